"""Who runs a matrix's runs: this machine's processes, or a Ray cluster. No scheduler of our own.

Every executor runs the same code path for a run, `harness.matrix.run_cell`: a fresh
``python -m harness.worker`` process that trains, evaluates and writes the run's record into the
run's ``output_dir`` (atomically, under its run id). They differ only in where that happens:

- `LocalExecutor` (``--executor local``, the default): one run after another, or ``--workers N``
  at a time (N child processes, each run still in its own process; threads only wait for them).
- `RayExecutor` (``--executor ray``, ``pip install '.[ray]'``): each run is a Ray task that asks
  for its CPUs and GPUs (``--cpus-per-run``, ``--gpus-per-run``) and calls `run_cell` on the node
  Ray picks, on the cluster at ``--ray-address`` or on a local one started for the command (with
  ``--workers N`` CPUs when given) and stopped after it. The record comes back as the task's
  result and is written into the results folder here when the node's write is not visible here,
  so records land in the same folder either way; a shared filesystem is assumed for the data,
  the models and a run's artifacts (its ``<run_id>/`` folder and ``--save`` models stay where the
  node wrote them otherwise). Paths in the config are made absolute before the task is sent.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from harness.config import ConfigError, RunConfig
from harness.records import new_record, record_path, write_record

Job = tuple[int, RunConfig, str]  # (index in the plan, config, label for the log)


@dataclass
class LocalExecutor:
    isolate: bool = True
    progress: bool = True
    workers: int = 1

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        if self.workers > 1 and not self.isolate:
            raise ConfigError("--workers N runs each run in its own process; it cannot be used with --no-isolate")

    def run(self, jobs: list[Job], log: Callable[[str], Any]) -> Iterator[tuple[int, dict[str, Any]]]:
        from harness.matrix import run_cell

        if self.workers == 1:
            for i, config, label in jobs:
                log(f"{label} ...")
                yield i, run_cell(config, isolate=self.isolate, progress=self.progress)
            return
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            futures = {}
            for i, config, label in jobs:
                futures[pool.submit(_started, run_cell, log, label, config)] = i
            for fut in as_completed(futures):
                yield futures[fut], fut.result()


def _started(run_cell: Any, log: Callable[[str], Any], label: str, config: RunConfig) -> dict[str, Any]:
    log(f"{label} ...")
    record = run_cell(config, isolate=True, progress=False)  # bars of parallel runs would interleave
    log(f"{label}: {record['status']}")
    return record


# -- Ray ---------------------------------------------------------------------------------------

# Environment variables a Ray task's run needs as the driver has them (data and cache folders,
# offline switches, thread counts); sent in the task's runtime environment.
FORWARDED_ENV = ("HARNESS_", "HF_", "TRANSFORMERS_", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def ray_task(config: dict[str, Any]) -> dict[str, Any]:
    """What a Ray task runs: the run in its own worker process on the node, as locally."""
    from harness.matrix import run_cell

    return run_cell(RunConfig.from_dict(config), isolate=True, progress=False)


def _absolute(config: RunConfig) -> RunConfig:
    data_dir = config.data_dir or os.environ.get("HARNESS_DATA_DIR")
    return replace(config, output_dir=str(Path(config.output_dir).resolve()),
                   data_dir=str(Path(data_dir).resolve()) if data_dir else None)


@dataclass
class RayExecutor:
    address: str | None = None          # None: start a local cluster for this command
    workers: int | None = None          # CPUs of that local cluster (None: all)
    cpus_per_run: float | None = None   # None: one per data-parallel process
    gpus_per_run: float | None = None   # None: one per process when the run uses CUDA and there are GPUs

    def _resources(self, config: RunConfig, cluster_gpus: float) -> dict[str, float]:
        cpus = self.cpus_per_run if self.cpus_per_run is not None else float(max(1, config.processes))
        gpus = self.gpus_per_run
        if gpus is None:
            wants = config.device.startswith("cuda") or (config.device == "auto" and cluster_gpus > 0)
            gpus = float(max(1, config.processes)) if wants else 0.0
        return {"num_cpus": cpus, "num_gpus": gpus}

    def run(self, jobs: list[Job], log: Callable[[str], Any]) -> Iterator[tuple[int, dict[str, Any]]]:
        if not jobs:
            return
        try:
            import ray
        except ImportError:
            raise ConfigError("--executor ray needs Ray: pip install -c constraints.txt -e '.[ray]'") from None
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
        started = not ray.is_initialized()
        if started:
            kwargs: dict[str, Any] = {"address": self.address} if self.address else \
                {"num_cpus": self.workers, "include_dashboard": False}
            ray.init(**kwargs, runtime_env={"env_vars": env} if env else None,
                     logging_level="warning", configure_logging=True)
            where = self.address or f"a local Ray cluster ({ray.cluster_resources().get('CPU', 0):g} CPUs)"
            log(f"ray: running {len(jobs)} runs on {where}")
        try:
            gpus = float(ray.cluster_resources().get("GPU", 0))
            remote = ray.remote(ray_task)
            pending: dict[Any, tuple[int, RunConfig, str]] = {}
            for i, config, label in jobs:
                config = _absolute(config)
                res = self._resources(config, gpus)
                log(f"{label}: submitted ({res['num_cpus']:g} CPU, {res['num_gpus']:g} GPU)")
                ref = remote.options(max_retries=0, **res).remote(config.to_dict())
                pending[ref] = (i, config, label)
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    i, config, label = pending.pop(ref)
                    try:
                        record = ray.get(ref)
                    except Exception as e:  # the task itself died (node lost, worker killed)
                        record = new_record(config)
                        record.update(status="failed", reason=f"Ray task failed: {type(e).__name__}: "
                                      f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}")
                    if not record_path(config.output_dir, record["run_id"]).exists():
                        write_record(record, config.output_dir)  # a node without the shared folder
                    log(f"{label}: {record['status']}")
                    yield i, record
        finally:
            if started:
                ray.shutdown()
