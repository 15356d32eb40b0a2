"""Entry point of one isolated run: ``python -m harness.worker CONFIG.json``."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from harness.config import RunConfig
from harness.observers import default_observers, quiet_libraries
from harness.run import run_and_record


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    progress = "--no-progress" not in argv
    path = Path([a for a in argv if not a.startswith("--")][0])
    config = RunConfig.from_dict(json.loads(path.read_text()))
    path.unlink(missing_ok=True)
    quiet_libraries()
    record = run_and_record(config, default_observers(progress))
    return 0 if record["status"] in ("ok", "merge_mismatch") else 3


if __name__ == "__main__":
    sys.exit(main())
