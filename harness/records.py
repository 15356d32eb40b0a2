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
# Resume skips these: "does_not_fit" is a measured result of the run's memory budget, not an error.
FINISHED = ("ok", "does_not_fit")


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
    """A record file that cannot be used: truncated or invalid JSON, not a run record."""


class UnsupportedSchema(CorruptRecord):
    """A well-formed record of a schema version this harness cannot read (newer, or unknown)."""


# Keys every run record has had since schema version 1 (failed runs included).
REQUIRED_KEYS = ("run_id", "method", "task", "status")
# Upgrades of older schema versions, applied in turn: {version: function(record) -> record of
# version + 1}. Version 1 is the first; when the layout changes, bump SCHEMA_VERSION and add the
# step here so that `harness report` and `harness compare` keep reading old records (baselines).
UPGRADES: dict[int, Any] = {}


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """One record, upgraded to the current schema; `CorruptRecord` (or `UnsupportedSchema`) with a
    message naming the file and what is wrong with it otherwise."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise CorruptRecord(f"{path}: unreadable run record ({e})") from e
    if not text.strip():
        raise CorruptRecord(f"{path}: corrupt run record (empty file)")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise CorruptRecord(f"{path}: corrupt or truncated run record (invalid JSON: {e})") from e
    if not isinstance(record, dict):
        raise CorruptRecord(f"{path}: not a run record (a JSON {type(record).__name__}, not an object)")
    version = record.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise UnsupportedSchema(f"{path}: not a run record of this harness (schema_version "
                                f"{version!r}; this harness reads versions 1 to {SCHEMA_VERSION})")
    if version > SCHEMA_VERSION:
        raise UnsupportedSchema(f"{path}: schema version {version} is newer than this harness reads "
                                f"(up to {SCHEMA_VERSION}); upgrade peft-harness to read it")
    while version < SCHEMA_VERSION:
        if version not in UPGRADES:
            raise UnsupportedSchema(f"{path}: schema version {version} is older than this harness "
                                    f"can read (from {min([SCHEMA_VERSION, *UPGRADES])} to "
                                    f"{SCHEMA_VERSION}); re-run it or read it with the harness "
                                    f"version that wrote it")
        record = UPGRADES[version](record)
        version = record["schema_version"] = version + 1
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise CorruptRecord(f"{path}: corrupt run record (missing {', '.join(missing)})")
    return record


def read_records(output_dir: str | os.PathLike) -> tuple[list[dict[str, Any]], list[str]]:
    """Every record under ``output_dir``, and a message for each file that could not be read
    (``<path>: <what is wrong>``). Temporary files of a write in progress are not records."""
    records, problems = [], []
    for path in sorted(Path(output_dir).glob("*.json")):
        if path.name.startswith(".tmp-"):
            continue
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
