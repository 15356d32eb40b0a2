"""Benchmark suites. Importing this package registers every built-in task."""
from tasks import glue  # noqa: F401  (registers the GLUE tasks)
from tasks.base import DataUnavailable, Example, MalformedData, Task
from tasks.registry import TASKS, UnknownTaskError, expand, get_task, register_task

__all__ = ["TASKS", "Task", "Example", "DataUnavailable", "MalformedData", "UnknownTaskError",
           "expand", "get_task", "register_task"]
