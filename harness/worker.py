"""Entry point of one isolated run: ``python -m harness.worker CONFIG.json``.

A run with ``processes > 1`` (data parallel, `harness.distributed`) is started from here with
``accelerate launch --multi_gpu --num_processes N -m harness.worker CONFIG.json``; each process it
starts comes back here with ``WORLD_SIZE`` set and joins the process group.

Every worker dies with the process that started it (Linux ``PR_SET_PDEATHSIG``): a ``harness
run`` killed with ``kill -9`` leaves no run going on behind it, so a restart never races an orphan
for the same record.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from harness.config import RunConfig


PARENT_ENV = "HARNESS_PARENT_PID"  # set by whoever starts the worker (harness.matrix.run_cell)


def die_with_parent(parent: int | str | None = None) -> None:
    """Ask the kernel to SIGKILL this process when its parent exits (Linux; elsewhere nothing).
    ``parent``: the pid the parent should have; if it is already another, the parent died before
    the request, and this process exits rather than run unsupervised."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if parent and os.getppid() != int(parent):
        os._exit(137)


def launch_command(config_path: str, processes: int, progress: bool) -> list[str]:
    """The accelerate command that trains one run with ``processes`` data-parallel processes
    (``--multi_gpu`` is accelerate's torchrun launcher; on a machine without GPUs it starts CPU
    processes, which use gloo)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", "0",
            "-m", "harness.worker", config_path] + ([] if progress else ["--no-progress"])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    progress = "--no-progress" not in argv
    path = Path([a for a in argv if not a.startswith("--")][0])
    config = RunConfig.from_dict(json.loads(path.read_text()))
    from harness import distributed

    # A data-parallel process's parent is the launcher, not the process that set the variable.
    die_with_parent(None if distributed.launched() else os.environ.pop(PARENT_ENV, None))

    if config.processes > 1 and not distributed.launched():
        # The launcher: its processes read the same config file, removed once they are done.
        try:
            env = {**os.environ, "HARNESS_LAUNCHER": "accelerate"}
            me = os.getpid()
            return subprocess.run(launch_command(str(path), config.processes, progress), env=env,
                                  preexec_fn=lambda: die_with_parent(me)).returncode
        finally:
            path.unlink(missing_ok=True)
    if not distributed.launched():
        path.unlink(missing_ok=True)

    from harness.observers import default_observers, quiet_libraries
    from harness.run import run_and_record

    quiet_libraries()
    if distributed.launched():
        import dataclasses

        config = dataclasses.replace(config, device=distributed.init(config.device))
        progress = progress and distributed.is_main()
    try:
        record = run_and_record(config, default_observers(progress))
    finally:
        distributed.shutdown()
    return 0 if record["status"] in ("ok", "merge_mismatch") else 3


if __name__ == "__main__":
    sys.exit(main())
