"""Per-loop-step evaluation metrics as one torchmetrics `Metric` (sums in state tensors,
so accumulation across batches and DDP ranks is torchmetrics' job).

Names come from `metric_names` (loss_step{t}, acc_step{t}_d{k}, acc_final, loss_exit,
exit_expected_step ...). Text tasks also get bits per byte, bpb_* = summed loss / ln 2 /
the UTF-8 bytes the scored targets cover (`nbytes`; one label = one byte on byte-level
tasks, any number with a subword tokenizer). `final` is the trained loop count T; steps after
T (extrapolation) are reported per step.
"""

from __future__ import annotations

import math
import re

import torch
from torchmetrics import Metric

from ouro_lab import exits
from ouro_lab import metric_names as names
from ouro_lab.objectives import entropy, exit_distribution

LN2 = math.log(2)  # nats per bit: a loss in nats / LN2 = bits (bits per byte divide by this, here and in decoding)


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
        self.add_state("nbytes", torch.zeros(n_levels, dtype=torch.float64), dist_reduce_fx="sum")
        if has_gate:
            self.add_state("exit_mass", torch.zeros(trained_loops, n_levels, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("exit_entropy", torch.zeros(n_levels, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("exit_loss", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("exit_correct", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, step_losses: torch.Tensor, correct: torch.Tensor, difficulty: torch.Tensor,
               exit_probs: torch.Tensor | None = None, nbytes: torch.Tensor | None = None) -> None:
        """step_losses, correct: (eval_loops, B, S); difficulty: (B, S) in 1..n_levels, 0 = not counted;
        exit_probs: (B, S, trained_loops); nbytes: (B, S) bytes each target covers (None: one)."""
        counted = difficulty > 0
        level = (difficulty[counted] - 1).long()  # (N,)
        one_hot = torch.nn.functional.one_hot(level, self.n_levels).double()  # (N, K)
        losses = step_losses[:, counted].double()  # (eval_loops, N)
        hits = correct[:, counted].double()
        self.loss_sum += losses @ one_hot
        self.correct += hits @ one_hot
        self.count += one_hot.sum(0)
        self.nbytes += one_hot.sum(0) if nbytes is None else nbytes[counted].double() @ one_hot
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
        if self.bpb:  # per token -> per byte: x count / bytes of the same tokens (exactly 1 on byte-level tasks)
            ratio = {None: self.count.sum() / self.nbytes.sum().clamp_min(1)}
            ratio |= {k + 1: self.count[k] / self.nbytes[k].clamp_min(1) for k in levels}
            out |= {names.as_bpb(name): v * ratio[_level(name)] / LN2
                    for name, v in out.items() if name.startswith("loss")}
        return {k: v.float() for k, v in out.items()}

    def _present_levels(self) -> list[int]:
        """Levels with at least one scored token (e.g. arith with eval_ops=max has one): an
        empty level is left out rather than reported as accuracy 0."""
        return [k for k in range(self.n_levels) if self.count[k] > 0]


def _level(name: str) -> int | None:
    """The difficulty level of a metric name (`loss_step3_d2` -> 2), None for all positions."""
    found = re.search(r"_d(\d+)$", name)
    return int(found.group(1)) if found else None


class ExitFrontierMetrics(Metric):
    """The early-exit frontier of a looped model, in selection semantics (all T trained steps
    computed, each token read at its exit step; `ouro_lab.exits`): for every exit rule x
    threshold and both oracles, summed correctness, loss and loop steps used, per difficulty
    level; the answer-stable oracle's exit-step histogram; the gate's expected exit step per
    oracle exit step. `compute` adds the gate scalars (docs/guides/early-exit.md)."""

    full_state_update = False

    def __init__(self, trained_loops: int, n_levels: int, rules: dict[str, list[float]], epsilon: float = 0.01,
                 oracle_tolerance: float = 0.01, loss_scored: bool = False, bpb: bool = False,
                 flops_per_loop: int = 0):
        super().__init__()
        self.T, self.n_levels, self.epsilon, self.oracle_tolerance = trained_loops, n_levels, epsilon, oracle_tolerance
        self.loss_scored, self.bpb, self.flops_per_loop = loss_scored, bpb, flops_per_loop
        # one row per (rule, threshold), then full depth and the two oracles
        self.rules = [(rule, float(x)) for rule in names.EXIT_RULES for x in rules.get(rule, [])]
        self.thresholds = {rule: [float(x) for x in rules.get(rule, [])] for rule in names.EXIT_RULES}
        n_rows = len(self.rules) + 3
        for state in ("correct", "loss", "loops"):
            self.add_state(state, torch.zeros(n_rows, n_levels, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(n_levels, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("nbytes", torch.zeros(n_levels, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("oracle_hist", torch.zeros(trained_loops, n_levels, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("gate_at_oracle", torch.zeros(trained_loops, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, step_losses: torch.Tensor, correct: torch.Tensor, preds: torch.Tensor, confidence: torch.Tensor,
               change: torch.Tensor, gate_logits: torch.Tensor, difficulty: torch.Tensor,
               nbytes: torch.Tensor | None = None) -> None:
        """step_losses, correct, preds, confidence, change: (T, B, S) over the trained steps;
        gate_logits: (B, S, T); difficulty: (B, S) in 1..n_levels, 0 = not counted; nbytes: (B, S)
        bytes each target covers (None: one)."""
        counted = difficulty > 0
        one_hot = torch.nn.functional.one_hot((difficulty[counted] - 1).long(), self.n_levels).double()  # (N, K)
        losses, hits = step_losses[:, counted].double(), correct[:, counted]  # (T, N)
        gate = gate_logits[counted]  # (N, T)
        th = self.thresholds
        oracle = exits.stable_oracle(losses=losses, tolerance=self.oracle_tolerance) if self.loss_scored \
            else exits.stable_oracle(preds=preds[:, counted])
        steps = torch.cat([
            exits.q_exit(gate, th["q"]).to(oracle.device),
            exits.confidence_exit(confidence[:, counted], th["conf"]),
            exits.step_change_exit(change[:, counted], th["change"]),
            torch.full_like(oracle, self.T)[None],  # full depth
            oracle[None],
            exits.first_right_oracle(hits)[None],
        ]).long()  # (R + 3, N)
        self.correct += exits.select(hits.double(), steps) @ one_hot
        self.loss += exits.select(losses, steps) @ one_hot
        self.loops += steps.double() @ one_hot
        self.count += one_hot.sum(0)
        self.nbytes += one_hot.sum(0) if nbytes is None else nbytes[counted].double() @ one_hot
        at_oracle = torch.nn.functional.one_hot(oracle - 1, self.T).double()  # (N, T)
        self.oracle_hist += at_oracle.T @ one_hot
        expected = (exit_distribution(gate) * torch.arange(1, self.T + 1, device=gate.device)).sum(-1).double()
        self.gate_at_oracle += at_oracle.T @ expected

    def compute(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        total = self.count.sum().clamp_min(1)
        levels = [k for k in range(self.n_levels) if self.count[k] > 0]
        # the name of each row's metrics (full depth, row len(rules), is logged as step T already)
        rows = [lambda kind, level, rule=rule, x=x: names.exit_rule(rule, x, kind, level) for rule, x in self.rules]
        rows += [None, lambda kind, level: names.oracle("stable", kind, level),
                 lambda kind, level: names.oracle("right", kind, level)]
        kinds = [("acc", self.correct, 1.0, self.count), ("loss", self.loss, 1.0, self.count),
                 ("loops", self.loops, 1.0, self.count)]
        kinds += [("bpb", self.loss, LN2, self.nbytes)] if self.bpb else []  # bits per byte of text covered
        for i, name in enumerate(rows):
            if name is None:
                continue
            for kind, sums, scale, per in kinds:
                out[name(kind, None)] = sums[i].sum() / per.sum().clamp_min(1) / scale
                for k in levels:
                    out[name(kind, k + 1)] = sums[i, k] / per[k] / scale
        share = self.oracle_hist.sum(1) / total
        for t in range(self.T):
            out[names.oracle_share(t + 1)] = share[t]
            for k in levels:
                out[names.oracle_share(t + 1, k + 1)] = self.oracle_hist[t, k] / self.count[k]
            n_t = self.oracle_hist[t].sum()
            if n_t > 0:
                out[names.gate_step_at_oracle(t + 1)] = self.gate_at_oracle[t] / n_t
        out |= self._gate_scalars(total)
        return {k: v.float() for k, v in out.items()}

    def _gate_scalars(self, total: torch.Tensor) -> dict[str, torch.Tensor]:
        """The cheapest Q-exit within epsilon of full depth (accuracy; loss for loss-scored
        tasks, epsilon then in bits per byte when bpb) and the share of the answer-stable
        oracle's saving it realises."""
        full, stable = len(self.rules), len(self.rules) + 1
        if self.loss_scored:  # epsilon in bits per byte for text tasks
            per, scale = (self.nbytes.sum().clamp_min(1), LN2) if self.bpb else (total, 1.0)
            quality = -self.loss.sum(1) / per / scale  # higher is better
        else:
            quality = self.correct.sum(1) / total
        loops = self.loops.sum(1) / total
        best_q, best_loops = torch.tensor(1.0, dtype=torch.float64), loops[full]  # full depth always qualifies
        for i, q in enumerate(self.thresholds["q"]):  # the q rows come first
            if quality[i] >= quality[full] - self.epsilon - 1e-12 and loops[i] < best_loops:
                best_q, best_loops = torch.tensor(q, dtype=torch.float64), loops[i]
        saved, possible = self.T - best_loops, self.T - loops[stable]
        # NOTE: when the oracle can save nothing, the gate has nothing to realise: efficiency 1
        efficiency = saved / possible if possible > 1e-6 else torch.ones((), dtype=torch.float64)
        return {"gate_q_at_eps": best_q, "gate_loops_at_eps": best_loops, "gate_saved_loops": saved,
                "gate_flops_at_eps": best_loops * self.flops_per_loop, "gate_efficiency": efficiency}


class SkipEvalMetrics(Metric):
    """One exit rule in skip semantics next to the same rule in selection semantics and full
    depth (ouro_lab/inference.py): summed correctness, loss and loop steps of scored tokens per
    difficulty level for each semantics; executed FLOPs and tokens; forward wall time."""

    full_state_update = False

    def __init__(self, n_levels: int, bpb: bool = False):
        super().__init__()
        self.n_levels, self.bpb = n_levels, bpb
        n = len(names.SEMANTICS)
        for state in ("correct", "loss", "loops"):
            self.add_state(state, torch.zeros(n, n_levels, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(n_levels, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("nbytes", torch.zeros(n_levels, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("flops", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("seconds", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, losses: torch.Tensor, correct: torch.Tensor, loops: torch.Tensor, difficulty: torch.Tensor,
               flops: torch.Tensor, seconds: torch.Tensor, tokens: int, nbytes: torch.Tensor | None = None) -> None:
        """losses, correct, loops: (3, B, S) per semantics (skip, select, full); difficulty: (B, S)
        in 1..n_levels, 0 = not scored; flops, seconds: (3,) for the batch; tokens: positions run;
        nbytes: (B, S) bytes each target covers (None: one)."""
        counted = difficulty > 0
        one_hot = torch.nn.functional.one_hot((difficulty[counted] - 1).long(), self.n_levels).double()  # (N, K)
        self.correct += correct[:, counted].double() @ one_hot
        self.loss += losses[:, counted].double() @ one_hot
        self.loops += loops[:, counted].double() @ one_hot
        self.count += one_hot.sum(0)
        self.nbytes += one_hot.sum(0) if nbytes is None else nbytes[counted].double() @ one_hot
        self.flops += flops.double()
        self.seconds += seconds.double()
        self.tokens += tokens

    def compute(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        levels = [k for k in range(self.n_levels) if self.count[k] > 0]
        kinds = [("acc", self.correct, 1.0, self.count), ("loss", self.loss, 1.0, self.count),
                 ("loops", self.loops, 1.0, self.count)]
        kinds += [("bpb", self.loss, LN2, self.nbytes)] if self.bpb else []
        for i, semantics in enumerate(names.SEMANTICS):
            for kind, sums, scale, per in kinds:
                out[names.inference(semantics, kind)] = sums[i].sum() / per.sum().clamp_min(1) / scale
                for k in levels:
                    out[names.inference(semantics, kind, k + 1)] = sums[i, k] / per[k] / scale
            out[names.inference(semantics, "flops")] = self.flops[i] / self.tokens.clamp_min(1)
            out[names.inference(semantics, "seconds")] = self.seconds[i]
        return {k: v.float() for k, v in out.items()}
