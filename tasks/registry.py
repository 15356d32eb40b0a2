"""Task registry, in the manner of lm-evaluation-harness: tasks register by name, groups expand.

``glue`` names the group (every task whose name starts with ``glue/``, except those that set
``in_group = False``); ``glue/rte`` one task. A *family* builds parameterised tasks on demand:
``multitask/sst2+rte`` is made by the ``multitask`` family's factory the first time it is named.
"""
from __future__ import annotations

from typing import Callable

from tasks.base import Task

TASKS: dict[str, type[Task]] = {}
# group -> factory(name) returning the task class of ``<group>/<parameters>`` (raises ValueError
# on bad parameters).
FAMILIES: dict[str, Callable[[str], type[Task]]] = {}


class UnknownTaskError(KeyError):
    def __str__(self) -> str:
        return self.args[0]


def register_task(cls: type[Task]) -> type[Task]:
    if cls.name in TASKS and TASKS[cls.name] is not cls:
        raise ValueError(f"task {cls.name!r} is registered twice")
    TASKS[cls.name] = cls
    return cls


def register_family(group: str, factory: Callable[[str], type[Task]]) -> None:
    FAMILIES[group] = factory


def task_class(name: str) -> type[Task] | None:
    """The class of task ``name``, building (and registering) a family member when needed."""
    if name in TASKS:
        return TASKS[name]
    group, _, params = name.partition("/")
    if params and group in FAMILIES:
        try:
            return register_task(FAMILIES[group](name))
        except ValueError as e:
            raise UnknownTaskError(str(e)) from None
    return None


def groups() -> list[str]:
    return sorted({name.split("/")[0] for name in TASKS if "/" in name})


def expand(spec: str) -> list[str]:
    """Task names for a comma-separated list of tasks and groups, in registry order."""
    out: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if task_class(item) is not None:
            names = [item]
        else:
            # A group runs its members; a task with in_group False runs only by name.
            names = [n for n in TASKS if n.startswith(item.rstrip("/") + "/") and TASKS[n].in_group]
        if not names:
            raise UnknownTaskError(f"unknown task {item!r}; available: "
                                   f"{', '.join(groups() + sorted(TASKS))}")
        out += [n for n in names if n not in out]
    return out


def get_task(name: str, options: dict | None = None) -> Task:
    """An instance of task ``name`` with its declared ``options`` overridden by ``options``."""
    if task_class(name) is None:
        expand(name)  # raises with the list of names
        raise UnknownTaskError(f"{name!r} is a group, not one task")
    return TASKS[name](options)
