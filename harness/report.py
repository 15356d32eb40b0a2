"""Comparison tables from run records (pandas): Markdown and CSV.

- ``runs``: one row per run, every measured figure (CSV for analysis).
- ``summary``: one row per method; a column per task metric, the suite average, and the costs:
  trainable parameters (the method's own, and method + head as a share of the model), peak
  memory (largest over tasks), training throughput (mean over tasks), merge check.

Seeds (``harness run --seeds 0,1,2``): ``runs`` keeps one row per seed; the summary, the
leaderboard and ``harness compare`` aggregate the seeds of a (method, task, profile)
(`aggregate_seeds`): the mean over the seeds that ran, its sample standard deviation ("mean ± sd",
`MeanSd`) and how many seeds.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pandas as pd

ABBREV = {"accuracy": "acc", "matthews": "mcc", "pearson": "pearson", "spearman": "spearman",
          "f1": "f1", "perplexity": "ppl"}
# Metrics not on a 0-1 scale: shown as they are, not in percent (and lower is better).
UNSCALED = {"loss", "perplexity"}


def unscaled(metric: str) -> bool:
    """Whether a metric key is one of ``UNSCALED``, however it is qualified: ``perplexity_1k``
    (a size), ``sst2/loss`` (a suite member), ``loss@before`` (the model before training)."""
    return metric.removesuffix(BEFORE).rpartition("/")[2].partition("_")[0] in UNSCALED


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
            # The memory budget (harness.budget): what was chosen to fit it.
            "budget_mib": mem["budget_bytes"] / 2**20 if mem.get("budget_bytes") else None,
            "micro_batch": mem.get("micro_batch"), "grad_accum": mem.get("grad_accum"),
            "checkpointing": mem.get("checkpointing"),
            "optimizer_state_mib": mem["optimizer_state_bytes"] / 2**20 if "optimizer_state_bytes" in mem else None,
            "samples_per_s": thr.get("samples_per_s"), "tokens_per_s": thr.get("tokens_per_s"),
            "step_time_ms": thr.get("step_time_ms"), "train_seconds": thr.get("train_seconds"),
            "wall_seconds": r.get("wall_seconds"),
            # Speed is comparable only between runs on equally quiet machines with equal threads.
            "torch_threads": host.get("torch_threads"),
            "load_avg_1m_end": host.get("load_avg_1m_end"),
            "mergeable": mrg.get("mergeable"), "merge_max_abs_diff": mrg.get("max_abs_diff"),
            "run_id": r.get("run_id"), "finished_at": r.get("finished_at"),
            "seed": ((r.get("config") or {}).get("train") or {}).get("seed"),
            "config_key": config_key(r.get("config")),
        }
        for k, v in (mem.get("breakdown") or {}).items():
            row[f"mem:{k}"] = v / 2**20
        for k, v in (r.get("metrics") or {}).items():
            row[f"metric:{k}"] = v
        for k, v in (r.get("metrics_before") or {}).items():  # tasks also evaluated before training
            row[f"metric:{k}{BEFORE}"] = v
        rows.append(row)
    df = pd.DataFrame(rows)
    if not df.empty:
        # The newest record of a (method, task, profile, seed) wins: re-runs replace older ones;
        # and the newest configuration of a (method, task, profile): its seeds are the runs kept.
        from tasks import TASKS  # registry order (GLUE's own order), then anything else

        known = list(TASKS) + [t for t in dict.fromkeys(df["task"]) if t not in TASKS]
        task_order = {t: i for i, t in enumerate(known)}
        key = ["method", "task", "profile"]
        df = (df.sort_values("finished_at", kind="stable", na_position="first")
              .drop_duplicates(key + ["seed"], keep="last"))
        newest = df.groupby(key, dropna=False, sort=False)["config_key"].transform("last")
        df = df[df["config_key"] == newest]
        df = df.assign(_o=df["task"].map(task_order)).sort_values("_o", kind="stable")
        df = df.drop(columns="_o").reset_index(drop=True)
    return df


BEFORE = "@before"  # metric-column suffix of ``metrics_before`` (the model before training)
GOOD = ("ok", "merge_mismatch")  # measured runs: a merge mismatch still trained and evaluated
# Settings that do not make two runs different experiments: where things go, and the seed.
_NOT_THE_EXPERIMENT = ("output_dir", "data_dir", "device", "save")


def config_key(config: dict[str, Any] | None) -> str:
    """A hash of a run's configuration without its seed (nor where it reads and writes): the
    runs of one experiment over several seeds share it."""
    if not isinstance(config, dict):
        return ""
    c = {k: v for k, v in config.items() if k not in _NOT_THE_EXPERIMENT}
    if isinstance(c.get("train"), dict):
        c["train"] = {k: v for k, v in c["train"].items() if k != "seed"}
    return hashlib.sha256(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:12]


class MeanSd(float):
    """A mean over seeds that shows its sample standard deviation: ``65.1 ± 1.23``; and, when not
    every seed was measured, how many were (``(2/3 seeds)``). Sorts and computes as its mean."""
    sd: float | None
    n: int
    of: int

    def __new__(cls, mean: float, sd: float | None, n: int, of: int | None = None) -> "MeanSd":
        v = super().__new__(cls, mean)
        v.sd, v.n, v.of = sd, n, of if of is not None else n
        return v

    def __str__(self) -> str:
        text = f"{float(self):g}"
        if self.sd is not None and self.n >= 2 and not pd.isna(self.sd):
            text += f" ± {self.sd:.2f}"
        if self.n < self.of:
            text += f" ({self.n}/{self.of} seeds)"
        return text

    def __format__(self, spec: str) -> str:
        return str(self) if not spec else float.__format__(self, spec)


def _sd(values: pd.Series) -> float | None:
    v = pd.to_numeric(values, errors="coerce").dropna()
    return float(v.std(ddof=1)) if len(v) >= 2 else None


def aggregate_seeds(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, task, profile) from `runs_frame`'s row per seed: numbers are means
    over the measured seeds (status ok or merge_mismatch; peak memory and budget: the largest),
    ``sd:<column>`` their sample standard deviation (score and metrics), ``seeds`` how many were
    measured, ``seeds_run`` how many ran, ``seed`` the seeds ("0,1,2"), ``run_ids`` every run.
    ``status`` is ok only when every seed is; otherwise the first other status, with each failed
    seed's reason. ``run_id`` is the first measured seed's (for its record). Already aggregated
    frames are returned as they are."""
    if df.empty or "seeds" in df.columns:
        return df
    key = ["method", "task", "profile"]
    numeric = [c for c in df.columns if c not in key and pd.api.types.is_numeric_dtype(df[c])
               and df[c].dtype != bool and c != "seed"]
    spread = ["score"] + [c for c in df.columns if c.startswith("metric:")]
    rows = []
    for _, sub in df.groupby(key, dropna=False, sort=False):
        good = sub[sub["status"].isin(GOOD)]
        base = (good if len(good) else sub).iloc[0].to_dict()
        pool = good if len(good) else sub
        for c in numeric:
            vals = pd.to_numeric(pool[c], errors="coerce")
            base[c] = vals.max() if c in ("peak_mem_mib", "budget_mib") else vals.mean()
        for c in spread:
            if c in sub.columns:
                base[f"sd:{c}"] = _sd(good[c])
        statuses = list(dict.fromkeys(sub["status"]))
        if statuses != ["ok"]:
            others = [st for st in statuses if st != "ok"]
            base["status"] = "failed" if "failed" in others else others[0]
            several = len(sub) > 1
            reasons = [f"seed {getattr(r, 'seed', '?')}: {r.reason}" if several else str(r.reason)
                       for r in sub.itertuples() if r.status != "ok" and r.reason is not None]
            base["reason"] = "; ".join(reasons) or base.get("reason")
        if "mergeable" in sub.columns and len(good):
            base["mergeable"] = bool(good["mergeable"].fillna(False).all()) if good["mergeable"].notna().any() else None
        base["seeds"] = len(good)
        base["seeds_run"] = len(sub)
        seeds = sub["seed"].dropna().unique() if "seed" in sub.columns else []
        base["seed"] = ",".join(str(x) for x in sorted(seeds))
        base["run_ids"] = ",".join(str(x) for x in sub.get("run_id", pd.Series(dtype=object)))
        base["finished_at"] = sub["finished_at"].dropna().max() if sub["finished_at"].notna().any() else None
        rows.append(base)
    return pd.DataFrame(rows).reset_index(drop=True)


def _value(row: Any, col: str, scale: float, nd: int = 2) -> Any:
    """A cell of an aggregated row: the mean (scaled, rounded), as `MeanSd` when seeds ran."""
    mean = round(float(row[col]) * scale, nd)
    if row.get("seeds_run", 1) <= 1:
        return mean
    sd = row.get(f"sd:{col}")
    return MeanSd(mean, None if sd is None or pd.isna(sd) else round(float(sd) * scale, nd),
                  int(row["seeds"]), int(row["seeds_run"]))


def _metric_label(task: str, metric: str) -> str:
    if metric.endswith(BEFORE):
        return _metric_label(task, metric[:-len(BEFORE)]) + " before"
    if "/" in metric:  # a suite member's metric "<member task>/<metric>": "multitask:sst2 acc"
        member, _, name = metric.rpartition("/")
        return f"{task.split('/', 1)[0]}:{_metric_label(member, name)}"
    short = task.split("/", 1)[-1]
    base, _, suffix = metric.partition("_")
    return f"{short} {ABBREV.get(base, base)}" + (f" {suffix.replace('_', ' ')}" if suffix else "")


_SIZE = re.compile(r"(?<![A-Za-z])(\d+(?:\.\d+)?)(k?)(?=_|@|$)")


def _ordered_metrics(cols: list[str]) -> list[str]:
    """Metric columns in reading order: as first seen, except that a metric measured at several
    sizes runs from small to large (records store keys alphabetically, which puts ``passkey_1k``
    before ``passkey_512``) and ``@before`` columns follow the trained model's."""
    def split(col: str) -> tuple[bool, str, float]:
        before = col.endswith(BEFORE)
        name = col.removesuffix(BEFORE)
        m = None
        for m in _SIZE.finditer(name):
            pass  # the last size token: "passkey_1k"
        if m is None:
            return before, name, 0.0
        size = float(m.group(1)) * (1024 if m.group(2) else 1)
        return before, name[:m.start()] + "#" + name[m.end():], size

    parts = [split(c) for c in cols]
    first = {}
    for before, stem, _ in parts:
        first.setdefault(stem, len(first))
    order = sorted(range(len(cols)), key=lambda i: (parts[i][0], first[parts[i][1]], parts[i][2]))
    return [cols[i] for i in order]


def summary_frame(df: pd.DataFrame, method_order: list[str] | None = None) -> pd.DataFrame:
    """One row per method (see the module's docstring); over several seeds, a metric's cell is its
    mean ± standard deviation (`MeanSd`), ``avg score`` the mean of the per-seed averages over
    tasks ± their standard deviation, and ``seeds`` how many seeds were measured."""
    if df.empty:
        return df
    raw, df = df, aggregate_seeds(df)
    methods = method_order or list(dict.fromkeys(df["method"]))
    methods = [m for m in methods if m in set(df["method"])]
    metric_cols = [c for c in df.columns if c.startswith("metric:")]
    tasks = list(dict.fromkeys(df["task"]))
    table: dict[str, dict[str, Any]] = {m: {} for m in methods}
    columns: list[str] = []
    for task in tasks:
        sub = df[df["task"] == task]
        present = _ordered_metrics([c for c in metric_cols if sub[c].notna().any()])
        for c in present or [None]:
            label = _metric_label(task, c[7:]) if c else f"{task.split('/', 1)[-1]}"
            if label not in columns:
                columns.append(label)
            for m in methods:
                row = sub[sub["method"] == m]
                if row.empty:
                    continue
                row = row.iloc[0]
                if row["seeds"] == 0 and row["status"] == DOES_NOT_FIT:
                    table[m][label] = "does not fit"
                elif row["seeds"] == 0:
                    table[m][label] = "failed"
                elif c is not None and pd.notna(row[c]):
                    scale = 1 if unscaled(c[7:]) else 100
                    table[m][label] = _value(row, c, scale)
    seeded = bool((df["seeds_run"] > 1).any())
    if seeded:  # cells keep their MeanSd (a float column would drop the spread)
        out = pd.DataFrame(index=methods, columns=columns + ["avg score"], dtype=object)
        for m, cells in table.items():
            for label, v in cells.items():
                out.at[m, label] = v
    else:
        out = pd.DataFrame.from_dict(table, orient="index", columns=columns)
    for m in methods:
        sub = df[(df["method"] == m) & (df["seeds"] > 0)]
        n_tasks = df[df["method"] == m]["task"].nunique()
        out.loc[m, "avg score"] = _avg_score(raw[raw["method"] == m], sub, n_tasks)
        if (df["seeds_run"] > 1).any():
            counts = sorted({int(x) for x in df[df["method"] == m]["seeds"]})
            out.loc[m, "seeds"] = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        out.loc[m, "method params"] = _int(sub["method_params"].max())
        out.loc[m, "trainable %"] = round(sub["trainable_share"].mean() * 100, 3) if len(sub) else None
        out.loc[m, "peak mem MiB"] = round(sub["peak_mem_mib"].max(), 1) if len(sub) else None
        if "budget_mib" in df.columns and df["budget_mib"].notna().any():
            _budget_columns(out, m, df[df["method"] == m], sub)
        out.loc[m, "samples/s"] = round(sub["samples_per_s"].mean(), 1) if len(sub) else None
        out.loc[m, "tokens/s"] = round(sub["tokens_per_s"].mean(), 0) if len(sub) else None
        diffs = sub["merge_max_abs_diff"].dropna()
        mergeable = bool(sub["mergeable"].fillna(False).all()) if len(sub) else None
        text = f"{diffs.max():.1e}" if len(diffs) else ""
        if mergeable is False:  # said, not hidden: the table's reader compares like with like
            # Such a method may still return an inference model (a cached prompt, a partial
            # merge); its check against the trained model is shown beside the verdict.
            text = "not mergeable into weights" + (f" (inference model: {text})" if text else "")
        out.loc[m, "merge max |diff|"] = text or None
        failed = int((~raw[raw["method"] == m]["status"].isin(["ok", DOES_NOT_FIT])).sum())
        out.loc[m, "runs failed"] = failed
    out.index.name = "method"
    return out


DOES_NOT_FIT = "does_not_fit"


def _avg_score(raw: pd.DataFrame, measured: pd.DataFrame, n_tasks: int) -> Any:
    """The mean over tasks of the task scores (blank unless every task was measured); over seeds,
    ± the standard deviation of the per-seed averages (seeds measured on every task)."""
    if not len(measured) or len(measured) != n_tasks:
        return None
    mean = round(float(measured["score"].mean()) * 100, 2)
    if int(measured["seeds_run"].max()) <= 1:
        return mean
    good = raw[raw["status"].isin(GOOD)]
    per_seed = [g["score"].mean() for _, g in good.groupby("seed") if g["task"].nunique() == n_tasks]
    sd = _sd(pd.Series(per_seed))
    return MeanSd(mean, None if sd is None else round(sd * 100, 2), int(measured["seeds"].min()),
                  int(measured["seeds_run"].max()))


def _budget_columns(out: pd.DataFrame, m: str, runs: pd.DataFrame, ok: pd.DataFrame) -> None:
    """Peak against budget, the micro-batch x accumulation chosen, checkpointing (harness.budget).
    A run that does not fit shows the memory it needed."""
    misfit = runs[runs["status"] == DOES_NOT_FIT]
    shown = ok
    if len(misfit) and not len(ok):
        need = misfit["peak_mem_mib"].max()
        out.loc[m, "peak mem MiB"] = f"{need:.1f} needed" if pd.notna(need) else "does not fit"
        shown = misfit
    budgets = runs["budget_mib"].dropna()
    out.loc[m, "budget MiB"] = round(float(budgets.max()), 1) if len(budgets) else None
    ratio = (shown["peak_mem_mib"] / shown["budget_mib"]).dropna()
    out.loc[m, "peak % of budget"] = round(float(ratio.max()) * 100, 1) if len(ratio) else None
    chosen = {(int(r.micro_batch), int(r.grad_accum)) for r in ok.itertuples()
              if pd.notna(r.micro_batch) and pd.notna(r.grad_accum)}
    out.loc[m, "micro-batch x accum"] = ", ".join(f"{b} x {a}" for b, a in sorted(chosen)) or None
    ck = ok["checkpointing"].dropna()
    out.loc[m, "checkpointing"] = ("yes" if ck.astype(bool).all() else "some") if ck.astype(bool).any() \
        else ("no" if len(ck) else None)


def memory_chart(df: pd.DataFrame, path: str | Path) -> Path | None:
    """`memory_chart_png` written to ``path``; None (nothing written) without a breakdown."""
    png = memory_chart_png(df)
    if png is None:
        return None
    path = Path(path)
    path.write_bytes(png)
    return path


def memory_chart_html(df: pd.DataFrame) -> str:
    """The chart as a self-contained HTML section (an inline PNG); empty without a breakdown."""
    import base64

    png = memory_chart_png(df)
    if png is None:
        return ""
    return ('<h2 id="memory">Memory at the peak</h2><p>Training tensor memory at its peak, by what it '
            'holds (harness/memory.py), against the memory budget (dashed).</p>'
            f'<img alt="memory breakdown per run" src="data:image/png;base64,'
            f'{base64.b64encode(png).decode()}">')


def memory_chart_png(df: pd.DataFrame) -> bytes | None:
    """Stacked bars of the peak-memory breakdown per run (method, and task when several), with
    the budget as a dashed line; PNG bytes (matplotlib). None when no record has a breakdown."""
    import io

    from harness.memory import CATEGORIES, LABELS

    cols = [f"mem:{c}" for c in CATEGORIES if f"mem:{c}" in df.columns]
    if df.empty or not cols:
        return None
    df = aggregate_seeds(df)  # one bar per method and task (means over seeds)
    rows = df[df[cols].notna().any(axis=1)]
    if rows.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    several = rows["task"].nunique() > 1
    labels = [f"{r.method}\n{r.task}" if several else r.method for r in rows.itertuples()]
    fig, ax = plt.subplots(figsize=(max(6.5, 1.1 * len(rows) + 4.0), 4.5))
    bottom = [0.0] * len(rows)
    top = float(rows[cols].fillna(0).sum(axis=1).max())
    for c in cols:
        values = rows[c].fillna(0).tolist()
        if max(values) < 0.005 * top:  # invisible at this scale (buffers, say): kept out of the legend
            continue
        ax.bar(labels, values, bottom=bottom, label=LABELS[c[4:]].split(" (")[0],
               color=f"C{CATEGORIES.index(c[4:])}")  # one colour per category, in every chart
        bottom = [b + v for b, v in zip(bottom, values)]
    for i, r in enumerate(rows.itertuples()):
        if r.status == DOES_NOT_FIT:
            ax.annotate("does not fit", (i, bottom[i]), ha="center", va="bottom", fontsize=8)
    budgets = rows["budget_mib"].dropna().unique() if "budget_mib" in rows else []
    for b in budgets:
        ax.axhline(b, color="black", linestyle="--", linewidth=1)
        ax.annotate(f"budget {b:.0f} MiB", (-0.45, b), ha="left", va="bottom", fontsize=8,
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
    ax.set_ylabel("MiB at the peak")
    ax.set_title("Training tensor memory at its peak", fontsize=11)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def multitask_frames(df: pd.DataFrame, method_order: list[str] | None = None,
                     singles: pd.DataFrame | None = None) -> dict[str, pd.DataFrame]:
    """Suites of several tasks (metrics keyed ``<member task>/<metric>``), one table each: per
    method a ``multitask`` row (the suite's run) and a ``single-task`` row (the same method's runs
    of the member tasks alone, same profile, from the same records or from ``singles``, records
    kept elsewhere), in percent; ``avg score`` is the mean of the member scores (blank while a
    single-task run is missing)."""
    out: dict[str, pd.DataFrame] = {}
    if df.empty:
        return out
    df = aggregate_seeds(df)  # over seeds: the means
    single_df = df if singles is None or singles.empty else \
        pd.concat([df, aggregate_seeds(singles)], ignore_index=True)
    good = single_df["seeds"] > 0
    for suite in dict.fromkeys(df["task"]):
        sub = df[df["task"] == suite]
        cols = [c for c in df.columns if c.startswith("metric:") and "/" in c and sub[c].notna().any()]
        if not cols:
            continue
        members = list(dict.fromkeys(c[7:].rpartition("/")[0] for c in cols))
        methods = [m for m in (method_order or list(dict.fromkeys(sub["method"]))) if m in set(sub["method"])]
        rows: list[dict[str, Any]] = []
        for m in methods:
            r = sub[sub["method"] == m].iloc[0]
            ok = r["seeds"] > 0
            row: dict[str, Any] = {"method": m, "setting": "multitask"}
            for c in cols:
                member, _, name = c[7:].rpartition("/")
                row[_metric_label(member, name)] = round(float(r[c]) * 100, 2) if ok else "failed"
            row["avg score"] = round(float(r["score"]) * 100, 2) if ok else None
            row["method params"] = _int(r["method_params"])
            row["trainable %"] = round(float(r["trainable_share"]) * 100, 3) if ok else None
            row["peak mem MiB"] = round(float(r["peak_mem_mib"]), 1) if ok else None
            rows.append(row)
            single: dict[str, Any] = {"method": m, "setting": "single-task"}
            scores, params, shares, mems = [], [], [], []
            for member in members:
                s = single_df[(single_df["task"] == member) & (single_df["method"] == m)
                              & (single_df["profile"] == r["profile"]) & good]
                if s.empty:
                    continue
                s = s.iloc[0]
                for c in cols:
                    of, _, name = c[7:].rpartition("/")
                    if of == member and pd.notna(s.get(f"metric:{name}")):
                        single[_metric_label(member, name)] = round(float(s[f"metric:{name}"]) * 100, 2)
                scores.append(float(s["score"]))
                params.append(s["method_params"])
                shares.append(s["trainable_share"])
                mems.append(s["peak_mem_mib"])
            if scores:
                single["avg score"] = round(sum(scores) / len(scores) * 100, 2) if len(scores) == len(members) else None
                # One model per task: parameters add up; memory is that of the largest run.
                single["method params"] = _int(sum(params))
                single["trainable %"] = round(float(sum(shares)) * 100, 3)
                single["peak mem MiB"] = round(float(max(mems)), 1)
                rows.append(single)
        out[suite] = pd.DataFrame(rows).set_index("method")
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
    if isinstance(v, MeanSd):
        return str(v)
    if isinstance(v, float):
        return f"{v:g}" if abs(v) < 1e6 else f"{v:,.0f}"
    return str(v)


def multitask_markdown(frames: dict[str, pd.DataFrame]) -> str:
    """The multitask tables under a heading each (empty when there are none)."""
    return "".join(
        f"\n## {suite}\n\nPer-task dev metrics in percent: the suite's run (one model for all tasks) "
        f"and the same method's single-task runs (one model per task: method params and trainable % "
        f"summed, peak memory of the largest).\n\n{to_markdown(frame)}\n"
        for suite, frame in frames.items())


def failures(df: pd.DataFrame, does_not_fit: bool = True) -> list[str]:
    """Runs that are not ok, with the reason; ``does_not_fit=False`` leaves out the runs that did
    not fit their memory budget (a measured result, not an error)."""
    if df.empty:
        return []
    bad = df[(df["status"] != "ok") & (does_not_fit | (df["status"] != DOES_NOT_FIT))]
    runs = df.groupby(["method", "task", "profile"], dropna=False)["status"].transform("size") \
        if "seed" in df.columns and "seeds" not in df.columns else pd.Series(1, index=df.index)
    return [f"{r.method} on {r.task}" + (f" (seed {r.seed})" if runs[r.Index] > 1 else "")
            + f": {r.status}: {r.reason}" for r in bad.itertuples()]


def write_reports(records: list[dict[str, Any]], out_dir: str | Path,
                  method_order: list[str] | None = None, problems: list[str] = (),
                  single_task_records: list[dict[str, Any]] = ()) -> dict[str, Path]:
    """``problems``: the records that could not be read (``<path>: <why>``), listed, not dropped;
    ``single_task_records``: runs kept elsewhere whose single-task figures the multitask tables
    show beside a suite's (they are in no other table)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = runs_frame(records)
    summary = summary_frame(runs, method_order)
    paths = {"summary_md": out / "summary.md", "summary_csv": out / "summary.csv",
             "runs_csv": out / "runs.csv"}
    multi = multitask_frames(runs, method_order, runs_frame(list(single_task_records)))
    notes = "\n".join(f"- {f}" for f in failures(runs))
    paths["summary_md"].write_text(
        "# Results\n\nTask metrics in percent (dev split; loss and perplexity as they are). "
        "method params: the method's own trainable parameters (task head excluded; a masked "
        "tensor counts only its unmasked entries); "
        "trainable %: method + head as a share of all parameters; "
        "peak mem: training tensor memory at its peak (harness/memory.py), largest over tasks; with a "
        "memory budget also the budget, the peak's share of it (for a run that does not fit: what it "
        "needed), the micro-batch x accumulation chosen to fit it and whether gradient checkpointing "
        "was needed (harness/budget.py; breakdown in memory.png); "
        "samples/s, tokens/s: training throughput, mean over tasks.\n\n"
        + to_markdown(summary) + "\n" + (f"\nNot ok:\n{notes}\n" if notes else "")
        + multitask_markdown(multi)
        + ("\n## Unreadable records\n\nNot in the tables above:\n" + "".join(f"\n- {p}" for p in problems) + "\n"
           if problems else ""))
    summary.to_csv(paths["summary_csv"])
    if multi:
        paths["multitask_csv"] = out / "multitask.csv"
        pd.concat({s: f.reset_index() for s, f in multi.items()}, names=["suite", "_"]) \
            .droplevel("_").to_csv(paths["multitask_csv"])
    runs.to_csv(paths["runs_csv"], index=False)
    chart = memory_chart(runs, out / "memory.png")
    if chart is not None:
        paths["memory_png"] = chart
    return paths
