"""`arith`: modular arithmetic expression trees in prefix notation (docs/concepts/tasks.md "Why these tasks").

`<bos> <len_l> - * a b + c d <ans>` -> the label at `<ans>` is the value mod p. One answer
token per example (loss on it only); difficulty = number of operations l. Training draws
l uniformly in [1, max_ops] (ramped up from 1 with a curriculum); evaluation draws l
uniformly in [1, max_ops] ('all', so accuracy is broken down by l) or l = max_ops only
('max', the paper's protocol).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ouro_lab.data.base import IGNORE_INDEX, Batch, Task, register_task

OPS = ("+", "-", "*")


@dataclass
class ArithConfig:
    modulus: int = 23  # p: values and answers live in Z_p (paper: 23)
    max_ops: int = 4  # L: operations per expression, drawn uniformly in [1, L]
    curriculum_steps: int = 0  # ramp the training max ops from 1 to L over this many steps (0 = off)
    eval_ops: str = "all"  # all: val/test l uniform in [1, L]; max: l = L only (paper)


@register_task
class ArithTask(Task):
    name = "arith"
    Config = ArithConfig
    difficulty_name = "operations"

    def __init__(self, cfg: ArithConfig):
        super().__init__(cfg)
        p = cfg.modulus
        # Vocabulary: 0..p-1 numbers, then ops, <bos>, <ans>, <pad>, then <len_1>..<len_L>.
        self.op_ids = {op: p + i for i, op in enumerate(OPS)}
        self.bos, self.ans, self.pad = p + 3, p + 4, p + 5
        self.len_base = p + 6  # <len_l> = len_base + l - 1

    @classmethod
    def check_config(cls, cfg: ArithConfig) -> list[tuple[str, str]]:
        problems = []
        if cfg.modulus < 2:
            problems.append(("modulus", f"must be >= 2, got {cfg.modulus}"))
        if cfg.max_ops < 1:
            problems.append(("max_ops", f"must be >= 1, got {cfg.max_ops}"))
        if cfg.curriculum_steps < 0:
            problems.append(("curriculum_steps", f"must be >= 0, got {cfg.curriculum_steps}"))
        if cfg.eval_ops not in ("all", "max"):
            problems.append(("eval_ops", f"{cfg.eval_ops!r} is not one of: all, max"))
        return problems

    @property
    def vocab_size(self) -> int:
        return self.cfg.modulus + 6 + self.cfg.max_ops

    @property
    def seq_len(self) -> int:
        return 2 * self.cfg.max_ops + 4  # bos, len, 2l+1 expression tokens, ans

    @property
    def difficulty_levels(self) -> list[int]:
        return list(range(1, self.cfg.max_ops + 1))

    def render(self, ids) -> str:
        p = self.cfg.modulus
        special = {self.bos: "<bos>", self.ans: "<ans>", self.pad: "<pad>", **{v: k for k, v in self.op_ids.items()}}
        return " ".join(str(i) if i < p else special.get(i, f"<len_{i - self.len_base + 1}>") for i in map(int, ids))

    def train_max_ops(self, step: int) -> int:
        if self.cfg.curriculum_steps <= 0:
            return self.cfg.max_ops
        return int(min(self.cfg.max_ops, 1 + step * self.cfg.max_ops // self.cfg.curriculum_steps))

    def generate(self, rng: np.random.Generator, n: int, split: str, step: int = 0) -> Batch:
        L, p = self.cfg.max_ops, self.cfg.modulus
        if split == "train":
            ops_count = rng.integers(1, self.train_max_ops(step) + 1, size=n)
        elif self.cfg.eval_ops == "max":
            ops_count = np.full(n, L)
        else:
            ops_count = rng.integers(1, L + 1, size=n)
        leaves = rng.integers(0, p, size=(n, L + 1))
        ops = rng.integers(0, len(OPS), size=(n, L))
        splits = rng.random(size=(n, L))
        tokens = np.full((n, self.seq_len), self.pad, dtype=np.int64)
        targets = np.full((n, self.seq_len), IGNORE_INDEX, dtype=np.int64)
        difficulty = np.zeros((n, self.seq_len), dtype=np.int64)
        for row in range(n):
            l = int(ops_count[row])
            expr, value = self._tree(l, iter(leaves[row]), iter(ops[row]), iter(splits[row]))
            seq = [self.bos, self.len_base + l - 1, *expr, self.ans]
            tokens[row, : len(seq)] = seq
            targets[row, len(seq) - 1] = value
            difficulty[row, len(seq) - 1] = l
        return Batch(tokens, targets, difficulty)

    def _tree(self, n_ops: int, leaves, ops, splits) -> tuple[list[int], int]:
        """A random binary expression with n_ops operations: (prefix token ids, value mod p)."""
        if n_ops == 0:
            leaf = int(next(leaves))
            return [leaf], leaf
        op = OPS[int(next(ops))]
        n_left = int(next(splits) * n_ops)  # uniform in [0, n_ops - 1]
        left, a = self._tree(n_left, leaves, ops, splits)
        right, b = self._tree(n_ops - 1 - n_left, leaves, ops, splits)
        value = evaluate(op, a, b, self.cfg.modulus)
        return [self.op_ids[op], *left, *right], value


def evaluate(op: str, a: int, b: int, modulus: int) -> int:
    if op == "+":
        return (a + b) % modulus
    if op == "-":
        return (a - b) % modulus
    return (a * b) % modulus
