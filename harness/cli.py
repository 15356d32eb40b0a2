"""``harness`` command line: run, report, compare, export, eval, list."""
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
        if args.memory_budget is not None:  # the same setting as --set memory_budget=SIZE
            overrides["memory_budget"] = None if args.memory_budget.lower() in ("none", "off") \
                else args.memory_budget
        seeds = _seeds(args.seeds)
        if args.processes < 1:
            raise ConfigError(f"--processes must be at least 1, got {args.processes}")
        if args.processes > 1:
            import importlib.util

            if importlib.util.find_spec("accelerate") is None:
                raise ConfigError("--processes N launches runs with accelerate: pip install -e '.[accelerate]'")
        p = plan(methods, args.task, args.profile, overrides, seeds=seeds, model=args.model,
                 device=args.device, data_dir=args.data_dir, output_dir=args.output_dir,
                 save=args.save, processes=args.processes)
        executor = _executor(args)
    except ConfigError as e:
        return _err(str(e))
    for task, why in p.skipped_tasks.items():
        print(f"skipped {task}: {why}", file=sys.stderr)
    if not p.cells:
        return _err(f"nothing to run for --task {args.task}: every task was skipped (reasons above)")
    t0 = time.perf_counter()
    try:
        records = run_matrix(p, force=args.force, executor=executor,
                             log=lambda m: print(m, file=sys.stderr, flush=True))
    except ConfigError as e:  # an executor that cannot start (Ray missing)
        return _err(str(e))
    runs = runs_frame(records)
    print()
    print(f"profile {args.profile}, {len(records)} runs, {time.perf_counter() - t0:.0f} s "
          f"(records in {args.output_dir})")
    print(to_markdown(summary_frame(runs, methods)))
    bad = failures(runs, does_not_fit=False)
    misfits = [f for f in failures(runs) if f not in bad]
    if p.skipped_tasks:
        print("\nSkipped tasks: " + ", ".join(f"{t} ({why.split('.')[0]})" for t, why in p.skipped_tasks.items()))
    if misfits:  # a measured result of the memory budget, not an error: the exit code stays 0
        print("\nDoes not fit the memory budget:\n" + "\n".join(f"- {b}" for b in misfits))
    if bad:
        print("\nNot ok:\n" + "\n".join(f"- {b}" for b in bad))
        return EXIT_RUN_FAILED
    return 0


def _seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds expects comma-separated integers, e.g. 0,1,2; got {text!r}") from None


def _executor(args: argparse.Namespace):
    from harness.executors import LocalExecutor, RayExecutor

    if args.executor == "ray":
        if args.no_isolate:
            raise ConfigError("--executor ray runs every run in its own process; drop --no-isolate")
        return RayExecutor(address=args.ray_address, workers=args.workers,
                           cpus_per_run=args.cpus_per_run, gpus_per_run=args.gpus_per_run)
    if args.ray_address or args.cpus_per_run is not None or args.gpus_per_run is not None:
        raise ConfigError("--ray-address, --cpus-per-run and --gpus-per-run go with --executor ray")
    if args.processes > 1 and args.no_isolate:
        raise ConfigError("--processes N launches each run's processes; it cannot be used with --no-isolate")
    workers = args.workers or 1
    return LocalExecutor(isolate=not args.no_isolate, progress=not args.no_progress and workers == 1,
                         workers=workers)


def cmd_report(args: argparse.Namespace) -> int:
    from harness.leaderboard import DEFAULT_REFERENCE, write_leaderboard
    from harness.records import read_records
    from harness.report import (multitask_frames, multitask_markdown, runs_frame, summary_frame,
                                to_markdown, write_reports)

    if not Path(args.output_dir).is_dir():
        return _err(f"no run records at {args.output_dir}; run `harness run` first or pass --output-dir")
    records, problems = read_records(args.output_dir)
    for p in problems:
        print(f"harness: warning: {p}", file=sys.stderr)
    if args.profile:
        records = [r for r in records if r.get("profile") == args.profile]
    singles: list[dict] = []
    for folder in args.single_task_dir or ():
        if not Path(folder).is_dir():
            return _err(f"--single-task-dir {folder}: no such folder")
        more, bad = read_records(folder)
        singles += more
        for p in bad:
            print(f"harness: warning: {p}", file=sys.stderr)
    report_dir = args.report_dir or Path(args.output_dir).parent
    paths = write_reports(records, report_dir, problems=problems, single_task_records=singles)
    paths.update(write_leaderboard(records, report_dir, problems, html_page=args.format == "html",
                                   reference=args.reference or DEFAULT_REFERENCE))
    runs = runs_frame(records)
    print(to_markdown(summary_frame(runs)))
    print(multitask_markdown(multitask_frames(runs, singles=runs_frame(singles))), end="")
    print("\n" + "\n".join(f"wrote {p}" for p in paths.values()))
    if problems:  # listed in the tables too; said again last, where it is seen
        print(f"harness: {len(problems)} unreadable record(s) in {args.output_dir} (listed above and "
              f"in the report); they are not in the tables", file=sys.stderr)
    return 1 if problems else 0


def cmd_compare(args: argparse.Namespace) -> int:
    from harness.compare import CompareError, compare, load_tolerances

    split = lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else None  # noqa: E731
    try:
        tol = load_tolerances(args.tolerances, reference=args.reference)
        result = compare(args.current, args.baseline, tol, tasks=split(args.tasks),
                         methods=split(args.methods), require_all=args.require_all)
    except CompareError as e:
        return _err(str(e))
    text = result.markdown()
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    return 0 if result.ok else EXIT_RUN_FAILED


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


def cmd_eval(args: argparse.Namespace) -> int:
    from harness.lm_eval_bridge import EvalError, evaluate, table, to_json
    from harness.observers import quiet_libraries

    quiet_libraries()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
        results = evaluate(args.model, tasks, include_path=args.include_path, limit=limit,
                           num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                           device=args.device, apply_chat_template=args.chat_template,
                           log_samples=args.log_samples)
    except EvalError as e:
        return _err(str(e))
    print(f"model {results['model_path']}")
    print(table(results))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(to_json(results))
        print(f"wrote {args.output}")
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
    run.add_argument("--memory-budget", default=None, metavar="SIZE",
                     help="training memory every run must fit (2GiB, 1500MiB, 2GB; 'none': no budget); "
                          "default: the profile's memory_budget. See harness/budget.py")
    run.add_argument("--save", action="store_true", help="also save each merged model (save_pretrained)")
    run.add_argument("--force", action="store_true", help="re-run finished runs")
    run.add_argument("--no-isolate", action="store_true", help="run in this process (debugging)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--seeds", default=None, metavar="S1,S2,...",
                     help="one run per seed (e.g. 0,1,2); tables show mean and standard deviation")
    run.add_argument("--executor", choices=["local", "ray"], default="local",
                     help="local: runs on this machine (see --workers); ray: each run a Ray task "
                          "(pip install '.[ray]'), on --ray-address or a local cluster started for "
                          "the command")
    run.add_argument("--workers", type=int, default=None, metavar="N",
                     help="local: N runs at a time, each in its own process (default 1); ray: CPUs "
                          "of the local cluster started for the command")
    run.add_argument("--ray-address", default=None,
                     help="Ray cluster to use (e.g. ray://head:10001 or auto); default: a local one")
    run.add_argument("--cpus-per-run", type=float, default=None,
                     help="ray: CPUs each run asks for (default: one per process of the run)")
    run.add_argument("--gpus-per-run", type=float, default=None,
                     help="ray: GPUs each run asks for (default: one per process when it uses CUDA)")
    run.add_argument("--processes", type=int, default=1, metavar="N",
                     help="train each run data-parallel in N processes (accelerate launch; one GPU "
                          "each, or CPU processes with gloo)")
    run.set_defaults(func=cmd_run)

    rep = sub.add_parser("report", help="tables (Markdown, CSV) from run records")
    rep.add_argument("--output-dir", default="results/runs", help="where the run records are")
    rep.add_argument("--report-dir", default=None, help="where tables go (default: beside the records)")
    rep.add_argument("--profile", default=None, help="only runs of this profile")
    rep.add_argument("--format", choices=["md", "html"], default="md",
                     help="md: Markdown and CSV tables (summary, runs, leaderboard); html: the same "
                          "and leaderboard.html, a self-contained page (sortable tables, Pareto plots, "
                          "every run's details)")
    rep.add_argument("--reference", default=None,
                     help="method whose step time the others' is divided by (default: "
                          "reference_method in harness/configs/compare.yaml)")
    rep.add_argument("--single-task-dir", action="append", metavar="DIR",
                     help="records of single-task runs kept elsewhere (repeatable): the multitask "
                          "tables show their figures beside the suite's run of the same method")
    rep.set_defaults(func=cmd_report)

    cmp = sub.add_parser("compare", help="regressions of a results folder against a baseline (exit 1 if any)")
    cmp.add_argument("current", help="folder of run records (or a report folder with them in runs/)")
    cmp.add_argument("--baseline", required=True, help="the baseline's records, e.g. results/smoke")
    cmp.add_argument("--tolerances", default=None,
                     help="YAML laid over harness/configs/compare.yaml (metric_drop_points, memory_rise, ...)")
    cmp.add_argument("--reference", default=None,
                     help="method for relative speed (default: the tolerances' reference_method)")
    cmp.add_argument("--tasks", default=None, help="only these tasks (comma-separated)")
    cmp.add_argument("--methods", default=None, help="only these methods (comma-separated)")
    cmp.add_argument("--require-all", action="store_true",
                     help="a baseline run (of the selected tasks/methods) missing from CURRENT is a regression")
    cmp.add_argument("--output", default=None, help="also write the comparison (Markdown) here")
    cmp.set_defaults(func=cmd_compare)

    ex = sub.add_parser("export", help="write a saved run's adapter in another library's format")
    ex.add_argument("run_dir", help="a run saved with --save: results/models/<run_id>")
    ex.add_argument("--format", choices=["peft"], default="peft")
    ex.add_argument("--out", default=None, help="output folder (default: RUN_DIR/peft)")
    ex.set_defaults(func=cmd_export)

    ev = sub.add_parser("eval", help="lm-evaluation-harness tasks on a saved model (pip install '.[eval]')")
    ev.add_argument("model", help="a saved model (results/models/<run_id>), its run record (.json), "
                                  "an alias such as smollm2, a model folder or a hub id")
    ev.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks or groups")
    ev.add_argument("--include-path", action="append", default=None, metavar="DIR",
                    help="a folder of task YAML files (repeatable); local data keeps it offline")
    ev.add_argument("--limit", type=float, default=None,
                    help="examples per task (a fraction below 1); for quick checks, not reporting")
    ev.add_argument("--num-fewshot", type=int, default=None)
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1")
    ev.add_argument("--chat-template", action="store_true", help="wrap prompts in the model's chat template")
    ev.add_argument("--output", default=None, help="also write lm-eval's complete results as JSON here")
    ev.add_argument("--log-samples", action="store_true",
                    help="keep every example's inputs and model answers in the --output JSON")
    ev.set_defaults(func=cmd_eval)

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
