"""Task registry, in the manner of lm-evaluation-harness: tasks register by name, groups expand.

``glue`` names the group (every task whose name starts with ``glue/``); ``glue/rte`` one task.
"""
from __future__ import annotations

from tasks.base import Task

TASKS: dict[str, type[Task]] = {}


class UnknownTaskError(KeyError):
    def __str__(self) -> str:
        return self.args[0]


def register_task(cls: type[Task]) -> type[Task]:
    if cls.name in TASKS and TASKS[cls.name] is not cls:
        raise ValueError(f"task {cls.name!r} is registered twice")
    TASKS[cls.name] = cls
    return cls


def groups() -> list[str]:
    return sorted({name.split("/")[0] for name in TASKS if "/" in name})


def expand(spec: str) -> list[str]:
    """Task names for a comma-separated list of tasks and groups, in registry order."""
    out: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item in TASKS:
            names = [item]
        else:
            names = [n for n in TASKS if n.startswith(item.rstrip("/") + "/")]
        if not names:
            raise UnknownTaskError(f"unknown task {item!r}; available: "
                                   f"{', '.join(groups() + sorted(TASKS))}")
        out += [n for n in names if n not in out]
    return out


def get_task(name: str) -> Task:
    if name not in TASKS:
        expand(name)  # raises with the list of names
        raise UnknownTaskError(f"{name!r} is a group, not one task")
    return TASKS[name]()
