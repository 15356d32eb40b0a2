"""Observer plugins: they implement hooks to watch training, never to change it."""
from __future__ import annotations

import os
import sys
from typing import Any

from harness.hookspecs import hookimpl


class ProgressBar:
    """A tqdm bar over optimizer steps, with the running loss."""

    def __init__(self, desc: str = "train"):
        self.desc = desc
        self.bar = None

    @hookimpl
    def on_train_start(self, model: Any, ctx: Any) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=ctx.total_steps, desc=f"{ctx.config.method} {ctx.config.task}",
                        unit="step", leave=False, file=sys.stderr, dynamic_ncols=True,
                        disable=None)  # None: no bar when stderr is not a terminal (CI logs)

    @hookimpl
    def on_step(self, model: Any, ctx: Any) -> None:
        self.bar.update(1)
        if ctx.step % 10 == 0 and "_last_loss" in ctx.extras:
            self.bar.set_postfix(loss=f"{ctx.extras['_last_loss']:.4f}", refresh=False)

    @hookimpl
    def on_train_end(self, model: Any, ctx: Any) -> None:
        if self.bar is not None:
            self.bar.close()


def default_observers(progress: bool = True) -> list[Any]:
    return [ProgressBar()] if progress and not os.environ.get("HARNESS_NO_PROGRESS") else []


def quiet_libraries() -> None:
    """Keep library chatter (load reports, hub hints) out of the harness's output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
