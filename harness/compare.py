"""Regression tracking: compare a results folder with a baseline, run by run.

``harness compare CURRENT --baseline BASELINE`` pairs the runs of the two folders by method, task
and profile (the newest record of each, as the report does; over several seeds, the means of its
seeds, `harness.report.aggregate_seeds`, ok only when every seed is) and checks, per pair, with the
tolerances of ``harness/configs/compare.yaml`` (or ``--tolerances FILE``):

- status: a baseline run that was ok must still be ok (a merge mismatch counts as not ok);
- metrics: none falls by more than ``metric_drop_points`` (percentage points; lower-is-better
  metrics such as loss and perplexity: rises by more than ``lower_better_rise``, relative);
- peak memory: rises by no more than ``memory_rise`` (relative) or ``memory_rise_mib``;
- relative speed: the reference method's step time over the run's own, both from the same folder
  (so the machine's speed cancels out), falls by no more than ``speed_drop``; not compared when
  the machine was busy during either run or its reference (1-minute load average above
  ``busy_load_per_cpu`` x CPUs at the start or end, from the records' host figures), as speed
  from a shared machine says nothing about the code; nor when the run's torch thread count
  differs from the baseline run's.

Unreadable records in either folder are errors too. A folder is either the records themselves or
a report folder that holds them in ``runs/`` (``results/smoke``).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from harness.config import CONFIG_DIR
from harness.leaderboard import DEFAULT_REFERENCE, GOOD, _num, relative_step_time
from harness.records import read_records
from harness.report import _metric_label, aggregate_seeds, runs_frame, to_markdown, unscaled

DEFAULT_TOLERANCES = CONFIG_DIR / "compare.yaml"
TOLERANCE_KEYS = ("metric_drop_points", "lower_better_rise", "memory_rise", "memory_rise_mib",
                  "speed_drop", "busy_load_per_cpu")


class CompareError(ValueError):
    """Bad input: a folder without records, an unreadable tolerance file, nothing to compare."""


@dataclass
class Tolerances:
    reference_method: str = DEFAULT_REFERENCE
    metric_drop_points: float = 12.0
    lower_better_rise: float = 0.10
    memory_rise: float = 0.25
    memory_rise_mib: float = 64.0
    speed_drop: float = 0.5
    busy_load_per_cpu: float = 1.5
    rules: list[dict[str, Any]] = field(default_factory=list)

    def for_run(self, method: str, task: str) -> dict[str, float]:
        out = {k: float(getattr(self, k)) for k in TOLERANCE_KEYS}
        for rule in self.rules:
            if fnmatch.fnmatchcase(method, str(rule.get("method", "*"))) and \
                    fnmatch.fnmatchcase(task, str(rule.get("task", "*"))):
                out.update({k: float(v) for k, v in rule.items() if k in TOLERANCE_KEYS})
        return out


def _check_tolerances(data: dict[str, Any], where: str) -> None:
    allowed = {"reference_method", "rules", *TOLERANCE_KEYS}
    for k, v in data.items():
        if k not in allowed:
            raise CompareError(f"{where}: unknown key {k!r} (allowed: {', '.join(sorted(allowed))})")
        if k in TOLERANCE_KEYS and (not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0):
            raise CompareError(f"{where}: {k} must be a non-negative number, got {v!r}")
    for i, rule in enumerate(data.get("rules") or []):
        if not isinstance(rule, dict):
            raise CompareError(f"{where}: rules[{i}] must be a mapping")
        for k, v in rule.items():
            if k not in ("method", "task", *TOLERANCE_KEYS):
                raise CompareError(f"{where}: rules[{i}]: unknown key {k!r}")
            if k in TOLERANCE_KEYS and (not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0):
                raise CompareError(f"{where}: rules[{i}].{k} must be a non-negative number, got {v!r}")


def load_tolerances(path: str | Path | None = None, reference: str | None = None) -> Tolerances:
    """The defaults file, with ``path`` laid over it (its rules come after the defaults' rules)."""
    merged: dict[str, Any] = {}
    rules: list[dict[str, Any]] = []
    for p in [DEFAULT_TOLERANCES] + ([Path(path)] if path else []):
        try:
            data = yaml.safe_load(Path(p).read_text()) or {}
        except OSError as e:
            raise CompareError(f"cannot read tolerances {p}: {e}") from e
        except yaml.YAMLError as e:
            raise CompareError(f"{p}: not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise CompareError(f"{p}: expected a mapping of tolerances")
        _check_tolerances(data, str(p))
        rules += list(data.pop("rules", None) or [])
        merged.update(data)
    tol = Tolerances(**merged, rules=rules)
    if reference:
        tol.reference_method = reference
    return tol


def records_dir(path: str | Path) -> Path:
    """A folder of records, or a report folder with its records in ``runs/``."""
    p = Path(path)
    if not p.is_dir():
        raise CompareError(f"{p}: no such folder of run records")
    if not any(p.glob("*.json")) and (p / "runs").is_dir():
        p = p / "runs"
    if not any(q for q in p.glob("*.json") if not q.name.startswith(".tmp-")):
        raise CompareError(f"{p}: no run records (*.json) here or in {p}/runs")
    return p


def _load(path: str | Path, tasks: list[str] | None, methods: list[str] | None, reference: str
          ) -> tuple[pd.DataFrame, dict[str, dict[str, Any]], list[str], Path]:
    folder = records_dir(path)
    records, problems = read_records(folder)
    runs = aggregate_seeds(runs_frame(records))  # one row per method, task and profile
    if not runs.empty:
        runs = runs.assign(rel_step=relative_step_time(runs, reference))
        if tasks:
            runs = runs[runs["task"].isin(tasks)]
        if methods:
            runs = runs[runs["method"].isin(methods)]
    by_id = {r["run_id"]: r for r in records}
    return runs, by_id, problems, folder


_IGNORED_CONFIG = {"output_dir", "data_dir", "device", "save"}


def config_changes(base: dict[str, Any], cur: dict[str, Any]) -> list[str]:
    """Settings that differ between two runs' configs (where results go excluded)."""
    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix: d}
        out: dict[str, Any] = {}
        for k, v in d.items():
            if not prefix and k in _IGNORED_CONFIG:
                continue
            out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out

    a, b = flat(base or {}), flat(cur or {})
    return [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _lower_better(metric: str) -> bool:
    return unscaled(metric)


@dataclass
class Comparison:
    rows: list[dict[str, Any]]                 # one per compared (method, task, profile)
    regressions: list[str]                     # why the comparison fails, one line each
    notes: list[str]                           # what changed without failing
    problems: list[str]                        # unreadable records
    baseline_dir: Path | None = None
    current_dir: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.regressions and not self.problems

    def markdown(self) -> str:
        table = pd.DataFrame(self.rows).set_index("method") if self.rows else pd.DataFrame()
        text = [f"Comparing {self.current_dir} with the baseline {self.baseline_dir}:", "",
                to_markdown(table) if not table.empty else "(nothing compared)"]
        if self.notes:
            text += ["", "Notes:"] + [f"- {n}" for n in self.notes]
        if self.problems:
            text += ["", "Unreadable records:"] + [f"- {p}" for p in self.problems]
        if self.regressions:
            text += ["", f"REGRESSIONS ({len(self.regressions)}):"] + [f"- {r}" for r in self.regressions]
        else:
            text += ["", "No regressions." if not self.problems else "No regressions among the readable records."]
        return "\n".join(text)


def compare(current: str | Path, baseline: str | Path, tolerances: Tolerances | None = None,
            tasks: list[str] | None = None, methods: list[str] | None = None,
            require_all: bool = False) -> Comparison:
    tol = tolerances or load_tolerances()
    ref = tol.reference_method
    base, base_recs, base_problems, bdir = _load(baseline, tasks, methods, ref)
    cur, cur_recs, cur_problems, cdir = _load(current, tasks, methods, ref)
    problems = [f"baseline {p}" for p in base_problems] + [f"current {p}" for p in cur_problems]
    if base.empty:
        raise CompareError(f"the baseline {bdir} has no runs" + (" of the selected tasks/methods" if tasks or methods else ""))
    if cur.empty:
        raise CompareError(f"{cdir} has no runs" + (" of the selected tasks/methods" if tasks or methods else ""))
    key = ["method", "task", "profile"]
    cur_idx = {tuple(r[k] for k in key): r for _, r in cur.iterrows()}
    base_keys = {tuple(r[k] for k in key) for _, r in base.iterrows()}
    rows, regressions, notes, busy_notes = [], [], [], []
    base_ref, cur_ref = _ref_ids(base, ref), _ref_ids(cur, ref)
    for _, b in base.iterrows():
        k = tuple(b[x] for x in key)
        label = f"{b['method']} on {b['task']}" + (f" ({b['profile']})" if b["profile"] != "smoke" else "")
        c = cur_idx.get(k)
        if c is None:
            (regressions if require_all else notes).append(f"{label}: in the baseline, not in the current results")
            continue
        t = tol.for_run(str(b["method"]), str(b["task"]))
        why: list[str] = []
        row: dict[str, Any] = {"method": b["method"], "task": b["task"]}
        b_ok, c_ok = b["status"] in GOOD, c["status"] in GOOD
        row["status"] = b["status"] if b["status"] == c["status"] else f"{b['status']} -> {c['status']}"
        if b["status"] == "ok" and c["status"] != "ok":
            why.append(f"status ok -> {c['status']}" + (f" ({c['reason']})" if c.get("reason") else ""))
        elif b["status"] != "ok" and c["status"] == "ok":
            notes.append(f"{label}: now ok (baseline: {b['status']}: {b.get('reason')})")
        elif not b_ok:
            notes.append(f"{label}: not ok in the baseline ({b['status']}); nothing else compared")
        changes = config_changes(base_recs.get(b["run_id"], {}).get("config"),
                                 cur_recs.get(c["run_id"], {}).get("config"))
        if b["seeds_run"] > 1 or c["seeds_run"] > 1:  # means of seeds: compared as such
            changes = [x for x in changes if not x.startswith("train.seed ")]
            row["seeds"] = f"{b['seeds']} -> {c['seeds']}"
            if str(b["seed"]) != str(c["seed"]):
                changes.append(f"seeds {b['seed']} -> {c['seed']}")
        if changes:
            notes.append(f"{label}: config differs from the baseline's: " + "; ".join(changes))
        score_b, score_c = _num(b["score"]), _num(c["score"])
        row["score"] = _pair(score_b, score_c, 100) if b_ok else ""
        if b_ok and c_ok:
            # metrics
            for col in (x for x in base.columns if x.startswith("metric:")):
                name = col[7:]
                vb = _num(b[col])
                if vb is None:
                    continue
                vc = _num(c.get(col)) if col in cur.columns else None
                mlabel = _metric_label(str(b["task"]), name)
                if vc is None:
                    why.append(f"{mlabel}: missing (baseline {vb:.4g})")
                elif _lower_better(name):
                    rise = (vc - vb) / abs(vb) if vb else float("inf") if vc > vb else 0.0
                    if rise > t["lower_better_rise"]:
                        why.append(f"{mlabel} rose {vb:.4g} -> {vc:.4g} (+{rise:.0%}; tolerance "
                                   f"+{t['lower_better_rise']:.0%})")
                else:
                    drop = (vb - vc) * 100
                    if drop > t["metric_drop_points"] + 1e-9:
                        why.append(f"{mlabel} fell {vb * 100:.2f} -> {vc * 100:.2f} ({-drop:+.2f} points; "
                                   f"tolerance {t['metric_drop_points']:g})")
            # memory
            mb, mc = _num(b["peak_mem_mib"]), _num(c["peak_mem_mib"])
            row["peak MiB"] = _pair(mb, mc, 1, pct=True)
            if mb and mc is not None:
                if b.get("memory_kind") != c.get("memory_kind"):
                    notes.append(f"{label}: memory measured differently ({b.get('memory_kind')} vs "
                                 f"{c.get('memory_kind')}); not compared")
                elif mc > mb * (1 + t["memory_rise"]) and mc - mb > t["memory_rise_mib"]:
                    why.append(f"peak memory rose {mb:.0f} -> {mc:.0f} MiB (+{mc / mb - 1:.0%}; tolerance "
                               f"+{t['memory_rise']:.0%} and {t['memory_rise_mib']:g} MiB)")
            # relative speed: speed relative to the reference = reference step time / own step time
            rb, rc = _num(b["rel_step"]), _num(c["rel_step"])
            busy = [f"{side} {m}: {why_busy}" for side, idx, recs, run in
                    (("baseline", base_ref, base_recs, b), ("current", cur_ref, cur_recs, c))
                    for m, rid in ((run["method"], run["run_id"]), (ref, idx.get((run["task"], run["profile"]))))
                    if (why_busy := _busy(recs.get(rid), t["busy_load_per_cpu"]))]
            tb, tc = (((recs.get(run["run_id"]) or {}).get("host") or {}).get("torch_threads")
                      for recs, run in ((base_recs, b), (cur_recs, c)))
            if tb and tc and tb != tc:  # methods scale differently with threads: not comparable
                busy.append(f"torch threads {tb} in the baseline, {tc} now")
            if b["method"] == ref:
                row[f"speed vs {ref}"] = "reference"
            elif rb and rc and busy:
                row[f"speed vs {ref}"] = f"{1 / rb:.2f} -> {1 / rc:.2f} (not compared)"
                busy_notes.append(f"{label}: " + "; ".join(dict.fromkeys(busy)))
            elif rb and rc:
                change = rb / rc  # current relative speed over the baseline's
                row[f"speed vs {ref}"] = f"{1 / rb:.2f} -> {1 / rc:.2f} ({change - 1:+.0%})"
                if change < 1 - t["speed_drop"]:
                    why.append(f"relative speed vs {ref} fell {1 / rb:.2f}x -> {1 / rc:.2f}x "
                               f"({change - 1:+.0%}; tolerance -{t['speed_drop']:.0%})")
            else:
                row[f"speed vs {ref}"] = f"({ref} missing)"
        row["verdict"] = "REGRESSION" if why else "ok"
        rows.append(row)
        regressions += [f"{label}: {w}" for w in why]
    if busy_notes:
        notes.append(f"relative speed not compared where the machine was busy (1-minute load average "
                     f"above {tol.busy_load_per_cpu:g} x CPUs while the run or its {ref} reference ran) "
                     f"or the thread count changed: " + " | ".join(busy_notes))
    for k, c in cur_idx.items():
        if k not in base_keys:
            notes.append(f"{c['method']} on {c['task']}: new (not in the baseline)")
    if not rows:
        raise CompareError(f"no run of {cdir} matches a baseline run of {bdir} (same method, task "
                           f"and profile)")
    return Comparison(rows, regressions, notes, problems, bdir, cdir)


def _ref_ids(runs: pd.DataFrame, ref: str) -> dict[tuple[str, str], str]:
    sub = runs[(runs["method"] == ref) & runs["status"].isin(GOOD)]
    return {(r["task"], r["profile"]): r["run_id"] for _, r in sub.iterrows()}


def _busy(record: dict[str, Any] | None, per_cpu: float) -> str | None:
    """Why a run's speed is not to be trusted (a busy machine), or None. Records without load
    figures (older ones) count as quiet; ``per_cpu`` 0 turns the check off."""
    host = (record or {}).get("host") or {}
    cpus = host.get("cpus")
    loads = [x for x in (host.get("load_avg_1m_start"), host.get("load_avg_1m_end")) if _num(x) is not None]
    if not per_cpu or not cpus or not loads or max(loads) <= per_cpu * cpus:
        return None
    return f"load {max(loads):g} on {cpus} CPUs"


def _pair(b: float | None, c: float | None, scale: float, pct: bool = False) -> str:
    if b is None or c is None:
        return "" if b is None else f"{b * scale:.2f} -> -"
    d = (c - b) * scale
    tail = f"{c / b - 1:+.0%}" if pct and b else f"{d:+.2f}"
    return f"{b * scale:.2f} -> {c * scale:.2f} ({tail})" if not pct else f"{b:.0f} -> {c:.0f} ({tail})"
