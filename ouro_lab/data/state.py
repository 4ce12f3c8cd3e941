"""`state`: the group word problem (docs/concepts/tasks.md "Why these tasks").

Input g_1..g_L, random elements of a finite group; the label at every position i is the
prefix product g_1 ... g_i. Difficulty = position i, bucketed (quarters by default):
composing i elements needs depth that grows with i, so "which bucket does loop step t
solve" reads out what each extra loop buys.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np

from ouro_lab.data.base import Batch, PositionBucketTask, register_task

GROUP_PATTERN = re.compile(r"^(S|A|Z)(\d+)$")


@dataclass
class StateConfig:
    group: str = "S3"  # S{n} symmetric, A{n} alternating, Z{m} cyclic (S5 and A5 are not solvable)
    length: int = 16  # L: group elements per sequence; position i has difficulty bucket ceil(i*buckets/L)
    buckets: int = 4  # position buckets the metrics are broken down by (4 = quarters q1..q4)


def group_table(group: str) -> np.ndarray:
    """Multiplication table of `group`: table[a, b] = index of a∘b; element 0 is the identity."""
    match = GROUP_PATTERN.match(group)
    if match is None:
        raise ValueError(f"data.state.group: {group!r} is not a group; use S<n>, A<n> or Z<m>, e.g. S3, S5, A5, Z7")
    kind, n = match.group(1), int(match.group(2))
    if kind == "Z":
        if n < 2:
            raise ValueError(f"data.state.group: Z{n} needs m >= 2")
        a = np.arange(n)
        return (a[:, None] + a[None, :]) % n
    if not 2 <= n <= 6:
        raise ValueError(f"data.state.group: {group} has n={n}; supported 2 <= n <= 6 (S6 has 720 elements)")
    perms = list(itertools.permutations(range(n)))  # identity first
    if kind == "A":
        perms = [p for p in perms if _is_even(p)]
    index = {p: i for i, p in enumerate(perms)}
    arr = np.array(perms)  # (G, n)
    # (a∘b)(i) = a[b[i]]
    return np.array([[index[tuple(a[b])] for b in arr] for a in arr], dtype=np.int64)


def _is_even(perm: tuple[int, ...]) -> bool:
    inversions = sum(1 for i in range(len(perm)) for j in range(i + 1, len(perm)) if perm[i] > perm[j])
    return inversions % 2 == 0


@register_task
class StateTask(PositionBucketTask):
    name = "state"
    Config = StateConfig

    def __init__(self, cfg: StateConfig):
        super().__init__(cfg)
        self.table = group_table(cfg.group)

    @classmethod
    def check_config(cls, cfg: StateConfig) -> list[tuple[str, str]]:
        problems = []
        try:
            group_table(cfg.group)
        except ValueError as err:
            problems.append(("group", str(err).split(": ", 1)[1]))
        if cfg.length < 1:
            problems.append(("length", f"must be >= 1, got {cfg.length}"))
        return problems + cls.bucket_problems(cfg.buckets, cfg.length, "length")

    @property
    def vocab_size(self) -> int:
        return len(self.table)

    @property
    def seq_len(self) -> int:
        return self.cfg.length

    def generate(self, rng: np.random.Generator, n: int, split: str, step: int = 0) -> Batch:
        tokens = rng.integers(0, len(self.table), size=(n, self.cfg.length))
        targets = np.empty_like(tokens)
        product = np.zeros(n, dtype=np.int64)  # identity
        for i in range(self.cfg.length):
            product = self.table[product, tokens[:, i]]
            targets[:, i] = product
        return Batch(tokens, targets, self.position_difficulty(n))
