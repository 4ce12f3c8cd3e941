"""Opening a study: Optuna storage (journal file, or RDB with heartbeats), sampler, pruner,
the definition check that refuses to resume a changed sweep, and the study's MLflow parent run."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from omegaconf import OmegaConf
from optuna.trial import TrialState

from ouro_lab import tracking
from ouro_lab.config import ConfigError, ExperimentConfig, load_config, to_dict
from ouro_lab.errors import StoreError
from ouro_lab.locations import writable_dir
from ouro_lab import run_record as rr
from ouro_lab.run_record import STUDY_HASH_LATER, drop_later_defaults
from ouro_lab.sweep.budget import counts_toward_budget, retried_trials
from ouro_lab.sweep.repair import repair_journal
from ouro_lab.sweep.design import DesignPruner, DesignSampler
from ouro_lab.sweep.schema import SweepConfig, grid_values

optuna.logging.set_verbosity(optuna.logging.WARNING)


class _NoFailureTracebacks(logging.Filter):
    """NOTE: Optuna logs ~90 lines of traceback for every failed trial; the sweep prints one
    line per trial with its error, and the traceback goes to the trial's run (error.txt)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not (message.startswith("Trial ") and " failed" in message)


logging.getLogger("optuna.study._optimize").addFilter(_NoFailureTracebacks())


@dataclass
class Study:
    """An open study: its definition, the Optuna study, and its MLflow experiment and parent run."""

    sweep: SweepConfig
    base: Path  # the experiment config the trials start from
    study: optuna.Study
    experiment: tracking.Experiment  # the MLflow experiment named after the study
    parent: tracking.Run  # the study's parent run; trial runs nest under it
    study_dir: Path

    @property
    def tracking_uri(self) -> str:
        return self.experiment.tracking_uri


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
        retried = retried_trials(trials)
        held, running = set(), set()
        for t in trials:
            gid = self.grid_id(t)
            if gid is None:
                continue
            if t.state in (TrialState.RUNNING, TrialState.WAITING):
                running.add(gid)
            elif t.state != TrialState.FAIL or counts_toward_budget(t, self.retries, retried):
                held.add(gid)
        everything = set(range(self._n_min_trials))
        return list(everything - held - running) or list(everything - held)


def make_sampler(sweep: SweepConfig, n_existing: int = 0, salt: int = 0) -> optuna.samplers.BaseSampler:
    """The grid's order depends on the seed alone (it skips visited points), the same in every
    worker. The others draw from a fresh random state per process: NOTE a resumed study must not
    replay the first process's draws, so their seed is moved on by the number of trials already
    in the study, and concurrent workers must not draw in lockstep, so each adds its own `salt`."""
    s = sweep.sampler
    if s.name == "adaptive":  # (its decisions depend on the finished trials alone: no seed to move on)
        return DesignSampler(sweep)
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
    if name == "design":
        return DesignPruner(sweep, **settings)
    return {
        "none": optuna.pruners.NopPruner,
        "median": optuna.pruners.MedianPruner,
        "hyperband": optuna.pruners.HyperbandPruner,
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    }[name](**settings)


def make_storage(sweep: SweepConfig, study_dir: Path) -> optuna.storages.BaseStorage | str:
    """Default: a journal file under the study folder, safe for several processes on one host.
    Any Optuna storage URL otherwise (e.g. postgresql://... for several hosts)."""
    if sweep.storage:  # (validated: one of STORAGE_SCHEMES)
        # NOTE: journal storage has no heartbeat; RDB has: a trial whose worker stops beating
        # is failed by the next worker that looks (our callback queues its retry)
        return optuna.storages.RDBStorage(sweep.storage, heartbeat_interval=sweep.heartbeat_interval,
                                          grace_period=sweep.grace_period,
                                          heartbeat_stale_trial_callback=RetryStaleTrial(sweep.retries))
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
    from optuna.storages.journal._file import get_lock_file  # NOTE: not exported; the lock Optuna appends under

    writable_dir(study_dir, "study_dir")
    path = str(study_dir / "optuna.journal")
    lock = JournalFileOpenLock(path)
    with get_lock_file(lock):
        repaired = repair_journal(Path(path))
    if repaired:
        print(f"[sweep {sweep.name}] {repaired}", flush=True)
    return optuna.storages.JournalStorage(JournalFileBackend(path, lock_obj=lock))


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


def this_process() -> str:
    """How a worker names itself on its trials (`worker` user attr): host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def open_study(sweep: SweepConfig, base: Path, worker: str | None = None) -> Study:
    """Create or load the Optuna study, the MLflow experiment and the study's parent run."""
    study_dir = Path(sweep.study_dir or Path("studies") / sweep.name).resolve()
    base_cfg = load_config(base, sweep.overrides)
    uri = tracking.resolve_tracking_uri(sweep.tracking_uri or base_cfg.tracking.uri)
    _refuse_a_lost_half(sweep, study_dir, uri)
    storage = make_storage(sweep, study_dir)
    writable_dir(Path(base_cfg.tracking.output_dir), "tracking.output_dir")  # not found in trial 1's last step
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
        worker = this_process()
    study.sampler = make_sampler(sweep, len(trials), zlib.crc32(worker.encode()) if worker else 0)
    study.set_user_attr("definition_hash", definition)
    experiment = tracking.Experiment.open(uri, sweep.name)
    parent_id = study.user_attrs.get("mlflow_parent_run_id")
    _check_same_study(sweep, study, experiment, parent_id, sweep.storage or study_dir / "optuna.journal", uri)
    if parent_id is None or not experiment.has_run(parent_id):
        parent = experiment.create_run(f"study-{sweep.name}", rr.sweep_tags(sweep.name, rr.STUDY_RUN)
                                       | tracking.reproducibility_tags())
        study.set_user_attr("mlflow_parent_run_id", parent.id)
        parent.log_params({f"{rr.SWEEP}{k}": v for k, v in _sweep_params(sweep).items()})
        parent.log_text(OmegaConf.to_yaml(OmegaConf.structured(sweep)), rr.SWEEP_ARTIFACT)
    else:
        parent = experiment.run(parent_id)
        parent.reopen()
    return Study(sweep, base, study, experiment, parent, study_dir)


def _refuse_a_lost_half(sweep: SweepConfig, study_dir: Path, uri: str) -> None:
    """`_check_same_study` before anything is created, for the default journal: a refusal after a
    deleted store or journal must not leave a new empty one behind (other storages are checked
    once open, by `_check_same_study`)."""
    if sweep.storage:
        return
    journal = study_dir / "optuna.journal"
    if journal.exists():
        if not uri.startswith("sqlite:///") or Path(uri[len("sqlite:///"):]).exists():
            return  # both halves exist: checked once open
        try:
            study = optuna.load_study(study_name=sweep.name, storage=make_storage(sweep, study_dir))
        except KeyError:  # (a journal of other studies)
            return
        _check_same_study(sweep, study, None, study.user_attrs.get("mlflow_parent_run_id"), journal, uri)
    else:
        experiment = tracking.Experiment.lookup(uri, sweep.name)
        if experiment is not None:
            _check_same_study(sweep, None, experiment, None, journal, uri)


def _check_same_study(sweep: SweepConfig, study: optuna.Study | None, experiment: tracking.Experiment | None,
                      parent_id: str | None, where: Path | str, uri: str) -> None:
    """The Optuna study and the MLflow experiment must be one study's two halves: refused when
    one of them was deleted (or is looked for elsewhere) while the other holds finished work,
    as going on would silently start a second copy of every run or orphan the finished ones.
    `study` None: it does not exist yet; `experiment` None: neither does it."""
    finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()] if study else []
    if parent_id is not None and finished and (experiment is None or not experiment.has_run(parent_id)):
        raise StoreError(
            f"study {sweep.name!r} ({where}) has {len(finished)} finished trial(s), but its MLflow runs are not in "
            f"{uri} (study run {parent_id} not found): the store was deleted or moved, or "
            "tracking.uri points elsewhere. Point tracking_uri (sweep) or tracking.uri (config) at the store that "
            f"holds them, or give the sweep a new name= to start over (nothing was changed)")
    if parent_id is None and experiment is not None:
        others = experiment.find_runs(rr.role_filter(rr.STUDY_RUN), max_results=1)
        if others:
            trials = experiment.find_runs(rr.role_filter(rr.TRIAL_RUN))
            raise StoreError(
                f"MLflow experiment {sweep.name!r} in {uri} already holds study run "
                f"{others[0].info.run_id} with {len(trials)} trial run(s), but the Optuna study ({where}) is new: "
                "its journal was deleted or moved, or study_dir / storage points elsewhere. Point study_dir (or "
                f"storage) at the study's journal, or give the sweep a new name= to start over (nothing was changed)")


def definition_hash(sweep: SweepConfig, base_cfg: ExperimentConfig) -> str:
    """What makes two invocations the same study: the search space, objective, seeds and the
    resolved experiment config (budget, timeout and retries may change between resumes)."""
    d = OmegaConf.to_container(OmegaConf.structured(sweep))
    for key in ("trials", "timeout", "retries", "storage", "heartbeat_interval", "grace_period", "study_dir",
                "tracking_uri", "pruner", "test_time_run"):  # (test_time_run: a run beside the trials, added any time)
        d.pop(key)
    if not d["bundles"]:
        d.pop("bundles")  # (studies made before bundles existed keep their hash)
    if sweep.sampler.name != "adaptive":
        d.pop("design")  # (the design's settings matter to its own sampler only; older studies keep their hash)
    else:
        d["design"].pop("flops")  # (a budget, like trials and timeout: it may change between resumes)
        for key, default in (("scale", "auto"), ("confirm", 2)):
            if d["design"][key] == default:
                d["design"].pop(key)  # (studies made before the setting keep their hash)
    d["base_config"] = to_dict(base_cfg)
    d["base_config"].pop("tracking")
    drop_later_defaults(d["base_config"], STUDY_HASH_LATER)  # at their defaults, left out: studies made before resume
    d["base_config"] = {k: v for k, v in d["base_config"].items() if v != {}}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _sweep_params(sweep: SweepConfig) -> dict[str, Any]:
    return {"objective": f"{sweep.objective.direction} {sweep.objective.metric}", "sampler": sweep.sampler.name,
            "pruner": json.dumps(dict(sweep.pruner)), "trials": sweep.trials, "seeds": sweep.seeds,
            "params": ", ".join(sweep.params), "overrides": " ".join(sweep.overrides)}
