"""Tasks: the registry of benchmark families (`registry`), `Sample`, metrics, and one module per family (niah,
ruler, unseen, longbench, longbench_v2, helmet, summary). Nothing here imports torch or the engine."""

from .registry import (
    Family,
    Task,
    TaskArgs,
    check_task,
    families,
    get_family,
    get_task,
    lengths_of,
    parse_lengths,
    register_family,
    select_tasks,
    task_names,
    task_samples,
    unregister_family,
)
from .sample import Sample

__all__ = [
    "Family",
    "Sample",
    "Task",
    "TaskArgs",
    "check_task",
    "families",
    "get_family",
    "get_task",
    "lengths_of",
    "parse_lengths",
    "register_family",
    "select_tasks",
    "task_names",
    "task_samples",
    "unregister_family",
]
