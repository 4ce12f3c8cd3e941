"""The adaptive design (`adaptive.py`) inside a sweep (sampler.name: adaptive): an Optuna
sampler that gives each new trial the design's next point (the loop count, and the seed index
as param `design.seed`), read from the finished trials in the study's storage, so a resumed
study, another worker or another host asks for the same next point from the same results.

A trial records its curves (the objective over all positions and per difficulty level) as
user attribute `curves`; trials running elsewhere are pending points, never asked twice.
"""

from __future__ import annotations

import math
import re
from typing import Any, Collection, Mapping, Sequence

import optuna
from optuna.trial import TrialState

from ouro_lab.metric_names import objective_kind
from ouro_lab.sweep.adaptive import Decision, Point, can_change, decide, final_bounds
from ouro_lab.sweep.pruning import PRUNED_BECAUSE
from ouro_lab.sweep.schema import DesignSpec, SweepConfig

SEED_PARAM = "design.seed"  # the seed index of a design point: train.seed + this
CURVES_ATTR = "curves"  # a finished trial's objective per curve: {"all": 0.93, "d1": 0.99, ...}
CURVE_STEPS_ATTR = "curve_steps"  # its curves at every validation: {"250": {"all": 0.61, ...}, ...}
TRAIN_FLOPS_ATTR = "train_flops"  # the training FLOPs of the steps it trained (a stopped run's, up to its stop)
LAST_STEP_ATTR = "last_step"  # the step its training ends at: a run there is finished, not stopped


def loop_key(sweep: SweepConfig) -> str:
    """The design's one param: the loop count's config key (validated: one param, int choices)."""
    return next(iter(sweep.params))


def curves(metrics: Mapping[str, float], objective: str) -> dict[str, float]:
    """A finished run's curves: the objective ('all') and its per-difficulty variants ('d2')."""
    level = re.compile(re.escape(objective) + r"_d(\d+)$")
    out = {"all": float(metrics[objective])} if objective in metrics else {}
    for name, value in metrics.items():
        if m := level.match(name):
            out[f"d{m[1]}"] = float(value)
    return {k: v for k, v in out.items() if math.isfinite(v)}


class Progress:
    """A design trial as it trains (`pruning.PruningCallback`'s `progress`): its curves at every
    validation so far, and the training FLOPs of the steps it trained (the module's per-token
    training FLOPs x batch x sequence length x steps: the runs frame's count)."""

    def __init__(self, objective: str):
        self.objective, self.history = objective, {}

    def __call__(self, trainer, module, step: int) -> dict[str, Any]:
        self.history[str(step)] = curves({k: float(v) for k, v in trainer.callback_metrics.items()}, self.objective)
        flops = module.train_flops_per_token() * module.cfg.data.batch_size * module.task.seq_len * step
        return {CURVE_STEPS_ATTR: dict(self.history), TRAIN_FLOPS_ATTR: float(flops),
                LAST_STEP_ATTR: int(module.step_offset + trainer.max_steps)}


def spent_flops(trials: Sequence[optuna.trial.FrozenTrial]) -> float:
    """The training FLOPs the design's finished and stopped trials spent."""
    return sum(float(t.user_attrs.get(TRAIN_FLOPS_ATTR, 0.0)) for t in trials
               if t.state in (TrialState.COMPLETE, TrialState.PRUNED))


def point_of(t: optuna.trial.FrozenTrial, key: str) -> Point | None:
    """A trial's point: its params, or a queued retry's fixed params."""
    params = t.params or t.system_attrs.get("fixed_params") or {}
    if key not in params or SEED_PARAM not in params:
        return None
    return Point(int(params[key]), int(params[SEED_PARAM]))


def scale_of(spec: DesignSpec, metric: str) -> str:
    """Where the design models the seed noise: `design.scale`, whose 'auto' is the logit scale
    for an accuracy objective (`adaptive.SCALES`) and the metric's own scale otherwise."""
    if spec.scale != "auto":
        return spec.scale
    return "logit" if objective_kind(metric) == "acc" else "raw"


def decide_with(spec: DesignSpec, candidates: Sequence[int], metric: str, direction: str, seed: int,
                observations: Mapping[Point, Mapping[str, float]], pending: Collection[Point] = (),
                failed: Collection[Point] = ()) -> Decision:
    """`adaptive.decide` with a sweep's `design:` settings and objective (the sweep and its report both ask it)."""
    return decide(observations, candidates, epsilon=spec.epsilon, direction=direction, tolerance=spec.tolerance,
                  level=spec.level, max_seeds=spec.max_seeds, seed=seed, pending=pending, failed=failed,
                  scale=scale_of(spec, metric), confirm=spec.confirm)


def _inputs(sweep: SweepConfig, trials: Sequence[optuna.trial.FrozenTrial],
            exclude: int | None) -> tuple[dict[Point, dict[str, float]], set[Point], set[Point]]:
    """The design's inputs from a study's trials: finished ones are observations, running or
    queued ones (other than trial number `exclude`) pending points, crashed or pruned ones
    failed points (not asked again: the budget would go to their repeats)."""
    key = loop_key(sweep)
    observations: dict[Point, dict[str, float]] = {}
    pending, failed = set(), set()
    for t in trials:
        p = point_of(t, key)
        if p is None or t.number == exclude:
            continue
        if t.state == TrialState.COMPLETE and t.user_attrs.get(CURVES_ATTR):
            observations[p] = t.user_attrs[CURVES_ATTR]
        elif t.state in (TrialState.RUNNING, TrialState.WAITING):
            pending.add(p)
        elif t.state == TrialState.PRUNED or (t.state == TrialState.FAIL and not t.user_attrs.get("discarded")
                                              and not t.user_attrs.get("interrupted")):
            failed.add(p)
    pending -= set(observations)
    return observations, pending, failed - set(observations) - pending


def decision(sweep: SweepConfig, trials: Sequence[optuna.trial.FrozenTrial], exclude: int | None = None) -> Decision:
    """The design's decision from a study's trials (see `_inputs`); it stops once the trials'
    training FLOPs reach `design.flops` (when set). (One decision: `DesignSampler.decision`
    keeps it for the next ask with the same inputs.)"""
    return DesignSampler(sweep).decision(trials, exclude)


def _within_flops(spec: DesignSpec, d: Decision, trials: Sequence[optuna.trial.FrozenTrial]) -> Decision:
    spent = spent_flops(trials)
    if d.point is None or not spec.flops or spent < spec.flops:
        return d
    return Decision(None, f"FLOPs budget spent ({spent:.3g} of design.flops {spec.flops:.3g})", d.answers,
                    spent=d.spent)


class DesignSampler(optuna.samplers.BaseSampler):
    """Each trial's params are the design's next point; a trial that starts when the design has
    stopped (another worker's result settled the answer) gets no point: `run_trial` discards it."""

    def __init__(self, sweep: SweepConfig):
        self.sweep, self.key = sweep, loop_key(sweep)
        self._decided: dict[int, Decision] = {}
        self._last: tuple[Any, Decision] | None = None  # (the inputs, the decision made from them)

    def decision(self, trials: Sequence[optuna.trial.FrozenTrial], exclude: int | None = None) -> Decision:
        """The design's decision (`decide_with`, then the FLOPs budget), made once per set of
        inputs: the trial loop's check before a trial and the trial's own ask see the same
        trials, and a decision costs seconds of bootstrapping."""
        observations, pending, failed = _inputs(self.sweep, trials, exclude)
        key = (sorted((p, sorted(v.items())) for p, v in observations.items()), sorted(pending), sorted(failed))
        if self._last is None or self._last[0] != key:
            self._last = (key, decide_with(self.sweep.design, self.sweep.params[self.key].choices,
                                           self.sweep.objective.metric, self.sweep.objective.direction,
                                           self.sweep.sampler.seed, observations, pending, failed))
        return _within_flops(self.sweep.design, self._last[1], trials)

    def decision_for(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> Decision:
        """The decision this trial was started with (made once per trial)."""
        if trial.number not in self._decided:
            self._decided = {trial.number: self.decision(study.get_trials(deepcopy=False), trial.number)}
        return self._decided[trial.number]

    def infer_relative_search_space(self, study, trial) -> dict[str, Any]:
        return {}

    def sample_relative(self, study, trial, search_space) -> dict[str, Any]:
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution) -> Any:
        point = self.decision_for(study, trial).point
        assert point is not None, "run_trial discards a trial the design gave no point"
        return point.loops if param_name == self.key else point.seed


def record(d: Decision) -> dict[str, Any]:
    """A decision as strict JSON for the study run (artifact design/...): the point, why, the
    answer so far (math.inf, 'not saturated', written as null)."""
    def num(v: float) -> float | None:
        return v if math.isfinite(v) else None

    return {"point": None if d.point is None else {"loops": d.point.loops, "seed": d.point.seed}, "reason": d.reason,
            "spent": d.spent, "answers": {c: {"point": num(a.point), "low": num(a.low), "high": num(a.high),
                                              "text": str(a), "law_loops": num(a.law_loops),
                                              "probs": {str(k): v for k, v in a.probs.items()}}
                                          for c, a in d.answers.items()},
            "scores": {f"T={p.loops} seed {p.seed}": num(v) for p, v in d.scores.items()}}


def answer_line(d: Decision) -> str:
    """'all T=4 [T=3, T=5]; d1 T=2 [T=2, T=2]': the answer so far, one line."""
    return "; ".join(f"{c} {a}" for c, a in d.answers.items()) or "none yet"


class DesignPruner(optuna.pruners.BasePruner):
    """pruner.name: design (adaptive sweeps only): stops a run whose result cannot change the
    answer (`adaptive.can_change`), its final value bounded by the learning curves of the
    finished runs at its T and the neighbouring ones (`adaptive.final_bounds`, widened by
    `margin`). A stopped trial is PRUNED: never an observation, never asked again."""

    def __init__(self, sweep: SweepConfig, margin: float = 1.0):
        self.sweep, self.key, self.margin = sweep, loop_key(sweep), float(margin)

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        steps = trial.user_attrs.get(CURVE_STEPS_ATTR) or {}
        point = point_of(trial, self.key)
        if not steps or point is None:
            return False
        step = max(steps, key=int)
        if int(step) >= trial.user_attrs.get(LAST_STEP_ATTR, math.inf):
            return False  # (its last validation: the run is whole, stopping it would only throw its result away)
        trials = study.get_trials(deepcopy=False)
        finished = [(p.loops, t.user_attrs[CURVE_STEPS_ATTR]) for t in trials
                    if t.state == TrialState.COMPLETE and t.user_attrs.get(CURVE_STEPS_ATTR)
                    and (p := point_of(t, self.key)) is not None]
        bounds = final_bounds(steps[step], int(step), finished, point.loops, self.sweep.params[self.key].choices,
                              self.margin)
        if bounds is None:
            return False
        observations, _, _ = _inputs(self.sweep, trials, trial.number)
        spec = self.sweep.design
        if can_change(observations, point, *bounds, self.sweep.params[self.key].choices, epsilon=spec.epsilon,
                      direction=self.sweep.objective.direction, level=spec.level, seed=self.sweep.sampler.seed,
                      scale=scale_of(spec, self.sweep.objective.metric)):
            return False
        low, high = bounds
        why = ("its final value (" + ", ".join(f"{c} in [{low[c]:.3f}, {high[c]:.3f}]" for c in sorted(low))
               + ") cannot change the answer")
        study._storage.set_trial_user_attr(trial._trial_id, PRUNED_BECAUSE, why)
        return True
