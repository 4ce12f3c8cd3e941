"""The run record: every tag, param and non-step metric name a run carries in MLflow, its role
and its state, built and parsed here and nowhere else (the per-step metric names are
`metric_names.py`'s). Writers (train, evaluate, bench, the sweep) and the reader
(`analysis.load`) both import these names.

    tags     ouro.role      study | trial | seed | eval | bench (a plain `ouro-lab train` run: none)
             ouro.study, ouro.trial, ouro.bundle.<param>        a sweep's runs
             ouro.task, ouro.arch, ouro.loops, ouro.seed        a training run (and its copies)
             ouro.metric_kind                                   acc | bpb: the run's quality metric
             ouro.checkpoint, ouro.checkpoint_step, ouro.stage, ouro.stage1_run_id
             ouro.config_hash, ouro.reused_from, ouro.recovered_from_trial
             ouro.evaluated_run_id, ouro.imported_from           eval and bench runs
             ouro.best_trial, ouro.best_run_id, ouro.best_checkpoint  a study run's best trial
             ouro.metric_tables                                 the run's metric tables (below)
             optuna.state (COMPLETE | PRUNED | FAIL | RUNNING), error, interrupted, pruned: how it ended
             versions.<package>, git.dirty, mlflow.source.git.commit, mlflow.parentRunId, ouro.machine
    params   the config, one name per key (`used_params`); derived.<fact> (the non-numeric derived facts);
             eval_split, eval_overrides, bench_files; sweep.<key> on a study run
    metrics  model/<fact> (the numeric derived facts); seeds/<objective>_std|_min|_max on a trial
             run with several seeds; study/n_<state>, study/best_<objective> on a study run, and
             study/series/<objective>_vs_loops[/<other swept values>] (step = T) when it sweeps model.loops
    tables   frontier/<split>.csv: the exit rules' and oracles' final metrics (`metric_tables`),
             which readers get back under their metric names (`table_metrics`)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import statistics
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import optuna
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID

from ouro_lab import metric_names as names
from ouro_lab.config import ExperimentConfig, InferConfig, flatten, to_dict
from ouro_lab.data import TASKS, Task

# --- tags -----------------------------------------------------------------------------------
ROLE = "ouro.role"
STUDY, TRIAL, BUNDLE = "ouro.study", "ouro.trial", "ouro.bundle."
TASK, ARCH, LOOPS, SEED = "ouro.task", "ouro.arch", "ouro.loops", "ouro.seed"
METRIC_KIND_TAG = "ouro.metric_kind"  # "acc" or "bpb": what the run's per-step quality metric is
CHECKPOINT, CHECKPOINT_STEP = "ouro.checkpoint", "ouro.checkpoint_step"
STAGE, STAGE1_RUN_ID = "ouro.stage", "ouro.stage1_run_id"
CONFIG_HASH, REUSED_FROM, RECOVERED_FROM_TRIAL = "ouro.config_hash", "ouro.reused_from", "ouro.recovered_from_trial"
EVALUATED_RUN_ID, IMPORTED_FROM = "ouro.evaluated_run_id", "ouro.imported_from"
# on a study run: its best complete trial so far (its run, and its checkpoint: the first seed's)
BEST_TRIAL, BEST_RUN_ID, BEST_CHECKPOINT = "ouro.best_trial", "ouro.best_run_id", "ouro.best_checkpoint"
OPTUNA_STATE, ERROR, INTERRUPTED, PRUNED = "optuna.state", "error", "interrupted", "pruned"
MACHINE = "ouro.machine"  # CPU model, cores, torch and its CPU capability (or the GPU): results move across them
VERSIONS, GIT_DIRTY, GIT_COMMIT = "versions.", "git.dirty", MLFLOW_GIT_COMMIT
PARENT = MLFLOW_PARENT_RUN_ID  # (MLflow's own: the run a run is nested under)
UNKNOWN = "unknown"  # the evaluated run of an imported checkpoint (it has no training run)

# roles (tag ouro.role)
STUDY_RUN, TRIAL_RUN, SEED_RUN, EVAL_RUN, BENCH_RUN = "study", "trial", "seed", "eval", "bench"
TEST_TIME_RUN = "test_time"  # a study's one random-depth run, evaluated at every t (sweep test_time_run)

# run states, Optuna's names: a sweep's runs carry theirs as tag optuna.state
COMPLETE, FAIL, PRUNED_STATE, RUNNING = "COMPLETE", "FAIL", "PRUNED", "RUNNING"

# --- params and non-step metrics ------------------------------------------------------------
DERIVED = "derived."  # derived.<fact>: model shape and the task's data, as params
MODEL = "model/"  # model/<fact>: the numeric derived facts, as metrics
EVAL_SPLIT, EVAL_OVERRIDES, BENCH_FILES = "eval_split", "eval_overrides", "bench_files"
SWEEP = "sweep."  # sweep.<key>: a study run's sweep definition, as params
N_PARAMS, SEQ_LEN = "model/n_params", "model/seq_len"
FORWARD_FLOPS, TRAIN_FLOPS = "model/forward_flops_per_token", "model/train_flops_per_token"

# artifacts
CONFIG_ARTIFACT, SWEEP_ARTIFACT, SUMMARY_ARTIFACT = "config.yaml", "sweep.yaml", "summary.txt"
ERROR_ARTIFACT, DIFF_ARTIFACT, REPORT_ARTIFACTS = "error.txt", "git_diff.patch", "report"
DESIGN_ARTIFACTS = "design"  # an adaptive study's decisions: design/trial_0007.json, design/stop.json


def role_filter(role: str) -> str:
    """An MLflow search filter for the runs of one role."""
    return f"tags.`{ROLE}` = '{role}'"


def hash_filter(digest: str) -> str:
    """An MLflow search filter for a sweep's whole finished runs with config hash `digest`."""
    return (f"tags.`{CONFIG_HASH}` = '{digest}' and attributes.status = 'FINISHED' "
            f"and tags.`{OPTUNA_STATE}` = '{COMPLETE}'")


RUNNING_FILTER = "attributes.status = 'RUNNING'"


def training_tags(cfg: ExperimentConfig, task: Task, stage1_run_id: str | None = None) -> dict[str, str]:
    """What every training run is tagged with besides reproducibility: task, arch, loop count,
    seed (for the MLflow UI's search), its Stage II lineage and its metric kind."""
    stage = {STAGE: "2", STAGE1_RUN_ID: stage1_run_id or UNKNOWN} if cfg.stage2.init_from \
        else {STAGE: "1+2"} if cfg.stage2.steps else {}
    return {TASK: cfg.data.task, ARCH: cfg.model.arch, LOOPS: str(cfg.model.loops), SEED: str(cfg.train.seed),
            **stage, METRIC_KIND_TAG: metric_kind(task), NOTE: TRAINING_NOTE}


@dataclass(frozen=True)
class DatasetRecord:
    """What a run trained or evaluated on, for MLflow's Dataset column (metadata only: the task
    generates or reads its data; nothing is stored): a name, a digest of everything that fixes
    the data, the settings behind the digest, and the context (training | evaluation)."""

    name: str
    digest: str
    source: dict[str, str]
    context: str


def datasets(cfg: ExperimentConfig, task: Task) -> list[DatasetRecord]:
    """The training stream (the task's data section, its facts from `describe()`, such as a
    corpus's key, and `train.seed`, which draws it) and the evaluation sets (the same with
    `data.seed` and the split sizes, which fix val and test), each hashed: equal digests, the
    same data."""
    section = {f"data.{cfg.data.task}.{k}": v for k, v in flatten(to_dict(cfg)["data"][cfg.data.task]).items()}
    facts = {f"{DERIVED}{k}": v for k, v in task.describe().items()}
    parts = (("train", "training", {"train.seed": cfg.train.seed}),
             ("val, test", "evaluation", {"data.seed": cfg.data.seed, "data.n_val": cfg.data.n_val,
                                          "data.n_test": cfg.data.n_test}))
    out = []
    for split, context, seeds in parts:
        fixed = section | seeds
        digest = hashlib.sha256(json.dumps(fixed | facts, sort_keys=True, default=str).encode()).hexdigest()[:12]
        out.append(DatasetRecord(f"{cfg.data.task} ({split})", digest,
                                 {"generator": f"ouro_lab.data ({cfg.data.task})", **{k: str(v) for k, v in fixed.items()}},
                                 context))
    return out


def checkpoint_tags(path: str, step: int | None) -> dict[str, str]:
    """Where a training run's final weights are, and the step they are from."""
    return {CHECKPOINT: path, CHECKPOINT_STEP: str(step)}


def evaluation_tags(role: str, checkpoint: str, evaluated_run_id: str | None) -> dict[str, str]:
    """An `ouro-lab eval` (role eval) or `ouro-lab bench` (role bench) run: what it scored."""
    return {ROLE: role, CHECKPOINT: checkpoint, EVALUATED_RUN_ID: evaluated_run_id or UNKNOWN}


NOTE = "mlflow.note.content"  # (MLflow's own: the run page's Description)
SHARED_VIEW = "mlflow.sharedViewState."  # (MLflow's own) experiment tag: a saved UI view (ouro_lab/ui_view.py)
# what the x axis of each family of charts means: MLflow labels every x axis "Step"
TRAINING_NOTE = ("Charts: the x axis is the training step, except the series logged once after training: "
                 "`*/series/*_vs_loop_step` (x = evaluation loop step t; t > T extrapolates) and "
                 "`*/series/exit_*_vs_milliloops` (x = 1000 x the mean loop steps a token runs under the exit rule). "
                 "A looped run's exit rules and oracles, per threshold and difficulty: Artifacts frontier/val.csv, "
                 "frontier/test.csv.")
STUDY_NOTE = ("Charts: `study/series/<objective>_vs_loops[/<other swept values>]` has x = the trained loop count T "
              "(the mean of the complete trials at each T); its trials are the runs nested under this one. "
              "The report (`ouro-lab report`) is under Artifacts: report/report.html.")


def trial_run_name(number: int, sampled: Mapping[str, Any], seed: int | None = None) -> str:
    """A trial's MLflow run name, the swept values first ('loops=4 arch=looped (trial 3)'), so
    the UI's run column shows them uncut; a key is shortened to its last part unless two share it."""
    last = [k.rsplit(".", 1)[-1] for k in sampled]
    keys = [short if last.count(short) == 1 else key for key, short in zip(sampled, last)]
    values = " ".join(f"{k}={v}" for k, v in zip(keys, sampled.values()))
    return f"{values}{f' seed {seed}' if seed is not None else ''} (trial {number})".strip()


def sweep_tags(study: str, role: str, trial: int | None = None) -> dict[str, str]:
    """A sweep's study, trial or seed run (a study run also gets its charts' description)."""
    return ({STUDY: study, ROLE: role} | ({TRIAL: str(trial)} if trial is not None else {})
            | ({NOTE: STUDY_NOTE} if role == STUDY_RUN else {}))


def bundle_tags(values: Mapping[str, Any]) -> dict[str, str]:
    """A trial's bundle params (named override lists, such as a loop recipe) as tags."""
    return {f"{BUNDLE}{k}": str(v) for k, v in values.items()}


def bundles(tags: Mapping[str, str]) -> dict[str, str]:
    """The bundle params a sweep's trial run is tagged with: {'recipe': 'huginn'}."""
    return {k[len(BUNDLE):]: v for k, v in tags.items() if k.startswith(BUNDLE)}


def copied_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """The tags a reused run's copy takes over from the run it copies (what it is, where from)."""
    return {k: v for k, v in tags.items() if k.startswith(("ouro.", VERSIONS, "mlflow.source"))}


def derived_params(summary: Mapping[str, object]) -> dict[str, object]:
    """The derived facts that are not numbers (the corpus key, ...) as params derived.<fact>;
    the numbers are metrics model/<fact> (`model_metrics`), logged once, not twice."""
    return {f"{DERIVED}{k}": v for k, v in summary.items() if not isinstance(v, (int, float))}


def derived_of(params: Mapping[str, str]) -> dict[str, str]:
    """A run's derived.* params."""
    return {k: v for k, v in params.items() if k.startswith(DERIVED)}


def model_metrics(summary: Mapping[str, object]) -> dict[str, float]:
    """The numeric derived facts as metrics model/<fact> (n_params, FLOPs per token ...)."""
    return {f"{MODEL}{k}": v for k, v in summary.items() if isinstance(v, (int, float))}


def seed_std(objective: str) -> str:
    """'seeds/val/acc_final_std': the seed spread of a trial's objective."""
    return f"seeds/{objective}_std"


def seed_spread(objective: str, values: list[float]) -> dict[str, float]:
    """The seed spread a trial run with several seeds logs beside the seed means."""
    if len(values) < 2:
        return {}
    return {seed_std(objective): statistics.stdev(values), f"seeds/{objective}_min": min(values),
            f"seeds/{objective}_max": max(values)}


def best_tags(number: int, run_id: str | None, checkpoint: str | None) -> dict[str, str]:
    """A study run's pointer to its best complete trial: where its run and its weights are."""
    return {BEST_TRIAL: str(number), **({BEST_RUN_ID: run_id} if run_id else {}),
            **({BEST_CHECKPOINT: checkpoint} if checkpoint else {})}


LOOPS_KEY = "model.loops"  # the swept key a study run's loop series is drawn against


def loop_series(objective: str, values: Iterable[tuple[Mapping[str, Any], float]],
                ignore: Iterable[str] = ()) -> dict[str, list[tuple[int, float]]]:
    """A study run's objective against the trained loop count: one series per setting of the
    other swept keys ('study/series/val_acc_final_vs_loops/arch_looped'), step = T, value = the
    mean of its complete trials. The answer then shows on the study run itself, in the MLflow
    UI's charts, while its trials sit collapsed under it. `values`: (trial params, objective)."""
    skip = {LOOPS_KEY, *ignore}
    groups: dict[str, dict[int, list[float]]] = {}
    for params, value in values:
        if LOOPS_KEY not in params:
            continue
        rest = re.sub(r"[^\w.-]", "_", "_".join(f"{k.rsplit('.', 1)[-1]}_{v}" for k, v in sorted(params.items())
                                                 if k not in skip))
        name = f"study/series/{objective.replace('/', '_')}_vs_loops" + (f"/{rest}" if rest else "")
        groups.setdefault(name, {}).setdefault(int(params[LOOPS_KEY]), []).append(float(value))
    return {name: [(t, statistics.fmean(v)) for t, v in sorted(by_t.items())] for name, by_t in groups.items()}


def study_metrics(counts: Mapping[str, int], objective: str, best: float | None) -> dict[str, float]:
    """A study run's summary: trials per state (study/n_complete ...) and the best objective."""
    metrics = {f"study/n_{k.lower()}": v for k, v in counts.items()}
    if best is not None:
        metrics[f"study/best_{objective.replace('/', '_')}"] = best
    return metrics


# --- metric tables: the early-exit frontiers as one CSV artifact per split ---------------------
# Each rule x threshold x difficulty level, and each oracle, is a row (about 800 numbers for a
# looped run at T=4); as scalars they buried the loop-step metrics in the MLflow UI. The gate
# scalars, the oracle histogram and the frontier series (`{split}/series/exit_*`) stay metrics.
# The skip frontier of `ouro-lab eval` (infer.frontier: semantics x rule x threshold x exited_kv
# x difficulty) is a table of its own.
TABLES = "ouro.metric_tables"  # tag: the run's metric tables, comma-separated artifact paths
FRONTIER_TABLE = "frontier/{split}.csv"
SKIP_FRONTIER_TABLE = "skip_frontier/{split}.csv"
_TABLE_KINDS = ("loops", "acc", "loss", "bpb", "flops")  # the value columns, in this order
_RULE_ORDER = (*names.EXIT_RULES, *(f"oracle_{o}" for o in names.ORACLES))
_KV_ORDER = ("", "frozen", "propagate", "first")  # (selection rows have none)
_KEYS = {FRONTIER_TABLE: ("rule", "threshold", "difficulty"),
         SKIP_FRONTIER_TABLE: ("semantics", "rule", "threshold", "exited_kv", "difficulty")}


def _table_cell(name: str) -> tuple[str, str, tuple[str, ...], str] | None:
    """(table, split, row key, kind) of a tabled metric name; None for a scalar."""
    if m := names.EXIT_RULE_METRIC.match(name):
        return FRONTIER_TABLE, m["split"], (m["rule"], m["threshold"], m["level"] or "all"), m["kind"]
    if m := names.ORACLE_METRIC.match(name):
        return FRONTIER_TABLE, m["split"], (f"oracle_{m['rule']}", "", m["level"] or "all"), m["kind"]
    if m := names.SKIP_FRONTIER_METRIC.match(name):
        key = (m["semantics"], m["rule"], m["threshold"], m["kv"] or "", m["level"] or "all")
        return SKIP_FRONTIER_TABLE, m["split"], key, m["kind"]
    return None


def _row_order(table: str, key: tuple[str, ...]) -> tuple:
    level = -1 if key[-1] == "all" else int(key[-1])
    if table == FRONTIER_TABLE:
        return _RULE_ORDER.index(key[0]), float(key[1] or 0), level
    return key[0] != "select", _RULE_ORDER.index(key[1]), float(key[2]), _KV_ORDER.index(key[3]), level


def tabled(name: str) -> bool:
    """Whether a final metric is logged in one of its split's tables rather than as a scalar."""
    return _table_cell(name) is not None


def metric_tables(metrics: Mapping[str, float]) -> dict[str, str]:
    """The tabled names among `metrics` as CSV text per artifact path ('frontier/val.csv'): key
    columns (frontier: rule, threshold (empty for an oracle), difficulty ('all' or the level);
    skip frontier: semantics, rule, threshold, exited_kv, difficulty), then loops, acc, loss
    (bpb, flops): one row per key."""
    rows: dict[str, dict[tuple[str, ...], dict[str, float]]] = {}
    for name, value in metrics.items():
        if cell := _table_cell(name):
            table, split, key, kind = cell
            rows.setdefault(table.format(split=split), {}).setdefault(key, {})[kind] = float(value)
    tables = {}
    for path, by_key in rows.items():
        table = next(t for t in _KEYS if t.format(split=path.rsplit("/", 1)[-1].removesuffix(".csv")) == path)
        kinds = [k for k in _TABLE_KINDS if any(k in v for v in by_key.values())]
        lines = [",".join([*_KEYS[table], *kinds])]
        lines += [",".join([*key, *(repr(by_key[key][k]) if k in by_key[key] else "" for k in kinds)])
                  for key in sorted(by_key, key=lambda k: _row_order(table, k))]
        tables[path] = "\n".join(lines) + "\n"
    return tables


def table_metrics(path: str, text: str) -> dict[str, float]:
    """The metrics a table from `metric_tables` holds, under the names they were logged as."""
    split = path.rsplit("/", 1)[-1].removesuffix(".csv")
    header, *lines = text.splitlines()
    columns = header.split(",")
    skip = path == SKIP_FRONTIER_TABLE.format(split=split)
    keys = len(_KEYS[SKIP_FRONTIER_TABLE if skip else FRONTIER_TABLE])
    out = {}
    for line in lines:
        row = dict(zip(columns, line.split(",")))
        level = None if row["difficulty"] == "all" else int(row["difficulty"])
        for kind in columns[keys:]:
            if row[kind] == "":
                continue
            if skip:
                name = names.skip_frontier(row["semantics"], row["rule"], float(row["threshold"]), kind,
                                           row["exited_kv"] or None, level)
            elif row["rule"].startswith("oracle_"):
                name = names.oracle(row["rule"].removeprefix("oracle_"), kind, level)
            else:
                name = names.exit_rule(row["rule"], float(row["threshold"]), kind, level)
            out[f"{split}/{name}"] = float(row[kind])
    return out


# --- run states -----------------------------------------------------------------------------
def ended_by(err: BaseException | None) -> tuple[str, dict[str, str]]:
    """How a run ends when its work raised `err` (None: it did not): FINISHED; KILLED for an
    interruption (Ctrl-C, SystemExit), with the reason in tag `interrupted`; FAILED otherwise,
    with the reason in tag `error`."""
    if err is None:
        return "FINISHED", {}
    if isinstance(err, (KeyboardInterrupt, SystemExit)):
        return "KILLED", {INTERRUPTED: f"{type(err).__name__}: {err}".rstrip(": ")[:5000]}
    return "FAILED", {ERROR: f"{type(err).__name__}: {err}"[:5000]}


def trial_ending(err: BaseException | None) -> tuple[str, dict[str, str]]:
    """How a sweep's run ends: FINISHED + optuna.state COMPLETE; KILLED + PRUNED (tag `pruned`:
    why); FAILED + FAIL (tag `error`); KILLED + FAIL (tag `interrupted`)."""
    if err is None:
        return "FINISHED", {OPTUNA_STATE: COMPLETE}
    if isinstance(err, optuna.TrialPruned):
        return "KILLED", {OPTUNA_STATE: PRUNED_STATE, PRUNED: str(err)}
    status, tags = ended_by(err)
    return status, tags | {OPTUNA_STATE: FAIL}


def pruned_message(step: int, metric: str, value: float, why: str | None = None) -> str:
    """Why a pruner stopped a run (its tag `pruned`): 'pruned at step 500 with val/acc_final=0.9: ...'."""
    return f"pruned at step {step} with {metric}={value:.4f}" + (f": {why}" if why else "")


def pruned_step(tags: Mapping[str, str]) -> int | None:
    """The optimizer step a pruned run stopped at (None: not pruned)."""
    m = re.match(r"pruned at step (\d+)", tags.get(PRUNED, ""))
    return int(m[1]) if m else None


def superseded(by_trial: int) -> dict[str, str]:
    """The tags that end a trial run whose seed runs another trial recovered."""
    return {OPTUNA_STATE: FAIL, INTERRUPTED: f"superseded: its runs were recovered by trial {by_trial}"}


def killed_with_sweep() -> dict[str, str]:
    """The tags that end a run a killed sweep process left RUNNING."""
    return {OPTUNA_STATE: FAIL, INTERRUPTED: "the sweep process was killed"}


def state(status: str, tags: Mapping[str, str]) -> str:
    """The Optuna-style state of a run: the sweep's own tag, else the MLflow status.

    NOTE: MLFlowLogger marks a run FINISHED when fit() ends, before the final validation and
    test: a sweep's run is whole only once the sweep tags it COMPLETE."""
    tag = tags.get(OPTUNA_STATE)
    if tag:
        return tag
    if STUDY in tags:
        return RUNNING if status in ("RUNNING", "FINISHED") else FAIL
    return {"FINISHED": COMPLETE, "FAILED": FAIL, "KILLED": FAIL}.get(status, status)


@dataclass(frozen=True)
class RunRecord:
    """One run as the analysis reads it: plain data (`analysis.load` fills it from MLflow; tests
    build it by hand)."""

    run_id: str
    name: str = ""
    status: str = "FINISHED"  # MLflow's: RUNNING | FINISHED | FAILED | KILLED
    start_time: int = 0  # ms since the epoch
    params: Mapping[str, str] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)

    @property
    def state(self) -> str:
        return state(self.status, self.tags)

    @property
    def role(self) -> str | None:
        return self.tags.get(ROLE)

    @property
    def parent(self) -> str | None:
        return self.tags.get(PARENT)


# --- what a run records -----------------------------------------------------------------------
def used_params(cfg: ExperimentConfig) -> dict[str, Any]:
    """The flattened config a run logs as MLflow params: one name per key (`model.loops`), and
    of the task sections only the one `data.task` uses (the full config is the run's
    config.yaml artifact)."""
    d = to_dict(cfg)
    for task in TASKS:
        if task != cfg.data.task:
            d["data"].pop(task, None)
    if not cfg.has_stage2:
        d.pop("stage2")
    if cfg.infer == InferConfig():  # inference settings: logged only when an evaluation used them
        d.pop("infer")
    return flatten(d)


_DEFAULTS = {k: str(v) for k, v in flatten(to_dict(ExperimentConfig())).items()}


def logged_config(params: Mapping[str, str]) -> dict[str, str]:
    """A run's params read back as `used_params` logged them, with the stage2.* keys it leaves
    out put back at their schema defaults: a run logs that section only when it trains Stage II
    (so stage2.steps=0 and =300 runs compare as two values of one key)."""
    return {k: v for k, v in _DEFAULTS.items() if k.startswith("stage2.")} | dict(params)


def run_name(cfg: ExperimentConfig) -> str:
    """tracking.run_name, else '{task}-looped-N2xT4-s0', '{task}-depth_matched-L8-s0'."""
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    m = cfg.model
    shape = f"N{m.n_layers}xT{m.loops}" if m.arch == "looped" else f"L{m.distinct_layers}"
    stage = "-stage2" if cfg.has_stage2 else ""
    return f"{cfg.data.task}-{m.arch}-{shape}{stage}-s{cfg.train.seed}"


def metric_kind(task: Task) -> str:
    """The per-step quality metric a task's runs report: bits per byte on byte-level tasks
    (`text`, `lm`), else accuracy. Decided here only; training and evaluation runs record it."""
    return "bpb" if task.byte_level else "acc"


# Config keys added after runs (the reuse hash) and studies (the definition hash) were first
# hashed: left out of a hash while at their schema default, so hashes made before them stay
# valid and old studies resume and reuse their runs.
EXIT_AWARE_KEYS = (("train", "exit_aware"), ("train", "exit_aware_q"), ("train", "exit_aware_from"), ("train", "exited_kv"))
RUN_HASH_LATER = (("model", "rope_layout"), ("model", "rope_base"), ("model", "norm_eps"), ("model", "prelude_layers"),
                  ("model", "coda_layers"), ("model", "injection"), ("model", "init_state"),
                  ("train", "loops_sampling"), ("train", "loops_min"), ("train", "loops_max"), ("train", "backprop_loops"),
                  *EXIT_AWARE_KEYS)
STUDY_HASH_LATER = (("train", "strategy"), ("eval", "exit_q"), ("eval", "exit_confidence"), ("eval", "exit_step_change"),
                    ("eval", "exit_epsilon"), ("eval", "oracle_tolerance"), ("stage2", "init_from"), ("stage2", "k"),
                    ("stage2", "gamma"), ("stage2", "improvement"), ("stage2", "steps"), ("model", "rope_layout"),
                    ("model", "rope_base"), ("model", "norm_eps"),
                    *(("infer", f.name) for f in dataclasses.fields(InferConfig)),
                    ("model", "prelude_layers"), ("model", "coda_layers"), ("model", "injection"),
                    ("model", "init_state"), ("train", "loops_sampling"), ("train", "loops_min"),
                    ("train", "loops_max"), ("train", "backprop_loops"), ("data", "lm"), *EXIT_AWARE_KEYS)


def drop_later_defaults(d: dict, keys: Iterable[tuple[str, str]]) -> None:
    """Remove from a config dict (`to_dict`'s) each (section, key) of `keys` that holds its
    schema default."""
    defaults = to_dict(ExperimentConfig())
    for section, key in keys:
        if section in d and key in d[section] and d[section][key] == defaults[section][key]:
            d[section].pop(key)
