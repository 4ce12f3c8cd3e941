"""The sweep's trials as an in-memory Optuna study rebuilt from the loaded runs: fANOVA
importance and Optuna's own history / importance plots."""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import numpy as np
import optuna

from ouro_lab.analysis.tidy import StudyData, typed_value

optuna.logging.set_verbosity(optuna.logging.WARNING)


def optuna_study(data: StudyData) -> optuna.Study | None:
    """The sweep's trials as an in-memory Optuna study rebuilt from MLflow (values, states,
    sampled params with the sweep's distributions), for Optuna's own importance and history."""
    dists = data.distributions
    if data.trials.empty or not dists:
        return None
    study = optuna.create_study(direction=data.direction, study_name=data.name)
    for _, row in data.trials.iterrows():
        state = optuna.trial.TrialState[row["state"]] if row["state"] in optuna.trial.TrialState.__members__ else None
        if state not in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL):
            continue
        if state == optuna.trial.TrialState.COMPLETE and not np.isfinite(row["value"]):
            continue
        try:
            values = {k: param_value(dists[k], row[k]) for k in dists if row.get(k) is not None}
        except ValueError as err:
            warnings.warn(f"trial {row['number']} left out of the Optuna view: {err}")
            continue
        study.add_trial(optuna.trial.create_trial(
            params=values, distributions={k: dists[k] for k in values}, state=state,
            value=float(row["value"]) if state == optuna.trial.TrialState.COMPLETE else None))
    return study


def param_value(dist, text: str) -> Any:
    """A logged param (a string; a float config key logs choice 0 as '0.0') as the distribution's value."""
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        for choice in dist.choices:
            if str(choice) == text or (isinstance(choice, (int, float)) and typed_value(text) == choice):
                return choice
        raise ValueError(f"param value {text!r} is not among the sweep's choices {dist.choices}")
    number = float(text)
    return int(number) if isinstance(dist, optuna.distributions.IntDistribution) else number


def param_importances(study: optuna.Study | None) -> dict[str, float]:
    """fANOVA importances (Optuna's FanovaImportanceEvaluator, seeded) of the swept params for the objective."""
    if study is None or len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) < 2:
        return {}
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    try:
        return optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (RuntimeError, ValueError) as err:  # e.g. every completed trial has the same value
        warnings.warn(f"no parameter importances: {err}")
        return {}


def plot_optuna(study: optuna.Study | None, importances: Mapping[str, float], target_name: str = "Objective Value"):
    """Optuna's own matplotlib views: optimisation history and the parameter importances."""
    if study is None or not study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        return None
    from optuna.visualization import matplotlib as ovm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        history = ovm.plot_optimization_history(study, target_name=target_name).figure
        history.set_size_inches(7.5, 4)
        history.tight_layout()
        if not importances:
            return history, None
        ax = ovm.plot_param_importances(study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0),
                                        target_name=target_name)
        ax.figure.set_size_inches(7.5, 1.2 + 0.5 * len(importances))
        ax.figure.tight_layout()
        return history, ax.figure
