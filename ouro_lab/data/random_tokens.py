"""`random`: uniformly random tokens labelled with the next token, at any vocabulary size and
length. Nothing to learn (the loss stays at ln V); it exists so the throughput benchmark can
run the real training path at an LM's shape (benchmarks/throughput.py, `--preset gpu`:
vocabulary 32768, 1024 tokens). Difficulty = position bucket, as for `text`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ouro_lab.data.base import Batch, PositionBucketTask, register_task


@dataclass
class RandomConfig:
    vocab: int = 32768  # vocabulary size
    length: int = 1024  # tokens per sequence
    buckets: int = 4  # position buckets of the metrics


@register_task
class RandomTokensTask(PositionBucketTask):
    name = "random"
    Config = RandomConfig

    @classmethod
    def check_config(cls, cfg: RandomConfig) -> list[tuple[str, str]]:
        problems = [(key, f"must be >= 2, got {getattr(cfg, key)}") for key in ("vocab", "length") if getattr(cfg, key) < 2]
        return problems + cls.bucket_problems(cfg.buckets, cfg.length, "length")

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab

    @property
    def seq_len(self) -> int:
        return self.cfg.length

    def generate(self, rng: np.random.Generator, n: int, split: str, step: int = 0) -> Batch:
        rows = rng.integers(0, self.cfg.vocab, size=(n, self.cfg.length + 1))
        return Batch(rows[:, :-1], rows[:, 1:], self.position_difficulty(n))
