"""LightningModules: a thin layer that owns the objective, optimizer, schedule and metrics.

`LoopedLMModule` trains `LoopedLM` with the Stage-I exit objective; `StandardLMModule`
trains the baselines. `new_module(cfg)` picks one from `model.arch`, and the baselines
take their depth from the looped config (param_matched: N layers; depth_matched: N*T,
`ModelConfig.distinct_layers`), so a sweep over `arch` is fair by construction.

A module takes the validated `ExperimentConfig` as it is (no second merge or validation);
its checkpoint keeps the config as a plain dict, and `config.from_dict` rebuilds it.
"""

from __future__ import annotations

import math
from collections import Counter

import lightning as L
import torch

from ouro_lab import exits
from ouro_lab import metric_names as names
from ouro_lab.config import ConfigError, ExperimentConfig, from_dict, to_dict
from ouro_lab.data import IGNORE_INDEX, Task, build_task
from ouro_lab.data.lm import tokenizer_files
from ouro_lab.metrics import ExitFrontierMetrics, LoopStepMetrics
from ouro_lab.models import LMOutput, LoopedLM, ModelSpec, StandardLM
from ouro_lab.models.exit_aware import TrainExits
from ouro_lab.objectives import (LoopLoss, entropy, exit_distribution, loop_objective_from_hidden, per_step_token_losses,
                                 sample_loops, stage2_gate_loss)


def model_spec(cfg: ExperimentConfig, task: Task) -> ModelSpec:
    """The network `cfg` describes, sized for `task`'s vocabulary and sequence length."""
    m = cfg.model
    return ModelSpec(
        vocab_size=task.vocab_size,
        max_seq_len=task.seq_len,
        d_model=m.d_model,
        n_heads=m.n_heads,
        n_layers=m.n_layers if m.arch == "looped" else m.distinct_layers,  # looped: the loop's blocks
        loops=m.trained_loops,
        d_ff=m.d_ff or 4 * m.d_model,
        tie_embeddings=m.tie_embeddings,
        embed_init_std=m.embed_init_std,
        positions=m.positions,
        loop_state=m.loop_state,
        prelude_layers=m.prelude_layers if m.arch == "looped" else 0,  # baselines: inside their one stack
        coda_layers=m.coda_layers if m.arch == "looped" else 0,
        injection=m.injection,
        init_state=m.init_state,
        rope_base=m.rope_base,
        rope_layout=m.rope_layout,
        norm_eps=m.norm_eps,
    )


class _LMModule(L.LightningModule):
    """Shared training/eval logic; subclasses build the model and say how many steps to score."""

    def __init__(self, cfg: ExperimentConfig | None = None, *, config: dict | None = None):
        """`cfg`: the validated config. `config`: its saved dict (Lightning's
        `load_from_checkpoint` passes the checkpoint's hyperparameters so), rebuilt by `from_dict`."""
        super().__init__()
        if cfg is None:
            if config is None:
                raise TypeError("a LightningModule of ouro-lab needs cfg (an ExperimentConfig) or config (its dict)")
            cfg = from_dict(config)
        # NOTE: saved as a plain dict, so checkpoints reload without this package's classes
        # being pickled (config.from_dict rebuilds the object); Lightning's logging of these
        # hyperparameters is switched off (train.py): the run logs its config once, itself.
        self.save_hyperparameters({"config": to_dict(cfg)})
        self.cfg = cfg
        self.task = build_task(cfg.data)
        self.spec = model_spec(cfg, self.task)
        self.model = self.build_model(self.spec)
        self.model.checkpointing = cfg.train.activation_checkpointing
        self.trained_loops, self.eval_loops = cfg.model.trained_loops, cfg.eval_loops
        self.has_gate = cfg.model.has_exit_gate
        self.in_stage2 = False  # training the exit gate alone (LoopedLMModule.start_stage2)
        self.step_offset = 0  # optimizer steps before this Trainer's (Stage I's in Stage II); logs go on from there
        n_levels = len(self.task.difficulty_levels)
        bpb = self.task.byte_level
        # (V,) UTF-8 bytes each target token covers, for bits per byte (tasks with a tokenizer; else one)
        token_bytes = getattr(self.task, "token_bytes", None)
        self.register_buffer("token_bytes", None if token_bytes is None else torch.as_tensor(token_bytes),
                             persistent=False)
        self.val_metrics = LoopStepMetrics(self.eval_loops, self.trained_loops, n_levels, self.has_gate, bpb)
        self.test_metrics = LoopStepMetrics(self.eval_loops, self.trained_loops, n_levels, self.has_gate, bpb)
        self.val_frontier = self.test_frontier = None
        if self.has_gate:  # the early-exit frontier (docs/guides/early-exit.md)
            e = cfg.eval
            rules = {"q": e.exit_q, "conf": e.exit_confidence, "change": e.exit_step_change}
            per_loop = self.model.flops_per_loop(self.task.seq_len)
            self.val_frontier, self.test_frontier = (
                ExitFrontierMetrics(self.trained_loops, n_levels, rules, e.exit_epsilon, e.oracle_tolerance,
                                    loss_scored=self.task.byte_level, bpb=bpb, flops_per_loop=per_loop)
                for _ in range(2))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ouro_run_id"] = getattr(self, "run_id", None)  # so a Stage II run can name its Stage I
        # the run's step these weights are from (Stage II: Stage I's steps + its own)
        checkpoint["ouro_step"] = self.global_step + self.step_offset
        if self.cfg.data.task == "lm":  # the tokenizer travels with the model (its files, not a path)
            checkpoint["ouro_tokenizer"] = tokenizer_files(self.cfg.data.lm.tokenizer)

    # --- what subclasses define -------------------------------------------------------
    def build_model(self, spec: ModelSpec) -> torch.nn.Module:
        raise NotImplementedError

    def run(self, tokens: torch.Tensor, loops: int | None = None) -> LMOutput:
        return self.model(tokens)

    def run_training(self, tokens: torch.Tensor) -> LMOutput:
        """The forward pass of a training step (looped models may sample the loop count)."""
        return self.run(tokens)

    # --- derived facts, logged with every run -------------------------------------------
    def flops_per_token(self) -> int:
        """Forward FLOPs per token at the trained loop count (training ~3x)."""
        return self.model.flops_per_token(self.task.seq_len)

    def train_flops_per_token(self) -> float:
        """Training FLOPs per token seen: forward + backward (2x forward)."""
        return 3 * self.flops_per_token()

    def summary(self) -> dict[str, int]:
        return {
            "n_params": self.model.num_params(),
            "n_distinct_layers": self.cfg.model.distinct_layers,
            "effective_depth": self.cfg.model.effective_depth,
            "forward_flops_per_token": self.flops_per_token(),
            "train_flops_per_token": self.train_flops_per_token(),
            "seq_len": self.task.seq_len,
            "vocab_size": self.task.vocab_size,
        }

    def configure_model(self) -> None:
        """torch.compile each block (Lightning calls this in every process, after spawning).
        NOTE: per block, not the model: the loop over T and the per-step head stay eager, so
        evaluating at T + extra loops reuses the same compiled block."""
        if self.cfg.train.compile and not getattr(self, "_compiled", False):
            for block in self.model.blocks:
                block.compile(fullgraph=True)
            self._compiled = True

    # --- training -------------------------------------------------------------------------
    def objective(self, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[LoopLoss, torch.Tensor]:
        """Forward pass and the training objective; also the (T, B, S) detached step losses."""
        out = self.run_training(tokens)
        o = self.cfg.objective
        return loop_objective_from_hidden(
            out.hidden, self.model.lm_head.weight, targets, out.gate_logits if self.has_gate else None,
            prior=o.prior if self.has_gate else "none", entropy_weight=o.entropy_weight,
            prior_p=o.prior_p, detach_exit_probs=o.detach_exit_probs,
            chunk_tokens=self.cfg.train.ce_chunk_tokens or None,
        )

    def training_step(self, batch, batch_idx):
        tokens, targets, _ = batch
        result, step_losses = self.objective(tokens, targets)
        # NOTE: logged (and checked for NaN) only at the steps Lightning flushes and the last one:
        # any read of the loss on the host is a device sync, which would stall a GPU every step.
        log_step = (self.global_step + 1) % self.cfg.train.log_every == 0
        if (log_step or self.global_step + 1 >= self.trainer.max_steps) and not torch.isfinite(result.loss):
            raise FloatingPointError(
                f"training loss became {result.loss.item()} by step {self.global_step} (checked every "
                f"train.log_every={self.cfg.train.log_every} steps and at the last, lr {self.cfg.train.lr}); "
                "lower train.lr or raise train.warmup_steps")
        if log_step:
            mask = (targets != IGNORE_INDEX).float()
            per_step = (step_losses * mask).sum((1, 2)) / mask.sum().clamp_min(1)
            # (the trained steps only: with a sampled loop count, later steps come and go)
            logs = {f"train/{names.step('loss', t + 1)}": v for t, v in enumerate(per_step[: self.trained_loops])}
            if self.has_gate:
                logs |= {f"train/{names.under_exit('loss')}": result.loss_exit, "train/exit_entropy": result.entropy,
                         "train/exit_kl": result.kl}
            self.log_dict(logs)
            self.log("train/loss", result.loss.detach(), prog_bar=True)
        return result.loss

    def configure_optimizers(self):
        t = self.cfg.train
        # matrices decay; norms, biases and Parcae's injection (StableInjection.no_weight_decay) do not
        trained = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in trained if p.dim() >= 2 and not getattr(p, "no_weight_decay", False)]
        no_decay = [p for p in trained if p.dim() < 2 or getattr(p, "no_weight_decay", False)]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
        )

        # a warmup of more than half the run leaves no room to decay: capped there, so a quick
        # run (train.max_steps=60) needs no second override (docs/guides/configs.md)
        max_steps, warmup_steps = t.max_steps, min(t.warmup_steps, t.max_steps // 2)
        if self.in_stage2 and self.cfg.stage2.steps:  # Stage II after Stage I: its own warmup and decay
            max_steps, warmup_steps = self.cfg.stage2.steps, min(t.warmup_steps, max(1, self.cfg.stage2.steps // 10))

        def lr_factor(step: int) -> float:
            if step < warmup_steps:
                return (step + 1) / warmup_steps
            progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
            return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- evaluation -------------------------------------------------------------------------
    def _eval_step(self, batch, metrics: LoopStepMetrics, frontier: ExitFrontierMetrics | None) -> None:
        tokens, targets, difficulty = batch
        out = self.run(tokens, loops=self.eval_loops)
        step_losses, correct, preds, confidence, change = [], [], [], [], []
        log_probs = None
        for t, hidden in enumerate(out.hidden):  # one step's (B, S, V) logits at a time
            logits = out.head(hidden)
            step_losses.append(per_step_token_losses(logits[None], targets)[0])
            preds.append(logits.argmax(-1))
            correct.append(preds[-1] == targets)
            if frontier is not None and t < self.trained_loops:  # what the exit rules read, trained steps only
                log_probs, step_confidence, step_change = exits.rule_inputs(logits, log_probs)
                confidence.append(step_confidence)
                change.append(step_change)
        step_losses, correct = torch.stack(step_losses), torch.stack(correct)  # (T', B, S)
        scored = difficulty * (targets != IGNORE_INDEX)
        exit_probs = None
        if self.has_gate:
            exit_probs = exit_distribution(out.gate_logits[..., : self.trained_loops])  # (B, S, T)
        nbytes = None if self.token_bytes is None else self.token_bytes[targets.clamp_min(0)]
        metrics.update(step_losses, correct, scored, exit_probs, nbytes)
        if frontier is not None:
            T = self.trained_loops
            frontier.update(step_losses[:T], correct[:T], torch.stack(preds[:T]), torch.stack(confidence),
                            torch.stack(change), out.gate_logits[..., :T], scored, nbytes)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, self.val_metrics, self.val_frontier)

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, self.test_metrics, self.test_frontier)

    def on_validation_epoch_end(self):
        self._log_metrics("val", self.val_metrics, self.val_frontier)

    def on_test_epoch_end(self):
        self._log_metrics("test", self.test_metrics, self.test_frontier)

    def _log_metrics(self, prefix: str, metrics: LoopStepMetrics, frontier: ExitFrontierMetrics | None) -> None:
        values = metrics.compute()  # already reduced over DDP ranks (the Metric syncs its sums)
        if frontier is not None:
            values |= frontier.compute()
            frontier.reset()
        # NOTE: every rank holds the same values, so sync_dist (a mean of equal numbers) changes
        # nothing; it only spares Lightning's warning per key under DDP. Not rank_zero_only: every
        # rank needs the objective for the pruning callback's collective.
        sync = self.trainer.world_size > 1
        self.log_dict({f"{prefix}/{k}": v for k, v in values.items()}, sync_dist=sync)
        self.log(f"{prefix}/acc", values[names.final("acc")], prog_bar=True, sync_dist=sync)
        metrics.reset()


class LoopedLMModule(_LMModule):
    """Ouro: N shared blocks x T loops, per-step head, exit gate; the Stage-I objective, or
    with `stage2.init_from` Stage II: all weights frozen but the exit gate, which learns from
    the per-token loss improvements (docs/concepts/method.md "Stage II"). The Stage-I checkpoint's
    weights come from `load_stage1` (builders.build_module), or from a Stage II checkpoint."""

    def __init__(self, cfg: ExperimentConfig | None = None, *, config: dict | None = None):
        super().__init__(cfg, config=config)
        self.stage1_run_id: str | None = None  # the run that trained the Stage-I checkpoint (Stage II only)
        if self.cfg.stage2.init_from:
            self.start_stage2()

    def start_stage2(self) -> None:
        """Switch to Stage II: freeze every parameter but the exit gate's; the objective becomes
        the gate loss (train() calls this after Stage I when stage2.steps > 0)."""
        for name, p in self.model.named_parameters():
            p.requires_grad_(name.startswith("exit_gate."))
        self.in_stage2 = True

    def build_model(self, spec: ModelSpec) -> LoopedLM:
        return LoopedLM(spec)

    def run(self, tokens: torch.Tensor, loops: int | None = None) -> LMOutput:
        return self.model(tokens, loops=loops)

    def run_training(self, tokens: torch.Tensor) -> LMOutput:
        """This batch's loop count from train.loops_sampling (one draw per optimizer step, seeded by
        train.seed and the step, so every DDP rank draws the same), truncated backprop through
        the last train.backprop_loops steps, and exit-aware steps (`train_exits`)."""
        grad_loops = self.cfg.train.backprop_loops or None
        return self.model(tokens, loops=self.training_loops(self.global_step), grad_loops=grad_loops,
                          train_exits=self.train_exits(self.global_step))

    def train_exits(self, step: int) -> TrainExits | None:
        """Exit-aware training (train.exit_aware, models/exit_aware.py) at optimizer step `step`:
        after the first train.exit_aware_from of Stage I's steps, and throughout Stage II (the
        gate then learns from the losses tokens have under exited context)."""
        t = self.cfg.train
        if t.exit_aware == "none" or (not self.in_stage2 and step < t.exit_aware_from * t.max_steps):
            return None
        return TrainExits(t.exit_aware, t.exited_kv, q=t.exit_aware_q)

    def training_loops(self, step: int) -> int:
        """The loop count of optimizer step `step` (a pure function of train.seed and the step)."""
        t = self.cfg.train
        generator = torch.Generator().manual_seed(t.seed * 1_000_003 + step)
        return sample_loops(t.loops_sampling, self.trained_loops, generator, t.loops_min, t.loops_max)

    def train_flops_per_token(self) -> float:
        """Under random depth or truncated backprop, the forward runs the loops each step drew and
        the backward (2x forward) the last train.backprop_loops of them (and the prelude, which
        an injection reaches): averaged over the run's own draws, known before training
        (`training_loops`). NOTE: approximate under truncation: the LM head's weight gradient
        at the steps without a graph (~1x head FLOPs each) is left out."""
        t = self.cfg.train
        if t.loops_sampling == "fixed" and not t.backprop_loops:
            return super().train_flops_per_token()
        seq_len = self.task.seq_len
        draws = Counter(self.training_loops(step) for step in range(t.max_steps))  # (~20 us a draw)
        total = 0
        for loops, n in draws.items():
            grad = min(loops, t.backprop_loops) if t.backprop_loops else loops
            total += n * (self.model.flops_per_token(seq_len, loops) + 2 * self.model.flops_per_token(seq_len, grad))
        return total / max(t.max_steps, 1)

    def load_stage1(self, ckpt: dict, path: str) -> None:
        """Load a Stage-I checkpoint's weights (`ckpt`, read from `path`) and freeze all but the
        exit gate; the model and task must be the checkpoint's (else a different network would
        be loaded)."""
        saved = ckpt["hyper_parameters"]["config"]
        here = to_dict(self.cfg)
        differ = [f"model.{k}" for k in here["model"] if saved["model"].get(k) != here["model"][k]]
        differ += ["data.task"] if saved["data"].get("task") != here["data"]["task"] else []
        if differ:
            raise ConfigError(f"stage2.init_from: {path} was trained with a different model or task: "
                              + ", ".join(f"{k}={_get(saved, k)} there, {_get(here, k)} here" for k in differ))
        self.load_state_dict(ckpt["state_dict"])
        self.start_stage2()
        self.stage1_run_id = ckpt.get("ouro_run_id")

    def objective(self, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[LoopLoss, torch.Tensor]:
        if not self.in_stage2:
            return super().objective(tokens, targets)
        # Stage II: the frozen network's per-step losses, without a graph; the gate alone learns
        with torch.no_grad():
            out = self.model(tokens, train_exits=self.train_exits(self.global_step))
            base, step_losses = loop_objective_from_hidden(out.hidden, self.model.lm_head.weight, targets, None,
                                                           prior="none", chunk_tokens=self.cfg.train.ce_chunk_tokens or None)
        gate_logits = self.model.exit_gate(out.hidden).squeeze(-1).permute(1, 2, 0)  # (B, S, T)
        mask = targets != IGNORE_INDEX
        s2 = self.cfg.stage2
        loss, _ = stage2_gate_loss(gate_logits, step_losses, mask, s2.k, s2.gamma, s2.improvement)
        with torch.no_grad():  # what Stage I logs, for the same training curves
            p = exit_distribution(gate_logits)  # (B, S, T)
            m = mask.float()
            loss_exit = ((p * step_losses.permute(1, 2, 0)).sum(-1) * m).sum() / m.sum().clamp_min(1)
            ent = (entropy(p) * m).sum() / m.sum().clamp_min(1)
        return LoopLoss(loss=loss, loss_exit=loss_exit, kl=torch.zeros_like(ent), entropy=ent), step_losses


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part, {}) if isinstance(d, dict) else None
    return d


class StandardLMModule(_LMModule):
    """The param-matched and depth-matched baselines: distinct blocks, one pass."""

    def build_model(self, spec: ModelSpec) -> StandardLM:
        return StandardLM(spec)


def new_module(cfg: ExperimentConfig) -> _LMModule:
    """The LightningModule for `model.arch`, freshly initialised (builders.build_module adds a
    Stage-I checkpoint's weights for stage2.init_from)."""
    cls = LoopedLMModule if cfg.model.arch == "looped" else StandardLMModule
    return cls(cfg)
