"""Run records: one JSON file per run, written atomically, read back for reports and resumes."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

from harness.config import RunConfig

SCHEMA_VERSION = 1
FINISHED = ("ok",)


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        if out.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5,
                               cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "pluggy", "peft-harness"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _load_avg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # not available on this platform
        return None


def host_info() -> dict[str, Any]:
    """Where the run ran. Speed figures are only comparable between runs with the same threads
    and a quiet machine: the 1-minute load average at start and end shows whether others ran."""
    import torch

    return {"machine": platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load_avg_1m_start": _load_avg()}


def new_record(config: RunConfig) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": config.run_id(),
        "method": config.method,
        "task": config.task,
        "profile": config.profile,
        "model": config.model,
        "status": "running",
        "config": config.to_dict(),
        "versions": versions(),
        "git_commit": git_commit(),
        "host": host_info(),
        "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def record_path(output_dir: str | os.PathLike, run_id: str) -> Path:
    return Path(output_dir) / f"{run_id}.json"


def write_record(record: dict[str, Any], output_dir: str | os.PathLike) -> Path:
    """Write via a temporary file and rename, so a reader never sees half a record."""
    record.setdefault("finished_at", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    if isinstance(record.get("host"), dict) and record.get("status") != "running":
        record["host"].setdefault("load_avg_1m_end", _load_avg())
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = record_path(out, record["run_id"])
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class CorruptRecord(ValueError):
    pass


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CorruptRecord(f"{path}: unreadable run record ({e})") from e
    version = record.get("schema_version") if isinstance(record, dict) else None
    if version != SCHEMA_VERSION:
        raise CorruptRecord(f"{path}: schema version {version!r}, this harness reads {SCHEMA_VERSION}; "
                            f"re-run it or read it with the harness version that wrote it")
    return record


def read_records(output_dir: str | os.PathLike) -> tuple[list[dict[str, Any]], list[str]]:
    """Every record under ``output_dir``, and a message for each file that could not be read."""
    records, problems = [], []
    for path in sorted(Path(output_dir).glob("*.json")):
        try:
            records.append(read_record(path))
        except CorruptRecord as e:
            problems.append(str(e))
    return records, problems


def finished(output_dir: str | os.PathLike, run_id: str) -> dict[str, Any] | None:
    path = record_path(output_dir, run_id)
    if not path.exists():
        return None
    try:
        record = read_record(path)
    except CorruptRecord:
        return None
    return record if record.get("status") in FINISHED else None
