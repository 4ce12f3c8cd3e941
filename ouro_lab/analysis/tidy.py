"""A study's runs as tidy DataFrames (`StudyData`), from plain run records: no MLflow here
(`load.py` reads the records from MLflow; tests build them by hand).

Vocabulary: a *unit run* is one trained (or reused) model: a seed of a trial, or the trial
itself when the sweep has one seed, or a plain `ouro-lab train` run. *T* is the trained loop
count (`model.loops`), *t* the evaluation loop step (t > T is extrapolation). A *group* is one
setting of everything else that varies in the study (sequence length, beta, prior ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import optuna
import pandas as pd

from ouro_lab import run_record as rr
from ouro_lab.config import ModelConfig
from ouro_lab.errors import AnalysisError  # (re-exported: `analysis.AnalysisError`)
from ouro_lab.metric_names import (BENCH_METRIC, EXIT_METRIC, EXIT_RULE_METRIC, GATE_METRIC, GATE_SCALARS,
                                   INFERENCE_METRIC, ORACLE_METRIC, STEP_METRIC, bench, inference, objective_kind)
from ouro_lab.run_record import RunRecord
from ouro_lab.views import skip_frontier_frame as skip_frontier_frame_of

# keys that never define a group: the axes of the analysis, bookkeeping, and facts derived from them
NOT_GROUPING = ("model.loops", "model.arch", "train.seed", "tracking.", "train.progress_bar", "train.precision",
                "stage2.init_from",  # (a Stage II run's checkpoint path is per seed, like the seed)
                "infer.")  # (how an `ouro-lab eval` ran, not what it evaluated: the skip table's axes)
RUN_SOURCES = ("auto", "train", "eval")  # what `load_study` analyses: see its docstring
MAX_GROUP_VALUES = 8  # outside sweeps, a varying key with more distinct values is averaged over
LOWER_IS_BETTER = ("loss", "bpb", "exit_entropy", "exit_expected_step")
ALL = "all"  # the difficulty label of the metric over all labelled positions


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
    # `ouro-lab eval` runs with infer.frontier: one row per evaluation x semantics x threshold x
    # exited_kv x difficulty (views.skip_frontier_frame's columns, plus run_id, evaluated, split)
    skip_frontier: pd.DataFrame = field(default_factory=pd.DataFrame)
    source: str = "train"
    # `ouro-lab bench` runs: one row per checkpoint x task x loop step (0 = under its exit rule)
    bench: pd.DataFrame = field(default_factory=pd.DataFrame)
    # the study's random-depth run (sweep test_time_run), kept apart from the unit runs: its row
    # (as in `runs`) and its metrics at every eval step t (as in `steps`)
    test_time_runs: pd.DataFrame = field(default_factory=pd.DataFrame)
    test_time_steps: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def kind(self) -> str:
        """The per-step metric kind the report reads: the objective's ('acc' for val/acc_final,
        'loss' for val/loss_step3), or for an objective that is no per-step metric (the gate's
        val/gate_efficiency) the runs' own `metric_kind`."""
        kind = objective_kind(self.objective_metric)
        return kind if kind in self.steps.columns else self.metric_kind

    @property
    def metric_kind(self) -> str:
        """The quality metric the runs recorded (tag ouro.metric_kind: acc, or bpb on byte-level
        tasks); for runs logged before the tag, bpb if logged, else acc."""
        recorded = set(self.runs["metric_kind"].dropna()) if "metric_kind" in self.runs else set()
        if len(recorded) == 1:
            return recorded.pop()
        return "bpb" if "bpb" in self.steps.columns else "acc"  # (runs logged before the tag)

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


def study_run(runs: Sequence[RunRecord]) -> RunRecord | None:
    """The experiment's study run (a sweep's parent; the latest, if a study was started over)."""
    parents = [r for r in runs if r.role == rr.STUDY_RUN]
    return max(parents, key=lambda r: r.start_time) if parents else None


def study_data(name: str, tracking_uri: str, experiment_id: str, runs: list[RunRecord], sweep: Mapping[str, Any],
               source: str = "auto", names: Mapping[str, str] | None = None) -> StudyData:
    """The tidy frames of an experiment's runs (`load_study` reads them from MLflow; tests build
    them by hand). `sweep`: the study's sweep definition ({} outside sweeps); `names`: run id ->
    run name of the runs the evaluations scored; `source`: see `load_study`."""
    if source not in RUN_SOURCES:
        raise AnalysisError(f"unknown run source {source!r}; one of: {', '.join(RUN_SOURCES)}")
    names = names or {}
    parent = study_run(runs)
    # unit runs carry a model config; a trial run with seed runs under it only holds their means
    with_seeds = {r.parent for r in runs if r.role == rr.SEED_RUN}
    evals = [r for r in runs if "model.arch" in r.params and r.role == rr.EVAL_RUN]
    units = [r for r in runs if "model.arch" in r.params and r.run_id not in with_seeds
             and r.role not in (rr.EVAL_RUN, rr.TEST_TIME_RUN)]  # (`ouro-lab eval` runs re-score a unit run)
    test_time = [r for r in runs if r.role == rr.TEST_TIME_RUN and r.state == rr.COMPLETE]
    if source == "eval" or (source == "auto" and not units and evals):
        source, units = "eval", latest_evals(evals)
    else:
        source = "train"
    counts: dict[str, int] = {}
    for r in units:
        counts[r.state] = counts.get(r.state, 0) + 1
    done = [r for r in units if r.state == rr.COMPLETE]
    if not done:
        what = "`ouro-lab eval` runs" if source == "eval" else "runs yet"
        raise AnalysisError(f"study {name!r} has no finished {what} (unit runs by state: {counts or 'none'}"
                            + (f"; it also holds {len(evals)} `ouro-lab eval` runs: --runs eval reports on them)"
                               if evals and source == "train" else ")"))
    # NOTE: a seed run's sampled values are taken from its trial run (stores written before the
    # reuse fix gave reused param_matched runs the source run's loop count)
    keys = list((sweep.get("params") or {}).keys())
    sampled = {r.run_id: {k: r.params[k] for k in keys if k in r.params} | rr.bundles(r.tags)
               for r in runs if r.run_id in with_seeds}
    distributions = sweep_distributions(sweep)
    continuous = [k for k, d in distributions.items() if not isinstance(d, optuna.distributions.CategoricalDistribution)]
    # a bundle param (a named override list, such as a loop recipe) groups by its name, in place
    # of the keys its overrides set
    # (evaluations carry no bundle tag: they group by their config keys)
    bundles = (sweep.get("bundles") or {}) if source == "train" else {}
    implied = {o.split("=", 1)[0] for named in bundles.values() for lists in named.values() for o in lists} - set(keys)
    run_frame, group_keys, averaged = runs_frame(done, sampled, continuous, list(bundles), implied)
    if source == "eval":  # what trained an evaluated checkpoint is not in this experiment
        run_frame["train_flops"] = math.nan
    kept = set(run_frame["run_id"])
    steps, exits, frontier, gate = tidy_metrics([r for r in done if r.run_id in kept], run_frame)
    test_time_runs = runs_frame(test_time, {}, [])[0] if test_time else pd.DataFrame()
    objective = sweep.get("objective") or {}
    task = run_frame["task"].iloc[0]
    return StudyData(
        name=name, tracking_uri=tracking_uri, experiment_id=experiment_id,
        parent_run_id=parent.run_id if parent else None, sweep=dict(sweep), distributions=distributions, runs=run_frame,
        steps=steps, exits=exits, frontier=frontier, gate=gate, trials=trials_frame(runs, sweep), group_keys=group_keys,
        averaged_keys=averaged, counts=counts, difficulty_name=_difficulty_name(task),
        objective_metric=objective.get("metric", "val/acc_final"), direction=objective.get("direction", "maximize"),
        skip=skip_frame(evals, names), skip_frontier=skip_frontier_frame(evals, names), source=source, bench=bench_frame(runs, names), test_time_runs=test_time_runs,
        test_time_steps=tidy_metrics(test_time, test_time_runs)[0] if test_time else pd.DataFrame())


def latest_evals(evals: list[RunRecord]) -> list[RunRecord]:
    """One evaluation per checkpoint and split: the latest (re-running `ouro-lab eval` with other
    infer.* settings re-scores the same model; the skip table keeps every one)."""
    latest: dict[tuple, Any] = {}
    for r in sorted(evals, key=lambda r: (r.state == rr.COMPLETE, r.start_time)):  # a finished one wins
        latest[(r.tags.get(rr.CHECKPOINT, r.run_id), r.params.get(rr.EVAL_SPLIT))] = r
    return list(latest.values())


def skip_frame(evals: list[RunRecord], names: Mapping[str, str]) -> pd.DataFrame:
    """Every finished evaluation with an exit rule: rule, threshold, what later tokens read from an
    exited one (exited_kv), skip/select/full metrics.
    `names`: run id -> run name of the runs the evaluations scored (`evaluated_run_ids`)."""
    rows = []
    for r in evals:
        split = r.params.get(rr.EVAL_SPLIT, "test")
        values = {m["name"]: v for k, v in r.metrics.items()
                  if (m := INFERENCE_METRIC.match(k)) and m["split"] == split}
        if inference("skip", "acc") not in values or r.state != rr.COMPLETE:  # (a skip frontier: below)
            continue
        evaluated = _evaluated(r, names)
        p = r.params
        rows.append({"run_id": r.run_id, "evaluated": evaluated, "split": split, "arch": p.get("model.arch"),
                     "loops": int(p.get("model.loops", 1)), "rule": p.get("infer.exit_rule"),
                     "threshold": typed_value(p.get("infer.exit_threshold", "nan")),
                     "exited_kv": p.get("infer.exited_kv", "frozen"), **values})  # (runs before the key: frozen)
    first = ["run_id", "evaluated", "split", "arch", "loops", "rule", "threshold", "exited_kv"]
    frame = pd.DataFrame(rows, columns=first + sorted({k for row in rows for k in row} - set(first)))
    return frame.sort_values(["evaluated", "split", "rule", "threshold", "exited_kv"]).reset_index(drop=True)


def skip_frontier_frame(evals: list[RunRecord], names: Mapping[str, str]) -> pd.DataFrame:
    """Every finished evaluation with a skip frontier (infer.frontier), one frame: run_id,
    evaluated, split, then `views.skip_frontier_frame`'s rows."""
    frames = []
    for r in evals:
        split = r.params.get(rr.EVAL_SPLIT, "test")
        frame = skip_frontier_frame_of(r.metrics, split)
        if r.state == rr.COMPLETE and len(frame):
            frames.append(frame.assign(run_id=r.run_id, evaluated=_evaluated(r, names), split=split))
    if not frames:
        return pd.DataFrame()
    frame = pd.concat(frames, ignore_index=True)
    return frame[["run_id", "evaluated", "split", *[c for c in frame.columns if c not in ("run_id", "evaluated", "split")]]]


def bench_frame(runs: list[RunRecord], names: Mapping[str, str]) -> pd.DataFrame:
    """Every finished `ouro-lab bench` run: one row per run x task x loop step (step 0 = under
    the run's exit rule) with acc and acc_norm; the latest run per checkpoint and task file set."""
    rows = []
    for r in sorted((r for r in runs if r.role == rr.BENCH_RUN and r.state == rr.COMPLETE),
                    key=lambda r: r.start_time):
        evaluated = _evaluated(r, names)
        cells: dict[tuple[str, int], dict[str, float]] = {}
        for key, value in r.metrics.items():
            m = BENCH_METRIC.match(key)
            if m:
                cells.setdefault((m["task"], int(m["step"] or 0)), {})[m["kind"]] = value
        for (task, step), values in cells.items():
            rows.append({"run_id": r.run_id, "evaluated": evaluated, "task": task, "step": step,
                         "arch": r.tags.get(rr.ARCH), "loops": int(r.tags.get(rr.LOOPS, 1)),
                         "acc": values.get("acc", math.nan), "acc_norm": values.get("acc_norm", math.nan),
                         "chance": r.metrics.get(bench(task, "chance"), math.nan)})
    columns = ["run_id", "evaluated", "task", "step", "arch", "loops", "acc", "acc_norm", "chance"]
    frame = pd.DataFrame(rows, columns=columns)
    latest = frame.drop_duplicates(["evaluated", "task", "step"], keep="last")  # runs came oldest first
    return latest.sort_values(["task", "evaluated", "step"]).reset_index(drop=True)


def evaluated_run_ids(runs: list[RunRecord]) -> set[str]:
    """The training runs that evaluation and bench runs scored (their names label the skip and
    bench tables)."""
    return {r.tags[rr.EVALUATED_RUN_ID] for r in runs if r.tags.get(rr.EVALUATED_RUN_ID, rr.UNKNOWN) != rr.UNKNOWN}


def _evaluated(r: RunRecord, names: Mapping[str, str]) -> str:
    """What an evaluation scored: its training run's name, else the checkpoint's file name (an
    imported checkpoint, or a run in another store)."""
    return names.get(r.tags.get(rr.EVALUATED_RUN_ID, rr.UNKNOWN)) or Path(r.tags.get(rr.CHECKPOINT, "?")).name


def sweep_distributions(sweep: Mapping[str, Any]) -> dict[str, optuna.distributions.BaseDistribution]:
    """The Optuna distribution of each swept param, as the sweep sampled it."""
    from ouro_lab.sweep.schema import ParamSpec, SamplerSpec, distribution

    sampler = (sweep.get("sampler") or {}).get("name", SamplerSpec.name)
    return {k: distribution(ParamSpec(**spec), sampler) for k, spec in (sweep.get("params") or {}).items()}


def typed_value(text: str) -> Any:
    """MLflow params are strings: give numbers back their type for sorting and axes."""
    for cast in (int, float):
        try:
            return cast(text)
        except (TypeError, ValueError):
            pass
    return {"True": True, "False": False, "None": None}.get(text, text)


def runs_frame(done: list[RunRecord], sampled: Mapping[str, dict[str, str]], continuous: Sequence[str],
                bundles: Sequence[str] = (), implied: set[str] = frozenset()) -> tuple[pd.DataFrame, list[str], list[str]]:
    """Unit runs as rows. Group keys: what varies besides T, arch and seed; a param the sweep
    samples from a range (or, outside sweeps, a key with many values) is averaged over instead.
    `bundles`: the sweep's bundle params, group keys in place of the keys they set (`implied`)."""
    rows, params = [], []
    for r in done:
        p = rr.logged_config(r.params | sampled.get(r.parent, {}) | rr.bundles(r.tags))
        m = r.metrics
        task = p.get("data.task", r.tags.get(rr.TASK, "?"))
        # NOTE: runs log only their own task's data.<task> section; runs logged before that (and
        # Lightning's config/... copy) are read the same way, so a resumed study stays one group
        drop = implied if any(b in p for b in bundles) else set()  # (a run outside the sweep keeps its keys)
        config = {k: v for k, v in p.items() if ("." in k or k in bundles) and k not in drop
                  and not k.startswith((rr.DERIVED, "config/"))
                  and not (k.startswith("data.") and k.count(".") >= 2 and k.split(".")[1] != task)}
        params.append(config)
        seq_len = m.get(rr.SEQ_LEN, typed_value(p.get(f"{rr.DERIVED}seq_len", "nan")))
        tokens = typed_value(p.get("train.max_steps", "nan")) * typed_value(p.get("data.batch_size", "nan")) * seq_len
        arch = p["model.arch"]
        rows.append({
            "run_id": r.run_id, "trial": int(r.tags.get(rr.TRIAL, -1)),
            "seed": typed_value(p.get("train.seed", r.tags.get(rr.SEED, "0"))), "arch": arch,
            "loops": int(p.get("model.loops", r.tags.get(rr.LOOPS, "1"))),
            "trained_loops": ModelConfig(arch=arch, loops=int(p.get("model.loops", "1"))).trained_loops,
            "task": task,
            "n_params": m.get(rr.N_PARAMS, math.nan),
            "forward_flops_per_token": m.get(rr.FORWARD_FLOPS, math.nan),
            "train_flops": m.get(rr.TRAIN_FLOPS, math.nan) * tokens,
            "reused": rr.REUSED_FROM in r.tags, "run_name": r.name,
            "config_hash": r.tags.get(rr.CONFIG_HASH, r.run_id),
            "metric_kind": r.tags.get(rr.METRIC_KIND_TAG),
            "stale_checkpoint": stale_checkpoint(p, r.tags),
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
    if rr.CHECKPOINT not in tags or rr.CHECKPOINT_STEP in tags or tags.get(rr.ROLE) == rr.EVAL_RUN:
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


def tidy_metrics(done: list[RunRecord], run_frame: pd.DataFrame) -> tuple[pd.DataFrame, ...]:
    step_rows: dict[tuple, dict[str, float]] = {}
    exit_rows: dict[tuple, dict[str, float]] = {}
    frontier_rows: dict[tuple, dict[str, float]] = {}
    gate_rows: dict[tuple, dict[str, float]] = {}
    for r in done:
        for name, value in r.metrics.items():
            if m := STEP_METRIC.match(name):
                key = (r.run_id, m["split"], int(m["step"]), _difficulty(m["level"]))
                step_rows.setdefault(key, {})[m["kind"]] = value
            elif m := EXIT_METRIC.match(name):
                key = (r.run_id, m["split"], _difficulty(m["level"]))
                exit_rows.setdefault(key, {})[m["kind"]] = value
            elif m := EXIT_RULE_METRIC.match(name):
                key = (r.run_id, m["split"], m["rule"], float(m["threshold"]), _difficulty(m["level"]))
                frontier_rows.setdefault(key, {})[_FRONTIER_KIND.get(m["kind"], m["kind"])] = value
            elif m := ORACLE_METRIC.match(name):
                key = (r.run_id, m["split"], f"oracle_{m['rule']}", math.nan, _difficulty(m["level"]))
                frontier_rows.setdefault(key, {})[_FRONTIER_KIND.get(m["kind"], m["kind"])] = value
            elif m := GATE_METRIC.match(name):
                gate_rows.setdefault((r.run_id, m["split"]), {})[m["name"]] = value
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


def trials_frame(runs: list[RunRecord], sweep: Mapping[str, Any]) -> pd.DataFrame:
    """One row per Optuna trial: the trial-level run (mean over seeds when seeds > 1)."""
    metric = (sweep.get("objective") or {}).get("metric")
    keys = list((sweep.get("params") or {}).keys())
    rows = []
    for r in runs:
        if r.role != rr.TRIAL_RUN:
            continue
        stopped = rr.pruned_step(r.tags)
        rows.append({"number": int(r.tags[rr.TRIAL]), "state": r.state,
                     "value": r.metrics.get(metric, math.nan) if metric else math.nan,
                     "std": r.metrics.get(rr.seed_std(metric), math.nan),
                     "stopped_at": math.nan if stopped is None else stopped,
                     "max_steps": typed_value(r.params.get("train.max_steps", "nan")), "pruned": r.tags.get(rr.PRUNED, ""),
                     **{k: rr.logged_config(r.params).get(k) for k in keys}})
    columns = ["number", "state", "value", "std", "stopped_at", "max_steps", "pruned", *keys]
    return pd.DataFrame(rows, columns=columns).sort_values("number").reset_index(drop=True)


