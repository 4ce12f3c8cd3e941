"""A study read back from MLflow as tidy DataFrames (`StudyData`): the only module of the
analysis that talks to MLflow (reading runs; `attach_report` writes the report back).

Vocabulary: a *unit run* is one trained (or reused) model: a seed of a trial, or the trial
itself when the sweep has one seed, or a plain `ouro-lab train` run. *T* is the trained loop
count (`model.loops`), *t* the evaluation loop step (t > T is extrapolation). A *group* is one
setting of everything else that varies in the study (sequence length, beta, prior ...).
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import optuna
import pandas as pd
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from ouro_lab import tracking
from ouro_lab.config import ExperimentConfig, ModelConfig, flatten, to_dict
from ouro_lab.metric_names import (EXIT_METRIC, EXIT_RULE_METRIC, GATE_METRIC, GATE_SCALARS, INFERENCE_METRIC,
                                   ORACLE_METRIC, STEP_METRIC, objective_kind)

# keys that never define a group: the axes of the analysis, bookkeeping, and facts derived from them
NOT_GROUPING = ("model.loops", "model.arch", "train.seed", "tracking.", "train.progress_bar", "train.precision",
                "stage2.init_from",  # (a Stage II run's checkpoint path is per seed, like the seed)
                "infer.")  # (how an `ouro-lab eval` ran, not what it evaluated: the skip table's axes)
RUN_SOURCES = ("auto", "train", "eval")  # what `load_study` analyses: see its docstring
MAX_GROUP_VALUES = 8  # outside sweeps, a varying key with more distinct values is averaged over
LOWER_IS_BETTER = ("loss", "bpb", "exit_entropy", "exit_expected_step")
ALL = "all"  # the difficulty label of the metric over all labelled positions


class AnalysisError(ValueError):
    """The study cannot be analysed as asked (unknown study, no finished runs, unknown metric)."""


@dataclass
class StudyData:
    """Everything the analysis needs, read once from MLflow.

    runs:   one row per finished unit run: run_id, trial, seed, arch, loops, task, group,
            <group keys>, n_params, forward_flops_per_token, train_flops, state.
    steps:  tidy, one row per unit run x split x eval step t x difficulty; one column per
            metric kind (acc, loss, ...). Difficulty is "all" or "d1".."dK".
    exits:  tidy, one row per looped unit run x split x difficulty: exit_expected_step, exit_entropy.
    trials: one row per Optuna trial (sweeps only): number, state, value, sampled params.
    skip:   one row per `ouro-lab eval` run with an exit rule (every such run in the experiment):
            run_id, evaluated (the checkpoint's run or file), split, rule, threshold, and the
            skip / select / full metrics (skip_acc, select_loops, full_flops, ...).
    source: "train" (unit runs are training runs) or "eval" (unit runs are `ouro-lab eval` runs,
            the latest per checkpoint and split: an imported checkpoint has no training run).
    """

    name: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str | None
    sweep: dict[str, Any]
    distributions: dict[str, optuna.distributions.BaseDistribution]  # swept param -> how it was sampled
    runs: pd.DataFrame
    steps: pd.DataFrame
    exits: pd.DataFrame
    trials: pd.DataFrame
    group_keys: list[str]
    averaged_keys: list[str]
    counts: dict[str, int]
    # early exit (looped runs): frontier = one row per unit run x split x rule x threshold x
    # difficulty (acc, loss, bpb, loops_used; rule q | conf | change | oracle_stable | oracle_right);
    # gate = one row per unit run x split: gate_q/loops/flops_at_eps, gate_saved_loops, gate_efficiency,
    # oracle_stable_share_step{t}[_d{k}], exit_expected_step_at_oracle{t}
    frontier: pd.DataFrame = field(default_factory=pd.DataFrame)
    gate: pd.DataFrame = field(default_factory=pd.DataFrame)
    difficulty_name: str = "difficulty"
    objective_metric: str = "val/acc_final"
    direction: str = "maximize"
    skip: pd.DataFrame = field(default_factory=pd.DataFrame)
    source: str = "train"
    # `ouro-lab bench` runs: one row per checkpoint x task x loop step (0 = under its exit rule)
    bench: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def kind(self) -> str:
        """The per-step metric kind the report reads: the objective's ('acc' for val/acc_final,
        'loss' for val/loss_step3), or for an objective that is no per-step metric (the gate's
        val/gate_efficiency) the task's own: bpb if logged, else acc."""
        kind = objective_kind(self.objective_metric)
        if kind in self.steps.columns:
            return kind
        return "bpb" if "bpb" in self.steps.columns else "acc"

    def direction_of(self, kind: str) -> str:
        """Which way is better for a metric kind: the sweep's direction for its own kind."""
        if kind == objective_kind(self.objective_metric):
            return self.direction
        return "minimize" if kind in LOWER_IS_BETTER else "maximize"

    @property
    def split(self) -> str:
        return "test" if "test" in set(self.steps["split"]) else "val"

    @property
    def groups(self) -> list[str]:
        """Group labels ordered by their values (length 8 before 12)."""
        def key(row) -> tuple:
            return tuple((type(row[k]).__name__, row[k]) for k in self.group_keys)

        firsts = self.runs.drop_duplicates("group")
        return [row["group"] for _, row in sorted(firsts.iterrows(), key=lambda item: key(item[1]))]


def resolve_store(store: str | None) -> str:
    """A tracking URI from a URI, a path to an sqlite file, or None (the embedded default)."""
    if store is None or "://" in store:
        uri = tracking.resolve_tracking_uri(store)
        if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
            raise AnalysisError(f"no MLflow store at {uri} (run a sweep here first, or pass the store: "
                                f"a tracking URI or the path of its mlflow.db)")
        return uri
    path = Path(store).expanduser()
    if not path.exists():
        raise AnalysisError(f"MLflow store {store!r} not found (expected an sqlite file such as mlflow.db "
                            f"or a tracking URI)")
    return f"sqlite:///{path.resolve()}"


def load_study(study: str, store: str | None = None, source: str = "auto") -> StudyData:
    """Read a study (its name, which is its MLflow experiment, or an experiment id) back from MLflow.

    Works on sweeps (parent run + trial runs + seed runs) and on experiments of plain
    `ouro-lab train` runs alike. `source`: which runs are the unit runs: "train" (training
    runs), "eval" (`ouro-lab eval` runs, the latest per checkpoint and split: the way to report
    on an imported checkpoint, which has no training run) or "auto" (train, else eval when the
    experiment holds evaluations only).
    """
    if source not in RUN_SOURCES:
        raise AnalysisError(f"unknown run source {source!r}; one of: {', '.join(RUN_SOURCES)}")
    uri = resolve_store(store)
    client = MlflowClient(uri)
    experiment = _experiment(client, study, uri)
    runs = _search_all(client, experiment.experiment_id)
    parents = [r for r in runs if r.data.tags.get("ouro.role") == "study"]
    parent = max(parents, key=lambda r: r.info.start_time) if parents else None
    sweep = _sweep_definition(client, parent.info.run_id) if parent else {}
    # unit runs carry a model config; a trial run with seed runs under it only holds their means
    with_seeds = {r.data.tags.get("mlflow.parentRunId") for r in runs if r.data.tags.get("ouro.role") == "seed"}
    evals = [r for r in runs if "model.arch" in r.data.params and r.data.tags.get("ouro.role") == "eval"]
    units = [r for r in runs if "model.arch" in r.data.params and r.info.run_id not in with_seeds
             and r.data.tags.get("ouro.role") != "eval"]  # (`ouro-lab eval` runs re-score a unit run)
    if source == "eval" or (source == "auto" and not units and evals):
        source, units = "eval", _latest_evals(evals)
    else:
        source = "train"
    counts: dict[str, int] = {}
    for r in units:
        state = _state(r)
        counts[state] = counts.get(state, 0) + 1
    done = [r for r in units if _state(r) == "COMPLETE"]
    if not done:
        what = "`ouro-lab eval` runs" if source == "eval" else "runs yet"
        raise AnalysisError(f"study {experiment.name!r} has no finished {what} (unit runs by state: {counts or 'none'}"
                            + (f"; it also holds {len(evals)} `ouro-lab eval` runs: --runs eval reports on them)"
                               if evals and source == "train" else ")"))
    # NOTE: a seed run's sampled values are taken from its trial run (stores written before the
    # reuse fix gave reused param_matched runs the source run's loop count)
    keys = list((sweep.get("params") or {}).keys())
    sampled = {r.info.run_id: {k: r.data.params[k] for k in keys if k in r.data.params} | _bundles(r)
               for r in runs if r.info.run_id in with_seeds}
    distributions = _sweep_distributions(sweep)
    continuous = [k for k, d in distributions.items() if not isinstance(d, optuna.distributions.CategoricalDistribution)]
    # a bundle param (a named override list, such as a loop recipe) groups by its name, in place
    # of the keys its overrides set
    # (evaluations carry no bundle tag: they group by their config keys)
    bundles = (sweep.get("bundles") or {}) if source == "train" else {}
    implied = {o.split("=", 1)[0] for named in bundles.values() for lists in named.values() for o in lists} - set(keys)
    run_frame, group_keys, averaged = _runs_frame(done, sampled, continuous, list(bundles), implied)
    if source == "eval":  # what trained an evaluated checkpoint is not in this experiment
        run_frame["train_flops"] = math.nan
    kept = set(run_frame["run_id"])
    steps, exits, frontier, gate = _tidy_metrics([r for r in done if r.info.run_id in kept], run_frame)
    objective = sweep.get("objective") or {}
    task = run_frame["task"].iloc[0]
    return StudyData(
        name=experiment.name, tracking_uri=uri, experiment_id=experiment.experiment_id,
        parent_run_id=parent.info.run_id if parent else None, sweep=sweep, distributions=distributions, runs=run_frame, steps=steps,
        exits=exits, frontier=frontier, gate=gate, trials=_trials_frame(runs, sweep), group_keys=group_keys, averaged_keys=averaged,
        counts=counts, difficulty_name=_difficulty_name(task),
        objective_metric=objective.get("metric", "val/acc_final"), direction=objective.get("direction", "maximize"),
        skip=_skip_frame(evals, client), source=source, bench=_bench_frame(runs, client))


def _latest_evals(evals: list) -> list:
    """One evaluation per checkpoint and split: the latest (re-running `ouro-lab eval` with other
    infer.* settings re-scores the same model; the skip table keeps every one)."""
    latest: dict[tuple, Any] = {}
    for r in sorted(evals, key=lambda r: (_state(r) == "COMPLETE", r.info.start_time)):  # a finished one wins
        latest[(r.data.tags.get("ouro.checkpoint", r.info.run_id), r.data.params.get("eval_split"))] = r
    return list(latest.values())


def _skip_frame(evals: list, client: MlflowClient) -> pd.DataFrame:
    """Every finished evaluation with an exit rule: rule, threshold, skip/select/full metrics."""
    rows = []
    for r in evals:
        split = r.data.params.get("eval_split", "test")
        values = {m["name"]: v for k, v in r.data.metrics.items()
                  if (m := INFERENCE_METRIC.match(k)) and m["split"] == split}
        if not values or _state(r) != "COMPLETE":
            continue
        evaluated = (_run_name(client, r.data.tags.get("ouro.evaluated_run_id", "unknown"))
                     or Path(r.data.tags.get("ouro.checkpoint", "?")).name)
        p = r.data.params
        rows.append({"run_id": r.info.run_id, "evaluated": evaluated, "split": split, "arch": p.get("model.arch"),
                     "loops": int(p.get("model.loops", 1)), "rule": p.get("infer.exit_rule"),
                     "threshold": typed_value(p.get("infer.exit_threshold", "nan")), **values})
    first = ["run_id", "evaluated", "split", "arch", "loops", "rule", "threshold"]
    frame = pd.DataFrame(rows, columns=first + sorted({k for row in rows for k in row} - set(first)))
    return frame.sort_values(["evaluated", "split", "rule", "threshold"]).reset_index(drop=True)


BENCH_METRIC = re.compile(r"^bench/(?P<task>[^/]+)/(?P<kind>acc|acc_norm)_(?:step(?P<step>\d+)|rule)$")


def _bench_frame(runs: list, client: MlflowClient) -> pd.DataFrame:
    """Every finished `ouro-lab bench` run: one row per run x task x loop step (step 0 = under
    the run's exit rule) with acc and acc_norm; the latest run per checkpoint and task file set."""
    rows = []
    for r in sorted((r for r in runs if r.data.tags.get("ouro.role") == "bench" and _state(r) == "COMPLETE"),
                    key=lambda r: r.info.start_time):
        evaluated = (_run_name(client, r.data.tags.get("ouro.evaluated_run_id", "unknown"))
                     or Path(r.data.tags.get("ouro.checkpoint", "?")).name)
        cells: dict[tuple[str, int], dict[str, float]] = {}
        for key, value in r.data.metrics.items():
            m = BENCH_METRIC.match(key)
            if m:
                cells.setdefault((m["task"], int(m["step"] or 0)), {})[m["kind"]] = value
        for (task, step), values in cells.items():
            rows.append({"run_id": r.info.run_id, "evaluated": evaluated, "task": task, "step": step,
                         "arch": r.data.tags.get("ouro.arch"), "loops": int(r.data.tags.get("ouro.loops", 1)),
                         "acc": values.get("acc", math.nan), "acc_norm": values.get("acc_norm", math.nan),
                         "chance": r.data.metrics.get(f"bench/{task}/chance", math.nan)})
    columns = ["run_id", "evaluated", "task", "step", "arch", "loops", "acc", "acc_norm", "chance"]
    frame = pd.DataFrame(rows, columns=columns)
    latest = frame.drop_duplicates(["evaluated", "task", "step"], keep="last")  # runs came oldest first
    return latest.sort_values(["task", "evaluated", "step"]).reset_index(drop=True)


def _run_name(client: MlflowClient, run_id: str) -> str | None:
    if run_id == "unknown":  # (an imported checkpoint: no training run)
        return None
    try:
        return client.get_run(run_id).info.run_name
    except Exception:  # MLflow raises for a run id it does not know (another store, deleted)
        return None


def _experiment(client: MlflowClient, study: str, uri: str):
    """The MLflow experiment named `study` (or with that id); AnalysisError naming the others."""
    experiment = client.get_experiment_by_name(study)
    if experiment is None and study.isdigit():
        try:
            experiment = client.get_experiment(study)
        except Exception:  # MLflow raises for an unknown id
            experiment = None
    if experiment is None:
        names = sorted(e.name for e in client.search_experiments())
        raise AnalysisError(f"no study or MLflow experiment named {study!r} in {uri}; "
                            f"experiments there: {', '.join(names) or 'none'}")
    return experiment


def load_bench(study: str, store: str | None = None) -> pd.DataFrame:
    """The experiment's finished `ouro-lab bench` runs as load_study's `bench` frame (for an
    experiment that holds nothing else, which load_study refuses)."""
    uri = resolve_store(store)
    client = MlflowClient(uri)
    experiment = _experiment(client, study, uri)
    return _bench_frame(_search_all(client, experiment.experiment_id, "tags.`ouro.role` = 'bench'"), client)


def _sweep_distributions(sweep: Mapping[str, Any]) -> dict[str, optuna.distributions.BaseDistribution]:
    """The Optuna distribution of each swept param, as the sweep sampled it."""
    from ouro_lab.sweep.schema import ParamSpec, SamplerSpec, distribution

    sampler = (sweep.get("sampler") or {}).get("name", SamplerSpec.name)
    return {k: distribution(ParamSpec(**spec), sampler) for k, spec in (sweep.get("params") or {}).items()}


def list_studies(store: str | None = None) -> pd.DataFrame:
    """The studies (sweeps) in a store: one row per study run, with its trials' run states
    (trial-level runs by `optuna.state`), when it last changed and where it was run from."""
    uri = resolve_store(store)
    client = MlflowClient(uri)
    rows = []
    for experiment in client.search_experiments():
        parents = client.search_runs([experiment.experiment_id], "tags.`ouro.role` = 'study'")
        every_trial = _search_all(client, experiment.experiment_id, "tags.`ouro.role` = 'trial'") if parents else []
        for parent in parents:
            trials = [r for r in every_trial if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
            states: dict[str, int] = {}
            for r in trials:
                states[_state(r)] = states.get(_state(r), 0) + 1
            rows.append({"study": experiment.name, "trials": sum(states.values()),
                         "states": ", ".join(f"{k} {v}" for k, v in sorted(states.items())) or "none",
                         "objective": parent.data.params.get("sweep.objective", "?"),
                         "last change": pd.Timestamp(max([parent.info.start_time] + [r.info.start_time for r in trials]),
                                                     unit="ms").strftime("%Y-%m-%d %H:%M"),
                         "study run": parent.info.run_id})
    return pd.DataFrame(rows, columns=["study", "trials", "states", "objective", "last change", "study run"])


def _search_all(client: MlflowClient, experiment_id: str, filter_string: str = "") -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _state(run) -> str:
    """The Optuna-style state of a run: the sweep's own tag, else the MLflow status.

    NOTE: MLFlowLogger marks a run FINISHED when fit() ends, before the final validation and
    test: a sweep's run is whole only once the sweep tags it COMPLETE."""
    tag = run.data.tags.get("optuna.state")
    if tag:
        return tag
    if "ouro.study" in run.data.tags:
        return "RUNNING" if run.info.status in ("RUNNING", "FINISHED") else "FAIL"
    return {"FINISHED": "COMPLETE", "FAILED": "FAIL", "KILLED": "FAIL"}.get(run.info.status, run.info.status)


def _sweep_definition(client: MlflowClient, parent_run_id: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, _quiet_artifacts():
        try:
            path = client.download_artifacts(parent_run_id, "sweep.yaml", tmp)
        except Exception:  # an older study without the artifact: no Optuna view
            return {}
        return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


@contextmanager
def _quiet_artifacts():
    """No tqdm bar for one small download."""
    saved = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = saved


def typed_value(text: str) -> Any:
    """MLflow params are strings: give numbers back their type for sorting and axes."""
    for cast in (int, float):
        try:
            return cast(text)
        except (TypeError, ValueError):
            pass
    return {"True": True, "False": False, "None": None}.get(text, text)


_DEFAULTS = {k: str(v) for k, v in flatten(to_dict(ExperimentConfig())).items()}


def _logged_config(params: Mapping[str, str]) -> dict[str, str]:
    """A run's params with the stage2.* keys it does not log at their schema defaults: a run
    logs that section only when it trains Stage II (so stage2.steps=0 and =300 runs compare as
    two values of one key)."""
    return {k: v for k, v in _DEFAULTS.items() if k.startswith("stage2.")} | dict(params)


def _bundles(run) -> dict[str, str]:
    """The bundle params a sweep's trial run is tagged with: {'recipe': 'huginn'}."""
    return {k[len("ouro.bundle."):]: v for k, v in run.data.tags.items() if k.startswith("ouro.bundle.")}


def _runs_frame(done: list, sampled: Mapping[str, dict[str, str]], continuous: Sequence[str],
                bundles: Sequence[str] = (), implied: set[str] = frozenset()) -> tuple[pd.DataFrame, list[str], list[str]]:
    """Unit runs as rows. Group keys: what varies besides T, arch and seed; a param the sweep
    samples from a range (or, outside sweeps, a key with many values) is averaged over instead.
    `bundles`: the sweep's bundle params, group keys in place of the keys they set (`implied`)."""
    rows, params = [], []
    for r in done:
        p = _logged_config(r.data.params | sampled.get(r.data.tags.get("mlflow.parentRunId"), {}) | _bundles(r))
        m = r.data.metrics
        task = p.get("data.task", r.data.tags.get("ouro.task", "?"))
        # NOTE: runs log only their own task's data.<task> section; runs logged before that (and
        # Lightning's config/... copy) are read the same way, so a resumed study stays one group
        drop = implied if any(b in p for b in bundles) else set()  # (a run outside the sweep keeps its keys)
        config = {k: v for k, v in p.items() if ("." in k or k in bundles) and k not in drop
                  and not k.startswith(("derived.", "config/"))
                  and not (k.startswith("data.") and k.count(".") >= 2 and k.split(".")[1] != task)}
        params.append(config)
        seq_len = m.get("model/seq_len", typed_value(p.get("derived.seq_len", "nan")))
        tokens = typed_value(p.get("train.max_steps", "nan")) * typed_value(p.get("data.batch_size", "nan")) * seq_len
        arch = p["model.arch"]
        rows.append({
            "run_id": r.info.run_id, "trial": int(r.data.tags.get("ouro.trial", -1)),
            "seed": typed_value(p.get("train.seed", r.data.tags.get("ouro.seed", "0"))), "arch": arch,
            "loops": int(p.get("model.loops", r.data.tags.get("ouro.loops", "1"))),
            "trained_loops": ModelConfig(arch=arch, loops=int(p.get("model.loops", "1"))).trained_loops,
            "task": task,
            "n_params": m.get("model/n_params", math.nan),
            "forward_flops_per_token": m.get("model/forward_flops_per_token", math.nan),
            "train_flops": m.get("model/train_flops_per_token", math.nan) * tokens,
            "reused": "ouro.reused_from" in r.data.tags, "run_name": r.info.run_name,
            "config_hash": r.data.tags.get("ouro.config_hash", r.info.run_id),
            "stale_checkpoint": stale_checkpoint(p, r.data.tags),
        })
    frame = pd.DataFrame(rows)
    varying = sorted(k for k in set().union(*params)
                     if not k.startswith(NOT_GROUPING) and len({c.get(k) for c in params}) > 1)
    group_keys = [k for k in varying if k not in continuous and len({c.get(k) for c in params}) <= MAX_GROUP_VALUES]
    averaged = [k for k in varying if k not in group_keys]
    for key in varying:
        frame[key] = [typed_value(c[key]) if key in c else None for c in params]
    frame["group"] = [group_label({k: row[k] for k in group_keys}) for _, row in frame.iterrows()]
    # NOTE: the sweep copies an identical finished run instead of retraining it; a copy in the
    # same cell (group, arch, T) is the same model, not another seed
    frame = frame.drop_duplicates(["group", "arch", "loops", "config_hash"]).reset_index(drop=True)
    return frame, group_keys, averaged


def stale_checkpoint(params: Mapping[str, str], tags: Mapping[str, str]) -> str:
    """'' when the checkpoint a training run names holds the weights its final metrics scored;
    else what it holds instead. NOTE: runs logged before tag `ouro.checkpoint_step` saved no
    checkpoint at a final validation that fell between two `train.val_every` validations:
    their checkpoint is from the last multiple of val_every (Stage II: of its own steps)."""
    if "ouro.checkpoint" not in tags or "ouro.checkpoint_step" in tags or tags.get("ouro.role") == "eval":
        return ""
    try:
        steps, every = int(params["train.max_steps"]), int(params["train.val_every"])
        stage2 = int(params.get("stage2.steps", "0") or 0)
    except (KeyError, ValueError):
        return ""

    def saved(n: int) -> int:  # the step of the last validation inside fit
        return n - n % min(every, n)

    notes = []
    if stage2 and saved(stage2) != stage2:
        notes.append(f"checkpoint from step {steps + saved(stage2)} of {steps + stage2}")
    if stage2 and saved(steps) != steps:
        notes.append(f"stage1.ckpt from step {saved(steps)} of {steps}")
    if not stage2 and saved(steps) != steps:
        notes.append(f"checkpoint from step {saved(steps)} of {steps}")
    return "; ".join(notes)


def group_label(values: Mapping[str, Any]) -> str:
    """'data.state.length=8 objective.prior=uniform', or 'all runs' when nothing else varies."""
    return " ".join(f"{k}={v}" for k, v in values.items()) or "all runs"


_FRONTIER_KIND = {"loops": "loops_used"}  # (the frames' `loops` is the trained T)


def _tidy_metrics(done: list, run_frame: pd.DataFrame) -> tuple[pd.DataFrame, ...]:
    step_rows: dict[tuple, dict[str, float]] = {}
    exit_rows: dict[tuple, dict[str, float]] = {}
    frontier_rows: dict[tuple, dict[str, float]] = {}
    gate_rows: dict[tuple, dict[str, float]] = {}
    for r in done:
        for name, value in r.data.metrics.items():
            if m := STEP_METRIC.match(name):
                key = (r.info.run_id, m["split"], int(m["step"]), _difficulty(m["level"]))
                step_rows.setdefault(key, {})[m["kind"]] = value
            elif m := EXIT_METRIC.match(name):
                key = (r.info.run_id, m["split"], _difficulty(m["level"]))
                exit_rows.setdefault(key, {})[m["kind"]] = value
            elif m := EXIT_RULE_METRIC.match(name):
                key = (r.info.run_id, m["split"], m["rule"], float(m["threshold"]), _difficulty(m["level"]))
                frontier_rows.setdefault(key, {})[_FRONTIER_KIND.get(m["kind"], m["kind"])] = value
            elif m := ORACLE_METRIC.match(name):
                key = (r.info.run_id, m["split"], f"oracle_{m['rule']}", math.nan, _difficulty(m["level"]))
                frontier_rows.setdefault(key, {})[_FRONTIER_KIND.get(m["kind"], m["kind"])] = value
            elif m := GATE_METRIC.match(name):
                gate_rows.setdefault((r.info.run_id, m["split"]), {})[m["name"]] = value
    keep = ["run_id", "trial", "seed", "arch", "loops", "trained_loops", "task", "group",
            *[c for c in run_frame.columns if "." in c]]
    steps = pd.DataFrame([dict(run_id=k[0], split=k[1], step=k[2], difficulty=k[3], **v) for k, v in step_rows.items()])
    exits = pd.DataFrame([dict(run_id=k[0], split=k[1], difficulty=k[2], **v) for k, v in exit_rows.items()],
                         columns=["run_id", "split", "difficulty", "exit_expected_step", "exit_entropy"])
    frontier = pd.DataFrame([dict(run_id=k[0], split=k[1], rule=k[2], threshold=k[3], difficulty=k[4], **v)
                             for k, v in frontier_rows.items()],
                            columns=["run_id", "split", "rule", "threshold", "difficulty", "acc", "loss", "loops_used"])
    gate = pd.DataFrame([dict(run_id=k[0], split=k[1], **v) for k, v in gate_rows.items()])
    gate = gate.reindex(columns=list(dict.fromkeys(["run_id", "split", *GATE_SCALARS, *gate.columns])))
    steps = steps.merge(run_frame[keep], on="run_id").sort_values(["group", "arch", "loops", "seed", "split", "step"])
    exits = exits.merge(run_frame[keep], on="run_id")
    frontier, gate = frontier.merge(run_frame[keep], on="run_id"), gate.merge(run_frame[keep], on="run_id")
    return (steps.reset_index(drop=True), exits.reset_index(drop=True), frontier.reset_index(drop=True),
            gate.reset_index(drop=True))


def _difficulty(level: str | None) -> str:
    return ALL if level is None else f"d{int(level)}"


def difficulty_order(labels) -> list[str]:
    """'all' first, then d1, d2, ... numerically."""
    labels = set(labels)
    return ([ALL] if ALL in labels else []) + sorted((x for x in labels if x != ALL), key=lambda x: int(x[1:]))


def _difficulty_name(task: str) -> str:
    from ouro_lab.data.base import TASKS

    import ouro_lab.data  # noqa: F401  (registers the tasks)

    cls = TASKS.get(task)
    return getattr(cls, "difficulty_name", "difficulty")


def _trials_frame(runs: list, sweep: Mapping[str, Any]) -> pd.DataFrame:
    """One row per Optuna trial: the trial-level run (mean over seeds when seeds > 1)."""
    metric = (sweep.get("objective") or {}).get("metric")
    keys = list((sweep.get("params") or {}).keys())
    rows = []
    for r in runs:
        if r.data.tags.get("ouro.role") != "trial":
            continue
        rows.append({"number": int(r.data.tags["ouro.trial"]), "state": _state(r),
                     "value": r.data.metrics.get(metric, math.nan) if metric else math.nan,
                     "std": r.data.metrics.get(f"seeds/{metric}_std", math.nan),
                     **{k: _logged_config(r.data.params).get(k) for k in keys}})
    return pd.DataFrame(rows, columns=["number", "state", "value", "std", *keys]).sort_values("number").reset_index(drop=True)


def attach_report(data: StudyData, files: Sequence[Path]) -> None:
    """Log the report's files as artifacts `report/` of the study's parent run (nothing when the
    experiment has no sweep parent)."""
    if data.parent_run_id:
        tracking.Experiment(data.tracking_uri, data.experiment_id).run(data.parent_run_id).log_artifacts(files, "report")
