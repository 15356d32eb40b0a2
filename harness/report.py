"""Comparison tables from run records (pandas): Markdown and CSV.

- ``runs``: one row per run, every measured figure (CSV for analysis).
- ``summary``: one row per method; a column per task metric, the suite average, and the costs:
  trainable parameters (the method's own, and method + head as a share of the model), peak
  memory (largest over tasks), training throughput (mean over tasks), merge check.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

ABBREV = {"accuracy": "acc", "matthews": "mcc", "pearson": "pearson", "spearman": "spearman",
          "f1": "f1"}


def runs_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for r in records:
        thr, mem, par, mrg, host = (r.get(k) or {} for k in ("throughput", "memory", "params", "merge",
                                                               "host"))
        row = {
            "method": r["method"], "task": r["task"], "profile": r.get("profile"),
            "status": r.get("status"), "reason": r.get("reason"),
            "score": r.get("score"),
            "method_params": par.get("method"), "head_params": par.get("head"),
            "trainable_share": par.get("share"),
            "peak_mem_mib": mem["peak_bytes"] / 2**20 if "peak_bytes" in mem else None,
            "memory_kind": mem.get("kind"),
            "optimizer_state_mib": mem["optimizer_state_bytes"] / 2**20 if "optimizer_state_bytes" in mem else None,
            "samples_per_s": thr.get("samples_per_s"), "tokens_per_s": thr.get("tokens_per_s"),
            "step_time_ms": thr.get("step_time_ms"), "train_seconds": thr.get("train_seconds"),
            "wall_seconds": r.get("wall_seconds"),
            # Speed is comparable only between runs on equally quiet machines with equal threads.
            "torch_threads": host.get("torch_threads"),
            "load_avg_1m_end": host.get("load_avg_1m_end"),
            "mergeable": mrg.get("mergeable"), "merge_max_abs_diff": mrg.get("max_abs_diff"),
            "run_id": r.get("run_id"), "finished_at": r.get("finished_at"),
        }
        for k, v in (r.get("metrics") or {}).items():
            row[f"metric:{k}"] = v
        rows.append(row)
    df = pd.DataFrame(rows)
    if not df.empty:
        # The newest record of a (method, task, profile) wins: re-runs replace older ones.
        from tasks import TASKS  # registry order (GLUE's own order), then anything else

        known = list(TASKS) + [t for t in dict.fromkeys(df["task"]) if t not in TASKS]
        task_order = {t: i for i, t in enumerate(known)}
        df = (df.sort_values("finished_at", kind="stable")
              .drop_duplicates(["method", "task", "profile"], keep="last"))
        df = df.assign(_o=df["task"].map(task_order)).sort_values("_o", kind="stable")
        df = df.drop(columns="_o").reset_index(drop=True)
    return df


def _metric_label(task: str, metric: str) -> str:
    short = task.split("/", 1)[-1]
    base, _, suffix = metric.partition("_")
    return f"{short} {ABBREV.get(base, base)}" + (f" {suffix}" if suffix else "")


def summary_frame(df: pd.DataFrame, method_order: list[str] | None = None) -> pd.DataFrame:
    if df.empty:
        return df
    methods = method_order or list(dict.fromkeys(df["method"]))
    methods = [m for m in methods if m in set(df["method"])]
    metric_cols = [c for c in df.columns if c.startswith("metric:")]
    tasks = list(dict.fromkeys(df["task"]))
    table: dict[str, dict[str, Any]] = {m: {} for m in methods}
    columns: list[str] = []
    for task in tasks:
        sub = df[df["task"] == task]
        present = [c for c in metric_cols if sub[c].notna().any()]
        for c in present or [None]:
            label = _metric_label(task, c[7:]) if c else f"{task.split('/', 1)[-1]}"
            if label not in columns:
                columns.append(label)
            for m in methods:
                row = sub[sub["method"] == m]
                if row.empty:
                    continue
                row = row.iloc[0]
                if row["status"] not in ("ok", "merge_mismatch"):
                    table[m][label] = "failed"
                elif c is not None:
                    table[m][label] = round(float(row[c]) * 100, 2)
    out = pd.DataFrame.from_dict(table, orient="index", columns=columns)
    for m in methods:
        sub = df[(df["method"] == m) & df["status"].isin(["ok", "merge_mismatch"])]
        n_tasks = df[df["method"] == m]["task"].nunique()
        out.loc[m, "avg score"] = round(sub["score"].mean() * 100, 2) if len(sub) == n_tasks and len(sub) else None
        out.loc[m, "method params"] = _int(sub["method_params"].max())
        out.loc[m, "trainable %"] = round(sub["trainable_share"].mean() * 100, 3) if len(sub) else None
        out.loc[m, "peak mem MiB"] = round(sub["peak_mem_mib"].max(), 1) if len(sub) else None
        out.loc[m, "samples/s"] = round(sub["samples_per_s"].mean(), 1) if len(sub) else None
        out.loc[m, "tokens/s"] = round(sub["tokens_per_s"].mean(), 0) if len(sub) else None
        diffs = sub["merge_max_abs_diff"].dropna()
        mergeable = bool(sub["mergeable"].fillna(False).all()) if len(sub) else None
        text = f"{diffs.max():.1e}" if len(diffs) else ""
        if mergeable is False:  # said, not hidden: the table's reader compares like with like
            text = "not mergeable into weights" + (f" (cached: {text})" if text else "")
        out.loc[m, "merge max |diff|"] = text or None
        failed = int((~df[df["method"] == m]["status"].isin(["ok"])).sum())
        out.loc[m, "runs failed"] = failed
    out.index.name = "method"
    return out


def _int(x: Any) -> Any:
    return None if pd.isna(x) else int(x)


def to_markdown(df: pd.DataFrame) -> str:
    """Markdown for people: thousands separators, blanks for missing values."""
    if df.empty:
        return "(no runs)"
    shown = df.copy().astype(object)
    for col in shown.columns:
        shown[col] = [_fmt(v, col) for v in shown[col]]
    return shown.to_markdown(disable_numparse=True)


def _fmt(v: Any, col: str) -> str:
    if v is None or (isinstance(v, float) and pd.isna(v)):
        return ""
    if col in ("method params", "runs failed", "tokens/s") and isinstance(v, (int, float)):
        return f"{int(v):,}"
    if isinstance(v, float):
        return f"{v:g}" if abs(v) < 1e6 else f"{v:,.0f}"
    return str(v)


def failures(df: pd.DataFrame) -> list[str]:
    if df.empty:
        return []
    bad = df[df["status"] != "ok"]
    return [f"{r.method} on {r.task}: {r.status}: {r.reason}" for r in bad.itertuples()]


def write_reports(records: list[dict[str, Any]], out_dir: str | Path,
                  method_order: list[str] | None = None) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = runs_frame(records)
    summary = summary_frame(runs, method_order)
    paths = {"summary_md": out / "summary.md", "summary_csv": out / "summary.csv",
             "runs_csv": out / "runs.csv"}
    notes = "\n".join(f"- {f}" for f in failures(runs))
    paths["summary_md"].write_text(
        "# Results\n\nTask metrics in percent (dev split). method params: the method's own trainable "
        "parameters (task head excluded; a masked tensor counts only its unmasked entries); "
        "trainable %: method + head as a share of all parameters; "
        "peak mem: largest over tasks; samples/s, tokens/s: training throughput, mean over tasks.\n\n"
        + to_markdown(summary) + "\n" + (f"\nNot ok:\n{notes}\n" if notes else ""))
    summary.to_csv(paths["summary_csv"])
    runs.to_csv(paths["runs_csv"], index=False)
    return paths
