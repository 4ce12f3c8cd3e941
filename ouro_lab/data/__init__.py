"""Generated tasks. Importing this package registers every task module below."""

from ouro_lab.data import arith, multihop, random_tokens, state, text  # noqa: F401  (registration side effect)
from ouro_lab.data.base import SPLITS, TASKS, Batch, Task, get_task, split_of
from ouro_lab.data.datamodule import TaskDataModule

__all__ = ["SPLITS", "TASKS", "Batch", "Task", "TaskDataModule", "get_task", "split_of"]
