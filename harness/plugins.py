"""Method discovery (entry points) and the per-run plugin manager."""
from __future__ import annotations

import warnings
from importlib.metadata import entry_points
from typing import Any, ClassVar

import pluggy

from harness import hookspecs

ENTRY_POINT_GROUP = "harness.methods"


class Method:
    """Base class of a method plugin. Subclasses implement hooks with ``@hookimpl``.

    ``defaults`` declares every hyperparameter the method accepts (the config refuses others);
    one instance serves one run, with the resolved hyperparameters in ``self.params``.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    mergeable: ClassVar[bool] = True         # False: merge returns None and the table says so
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, params: dict[str, Any] | None = None):
        self.params = {**self.defaults, **(params or {})}


class UnknownMethodError(KeyError):
    def __str__(self) -> str:
        return self.args[0]


# Entry points that failed to load, with the reason: one broken plugin (a third-party package,
# a half-written method) must not take every other method down with it.
BROKEN: dict[str, str] = {}


def discover_methods() -> dict[str, type[Method]]:
    """Every method registered under the ``harness.methods`` entry-point group, by name.

    A plugin that fails to import or is not a `Method` subclass is left out with a warning and
    its reason kept in `BROKEN`; asking for it by name raises that reason.
    """
    found: dict[str, type[Method]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found:
            continue  # the first distribution on sys.path wins, as for console scripts
        try:
            cls = ep.load()
        except Exception as e:  # any import-time failure of someone else's code
            reason = f"{ep.value} failed to import: {type(e).__name__}: {e}"
        else:
            if isinstance(cls, type) and issubclass(cls, Method):
                found[ep.name] = cls
                BROKEN.pop(ep.name, None)
                continue
            reason = f"{ep.value} is not a harness.plugins.Method subclass"
        if ep.name not in BROKEN:
            warnings.warn(f"method plugin {ep.name!r} skipped: {reason}", stacklevel=2)
        BROKEN[ep.name] = reason
    return found


class BrokenMethodError(ImportError):
    pass


def get_method(name: str) -> type[Method]:
    methods = discover_methods()
    if name not in methods and name in BROKEN:
        raise BrokenMethodError(f"method {name!r} is registered but cannot be used: {BROKEN[name]}")
    if name not in methods:
        hint = ", ".join(sorted(methods)) or "none (is the package installed? pip install -e .)"
        raise UnknownMethodError(f"unknown method {name!r}; available: {hint}")
    return methods[name]


def make_manager(method: Method, observers: list[Any] = ()) -> pluggy.PluginManager:
    """A plugin manager with one method plugin and any observers (progress, loggers, meters)."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(method, name="method")
    for i, obs in enumerate(observers):
        pm.register(obs, name=f"observer-{i}-{type(obs).__name__}")
    return pm
