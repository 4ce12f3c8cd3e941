"""Per-loop-step evaluation metrics as one torchmetrics `Metric` (sums in state tensors,
so accumulation across batches and DDP ranks is torchmetrics' job).

Names come from `metric_names` (loss_step{t}, acc_step{t}_d{k}, acc_final, loss_exit,
exit_expected_step ...). Byte-level tasks also get bits per byte, bpb_* = loss_* / ln 2
(one label = one byte). `final` is the trained loop count T; steps after T (extrapolation)
are reported per step.
"""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric

from ouro_lab import metric_names as names
from ouro_lab.objectives import entropy


class LoopStepMetrics(Metric):
    """Accumulates, for evaluation loop steps t=1..eval_loops and difficulty levels
    k=1..n_levels: summed CE, correct predictions and token counts; plus exit-gate statistics
    over the trained steps 1..trained_loops when the model has a gate."""

    full_state_update = False

    def __init__(self, eval_loops: int, trained_loops: int, n_levels: int, has_gate: bool, bpb: bool = False):
        super().__init__()
        self.eval_loops, self.trained_loops, self.n_levels, self.has_gate = eval_loops, trained_loops, n_levels, has_gate
        self.bpb = bpb
        self.add_state("loss_sum", torch.zeros(eval_loops, n_levels, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("correct", torch.zeros(eval_loops, n_levels, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(n_levels, dtype=torch.float64), dist_reduce_fx="sum")
        if has_gate:
            self.add_state("exit_mass", torch.zeros(trained_loops, n_levels, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("exit_entropy", torch.zeros(n_levels, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("exit_loss", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("exit_correct", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, step_losses: torch.Tensor, correct: torch.Tensor, difficulty: torch.Tensor,
               exit_probs: torch.Tensor | None = None) -> None:
        """step_losses, correct: (eval_loops, B, S); difficulty: (B, S) in 1..n_levels, 0 = not counted;
        exit_probs: (B, S, trained_loops)."""
        counted = difficulty > 0
        level = (difficulty[counted] - 1).long()  # (N,)
        one_hot = torch.nn.functional.one_hot(level, self.n_levels).double()  # (N, K)
        losses = step_losses[:, counted].double()  # (eval_loops, N)
        hits = correct[:, counted].double()
        self.loss_sum += losses @ one_hot
        self.correct += hits @ one_hot
        self.count += one_hot.sum(0)
        if self.has_gate and exit_probs is not None:
            p = exit_probs[counted].double()  # (N, T)
            self.exit_mass += p.T @ one_hot
            self.exit_entropy += entropy(p) @ one_hot
            trained = slice(0, self.trained_loops)
            self.exit_loss += (p * losses[trained].T).sum()
            self.exit_correct += (p * hits[trained].T).sum()

    def compute(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        count = self.count.clamp_min(1)
        total = self.count.sum().clamp_min(1)
        levels = self._present_levels()
        for kind, sums in (("loss", self.loss_sum), ("acc", self.correct)):
            for t in range(1, self.eval_loops + 1):
                out[names.step(kind, t)] = sums[t - 1].sum() / total
                for k in levels:
                    out[names.step(kind, t, k + 1)] = sums[t - 1, k] / count[k]
            for level in [None, *(k + 1 for k in levels)]:
                out[names.final(kind, level)] = out[names.step(kind, self.trained_loops, level)]
        if self.has_gate:
            steps = torch.arange(1, self.trained_loops + 1, dtype=torch.float64, device=count.device)
            mass = self.exit_mass.sum(1) / total  # (T,)
            for t in range(self.trained_loops):
                out[names.exit_mass(t + 1)] = mass[t]
            out[names.exit_stat("exit_expected_step")] = (mass * steps).sum()
            out[names.exit_stat("exit_entropy")] = self.exit_entropy.sum() / total
            out[names.under_exit("loss")] = self.exit_loss / total
            out[names.under_exit("acc")] = self.exit_correct / total
            for k in levels:
                out[names.exit_stat("exit_expected_step", k + 1)] = (self.exit_mass[:, k] * steps).sum() / count[k]
                out[names.exit_stat("exit_entropy", k + 1)] = self.exit_entropy[k] / count[k]
        if self.bpb:
            out |= {names.as_bpb(name): v / math.log(2) for name, v in out.items() if name.startswith("loss")}
        return {k: v.float() for k, v in out.items()}

    def _present_levels(self) -> list[int]:
        """Levels with at least one scored token (e.g. arith with eval_ops=max has one): an
        empty level is left out rather than reported as accuracy 0."""
        return [k for k in range(self.n_levels) if self.count[k] > 0]
