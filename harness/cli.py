"""``harness`` command line: run, report, list."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from harness.config import ConfigError, available_profiles, parse_overrides

EXIT_BAD_INPUT = 2
EXIT_RUN_FAILED = 1


def _err(msg: str) -> int:
    print(f"harness: error: {msg}", file=sys.stderr)
    return EXIT_BAD_INPUT


def cmd_run(args: argparse.Namespace) -> int:
    from harness.matrix import plan, run_matrix
    from harness.observers import quiet_libraries
    from harness.report import failures, runs_frame, summary_frame, to_markdown

    quiet_libraries()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        return _err("--methods is empty; e.g. --methods METHOD,METHOD (see `harness list methods`)")
    try:
        overrides = parse_overrides(args.set)
        p = plan(methods, args.task, args.profile, overrides, model=args.model, device=args.device,
                 data_dir=args.data_dir, output_dir=args.output_dir, save=args.save)
    except ConfigError as e:
        return _err(str(e))
    for task, why in p.skipped_tasks.items():
        print(f"skipped {task}: {why}", file=sys.stderr)
    if not p.cells:
        return _err(f"nothing to run for --task {args.task}: every task was skipped (reasons above)")
    t0 = time.perf_counter()
    records = run_matrix(p, isolate=not args.no_isolate, force=args.force,
                         progress=not args.no_progress, log=lambda m: print(m, file=sys.stderr))
    runs = runs_frame(records)
    print()
    print(f"profile {args.profile}, {len(records)} runs, {time.perf_counter() - t0:.0f} s "
          f"(records in {args.output_dir})")
    print(to_markdown(summary_frame(runs, methods)))
    bad = failures(runs)
    if p.skipped_tasks:
        print("\nSkipped tasks: " + ", ".join(f"{t} ({why.split('.')[0]})" for t, why in p.skipped_tasks.items()))
    if bad:
        print("\nNot ok:\n" + "\n".join(f"- {b}" for b in bad))
        return EXIT_RUN_FAILED
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from harness.records import read_records
    from harness.report import runs_frame, summary_frame, to_markdown, write_reports

    if not Path(args.output_dir).is_dir():
        return _err(f"no run records at {args.output_dir}; run `harness run` first or pass --output-dir")
    records, problems = read_records(args.output_dir)
    for p in problems:
        print(f"harness: warning: {p}", file=sys.stderr)
    if args.profile:
        records = [r for r in records if r.get("profile") == args.profile]
    paths = write_reports(records, args.report_dir or Path(args.output_dir).parent)
    print(to_markdown(summary_frame(runs_frame(records))))
    print("\n" + "\n".join(f"wrote {p}" for p in paths.values()))
    return 1 if problems else 0


def cmd_list(args: argparse.Namespace) -> int:
    if args.what == "methods":
        from harness.plugins import discover_methods

        for name, cls in sorted(discover_methods().items()):
            merge = "" if cls.mergeable else "  [not mergeable into weights]"
            print(f"{name:16s} {cls.summary}{merge}")
    elif args.what == "tasks":
        from tasks import TASKS, get_task

        for name in TASKS:
            why = get_task(name).availability(args.data_dir)
            print(f"{name:12s} {'available' if why is None else 'unavailable: ' + why}")
    else:
        for name in available_profiles():
            print(name)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from harness.export import ExportError, export_peft
    from harness.observers import quiet_libraries

    quiet_libraries()
    out = args.out or str(Path(args.run_dir) / "peft")
    try:
        path = export_peft(args.run_dir, out)
    except ExportError as e:
        return _err(str(e))
    print(f"wrote {path}/adapter_config.json and adapter_model.safetensors; load with "
          f"PeftModel.from_pretrained(base_model, {str(path)!r})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="harness", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train and evaluate a method x task matrix")
    run.add_argument("--methods", required=True, help="comma-separated method names (see `harness list methods`)")
    run.add_argument("--task", required=True, help="task or group, e.g. glue or glue/rte")
    run.add_argument("--profile", default="smoke", help=f"one of {', '.join(available_profiles())} or a YAML path")
    run.add_argument("--model", default=None, help="hub id, local directory or alias (default: the task's)")
    run.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a setting: lr=1e-3 (all methods) or METHOD.KEY=VALUE (one method)")
    run.add_argument("--data-dir", default=None, help="local data root (default: $HARNESS_DATA_DIR)")
    run.add_argument("--output-dir", default="results/runs", help="where run records go")
    run.add_argument("--save", action="store_true", help="also save each merged model (save_pretrained)")
    run.add_argument("--force", action="store_true", help="re-run finished runs")
    run.add_argument("--no-isolate", action="store_true", help="run in this process (debugging)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(func=cmd_run)

    rep = sub.add_parser("report", help="tables (Markdown, CSV) from run records")
    rep.add_argument("--output-dir", default="results/runs", help="where the run records are")
    rep.add_argument("--report-dir", default=None, help="where tables go (default: beside the records)")
    rep.add_argument("--profile", default=None, help="only runs of this profile")
    rep.set_defaults(func=cmd_report)

    ex = sub.add_parser("export", help="write a saved run's adapter in another library's format")
    ex.add_argument("run_dir", help="a run saved with --save: results/models/<run_id>")
    ex.add_argument("--format", choices=["peft"], default="peft")
    ex.add_argument("--out", default=None, help="output folder (default: RUN_DIR/peft)")
    ex.set_defaults(func=cmd_export)

    ls = sub.add_parser("list", help="list methods, tasks or profiles")
    ls.add_argument("what", choices=["methods", "tasks", "profiles"])
    ls.add_argument("--data-dir", default=None)
    ls.set_defaults(func=cmd_list)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
