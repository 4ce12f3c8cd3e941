"""The trial budget: which trials count toward `trials` (complete, pruned, failed; not an
interrupted trial that is retried, nor a discarded one), and which claim a place in it."""

from __future__ import annotations

import math
from typing import Sequence

import optuna
from optuna.trial import TrialState

from ouro_lab.sweep.schema import SweepConfig, grid_values


def was_interrupted(t: optuna.trial.FrozenTrial) -> bool:
    return t.state == TrialState.FAIL and bool(t.user_attrs.get("interrupted"))


def retried_trials(trials: Sequence[optuna.trial.FrozenTrial]) -> set[int]:
    """Numbers of the trials that a later trial retries."""
    return {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}


def counts_toward_budget(t: optuna.trial.FrozenTrial, retries: int, retried: set[int]) -> bool:
    """Complete, pruned and failed (crash, NaN) trials use the budget; an interrupted trial
    does not while it will be retried or once it is (its retry stands in for it), nor does a
    discarded one (it never ran)."""
    if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    if t.state == TrialState.FAIL:
        if t.user_attrs.get("discarded") or t.number in retried or not t.params:  # never trained
            return False
        return not was_interrupted(t) or t.user_attrs.get("retry_depth", 0) >= retries
    return False


def budget_used(trials: Sequence[optuna.trial.FrozenTrial], retries: int) -> int:
    retried = retried_trials(trials)
    return sum(counts_toward_budget(t, retries, retried) for t in trials)


def claims_budget(t: optuna.trial.FrozenTrial, retries: int, retried: set[int]) -> bool:
    """Uses the budget, or will: running, or queued (a retry)."""
    return counts_toward_budget(t, retries, retried) or t.state in (TrialState.RUNNING, TrialState.WAITING)


def budget(sweep: SweepConfig) -> int:
    if sweep.sampler.name == "adaptive":  # every T x max_seeds at most; the design stops before
        size = sum(len(spec.choices or []) for spec in sweep.params.values()) * sweep.design.max_seeds
        return min(size, sweep.trials) if sweep.trials else size
    if sweep.sampler.name == "grid":
        size = math.prod(len(grid_values(spec)) for spec in sweep.params.values())
        return min(size, sweep.trials) if sweep.trials else size
    return sweep.trials
