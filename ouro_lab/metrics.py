"""Per-loop-step validation metrics as one torchmetrics `Metric` (sums in state tensors,
so accumulation across batches and DDP ranks is torchmetrics' job).

Names follow DESIGN.md: loss_step{t}, acc_step{t}, acc_step{t}_d{k}, loss_final,
acc_final, acc_final_d{k}, exit_expected_step, exit_entropy, exit_mass_step{t} ...
Byte-level tasks also get bits per byte, bpb_* = loss_* / ln 2 (one label = one byte).
`final` is the trained loop count T; steps after T (extrapolation) are reported per step.
"""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric

from ouro_lab.objectives import entropy


class LoopStepMetrics(Metric):
    """Accumulates, for eval steps t=1..n_steps and difficulty levels k=1..n_levels:
    summed CE, correct predictions and token counts; plus exit-gate statistics over the
    trained steps 1..trained_steps when the model has a gate."""

    full_state_update = False

    def __init__(self, n_steps: int, trained_steps: int, n_levels: int, has_gate: bool, bpb: bool = False):
        super().__init__()
        self.n_steps, self.trained_steps, self.n_levels, self.has_gate = n_steps, trained_steps, n_levels, has_gate
        self.bpb = bpb
        self.add_state("loss_sum", torch.zeros(n_steps, n_levels, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("correct", torch.zeros(n_steps, n_levels, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(n_levels, dtype=torch.float64), dist_reduce_fx="sum")
        if has_gate:
            self.add_state("exit_mass", torch.zeros(trained_steps, n_levels, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("exit_entropy", torch.zeros(n_levels, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("exit_loss", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("exit_correct", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, step_losses: torch.Tensor, correct: torch.Tensor, difficulty: torch.Tensor,
               exit_probs: torch.Tensor | None = None) -> None:
        """step_losses, correct: (n_steps, B, S); difficulty: (B, S) in 1..n_levels, 0 = not counted;
        exit_probs: (B, S, trained_steps)."""
        counted = difficulty > 0
        level = (difficulty[counted] - 1).long()  # (N,)
        one_hot = torch.nn.functional.one_hot(level, self.n_levels).double()  # (N, K)
        losses = step_losses[:, counted].double()  # (n_steps, N)
        hits = correct[:, counted].double()
        self.loss_sum += losses @ one_hot
        self.correct += hits @ one_hot
        self.count += one_hot.sum(0)
        if self.has_gate and exit_probs is not None:
            p = exit_probs[counted].double()  # (N, T)
            self.exit_mass += p.T @ one_hot
            self.exit_entropy += entropy(p) @ one_hot
            trained = slice(0, self.trained_steps)
            self.exit_loss += (p * losses[trained].T).sum()
            self.exit_correct += (p * hits[trained].T).sum()

    def compute(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        count = self.count.clamp_min(1)
        total = self.count.sum().clamp_min(1)
        for t in range(self.n_steps):
            out[f"loss_step{t + 1}"] = self.loss_sum[t].sum() / total
            out[f"acc_step{t + 1}"] = self.correct[t].sum() / total
            for k in self._present_levels():
                out[f"loss_step{t + 1}_d{k + 1}"] = self.loss_sum[t, k] / count[k]
                out[f"acc_step{t + 1}_d{k + 1}"] = self.correct[t, k] / count[k]
        final = self.trained_steps
        for name in list(out):
            prefix = f"{name.split('_', 1)[0]}_step{final}"
            if name == prefix or name.startswith(prefix + "_"):
                out[name.replace(f"_step{final}", "_final")] = out[name]
        if self.has_gate:
            steps = torch.arange(1, self.trained_steps + 1, dtype=torch.float64, device=count.device)
            mass = self.exit_mass.sum(1) / total  # (T,)
            for t in range(self.trained_steps):
                out[f"exit_mass_step{t + 1}"] = mass[t]
            out["exit_expected_step"] = (mass * steps).sum()
            out["exit_entropy"] = self.exit_entropy.sum() / total
            out["loss_exit"] = self.exit_loss / total
            out["acc_exit"] = self.exit_correct / total
            for k in self._present_levels():
                out[f"exit_expected_step_d{k + 1}"] = (self.exit_mass[:, k] * steps).sum() / count[k]
                out[f"exit_entropy_d{k + 1}"] = self.exit_entropy[k] / count[k]
        if self.bpb:
            out |= {name.replace("loss", "bpb", 1): v / math.log(2) for name, v in out.items() if name.startswith("loss")}
        return {k: v.float() for k, v in out.items()}

    def _present_levels(self) -> list[int]:
        """Levels with at least one scored token (e.g. arith with eval_ops=max has one): an
        empty level is left out rather than reported as accuracy 0."""
        return [k for k in range(self.n_levels) if self.count[k] > 0]


def metric_names(n_steps: int, trained_steps: int, levels: list[int], has_gate: bool,
                 splits: tuple[str, ...] = ("val", "test"), bpb: bool = False) -> set[str]:
    """Every name a run logs through `LoopStepMetrics` (for checking a sweep's objective up
    front). Difficulty levels with no examples in a split are left out at run time."""
    names: set[str] = set()
    for t in [*range(1, n_steps + 1), "final"]:
        step = f"step{t}" if t != "final" else "final"
        for kind in ("loss", "acc", "bpb") if bpb else ("loss", "acc"):
            names.add(f"{kind}_{step}")
            names.update(f"{kind}_{step}_d{k}" for k in levels)
    if has_gate:
        names.update({"exit_expected_step", "exit_entropy", "loss_exit", "acc_exit"} | ({"bpb_exit"} if bpb else set()))
        names.update(f"exit_mass_step{t}" for t in range(1, trained_steps + 1))
        names.update(f"exit_{stat}_d{k}" for stat in ("expected_step", "entropy") for k in levels)
    return {f"{split}/{name}" for split in splits for name in names} | {f"{split}/acc" for split in splits}
