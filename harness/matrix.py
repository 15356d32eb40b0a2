"""The method x task x seed matrix: resolve every cell, skip finished ones, run the rest in isolation.

Each run executes in a fresh Python process (``python -m harness.worker``) unless ``isolate`` is
off: its peak-memory figure then belongs to it alone, and a crash, an out-of-memory kill or a
hard abort in one run is recorded as that run's failure while the matrix goes on. Which process
runs it is the executor's choice (`harness.executors`: one after another, N at a time, or Ray
tasks); every run writes its record the same way, under its run id.

Resume: a run's id is a hash of its whole configuration (seed included, `RunConfig.run_id`), its
record is written once, atomically (`harness.records.write_record`), and a run already recorded
as finished is skipped, so the same command restarted after a ``kill -9`` runs only what is left.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.config import TRAIN_KEYS, ConfigError, RunConfig, TrainConfig, load_profile, resolve
from harness.plugins import UnknownMethodError, discover_methods
from harness.records import finished, new_record, read_record, record_path, write_record
from harness.worker import PARENT_ENV


@dataclass
class Cell:
    method: str
    task: str
    config: RunConfig | None = None
    error: str | None = None
    seed: int | None = None               # --seeds: this cell's seed (None: the configured one)

    @property
    def label(self) -> str:
        return f"{self.method} on {self.task}" + (f" (seed {self.seed})" if self.seed is not None else "")


@dataclass
class MatrixPlan:
    cells: list[Cell] = field(default_factory=list)
    skipped_tasks: dict[str, str] = field(default_factory=dict)   # task -> why
    defaults: dict[str, Any] = field(default_factory=dict)        # RunConfig fields of every cell


def plan(methods: list[str], task_spec: str, profile: str, overrides: dict[str, Any],
         seeds: list[int] | None = None, **run_kwargs: Any) -> MatrixPlan:
    """Expand the task spec, check data availability, resolve each (method, task, seed) config.
    ``seeds``: one run per seed (the training setting ``seed``: initialisation, data order and the
    training subset's draw); None: the configured seed only."""
    if seeds is not None:
        if not seeds:
            raise ConfigError("--seeds is empty; e.g. --seeds 0,1,2")
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"--seeds repeats a seed: {','.join(map(str, seeds))}")
        clash = [k for k in overrides if k == "seed" or k.endswith(".seed")]
        if clash:
            raise ConfigError(f"--seeds and --set {clash[0]}=... both set the seed; use one")
    from tasks import TASKS, UnknownTaskError, expand, get_task

    load_profile(profile)  # a bad profile is a command-line error, not a failed run per cell
    known = discover_methods()
    out = MatrixPlan(defaults={"profile": profile, **run_kwargs})
    task_names: list[str] = []
    for item in (s.strip() for s in task_spec.split(",") if s.strip()):
        try:
            names = expand(item)
        except UnknownTaskError as e:
            out.skipped_tasks[item] = str(e)
            continue
        for name in names:
            why = get_task(name).availability(run_kwargs.get("data_dir"))
            # A task asked for by name runs (and fails with the data error); a group skips it.
            if why is not None and item != name:
                out.skipped_tasks[name] = why
            elif name not in task_names:
                task_names.append(name)
    for key in (k for k in overrides if "." not in k):
        if key not in TRAIN_KEYS and not any(key in known[m].defaults for m in methods if m in known) \
                and not any(key in TASKS[t].options for t in task_names):
            raise ConfigError(f"--set {key}: not a training setting, a hyperparameter of "
                              f"{', '.join(methods)} nor an option of {', '.join(task_names)}")
    for task in task_names:
        for method in methods:
            for seed in seeds if seeds is not None else [None]:
                cell = Cell(method, task, seed=seed)
                cell_overrides = overrides if seed is None else {**overrides, "seed": seed}
                if method not in known:
                    cell.error = str(UnknownMethodError(
                        f"unknown method {method!r}; available: {', '.join(sorted(known))}"))
                else:
                    try:
                        cell.config = resolve(method, task, known[method].defaults, profile,
                                              cell_overrides, **run_kwargs)
                    except ConfigError as e:
                        cell.error = f"ConfigError: {e}"
                out.cells.append(cell)
    assert all(t in TASKS for t in task_names)
    return out


def failed_record(cell: Cell, reason: str, defaults: dict[str, Any]) -> dict[str, Any]:
    train = TrainConfig() if cell.seed is None else TrainConfig(seed=cell.seed)
    config = cell.config or RunConfig(method=cell.method, task=cell.task, train=train, **defaults)
    record = new_record(config)
    record.update(status="failed", reason=reason)
    return record


def run_cell(config: RunConfig, isolate: bool = True, progress: bool = True) -> dict[str, Any]:
    if not isolate:
        from harness.observers import default_observers
        from harness.run import run_and_record

        return run_and_record(config, default_observers(progress))
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(config.to_dict(), f)
    path = record_path(config.output_dir, config.run_id())
    path.unlink(missing_ok=True)  # a stale failed record must not stand in for this attempt
    cmd = [sys.executable, "-m", "harness.worker", f.name] + ([] if progress else ["--no-progress"])
    # The worker dies with this process (harness.worker.die_with_parent): no orphan after kill -9.
    env = {**os.environ, PARENT_ENV: str(os.getpid())}
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=env)
    Path(f.name).unlink(missing_ok=True)  # the worker removes it; not if it died first
    try:
        record = read_record(path)
        if record.get("status") != "running":
            return record  # the worker recorded its own outcome, failures included
    except Exception:
        pass
    record = new_record(config)
    record.update(status="failed", reason=f"worker process died ({_death(proc.returncode)}); "
                  f"rerun with --no-isolate to see the error")
    write_record(record, config.output_dir)
    return record


def _death(returncode: int) -> str:
    if returncode >= 0:
        return f"exit code {returncode} without a record: a crash in native code?"
    sig = -returncode
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    hint = {signal.SIGKILL: ": often the out-of-memory killer", signal.SIGTERM: ": stopped from outside",
            signal.SIGSEGV: ": a crash in native code"}.get(sig, "")
    return f"killed by {name}{hint}"


def run_matrix(p: MatrixPlan, isolate: bool = True, force: bool = False, progress: bool = True,
               log=print, executor: Any = None) -> list[dict[str, Any]]:
    """Every cell's record, in the plan's order: finished runs as recorded (skipped), the others
    run by ``executor`` (`harness.executors`; default: one after another in this process's
    children)."""
    from harness.executors import LocalExecutor

    executor = executor or LocalExecutor(isolate=isolate, progress=progress)
    records: list[dict[str, Any] | None] = [None] * len(p.cells)
    todo = []
    first: dict[str, int] = {}            # run id -> the cell that runs it
    same: list[tuple[int, int]] = []      # (cell, cell whose record it shares)
    n = len(p.cells)
    for i, cell in enumerate(p.cells):
        label = f"[{i + 1}/{n}] {cell.label}"
        if cell.error is not None:
            record = failed_record(cell, cell.error, p.defaults)
            write_record(record, record["config"]["output_dir"])
            log(f"{label}: failed: {cell.error}")
            records[i] = record
            continue
        done = None if force else finished(cell.config.output_dir, cell.config.run_id())
        if done is not None:
            log(f"{label}: already done ({done['run_id']}), skipped")
            records[i] = done
            continue
        rid = cell.config.run_id()
        if rid in first:  # the same run asked for twice (a method named twice): run once
            same.append((i, first[rid]))
            continue
        first[rid] = i
        todo.append((i, cell.config, label))
    for i, record in executor.run(todo, log):
        label = next(lab for j, _, lab in todo if j == i)
        if record["status"] != "ok":
            log(f"{label}: {record['status']}: {record.get('reason')}")
        records[i] = record
    for i, j in same:
        records[i] = records[j]
    return [r for r in records if r is not None]
