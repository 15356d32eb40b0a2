"""Run records for the report and compare tests: synthetic ones (schema version 1) where a real run
is not the point, and a real smoke matrix made once per session where it is."""
from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from harness.records import SCHEMA_VERSION


def fake_record(method: str, task: str = "glue/sst2", acc: float | dict[str, float] = 0.8,
                peak_mib: float = 1000.0, step_ms: float = 100.0, status: str = "ok",
                profile: str = "smoke", params: int = 10_000, lr: float = 5e-3,
                finished_at: str = "2026-01-01T00:00:00+00:00", **extra: Any) -> dict[str, Any]:
    metrics = acc if isinstance(acc, dict) else {"accuracy": acc}
    run_id = f"{task.replace('/', '-')}__{method}__{hashlib.sha256(repr((method, task, profile, lr)).encode()).hexdigest()[:10]}"
    rec: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "run_id": run_id, "method": method, "task": task,
        "profile": profile, "model": None, "status": status,
        "config": {"method": method, "task": task, "profile": profile, "model": None,
                   "train": {"lr": lr, "seed": 42, "batch_size": 16}, "method_params": {"r": 8},
                   "output_dir": "/somewhere/runs", "device": "auto", "save": False, "data_dir": None},
        "versions": {"python": "3.11.7", "torch": "2.13.0+cpu", "transformers": "5.23.0"},
        "git_commit": "0123456789abcdef", "host": {"cpus": 2, "torch_threads": 2},
        "started_at": "2026-01-01T00:00:00+00:00", "finished_at": finished_at,
    }
    if status == "ok":
        rec.update({
            "metrics": metrics, "score": sum(metrics.values()) / len(metrics),
            "params": {"method": params, "head": 770, "total": 22_787_714, "trainable": params + 770,
                       "share": (params + 770) / 22_787_714},
            "memory": {"kind": "cpu_peak_rss", "peak_bytes": int(peak_mib * 2**20),
                       "optimizer_state_bytes": 8 * params},
            "throughput": {"samples": 512, "samples_per_s": 16000 / step_ms, "tokens_per_s": 200000 / step_ms,
                           "step_time_ms": step_ms, "steps": 32, "train_seconds": step_ms * 32 / 1000},
            "merge": {"mergeable": True, "max_abs_diff": 1e-6, "ok": True},
            "wall_seconds": 30.0,
        })
    else:
        rec["reason"] = extra.pop("reason", "RuntimeError: boom")
    rec.update(extra)
    return rec


def write(folder: Path, *records: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for r in records:
        (folder / f"{r['run_id']}.json").write_text(json.dumps(r, indent=1))
    return folder


# --- a real smoke matrix, made once per test session --------------------------------------------

SMOKE_METHODS = ("lora", "bitfit")
SMOKE_TASK = "glue/sst2"


def harness_cli(*args: str, cwd: Path | None = None, timeout: int = 1800):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HARNESS_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-m", "harness", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@lru_cache(maxsize=1)
def real_smoke_matrix() -> Path:
    """Records of a real smoke matrix (LoRA and BitFit on SST-2: MiniLM, 512 training examples,
    200 dev examples, the smoke profile as CI runs it), made once per session in a temporary
    folder: the HTML page is tested on what `harness run` really writes, and it is the baseline a
    method broken on purpose is compared with. Needs HARNESS_DATA_DIR (the shared GLUE files)."""
    import tempfile

    out = Path(tempfile.mkdtemp(prefix="harness-smoke-")) / "runs"
    r = harness_cli("run", "--methods", ",".join(SMOKE_METHODS), "--task", SMOKE_TASK, "--profile", "smoke",
                    "--output-dir", out, "--no-progress", cwd=out.parent)
    if r.returncode != 0:
        raise RuntimeError(f"the smoke matrix failed (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return out
