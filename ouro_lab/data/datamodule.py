"""LightningDataModule over any registered task: an endless seeded training stream and
fixed val/test sets (the same for every model seed, so runs compare on the same examples)."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset, get_worker_info

from ouro_lab.data.base import Batch, Task


def to_tensors(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.from_numpy(batch.tokens), torch.from_numpy(batch.targets), torch.from_numpy(batch.difficulty)


class TrainStream(IterableDataset):
    """Endless stream of training batches, deterministic in (data_seed, seed, rank, worker)."""

    def __init__(self, task: Task, batch_size: int, data_seed: int, seed: int):
        self.task, self.batch_size, self.data_seed, self.seed = task, batch_size, data_seed, seed

    def __iter__(self):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        worker = get_worker_info()
        rng = np.random.default_rng([self.data_seed, self.seed, rank, worker.id if worker else 0])
        step = 0
        while True:
            yield to_tensors(self.task.sample(rng, self.batch_size, "train", step))
            step += 1


class TaskDataModule(L.LightningDataModule):
    def __init__(self, task: Task, batch_size: int, eval_batch_size: int, n_val: int, n_test: int,
                 data_seed: int, seed: int, num_workers: int = 0):
        super().__init__()
        self.task = task
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.n_val, self.n_test = n_val, n_test
        self.data_seed, self.seed, self.num_workers = data_seed, seed, num_workers
        self._eval_sets: dict[str, TensorDataset] = {}

    def eval_set(self, split: str) -> TensorDataset:
        if split not in self._eval_sets:
            n = self.n_val if split == "val" else self.n_test
            rng = np.random.default_rng([self.data_seed, 1 if split == "val" else 2])
            self._eval_sets[split] = TensorDataset(*to_tensors(self.task.sample(rng, n, split)))
        return self._eval_sets[split]

    def train_dataloader(self) -> DataLoader:
        stream = TrainStream(self.task, self.batch_size, self.data_seed, self.seed)
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.eval_set("val"), batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.eval_set("test"), batch_size=self.eval_batch_size)
