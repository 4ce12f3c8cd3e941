"""Generated tasks and the DataModule that serves them.

    base.py          Task (tokens, targets, difficulty per position), the registry, split hashing
    arith.py         Mano: modular arithmetic in prefix notation (difficulty = number of ops)
    state.py         group word problem, the CPU demo (difficulty = position bucket)
    multihop.py      layered-graph multi-hop questions (difficulty = hops)
    text.py          byte-level LM on local files: lm with bytes (difficulty = context-position bucket)
    lm.py            LM on a real corpus: tokenizer, tokenized cache, document splits (difficulty = token frequency)
    random_tokens.py random tokens for throughput benchmarks
    datamodule.py    TaskDataModule: infinite train stream, fixed val/test sets (Lightning)

Importing this package registers every task; the DataModule (and so Lightning) is imported
only when asked for, so validating a config does not load Lightning.
"""

from ouro_lab.data import arith, lm, multihop, random_tokens, state, text  # noqa: F401  (registration side effect)
from ouro_lab.data.base import IGNORE_INDEX, SPLITS, TASKS, Batch, Task, build_task, get_task, split_of

__all__ = ["IGNORE_INDEX", "SPLITS", "TASKS", "Batch", "Task", "TaskDataModule", "build_task", "get_task", "split_of"]


def __getattr__(name: str):
    if name == "TaskDataModule":
        from ouro_lab.data.datamodule import TaskDataModule

        return TaskDataModule
    raise AttributeError(f"module 'ouro_lab.data' has no attribute {name!r}")
