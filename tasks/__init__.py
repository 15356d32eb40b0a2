"""Benchmark suites. Importing this package registers every built-in task."""
from tasks import glue  # noqa: F401  (registers the GLUE tasks)
from tasks import instruction  # noqa: F401  (registers the instruction-tuning suite)
from tasks import longcontext  # noqa: F401  (registers the long-context suite)
from tasks import multitask  # noqa: F401  (registers the multitask family: multitask/sst2+rte+...)
from tasks.base import DataUnavailable, Example, MalformedData, Task
from tasks.registry import (TASKS, UnknownTaskError, expand, get_task, register_family,
                            register_task, task_class)

__all__ = ["TASKS", "Task", "Example", "DataUnavailable", "MalformedData", "UnknownTaskError",
           "expand", "get_task", "register_task", "register_family", "task_class"]
