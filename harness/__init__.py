"""peft-harness: train PEFT methods on the same model, data and budget; measure what each costs."""
from harness.hookspecs import hookimpl
from harness.plugins import Method

__version__ = "0.1.0"
__all__ = ["hookimpl", "Method", "__version__"]
