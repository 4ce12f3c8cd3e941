"""Task interface, the task registry and the deterministic train/val/test split.

A task is one small module: a config dataclass, a generator of examples and the
difficulty of every labelled position, registered by name with `@register_task`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import numpy as np

IGNORE_INDEX = -100  # target of a position with no loss (PyTorch cross-entropy's default ignore_index)


SPLITS = ("train", "val", "test")
# Share of the example space held out for val and for test, chosen by a hash of the input.
HELD_OUT_BUCKETS = {"val": 0, "test": 1}
N_HASH_BUCKETS = 20  # val = 5%, test = 5% of the example space, train = the other 90%


@dataclass
class Batch:
    """Examples as numpy arrays; torch conversion happens in the DataModule.

    tokens: (B, S) int64 input ids; targets: (B, S) int64 labels, IGNORE_INDEX where no loss;
    difficulty: (B, S) int64 difficulty level of each labelled position (1..n), 0 elsewhere.
    """

    tokens: np.ndarray
    targets: np.ndarray
    difficulty: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)

    def select(self, keep: np.ndarray) -> "Batch":
        return Batch(self.tokens[keep], self.targets[keep], self.difficulty[keep])

    @staticmethod
    def concat(batches: list["Batch"]) -> "Batch":
        return Batch(*(np.concatenate([getattr(b, f) for b in batches]) for f in ("tokens", "targets", "difficulty")))


class Task:
    """Base class: subclasses set `name`, `Config`, `difficulty_name` and implement `generate`."""

    name: ClassVar[str]
    Config: ClassVar[type]
    difficulty_name: ClassVar[str]  # what the difficulty level means, for plots and docs
    byte_level: ClassVar[bool] = False  # labels are bytes: metrics add bits-per-byte (bpb_step{t} ...)

    def __init__(self, cfg):
        self.cfg = cfg

    @classmethod
    def check_config(cls, cfg) -> list[tuple[str, str]]:
        """Problems with this task's config as (key under data.<task>, message); [] if valid."""
        return []

    def describe(self) -> dict[str, object]:
        """Facts about the task's data worth logging with every run (MLflow params derived.*)."""
        return {}

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def seq_len(self) -> int:
        raise NotImplementedError

    @property
    def difficulty_levels(self) -> list[int]:
        """The difficulty values that occur (metric suffixes `_d{k}`)."""
        raise NotImplementedError

    @property
    def eval_difficulty_levels(self) -> list[int]:
        """The levels val/test score (all of them unless a task holds some out of evaluation)."""
        return self.difficulty_levels

    def render(self, ids) -> str:
        """Token ids as a person reads them (`ouro-lab generate`); the ids themselves by default."""
        return " ".join(str(int(i)) for i in ids)

    def generate(self, rng: np.random.Generator, n: int, split: str, step: int = 0) -> Batch:
        """n raw examples (before the split filter). `step` is the training step, for curricula."""
        raise NotImplementedError

    def sample(self, rng: np.random.Generator, n: int, split: str, step: int = 0) -> Batch:
        """n examples that belong to `split`: rejection on a hash of the input tokens makes
        train, val and test disjoint by construction, whatever the seed."""
        kept, total = [], 0
        for _ in range(1000):
            batch = self.generate(rng, max(n - total, 1) * 2 if split == "train" else max(n - total, 1) * 12, split, step)
            batch = batch.select(split_of(batch.tokens) == SPLITS.index(split))
            kept.append(batch)
            total += len(batch)
            if total >= n:
                return Batch.concat(kept).select(np.arange(n))
        raise RuntimeError(
            f"task {self.name!r} could not draw {n} {split} examples: its example space is too small "
            "for a held-out split; make the task larger (longer sequences, more operations)"
        )


class PositionBucketTask(Task):
    """A task labelled at every position, difficulty = the position's bucket ceil(i * buckets / S)
    (`state`, `text`, `random`): its config has `buckets`."""

    difficulty_name = "position bucket"

    @staticmethod
    def bucket_problems(buckets: int, length: int, length_key: str) -> list[tuple[str, str]]:
        if 1 <= buckets <= max(length, 1):
            return []
        return [("buckets", f"must be in [1, {length_key}={length}], got {buckets}")]

    @property
    def difficulty_levels(self) -> list[int]:
        return list(range(1, self.cfg.buckets + 1))

    def position_difficulty(self, n: int) -> np.ndarray:
        """(n, S) the bucket of every position, 1..buckets."""
        S = self.seq_len
        buckets = np.ceil(np.arange(1, S + 1) * self.cfg.buckets / S).astype(np.int64)
        return np.broadcast_to(buckets, (n, S)).copy()


def split_of(tokens: np.ndarray) -> np.ndarray:
    """Split index (0 train, 1 val, 2 test) of each row, from a hash of its tokens."""
    return _split_of_hash(prefix_hashes(tokens)[:, -1])


def prefix_hashes(tokens: np.ndarray, start: int = 0, salt: int = 0, shift: int = 29) -> np.ndarray:
    """(n, L) uint64 hash of every prefix of every row (FNV-1a style, 64-bit); `start`, `salt`
    and `shift` give independent hash families over the same tokens."""
    h = np.full(len(tokens), start, dtype=np.uint64)
    out = np.empty(tokens.shape, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j, column in enumerate(tokens.T.astype(np.uint64)):
            h = (h ^ (column + np.uint64(salt))) * np.uint64(0x100000001B3)
            h ^= h >> np.uint64(shift)
            out[:, j] = h
    return out


def _split_of_hash(h: np.ndarray) -> np.ndarray:
    bucket = (h % np.uint64(N_HASH_BUCKETS)).astype(np.int64)
    return np.where(bucket == HELD_OUT_BUCKETS["val"], 1, np.where(bucket == HELD_OUT_BUCKETS["test"], 2, 0))


TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    TASKS[cls.name] = cls
    return cls


def get_task(name: str) -> Callable:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; registered tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def build_task(data_config) -> Task:
    """The task `data.task` names, built from its own section `data.<task>`."""
    return get_task(data_config.task)(getattr(data_config, data_config.task))


__all__ = ["Batch", "IGNORE_INDEX", "PositionBucketTask", "SPLITS", "TASKS", "Task", "build_task", "get_task", "prefix_hashes", "register_task", "split_of"]


def json_lines(path: Path, error: type[Exception] = ValueError) -> Iterator[tuple[int, Any]]:
    """(line number, value) of every non-blank line of a JSON-lines file; `error` naming the
    file and line for one that is not JSON (corpora and benchmark files alike)."""
    with path.open(encoding="utf-8") as lines:
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as err:
                raise error(f"{path}:{n}: not a JSON line ({err.msg})") from None
