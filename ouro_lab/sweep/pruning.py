"""Pruning: report the objective to Optuna at every validation and stop a trial the pruner
gives up on (also under DDP)."""

from __future__ import annotations

import math
from typing import Any, Callable

import lightning as L
import optuna

from ouro_lab.run_record import pruned_message


PRUNED_BECAUSE = "pruned_because"  # a trial's user attribute: why a pruner that says why stopped it


class PruningCallback(L.Callback):
    """Reports the objective to Optuna after every validation, at `offset + global_step`, and
    stops the trial when the pruner says so.

    NOTE: optuna_integration's PyTorchLightningPruningCallback reports at step=current_epoch,
    which repeats for step-based training (and Optuna drops repeated steps silently).
    Under DDP it follows that callback's documented protocol: only rank 0 reports and asks the
    pruner, the decision is broadcast and stops every rank, rank 0 records it (and the values
    it reported) in the trial's system attrs in the shared storage, and `check_pruned()`,
    called after `fit` in the process that owns the trial, replays them and raises TrialPruned.
    """

    PRUNED, REPORTED = "ouro:ddp_pruned", "ouro:ddp_reported"

    def __init__(self, trial: optuna.Trial, metric: str, offset: int = 0,
                 progress: Callable[[L.Trainer, L.LightningModule, int], dict[str, Any]] | None = None):
        """`progress` (adaptive sweeps, `design.Progress`): the user attributes that record the
        run so far (its curves at every validation, the FLOPs it trained), set before the pruner
        is asked: the design's pruner and budget read them."""
        self.trial, self.metric, self.offset, self.progress = trial, metric, offset, progress

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.metric not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.metric])
        step = self.offset + module.step_offset + trainer.global_step  # (step_offset: Stage I's steps, in Stage II)
        if not math.isfinite(value):
            return  # NaN weights fail the trial in training_step (checked at log steps and the last), with its reason
        if self.progress is not None and trainer.is_global_zero:
            for key, recorded in self.progress(trainer, module, step).items():
                self.trial.set_user_attr(key, recorded)
        if trainer.world_size == 1:
            self.trial.report(value, step)
            if self.trial.should_prune():
                raise optuna.TrialPruned(self._message(trainer.global_step, value))
            return
        storage, trial_id = self.trial.study._storage, self.trial._trial_id
        prune = False
        if trainer.is_global_zero:
            self.trial.report(value, step)
            prune = self.trial.should_prune()
            reported = storage.get_trial_system_attrs(trial_id).get(self.REPORTED, {})
            storage.set_trial_system_attr(trial_id, self.REPORTED, reported | {str(step): value})
        prune = trainer.strategy.broadcast(prune, src=0)
        if prune:
            trainer.should_stop = True
            if trainer.is_global_zero:
                storage.set_trial_system_attr(trial_id, self.PRUNED, self._message(trainer.global_step, value))

    def check_pruned(self) -> None:
        """In the trial's own process after `fit`: replay what the ranks reported, and raise
        TrialPruned if rank 0 decided to prune. A no-op for single-process training."""
        storage, trial_id = self.trial.study._storage, self.trial._trial_id
        attrs = storage.get_trial_system_attrs(trial_id)
        known = storage.get_trial(trial_id).intermediate_values
        for step, value in attrs.get(self.REPORTED, {}).items():
            if int(step) not in known:
                self.trial.report(value, int(step))
        if attrs.get(self.PRUNED):
            raise optuna.TrialPruned(attrs[self.PRUNED])

    def _message(self, step: int, value: float) -> str:
        why = self.trial.study._storage.get_trial(self.trial._trial_id).user_attrs.get(PRUNED_BECAUSE)
        return pruned_message(step, self.metric, value, why)
