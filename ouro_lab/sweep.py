"""`ouro-lab sweep sweeps/X.yaml`: an Optuna study whose trials are `train()` runs nested
under one MLflow parent run; pruning, failure handling and resume.

Layout of one study in MLflow (experiment = the study name):
    study parent run (tag ouro.study)
      trial run per Optuna trial (params = sampled values + full config; state tag optuna.state)
        seed runs, when seeds > 1 (the trial run then holds their mean and spread)

Resume: rerunning the same command loads the study from its storage. Trials left RUNNING by
a dead process (journal storage has no heartbeat) are marked FAIL and, if `retries` allows,
re-enqueued with the same params; finished trials are kept and never repeated.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from ouro_lab import tracking
from ouro_lab.config import ConfigError, ExperimentConfig, flatten, load_config, to_dict
from ouro_lab.sweep_config import SweepConfig, distribution, grid_values, override_for
from ouro_lab.train import TrainResult, resolve_precision, train

optuna.logging.set_verbosity(optuna.logging.WARNING)


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

    def __init__(self, trial: optuna.Trial, metric: str, offset: int = 0):
        self.trial, self.metric, self.offset = trial, metric, offset

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.metric not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.metric])
        step = self.offset + trainer.global_step
        if not math.isfinite(value):
            return  # NaN weights fail the trial in training_step (checked at log steps and the last), with its reason
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
        return f"pruned at step {step} with {self.metric}={value:.4f}"


@dataclass
class Study:
    sweep: SweepConfig
    base: Path
    study: optuna.Study
    client: MlflowClient
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    study_dir: Path


def canonical_hash(cfg: ExperimentConfig) -> str:
    """Hash of what determines a run's result. Keys a standard model ignores (loop count for
    param_matched, the exit objective, extra eval loops) are normalised away, so the same
    param-matched baseline is trained once per study and reused at every T."""
    d = to_dict(cfg)
    d.pop("tracking")
    d["train"].pop("progress_bar")
    d["train"]["precision"] = resolve_precision(cfg)  # 'auto' means fp32 on CPU, bf16 on GPU
    if cfg.objective.prior != "geometric":
        d["objective"].pop("prior_p")
    if cfg.model.arch != "looped":
        d.pop("objective")
        d["eval"].pop("extra_loops")
        d["model"].pop("loop_state")
        if cfg.model.arch == "param_matched":
            d["model"].pop("loops")
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


class GridSampler(optuna.samplers.GridSampler):
    """Optuna's GridSampler, with what several workers and retries need.

    NOTE: every worker must use the same seed: a grid id means the same point only under the
    same shuffle. Optuna 5.0's after_trial raises KeyError('grid_id') for an enqueued trial (our
    retry of an interrupted one) when one point is left; stopping is decided by our own budget
    loop, so that lookup is skipped for such trials. A point counts as visited only if a trial
    holds it: not a discarded trial, nor an interrupted one (its retry, which carries params
    but no grid id, holds it instead)."""

    def __init__(self, search_space, seed: int | None = None, retries: int = 0):
        super().__init__(search_space, seed=seed)
        self.retries = retries
        self._ids = {tuple(grid): i for i, grid in enumerate(self._all_grids)}

    def after_trial(self, study, trial, state, values) -> None:
        if "grid_id" in study._storage.get_trial_system_attrs(trial._trial_id):
            super().after_trial(study, trial, state, values)

    def grid_id(self, t: optuna.trial.FrozenTrial) -> int | None:
        if "grid_id" in t.system_attrs:
            return t.system_attrs["grid_id"]
        params = t.params or t.system_attrs.get("fixed_params", {})  # an enqueued retry: its fixed params
        try:
            return self._ids.get(tuple(params[name] for name in self._param_names))
        except KeyError:
            return None

    def _get_unvisited_grid_ids(self, study: optuna.Study) -> list[int]:
        trials = study._storage.get_all_trials(study._study_id, deepcopy=False)
        retried = _retried(trials)
        held, running = set(), set()
        for t in trials:
            gid = self.grid_id(t)
            if gid is None:
                continue
            if t.state in (TrialState.RUNNING, TrialState.WAITING):
                running.add(gid)
            elif t.state != TrialState.FAIL or _counts_toward_budget(t, self.retries, retried):
                held.add(gid)
        everything = set(range(self._n_min_trials))
        return list(everything - held - running) or list(everything - held)


def make_sampler(sweep: SweepConfig, n_existing: int = 0, salt: int = 0) -> optuna.samplers.BaseSampler:
    """The grid's order depends on the seed alone (it skips visited points), the same in every
    worker. The others draw from a fresh random state per process: NOTE a resumed study must not
    replay the first process's draws, so their seed is moved on by the number of trials already
    in the study, and concurrent workers must not draw in lockstep, so each adds its own `salt`."""
    s = sweep.sampler
    if s.name == "grid":
        space = {key: grid_values(spec) for key, spec in sweep.params.items()}
        return GridSampler(space, seed=s.seed, retries=sweep.retries)
    seed = (s.seed + 1_000_003 * n_existing + 7_919 * salt) % 2**32
    if s.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s.name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(sweep: SweepConfig) -> optuna.pruners.BasePruner:
    settings = dict(sweep.pruner)
    name = settings.pop("name", "none")
    return {
        "none": optuna.pruners.NopPruner,
        "median": optuna.pruners.MedianPruner,
        "hyperband": optuna.pruners.HyperbandPruner,
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    }[name](**settings)


def make_storage(sweep: SweepConfig, study_dir: Path) -> optuna.storages.BaseStorage | str:
    """Default: a journal file under the study folder, safe for several processes on one host.
    Any Optuna storage URL otherwise (e.g. postgresql://... for several hosts)."""
    if sweep.storage:
        if sweep.storage.startswith(("postgresql", "mysql", "sqlite")):
            # NOTE: journal storage has no heartbeat; RDB has: a trial whose worker stops beating
            # is failed by the next worker that looks (our callback queues its retry)
            return optuna.storages.RDBStorage(sweep.storage, heartbeat_interval=sweep.heartbeat_interval,
                                              grace_period=sweep.grace_period,
                                              heartbeat_stale_trial_callback=RetryStaleTrial(sweep.retries))
        return sweep.storage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    study_dir.mkdir(parents=True, exist_ok=True)
    path = str(study_dir / "optuna.journal")
    return optuna.storages.JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))


def open_study(sweep: SweepConfig, base: Path, worker: str | None = None) -> Study:
    """Create or load the Optuna study, the MLflow experiment and the study's parent run."""
    study_dir = Path(sweep.study_dir or Path("studies") / sweep.name).resolve()
    storage = make_storage(sweep, study_dir)
    base_cfg = load_config(base, sweep.overrides)
    definition = definition_hash(sweep, base_cfg)
    study = optuna.create_study(study_name=sweep.name, storage=storage, pruner=make_pruner(sweep),
                                direction=sweep.objective.direction, load_if_exists=True)
    found = study.user_attrs.get("definition_hash")
    if found is not None and found != definition:
        raise ConfigError(
            f"study {sweep.name!r} in {sweep.storage or study_dir} was created from a different sweep definition "
            f"(params, overrides, objective, seeds or the base config changed). Resuming would mix "
            f"incomparable trials: give the new study its own name (e.g. name={sweep.name}-v2) or "
            f"delete the old study")
    trials = study.get_trials(deepcopy=False)
    # a worker, or a process joining a study others are running (another host): its own draws
    if worker is None and any(t.state == TrialState.RUNNING for t in trials):
        worker = _this_process()
    study.sampler = make_sampler(sweep, len(trials), zlib.crc32(worker.encode()) if worker else 0)
    study.set_user_attr("definition_hash", definition)
    uri = tracking.resolve_tracking_uri(sweep.tracking_uri or base_cfg.tracking.uri)
    client, experiment_id = tracking.open_experiment(uri, sweep.name)
    parent = study.user_attrs.get("mlflow_parent_run_id")
    if parent is None or _run_missing(client, parent):
        parent = tracking.create_run(client, experiment_id, f"study-{sweep.name}", {
            "ouro.study": sweep.name, "ouro.role": "study", **tracking.reproducibility_tags()})
        study.set_user_attr("mlflow_parent_run_id", parent)
        tracking.log_params(client, parent, {f"sweep.{k}": v for k, v in _sweep_params(sweep).items()})
        client.log_text(parent, _sweep_yaml(sweep), "sweep.yaml")
    else:
        client.update_run(parent, status="RUNNING")
    return Study(sweep, base, study, client, uri, experiment_id, parent, study_dir)


def definition_hash(sweep: SweepConfig, base_cfg: ExperimentConfig) -> str:
    """What makes two invocations the same study: the search space, objective, seeds and the
    resolved experiment config (budget, timeout and retries may change between resumes)."""
    from omegaconf import OmegaConf

    d = OmegaConf.to_container(OmegaConf.structured(sweep))
    for key in ("trials", "timeout", "retries", "storage", "heartbeat_interval", "grace_period", "study_dir",
                "tracking_uri", "pruner"):
        d.pop(key)
    d["base_config"] = to_dict(base_cfg)
    d["base_config"].pop("tracking")
    if d["base_config"]["train"].get("strategy") == "auto":  # NOTE: a later key; studies made before it resume
        d["base_config"]["train"].pop("strategy")
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _sweep_yaml(sweep: SweepConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(sweep))


def _sweep_params(sweep: SweepConfig) -> dict[str, Any]:
    return {"objective": f"{sweep.objective.direction} {sweep.objective.metric}", "sampler": sweep.sampler.name,
            "pruner": json.dumps(dict(sweep.pruner)), "trials": sweep.trials, "seeds": sweep.seeds,
            "params": ", ".join(sweep.params), "overrides": " ".join(sweep.overrides)}


def _run_missing(client: MlflowClient, run_id: str) -> bool:
    try:
        return client.get_run(run_id).info.lifecycle_stage == "deleted"
    except Exception:
        return True


# --- trials ------------------------------------------------------------------------------

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


class Discarded(Exception):
    """A trial that another worker's trial made redundant before it trained anything."""


def claim(s: Study, trial: optuna.Trial, total: int) -> None:
    """Raise `Discarded` unless this trial may run. Several workers check the budget and ask
    Optuna for a trial at about the same time, so the check is repeated here, ordered by trial
    number (which the storage assigns atomically): a trial runs only if the trials numbered
    before it leave room in the budget, and (grid) none of them already holds its grid point,
    and (retry) none of them already retries the same interrupted trial. NOTE: Optuna's
    GridSampler may hand one point to two concurrent workers (DESIGN.md Part 3)."""
    trials = s.study.get_trials(deepcopy=False)
    retried = _retried(trials)
    live = [t for t in trials if t.number < trial.number and _claims_budget(t, s.sweep.retries, retried)]
    if len(live) >= total:
        raise Discarded(f"budget of {total} trials already claimed by earlier trials")
    grid_id = s.study._storage.get_trial_system_attrs(trial._trial_id).get("grid_id")
    retry_of = trial.user_attrs.get("retry_of")
    for t in live:
        if grid_id is not None and t.system_attrs.get("grid_id") == grid_id:
            raise Discarded(f"grid point already taken by trial {t.number}")
        if retry_of is not None and t.user_attrs.get("retry_of") == retry_of:
            raise Discarded(f"trial {retry_of} is already retried by trial {t.number}")


def run_trial(s: Study, trial: optuna.Trial, verbose: bool, total: int | None = None) -> float:
    sweep = s.sweep
    trial.set_user_attr("worker", _this_process())
    if total is not None:
        claim(s, trial, total)
    sampled = suggest(trial, sweep)
    overrides = [*sweep.overrides, *(override_for(k, v) for k, v in sampled.items()),
                 f"tracking.uri={s.tracking_uri}", f"tracking.experiment={sweep.name}", "train.progress_bar=false"]
    cfg = load_config(s.base, overrides)
    label = " ".join(f"{k}={v}" for k, v in sampled.items())
    tags = {"ouro.study": sweep.name, "ouro.trial": str(trial.number), "ouro.role": "trial",
            "optuna.state": "RUNNING"}
    if sweep.seeds == 1:
        value, _ = _train_seed(s, trial, cfg, cfg.train.seed, 0, s.parent_run_id, tags, label, verbose)
        return value
    # several seeds: a trial run holding the mean and spread, with one child run per seed
    trial_run = tracking.create_run(s.client, s.experiment_id, f"trial-{trial.number} {label}",
                                    tags | tracking.reproducibility_tags(), s.parent_run_id)
    trial.set_user_attr("mlflow_run_id", trial_run)
    tracking.log_params(s.client, trial_run, {k: v for k, v in flatten(to_dict(cfg)).items() if k != "train.seed"})
    results, values = [], []
    first_seed = cfg.train.seed
    try:
        for i in range(sweep.seeds):
            seed_tags = {"ouro.study": sweep.name, "ouro.trial": str(trial.number), "ouro.role": "seed"}
            value, run_id = _train_seed(s, trial, cfg, first_seed + i, i, trial_run, seed_tags,
                                        f"{label} seed {first_seed + i}", verbose)
            values.append(value)
            results.append(s.client.get_run(run_id).data.metrics)
    except BaseException as err:
        _end_run(s.client, trial_run, err)
        raise
    _log_aggregate(s.client, trial_run, results, sweep.objective.metric)
    _end_run(s.client, trial_run, None)
    return statistics.fmean(values)


def _train_seed(s: Study, trial: optuna.Trial, cfg: ExperimentConfig, seed: int, index: int, parent: str,
                tags: dict[str, str], label: str, verbose: bool) -> tuple[float, str]:
    """Train one seed (or reuse an identical finished run of this study); return (objective, run id)."""
    cfg.train.seed = seed
    cfg.tracking.run_name = f"trial-{trial.number} {label}"
    digest = canonical_hash(cfg)
    tags = tags | {"ouro.config_hash": digest}
    metric = s.sweep.objective.metric
    reused = _find_finished(s, digest)
    if reused is not None:
        run_id = _copy_run(s, reused, cfg, parent, tags)
        value = reused.data.metrics.get(metric)
        if verbose:
            print(f"[sweep] trial {trial.number}: reusing identical run {reused.info.run_id} ({label})", flush=True)
        if value is None:
            raise KeyError(f"objective metric {metric!r} was not logged by run {reused.info.run_id}")
        return value, run_id
    offset = index * cfg.train.max_steps
    run_id = tracking.create_run(s.client, s.experiment_id, cfg.tracking.run_name, tags, parent)
    if s.sweep.seeds == 1:
        trial.set_user_attr("mlflow_run_id", run_id)
    if verbose:
        print(f"[sweep {s.sweep.name}] trial {trial.number} started: {label}", flush=True)
    try:
        result: TrainResult = train(cfg, run_id=run_id, callbacks=[PruningCallback(trial, metric, offset)],
                                    extra_tags=tags, verbose=False)
    except BaseException as err:
        if s.client.get_run(run_id).info.status == "RUNNING":  # failed before train() could end it
            _end_run(s.client, run_id, err)
        else:
            s.client.set_tag(run_id, "optuna.state", state_of(err))
        raise
    value = (result.val | result.test).get(metric)
    problem = None
    if value is None:
        problem = (f"objective metric {metric!r} was not logged; available e.g. "
                   f"{', '.join(sorted(result.val)[:6])} ...")
    elif not math.isfinite(value):
        problem = f"objective metric {metric!r} is {value}"
    if problem:
        s.client.set_tag(result.run_id, "optuna.state", "FAIL")
        s.client.set_tag(result.run_id, "error", problem)
        raise ValueError(problem)
    s.client.set_tag(result.run_id, "optuna.state", "COMPLETE")
    return value, result.run_id


def _find_finished(s: Study, digest: str):
    # NOTE: MLFlowLogger marks a run FINISHED as soon as fit() ends, before the final
    # validation and test; only the sweep's own COMPLETE tag says the run is whole.
    runs = s.client.search_runs(
        [s.experiment_id], filter_string=f"tags.`ouro.config_hash` = '{digest}' and attributes.status = 'FINISHED' "
                                         "and tags.`optuna.state` = 'COMPLETE'",
        max_results=10)
    originals = [r for r in runs if "ouro.reused_from" not in r.data.tags]
    return originals[0] if originals else None


def _copy_run(s: Study, source, cfg: ExperimentConfig, parent: str, tags: dict[str, str]) -> str:
    """A child run that points at an identical finished run and carries its final metrics;
    its params are this trial's own config (e.g. the T it stands for), plus the derived facts."""
    source_tags = {k: v for k, v in source.data.tags.items() if k.startswith(("ouro.", "versions.", "mlflow.source"))}
    run_tags = source_tags | tags | {"ouro.reused_from": source.info.run_id, "optuna.state": "COMPLETE",
                                     "ouro.loops": str(cfg.model.loops), "ouro.seed": str(cfg.train.seed)}
    run_id = tracking.create_run(s.client, s.experiment_id, cfg.tracking.run_name, run_tags, parent)
    derived = {k: v for k, v in source.data.params.items() if k.startswith("derived.")}
    tracking.log_params(s.client, run_id, flatten(to_dict(cfg)) | derived)
    tracking.log_metrics(s.client, run_id, source.data.metrics)
    s.client.set_terminated(run_id, "FINISHED")
    return run_id


def _log_aggregate(client: MlflowClient, run_id: str, results: list[dict[str, float]], objective: str) -> None:
    """Mean over seeds of every final val/test metric (same names), and the objective's spread."""
    keys = set.intersection(*(set(r) for r in results))
    metrics = {k: statistics.fmean(r[k] for r in results) for k in sorted(keys)
               if k.startswith(("val/", "test/", "model/"))}
    values = [r[objective] for r in results if objective in r]
    if len(values) > 1:
        metrics |= {f"seeds/{objective}_std": statistics.stdev(values), f"seeds/{objective}_min": min(values),
                    f"seeds/{objective}_max": max(values)}
    tracking.log_metrics(client, run_id, metrics)


def state_of(err: BaseException) -> str:
    return "PRUNED" if isinstance(err, optuna.TrialPruned) else "FAIL"


def _end_run(client: MlflowClient, run_id: str, err: BaseException | None) -> None:
    """End a run the sweep made and tag its Optuna state (COMPLETE / PRUNED / FAIL)."""
    client.set_tag(run_id, "optuna.state", "COMPLETE" if err is None else state_of(err))
    tracking.end_run(client, run_id, err)


# --- the study loop ----------------------------------------------------------------------

def _interrupted(t: optuna.trial.FrozenTrial) -> bool:
    return t.state == TrialState.FAIL and bool(t.user_attrs.get("interrupted"))


def _retried(trials: Sequence[optuna.trial.FrozenTrial]) -> set[int]:
    """Numbers of the trials that a later trial retries."""
    return {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}


def _counts_toward_budget(t: optuna.trial.FrozenTrial, retries: int, retried: set[int]) -> bool:
    """Complete, pruned and failed (crash, NaN) trials use the budget; an interrupted trial
    does not while it will be retried or once it is (its retry stands in for it), nor does a
    discarded one (it never ran)."""
    if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    if t.state == TrialState.FAIL:
        if t.user_attrs.get("discarded") or t.number in retried or not t.params:  # never trained
            return False
        return not _interrupted(t) or t.user_attrs.get("retry_depth", 0) >= retries
    return False


def _budget_used(trials: Sequence[optuna.trial.FrozenTrial], retries: int) -> int:
    retried = _retried(trials)
    return sum(_counts_toward_budget(t, retries, retried) for t in trials)


def _claims_budget(t: optuna.trial.FrozenTrial, retries: int, retried: set[int]) -> bool:
    """Uses the budget, or will: running, or queued (a retry)."""
    return _counts_toward_budget(t, retries, retried) or t.state in (TrialState.RUNNING, TrialState.WAITING)


def recover_interrupted(s: Study, verbose: bool) -> None:
    """Mark trials left RUNNING by a dead worker as FAIL, end their MLflow runs, and enqueue
    retries for interrupted trials. Dead = no heartbeat (RDB storage, any host), or (journal
    storage, which has no heartbeat) a worker process on this host that no longer exists."""
    host = socket.gethostname()
    storage = s.study._storage
    if _has_heartbeat(s.study):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(s.study)
    now = datetime.datetime.now()
    for t in s.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker", "")
        w_host, _, w_pid = worker.rpartition(":")
        # a worker names itself right after asking for the trial; silent for a minute = died in between
        unnamed = not worker and t.datetime_start is not None and (now - t.datetime_start).total_seconds() > 60
        if unnamed or (w_host == host and not _pid_alive(int(w_pid or 0))):
            if not t.user_attrs.get("interrupted"):
                storage.set_trial_user_attr(t._trial_id, "interrupted", "worker process died")
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            if verbose:
                print(f"[sweep {s.sweep.name}] trial {t.number} was left running by a dead worker "
                      f"({worker}): marked FAIL", flush=True)
    states = {t.number: t for t in s.study.get_trials(deepcopy=False)}
    for run in s.client.search_runs([s.experiment_id], filter_string="attributes.status = 'RUNNING'"):
        if run.info.run_id == s.parent_run_id:
            continue
        trial_no = run.data.tags.get("ouro.trial")
        if trial_no is not None and int(trial_no) in states and states[int(trial_no)].state.is_finished():
            s.client.set_tag(run.info.run_id, "optuna.state", "FAIL")
            s.client.set_tag(run.info.run_id, "error", "interrupted: the sweep process was killed")
            s.client.set_terminated(run.info.run_id, "KILLED")
    trials = list(states.values())
    retried = _retried(trials)
    for t in trials:
        depth = t.user_attrs.get("retry_depth", 0)
        if _interrupted(t) and t.params and t.number not in retried and depth < s.sweep.retries:
            s.study.enqueue_trial(t.params, user_attrs={"retry_of": t.number, "retry_depth": depth + 1},
                                  skip_if_exists=False)
            if verbose:
                print(f"[sweep {s.sweep.name}] re-queued interrupted trial {t.number} "
                      f"(retry {depth + 1}/{s.sweep.retries})", flush=True)


def _has_heartbeat(study: optuna.Study) -> bool:
    from optuna.storages._heartbeat import is_heartbeat_enabled  # NOTE: not exported by Optuna 5

    return is_heartbeat_enabled(study._storage)


class RetryStaleTrial:
    """Optuna's callback for a trial whose heartbeat stopped (RDB storage): it has just been
    set FAIL; queue its retry (the retry_of link keeps the failed one off the budget).
    NOTE: a finished trial's attrs cannot be changed any more, so the reason goes on the retry;
    a class, not a closure, because a DDP rank gets the storage (and this) pickled."""

    def __init__(self, retries: int):
        self.retries = retries

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        depth = trial.user_attrs.get("retry_depth", 0)
        again = depth < self.retries and bool(trial.params)  # no params: it never started, nothing to retry
        print(f"[sweep {study.study_name}] trial {trial.number} lost its worker (no heartbeat): marked FAIL"
              + (f", re-queued (retry {depth + 1}/{self.retries})" if again else ""), flush=True)
        if again:
            study.enqueue_trial(trial.params, skip_if_exists=False, user_attrs={
                "retry_of": trial.number, "retry_depth": depth + 1, "retry_reason": "no heartbeat: its worker died"})


def _this_process() -> str:
    """How a worker names itself on its trials (`worker` user attr): host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def budget(sweep: SweepConfig) -> int:
    if sweep.sampler.name == "grid":
        size = math.prod(len(grid_values(spec)) for spec in sweep.params.values())
        return min(size, sweep.trials) if sweep.trials else size
    return sweep.trials


@dataclass
class SweepSummary:
    name: str
    study_dir: Path
    storage: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    counts: dict[str, int]
    best: list[dict[str, Any]]
    seconds: float

    def table(self, k: int = 5) -> str:
        lines = [f"best {min(k, len(self.best))} of {self.counts.get('COMPLETE', 0)} complete trials "
                 f"({', '.join(f'{n} {s.lower()}' for s, n in sorted(self.counts.items()))}):"]
        for row in self.best[:k]:
            spread = f" ± {row['std']:.4f}" if row.get("std") is not None else ""
            lines.append(f"  trial {row['number']:>3}  {row['value']:.4f}{spread}  "
                         + " ".join(f"{p}={v}" for p, v in row["params"].items()))
        return "\n".join(lines)


def run_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = (), verbose: bool = True,
              workers: int = 1, gpus: Sequence[str] = ()) -> SweepSummary:
    """Run (or resume) the study declared in `path` until its budget or timeout is used up:
    in this process, or with `workers` > 1 (or `gpus`) in that many worker processes sharing
    the study and the MLflow store (`run_workers`)."""
    from ouro_lab.sweep_config import load_sweep

    sweep, base = load_sweep(path, overrides)
    cfg = load_config(base, sweep.overrides)
    if cfg.train.strategy == "ddp":
        raise ConfigError("train.strategy=ddp re-runs the whole command in every rank, this sweep included: "
                          "use ddp_spawn (the default for train.devices > 1)")
    if cfg.train.devices > 1 and (workers > 1 or gpus):
        raise ConfigError(f"train.devices={cfg.train.devices} (DDP trials) with --workers/--gpus: each worker is "
                          "pinned to one GPU; run DDP trials with one worker per host")
    s = open_study(sweep, base)  # the store, experiment, parent run and study exist before any worker
    total, start = budget(sweep), time.perf_counter()
    storage_desc = sweep.storage or str(s.study_dir / "optuna.journal")
    if verbose:
        print(f"[sweep {sweep.name}] study in {storage_desc}; runs in {s.tracking_uri} "
              f"(experiment {sweep.name!r}); budget {total} trials x {sweep.seeds} seed(s)"
              + (f"; {len(gpus) or workers} workers" if workers > 1 or gpus else ""), flush=True)
    try:
        if workers > 1 or gpus:
            run_workers(path, overrides, workers, gpus, verbose)
            # a worker that died late may have left its trial for nobody: finish the budget here
            work(s, total, start, sweep.name, verbose, wait=True)
        else:
            # RDB: a trial left RUNNING by a dead process elsewhere is failed once its heartbeat
            # lapses; wait for that rather than end the study short
            work(s, total, start, sweep.name, verbose, wait=_has_heartbeat(s.study))
    except (KeyboardInterrupt, SystemExit):
        s.client.set_terminated(s.parent_run_id, "KILLED")
        print(f"\n[sweep {sweep.name}] interrupted; finished trials are saved. Rerun the same command to resume.",
              file=sys.stderr, flush=True)
        raise
    summary = summarize(s, time.perf_counter() - start, storage_desc)
    _log_summary(s, summary)
    if verbose:
        print(summary.table())
        print(f"[sweep {sweep.name}] done in {summary.seconds:.0f} s. study: {storage_desc}")
        print(f"[sweep {sweep.name}] view: {tracking.where_to_look(s.tracking_uri, s.experiment_id)}")
        store = "" if sweep.tracking_uri is None and s.tracking_uri == tracking.resolve_tracking_uri() \
            else f" --store {s.tracking_uri}"
        print(f"[sweep {sweep.name}] analyse: ouro-lab report {sweep.name}{store}")
    return summary


def run_worker(path: str | Path, overrides: list[str] | tuple[str, ...], index: int, verbose: bool = True) -> None:
    """One worker of `run_workers`: the trial loop on the shared study, nothing else (the
    coordinating process made the study and summarises it)."""
    from ouro_lab.sweep_config import load_sweep

    threads = int(os.environ.get("OURO_WORKER_THREADS", "0"))
    if threads:
        import torch

        torch.set_num_threads(threads)
    sweep, base = load_sweep(path, overrides)
    s = open_study(sweep, base, worker=f"{socket.gethostname()}:{index}")
    work(s, budget(sweep), time.perf_counter(), f"{sweep.name} w{index}", verbose)


def run_workers(path: str | Path, overrides: Sequence[str], workers: int, gpus: Sequence[str], verbose: bool) -> None:
    """Start one worker process per GPU (CUDA_VISIBLE_DEVICES pinned) or `workers` CPU workers
    (cores split between them so they do not oversubscribe), and wait for them. A worker that
    dies leaves its trial to the others: they mark it failed and retry it."""
    import torch

    if not gpus and torch.cuda.is_available():  # K workers over the visible GPUs, round robin
        gpus = [str(i % torch.cuda.device_count()) for i in range(workers)]
    n = len(gpus) or workers
    threads = max(1, len(os.sched_getaffinity(0)) // n)
    procs = []
    for i in range(n):
        env = os.environ | {"OURO_WORKER_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
                            "MKL_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": gpus[i] if gpus else ""}
        cmd = [sys.executable, "-m", "ouro_lab.cli", "sweep", str(path), *overrides, "--as-worker", str(i)]
        procs.append(subprocess.Popen(cmd, env=env))
        if verbose:
            where = f"GPU {gpus[i]}" if gpus else f"CPU, {threads} thread(s)"
            print(f"[sweep] worker {i} pid {procs[-1].pid} on {where}", flush=True)
    try:
        # NOTE: reap each worker as soon as it ends: a dead child left unreaped is a zombie,
        # which still looks alive to the others' check of its pid
        while any(p.poll() is None for p in procs):
            time.sleep(0.5)
        codes = [p.returncode for p in procs]
    except KeyboardInterrupt:
        for p in procs:  # they got the terminal's SIGINT too; wait for them to save their state
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        raise
    for i, code in enumerate(codes):
        if code != 0 and verbose:
            print(f"[sweep] worker {i} ended with status {code}; its trial is retried by the others or by a rerun",
                  file=sys.stderr, flush=True)


def work(s: Study, total: int, start: float, label: str, verbose: bool, wait: bool = False) -> None:
    """The trial loop of one process: run trials until the budget is used up or the timeout.
    `wait`: while the rest of the budget is held by running trials, wait for them instead of
    returning (one of them may belong to a dead worker, to be failed and retried)."""
    sweep = s.sweep

    def objective(trial: optuna.Trial) -> float:
        try:
            return run_trial(s, trial, verbose, total)
        except Discarded as err:
            trial.set_user_attr("discarded", str(err))
            raise
        except (KeyboardInterrupt, SystemExit):
            trial.set_user_attr("interrupted", "Ctrl-C / SystemExit")
            raise
        except optuna.TrialPruned:
            raise
        except Exception as err:
            trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:2000])
            raise

    def report(study: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
        if not verbose:
            return
        if t.user_attrs.get("discarded"):
            print(f"[sweep {label}] trial {t.number} not run: {t.user_attrs['discarded']}", flush=True)
            return
        done = _budget_used(study.get_trials(deepcopy=False), sweep.retries)
        try:
            best = f"best {study.best_value:.4f} (trial {study.best_trial.number})"
        except ValueError:
            best = "no complete trial yet"
        what = f"{sweep.objective.metric}={t.value:.4f}" if t.value is not None else (
            t.user_attrs.get("error") or t.user_attrs.get("interrupted") or "")
        print(f"[sweep {label}] {done}/{total} trial {t.number} {t.state.name} {what} | {best} | "
              f"{' '.join(f'{k}={v}' for k, v in t.params.items())} | "
              f"{(t.duration.total_seconds() if t.duration else 0):.0f} s", flush=True)

    try:
        while True:
            recover_interrupted(s, verbose)  # trials of a dead process: an earlier killed run, another worker
            trials = s.study.get_trials(deepcopy=False)
            # queued retries are work left: only what ran or is running fills the budget
            done = _budget_used(trials, sweep.retries)
            running = sum(t.state == TrialState.RUNNING for t in trials)
            waiting = any(t.state == TrialState.WAITING for t in trials)  # a queued retry: always pop it
            if not waiting and (done >= total or (done + running >= total and not wait)):
                break
            if sweep.timeout is not None and time.perf_counter() - start > sweep.timeout:
                if verbose:
                    print(f"[sweep {label}] timeout of {sweep.timeout:.0f} s reached", flush=True)
                break
            if not waiting and done + running >= total:  # wait: a running trial's worker may be dead
                time.sleep(1)
                continue
            s.study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[report])
    except (KeyboardInterrupt, SystemExit):
        me = _this_process()
        for t in s.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.user_attrs.get("worker") == me:  # Optuna leaves it RUNNING on a BaseException
                s.study._storage.set_trial_user_attr(t._trial_id, "interrupted", "Ctrl-C")
                s.study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        raise


def summarize(s: Study, seconds: float, storage_desc: str) -> SweepSummary:
    # a discarded trial never ran (another worker's trial made it redundant): not counted
    trials = [t for t in s.study.get_trials(deepcopy=False) if not t.user_attrs.get("discarded")]
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    reverse = s.sweep.objective.direction == "maximize"
    best = []
    for t in sorted(complete, key=lambda t: t.value, reverse=reverse):
        std = None
        run_id = t.user_attrs.get("mlflow_run_id")
        if s.sweep.seeds > 1 and run_id:
            std = s.client.get_run(run_id).data.metrics.get(f"seeds/{s.sweep.objective.metric}_std")
        best.append({"number": t.number, "value": t.value, "std": std, "params": t.params, "run_id": run_id})
    return SweepSummary(s.sweep.name, s.study_dir, storage_desc, s.tracking_uri, s.experiment_id, s.parent_run_id,
                        counts, best, seconds)


def _log_summary(s: Study, summary: SweepSummary) -> None:
    s.study_dir.mkdir(parents=True, exist_ok=True)
    text = summary.table(k=len(summary.best) or 1)
    (s.study_dir / "summary.txt").write_text(text + "\n")
    s.client.log_text(s.parent_run_id, text, "summary.txt")
    metrics = {f"study/n_{k.lower()}": v for k, v in summary.counts.items()}
    if summary.best:
        metrics[f"study/best_{s.sweep.objective.metric.replace('/', '_')}"] = summary.best[0]["value"]
    tracking.log_metrics(s.client, s.parent_run_id, metrics)
    failed_all = summary.counts and not summary.counts.get("COMPLETE") and not summary.counts.get("PRUNED")
    s.client.set_terminated(s.parent_run_id, "FAILED" if failed_all else "FINISHED")
