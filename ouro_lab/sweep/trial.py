"""What one trial does: claim its place in the budget, take the sampler's values, train one
run per seed (or reuse an identical finished run of the study), and return the objective.

MLflow runs of a trial (each ended by its `tracking.Run` handle, tagged `optuna.state`):
    seeds == 1: one run, nested under the study run, trained by `train(cfg, run=...)`
    seeds > 1:  a trial run holding the seed mean and spread, one nested run per seed
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import sys
import threading
import time
from typing import Any

import lightning as L
import optuna
from optuna.trial import TrialState

from ouro_lab import tracking
from ouro_lab.config import ExperimentConfig, load_config, to_dict
from ouro_lab import run_record as rr
from ouro_lab.run_record import RUN_HASH_LATER, drop_later_defaults, used_params
from ouro_lab.sweep import design
from ouro_lab.sweep.budget import claims_budget, retried_trials
from ouro_lab.sweep.pruning import PruningCallback
from ouro_lab.sweep.schema import SweepConfig, distribution, point_overrides
from ouro_lab.sweep.study import Study, this_process
from ouro_lab.builders import resolve_precision
from ouro_lab.train import train


class Discarded(Exception):
    """A trial that another worker's trial made redundant before it trained anything."""


def claim(s: Study, trial: optuna.Trial, total: int) -> None:
    """Raise `Discarded` unless this trial may run. Several workers check the budget and ask
    Optuna for a trial at about the same time, so the check is repeated here, ordered by trial
    number (which the storage assigns atomically): a trial runs only if the trials numbered
    before it leave room in the budget, and (grid) none of them already holds its grid point,
    and (retry) none of them already retries the same interrupted trial. NOTE: Optuna's
    GridSampler may hand one point to two concurrent workers (docs/design.md "Optuna")."""
    trials = s.study.get_trials(deepcopy=False)
    retried = retried_trials(trials)
    live = [t for t in trials if t.number < trial.number and claims_budget(t, s.sweep.retries, retried)]
    if len(live) >= total:
        raise Discarded(f"budget of {total} trials already claimed by earlier trials")
    grid_id = s.study._storage.get_trial_system_attrs(trial._trial_id).get("grid_id")
    retry_of = trial.user_attrs.get("retry_of")
    for t in live:
        if grid_id is not None and t.system_attrs.get("grid_id") == grid_id:
            raise Discarded(f"grid point already taken by trial {t.number}")
        if retry_of is not None and t.user_attrs.get("retry_of") == retry_of:
            raise Discarded(f"trial {retry_of} is already retried by trial {t.number}")


def canonical_hash(cfg: ExperimentConfig) -> str:
    """Hash of what determines a run's result. Keys a standard model ignores (loop count for
    param_matched, the exit objective, extra eval loops) are normalised away, so the same
    param-matched baseline is trained once per study and reused at every T."""
    d = to_dict(cfg)
    d.pop("tracking")
    d.pop("infer")  # inference settings do not change what training produces
    drop_later_defaults(d, RUN_HASH_LATER)  # keys added later: at their defaults, hashes made before stay valid
    if cfg.data.task != "lm":
        d["data"].pop("lm")  # (hashes made before the lm task existed stay valid)
    if not cfg.has_stage2:
        d.pop("stage2")  # Stage I (hashes made before the section existed stay valid)
    d["train"].pop("progress_bar")
    d["train"]["precision"] = resolve_precision(cfg)  # 'auto' means fp32 on CPU, bf16 on GPU
    if cfg.objective.prior != "geometric":
        d["objective"].pop("prior_p")
    if cfg.model.arch != "looped":
        d.pop("objective")
        d["eval"] = {"test": d["eval"]["test"]}  # a standard model has no loops to extrapolate or exit from
        d["model"].pop("loop_state")
        for key in ("injection", "init_state"):  # a single pass has no loop to inject into or start
            d["model"].pop(key, None)
        for key in ("loops_sampling", "loops_min", "loops_max", "backprop_loops"):
            d["train"].pop(key, None)
        if cfg.model.arch == "param_matched":
            d["model"].pop("loops")
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def suggest(trial: optuna.Trial, sweep: SweepConfig) -> dict[str, Any]:
    values = {}
    for key, spec in sweep.params.items():
        dist = distribution(spec, sweep.sampler.name)
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            values[key] = trial.suggest_categorical(key, dist.choices)
        elif isinstance(dist, optuna.distributions.IntDistribution):
            values[key] = trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
        else:
            values[key] = trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)
    return values


def run_trial(s: Study, trial: optuna.Trial, verbose: bool, total: int | None = None) -> float:
    """Train the trial's configuration (one run per seed) and return the objective (seed mean)."""
    sweep = s.sweep
    trial.set_user_attr("worker", this_process())
    if total is not None:
        claim(s, trial, total)
    seed_index = _design_point(s, trial) if sweep.sampler.name == "adaptive" else 0
    sampled = suggest(trial, sweep)
    overrides = [*sweep.overrides, *point_overrides(sweep, sampled),
                 f"tracking.uri={s.tracking_uri}", f"tracking.experiment={sweep.name}", "train.progress_bar=false"]
    cfg = load_config(s.base, overrides)
    cfg.train.seed += seed_index
    label = " ".join(f"{k}={v}" for k, v in sampled.items()) + (f" seed {cfg.train.seed}" if seed_index else "")
    name = rr.trial_run_name(trial.number, sampled, cfg.train.seed if seed_index else None)
    tags = (rr.sweep_tags(sweep.name, rr.TRIAL_RUN, trial.number) | {rr.OPTUNA_STATE: rr.RUNNING}
            | rr.bundle_tags({k: v for k, v in sampled.items() if k in sweep.bundles}))
    if sweep.seeds == 1:
        value, run = _train_seed(s, trial, cfg, cfg.train.seed, 0, s.parent.id, tags, label, name, verbose)
        if sweep.sampler.name == "adaptive":
            trial.set_user_attr(design.CURVES_ATTR, design.curves(run.final_metrics(), sweep.objective.metric))
        return value
    # several seeds: a trial run holding the mean and spread, with one child run per seed
    with _trial_run(s, name, tags | tracking.reproducibility_tags(), s.parent.id) as run:
        trial.set_user_attr("mlflow_run_id", run.id)
        run.log_params({k: v for k, v in used_params(cfg).items() if k != "train.seed"})
        results, values = [], []
        first_seed = cfg.train.seed
        for i in range(sweep.seeds):
            seed_tags = rr.sweep_tags(sweep.name, rr.SEED_RUN, trial.number)
            value, seed_run = _train_seed(s, trial, cfg, first_seed + i, i, run.id, seed_tags,
                                          f"{label} seed {first_seed + i}",
                                          rr.trial_run_name(trial.number, sampled, first_seed + i), verbose)
            values.append(value)
            results.append(seed_run.final_metrics())
        run.log_metrics(_seed_aggregate(results, sweep.objective.metric))
    return statistics.fmean(values)


def train_test_time_run(s: Study, verbose: bool) -> str | None:
    """The study's one random-depth run (sweep `test_time_run`): the looped model at the largest
    loop count of the choices, each batch at a depth drawn uniformly from the smallest to the
    largest, evaluated at every t; under the study run, role `test_time`. Trained once: a
    rerun finds it finished. Returns its run id (None: it failed, and says why)."""
    choices = s.sweep.params["model.loops"].choices
    for run in s.experiment.find_runs(rr.role_filter(rr.TEST_TIME_RUN)):
        if rr.state(run.info.status, run.data.tags) == rr.COMPLETE:
            return run.info.run_id
    low, high = min(choices), max(choices)
    overrides = [*s.sweep.overrides, "model.arch=looped", f"model.loops={high}", "train.loops_sampling=uniform",
                 f"train.loops_min={low}", f"train.loops_max={high}", f"tracking.uri={s.tracking_uri}",
                 f"tracking.experiment={s.sweep.name}", "train.progress_bar=false"]
    cfg = load_config(s.base, overrides)
    cfg.tracking.run_name = f"test-time: random depth T~U[{low},{high}]"
    if verbose:
        print(f"[sweep {s.sweep.name}] the test-time run: {cfg.tracking.run_name}, evaluated at t=1..{cfg.eval_loops}",
              flush=True)
    try:
        with _trial_run(s, cfg.tracking.run_name, rr.sweep_tags(s.sweep.name, rr.TEST_TIME_RUN), s.parent.id) as run:
            progress = [TrialProgress(f"[sweep {s.sweep.name}] test-time run", cfg.tracking.run_name,
                                      s.sweep.objective.metric, cfg.total_steps)] if verbose else []
            train(cfg, run=run, callbacks=[StopWhenOrphaned(), *progress], verbose=False)
    except Exception as err:  # (the trials are saved; the summary and report go on without it)
        print(f"[sweep {s.sweep.name}] the test-time run failed ({type(err).__name__}: {err}); its run is marked "
              "FAILED with the traceback. Rerun the same command to train it again.", file=sys.stderr, flush=True)
        return None
    return run.id


def _design_point(s: Study, trial: optuna.Trial) -> int:
    """The adaptive design's point for this trial (its loop count is then suggested as usual):
    the seed index; the decision is logged on the study run. Raises `Discarded` when the design
    has stopped, or when an earlier trial holds the same point (two workers decided at once)."""
    decided = s.study.sampler.decision_for(s.study, trial)
    if decided.point is None and not trial.system_attrs.get("fixed_params"):
        raise Discarded(f"the design has stopped: {decided.reason}")
    seed_index = trial.suggest_categorical(design.SEED_PARAM, list(range(s.sweep.design.max_seeds)))
    key = design.loop_key(s.sweep)
    point = design.Point(trial.suggest_categorical(key, s.sweep.params[key].choices), seed_index)
    # NOTE: a trial is pending for the others only once its params are set, seconds after its
    # decision began: wait for the earlier trials still deciding, then the earlier one holding
    # the same point wins
    deadline = time.monotonic() + 120
    while True:
        earlier = [t for t in s.study.get_trials(deepcopy=False)
                   if t.number < trial.number and t.state in (TrialState.RUNNING, TrialState.COMPLETE)]
        if any(design.point_of(t, key) == point for t in earlier):
            raise Discarded(f"an earlier trial already holds T={point.loops} seed {point.seed}")
        if time.monotonic() > deadline or all(design.point_of(t, key) is not None for t in earlier):
            break
        time.sleep(0.5)
    reason = decided.reason if point == decided.point else f"T={point.loops} seed {point.seed}: a queued retry"
    trial.set_user_attr("design_reason", reason)
    s.parent.log_text(json.dumps(design.record(decided) | {"trained": {"loops": point.loops, "seed": point.seed},
                                                           "why": reason}, indent=1),
                      f"{rr.DESIGN_ARTIFACTS}/trial_{trial.number:04d}.json")
    return seed_index


def _train_seed(s: Study, trial: optuna.Trial, cfg: ExperimentConfig, seed: int, index: int, parent: str,
                tags: dict[str, str], label: str, name: str, verbose: bool) -> tuple[float, tracking.Run]:
    """Train one seed (or reuse an identical finished run of this study); return (objective, its run)."""
    cfg.train.seed = seed
    cfg.tracking.run_name = name
    digest = canonical_hash(cfg)
    tags = tags | {rr.CONFIG_HASH: digest}
    metric = s.sweep.objective.metric
    reused = _find_finished(s, digest)
    if reused is not None:
        value = tracking.read_metrics(s.experiment.client, reused).get(metric)
        if value is None:
            raise KeyError(f"objective metric {metric!r} was not logged by run {reused.info.run_id}")
        if index == 0 and reused.data.tags.get(rr.CHECKPOINT):
            trial.set_user_attr("checkpoint", reused.data.tags[rr.CHECKPOINT])
        if _orphaned(s, reused):
            return value, _adopt(s, trial, reused, parent, verbose)
        if verbose:
            print(f"[sweep] trial {trial.number}: reusing identical run {reused.info.run_id} ({label})", flush=True)
        return value, _copy_run(s, reused, cfg, parent, tags)
    offset = index * cfg.total_steps
    with _trial_run(s, cfg.tracking.run_name, tags, parent) as run:
        if s.sweep.seeds == 1:
            trial.set_user_attr("mlflow_run_id", run.id)
        if verbose:
            print(f"[sweep {s.sweep.name}] trial {trial.number} started: {label}", flush=True)
        progress = [TrialProgress(f"[sweep {s.sweep.name}] trial {trial.number}", label, metric, cfg.total_steps)] \
            if verbose else []
        # (an adaptive design's runs record their learning curves and FLOPs: its pruner and budget read them)
        pruning = PruningCallback(trial, metric, offset,
                                  design.Progress(metric) if s.sweep.sampler.name == "adaptive" else None)
        result = train(cfg, run=run, callbacks=[pruning, StopWhenOrphaned(), *progress],
                       verbose=False)
        if index == 0 and result.checkpoint:
            trial.set_user_attr("checkpoint", result.checkpoint)  # (the first seed's; every run has its own tag)
        value = (result.val | result.test).get(metric)
        if value is None:
            raise ValueError(f"objective metric {metric!r} was not logged; available e.g. "
                             f"{', '.join(sorted(result.val)[:6])} ...")
        if not math.isfinite(value):
            raise ValueError(f"objective metric {metric!r} is {value}")
    return value, run


# set by a sweep worker whose coordinator is gone (runner._exit_with_coordinator)
COORDINATOR_GONE = threading.Event()
# set by the sweep's Ctrl-C handler (runner.ctrl_c_stops_trials): a Ctrl-C whose KeyboardInterrupt
# a finalizer swallowed ("Exception ignored in ...", seen in CI) still stops the trial at its next batch
CTRL_C = threading.Event()


class StopWhenOrphaned(L.Callback):
    """Interrupt the trial at the next batch once the coordinator is gone: between batches no
    MLflow write is under way. NOTE: a KeyboardInterrupt raised asynchronously inside one
    (interrupt_main) can leave its sqlite transaction open on a connection the traceback keeps
    alive, and then every later write of this worker and the other workers waits on that lock
    and fails (seen in CI)."""

    def _check(self, *_) -> None:
        stop_if_orphaned()

    on_train_batch_start = on_validation_batch_start = on_test_batch_start = _check


def stop_if_orphaned() -> None:
    """A KeyboardInterrupt, here and now, once this worker's coordinator is gone or after a Ctrl-C."""
    if COORDINATOR_GONE.is_set():
        raise KeyboardInterrupt("the sweep's coordinator is gone")
    if CTRL_C.is_set():
        raise KeyboardInterrupt("interrupted (Ctrl-C)")


class TrialProgress(L.Callback):
    """One line per validation while a trial trains: its step, objective and an ETA. NOTE:
    not Lightning's progress bar: trials run in worker processes and their output goes to
    logs as often as to a terminal, where a bar's carriage returns garble."""

    def __init__(self, prefix: str, label: str, metric: str, total_steps: int):
        self.prefix, self.label, self.metric, self.total = prefix, label, metric, total_steps
        self.start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        step = module.step_offset + trainer.global_step
        elapsed = time.perf_counter() - self.start
        left = elapsed / max(step, 1) * (self.total - step)
        value = trainer.callback_metrics.get(self.metric)
        shown = f" {self.metric}={float(value):.4f}" if value is not None else ""
        print(f"{self.prefix} step {step}/{self.total}{shown} | {elapsed:.0f} s, ~{left:.0f} s left | {self.label}",
              flush=True)


def _trial_run(s: Study, name: str, tags: dict[str, str], parent: str) -> tracking.Run:
    """A run of this study that ends with its Optuna state: FINISHED + optuna.state COMPLETE;
    KILLED + PRUNED (tag `pruned`: why); FAILED + FAIL (tag `error`, the traceback in error.txt);
    KILLED + FAIL (tag `interrupted`)."""
    run = s.experiment.create_run(name, tags, parent)
    run.ending = rr.trial_ending
    return run


def _find_finished(s: Study, digest: str):
    """An original (not itself a copy) run of this study with the same config hash, ended whole."""
    runs = s.experiment.find_runs(rr.hash_filter(digest), max_results=10)
    originals = [r for r in runs if rr.REUSED_FROM not in r.data.tags]
    return originals[0] if originals else None


def _orphaned(s: Study, run) -> bool:
    """A finished run whose trial failed (its process was killed after the run ended and
    before the trial's result reached the study). NOTE: not a RUNNING trial's: with seeds > 1
    a live trial has finished seed runs too."""
    number = run.data.tags.get(rr.TRIAL)
    if number is None:
        return False
    states = {t.number: t.state for t in s.study.get_trials(deepcopy=False)}
    return states.get(int(number)) == TrialState.FAIL


def _adopt(s: Study, trial: optuna.Trial, source, parent: str, verbose: bool) -> tracking.Run:
    """Take over an orphaned finished run as this trial's (instead of training the same point
    again): re-tagged and moved under this trial's parent; a trial-level run it hung under
    (seeds > 1) is ended as superseded, so one FINISHED run per point remains."""
    old_trial, old_parent = source.data.tags[rr.TRIAL], source.data.tags.get(rr.PARENT)
    run = s.experiment.run(source.info.run_id)
    run.set_tags({rr.TRIAL: str(trial.number), rr.PARENT: parent, rr.RECOVERED_FROM_TRIAL: old_trial})
    if old_parent and old_parent not in (parent, s.parent.id):
        s.experiment.run(old_parent).end(status="KILLED", tags=rr.superseded(trial.number))
    if s.sweep.seeds == 1:
        trial.set_user_attr("mlflow_run_id", run.id)
    trial.set_user_attr("recovered_from_trial", int(old_trial))
    if verbose:
        print(f"[sweep {s.sweep.name}] trial {trial.number}: recovered finished run {run.id} of trial {old_trial} "
              "(its result never reached the study); not retrained", flush=True)
    return run


def _copy_run(s: Study, source, cfg: ExperimentConfig, parent: str, tags: dict[str, str]) -> tracking.Run:
    """A child run that points at an identical finished run and carries its final metrics;
    its params are this trial's own config (e.g. the T it stands for), plus the derived facts."""
    run_tags = rr.copied_tags(source.data.tags) | tags | {
        rr.REUSED_FROM: source.info.run_id, rr.OPTUNA_STATE: rr.COMPLETE, rr.LOOPS: str(cfg.model.loops),
        rr.SEED: str(cfg.train.seed)}
    with _trial_run(s, cfg.tracking.run_name, run_tags, parent) as run:
        run.log_params(used_params(cfg) | rr.derived_of(source.data.params))
        run.log_metrics(tracking.read_metrics(s.experiment.client, source))
    return run


def _seed_aggregate(results: list[dict[str, float]], objective: str) -> dict[str, float]:
    """Mean over seeds of every final val/test metric (same names), and the objective's spread."""
    keys = set.intersection(*(set(r) for r in results))
    metrics = {k: statistics.fmean(r[k] for r in results) for k in sorted(keys)
               if k.startswith(("val/", "test/", rr.MODEL))}
    return metrics | rr.seed_spread(objective, [r[objective] for r in results if objective in r])
