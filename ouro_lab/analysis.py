"""Turn a study into the answer to "when do extra loops stop helping?".

Data flows one way (STYLE.md): MLflow runs -> tidy DataFrames -> saturation, plots, report.
`ouro-lab report`, notebooks/loop_saturation.ipynb and the tests call these same functions:

    data = load_study("loops")                  # StudyData: runs, steps, exits, trials
    sat = saturation_table(data)                # saturation point per group x difficulty x arch
    plot_vs_loops(data, sat)                    # metric vs trained T, both baselines alongside
    report = write_report(data, "reports/loops")  # Markdown + PNGs (+ artifacts on the study run)

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
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import optuna
import pandas as pd
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from scipy import stats

from ouro_lab import tracking
from ouro_lab.tracking import plt

optuna.logging.set_verbosity(optuna.logging.WARNING)

ARCHS = ("looped", "param_matched", "depth_matched")
ARCH_STYLE = {"looped": dict(color="tab:blue", marker="o"),
              "param_matched": dict(color="tab:green", marker="s", linestyle="--"),
              "depth_matched": dict(color="tab:red", marker="^")}
# per-step metrics: {split}/{kind}_step{t}[_d{k}]  (DESIGN.md's one naming scheme)
STEP_METRIC = re.compile(r"^(?P<split>val|test)/(?P<kind>[a-z]+)_step(?P<step>\d+)(?:_d(?P<level>\d+))?$")
EXIT_METRIC = re.compile(r"^(?P<split>val|test)/(?P<kind>exit_expected_step|exit_entropy)(?:_d(?P<level>\d+))?$")
# keys that never define a group: the axes of the analysis, bookkeeping, and facts derived from them
NOT_GROUPING = ("model.loops", "model.arch", "train.seed", "tracking.", "train.progress_bar", "train.precision")
EXIT_KEYS = ("objective.entropy_weight", "objective.prior", "objective.prior_p")
MAX_GROUP_VALUES = 8  # outside sweeps, a varying key with more distinct values is averaged over
EXIT_TREND = 0.05  # expected-exit-step difference (steps) the summary calls a trend
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
    difficulty_name: str = "difficulty"
    objective_metric: str = "val/acc_final"
    direction: str = "maximize"

    @property
    def kind(self) -> str:
        """The metric kind the objective is about: 'acc' for val/acc_final, 'loss' for val/loss_step3."""
        return _objective_kind(self.objective_metric)

    def direction_of(self, kind: str) -> str:
        """Which way is better for a metric kind: the sweep's direction for its own kind."""
        if kind == self.kind:
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


def _objective_kind(metric: str) -> str:
    name = metric.split("/", 1)[-1]
    return re.sub(r"_(final|exit|step\d+)(_d\d+)?$", "", name)


# --- reading a study back from MLflow ----------------------------------------------------

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


def load_study(study: str, store: str | None = None) -> StudyData:
    """Read a study (its name, which is its MLflow experiment, or an experiment id) back from MLflow.

    Works on sweeps (parent run + trial runs + seed runs) and on experiments of plain
    `ouro-lab train` runs alike.
    """
    uri = resolve_store(store)
    client = MlflowClient(uri)
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
    runs = _search_all(client, experiment.experiment_id)
    parents = [r for r in runs if r.data.tags.get("ouro.role") == "study"]
    parent = max(parents, key=lambda r: r.info.start_time) if parents else None
    sweep = _sweep_definition(client, parent.info.run_id) if parent else {}
    # unit runs carry a model config; a trial run with seed runs under it only holds their means
    with_seeds = {r.data.tags.get("mlflow.parentRunId") for r in runs if r.data.tags.get("ouro.role") == "seed"}
    units = [r for r in runs if "model.arch" in r.data.params and r.info.run_id not in with_seeds]
    counts: dict[str, int] = {}
    for r in units:
        state = _state(r)
        counts[state] = counts.get(state, 0) + 1
    done = [r for r in units if _state(r) == "COMPLETE"]
    if not done:
        raise AnalysisError(f"study {experiment.name!r} has no finished runs yet (unit runs by state: {counts or 'none'})")
    # NOTE: a seed run's sampled values are taken from its trial run (stores written before the
    # reuse fix gave reused param_matched runs the source run's loop count)
    keys = list((sweep.get("params") or {}).keys())
    sampled = {r.info.run_id: {k: r.data.params[k] for k in keys if k in r.data.params}
               for r in runs if r.info.run_id in with_seeds}
    distributions = _sweep_distributions(sweep)
    continuous = [k for k, d in distributions.items() if not isinstance(d, optuna.distributions.CategoricalDistribution)]
    run_frame, group_keys, averaged = _runs_frame(done, sampled, continuous)
    kept = set(run_frame["run_id"])
    steps, exits = _tidy_metrics([r for r in done if r.info.run_id in kept], run_frame)
    objective = sweep.get("objective") or {}
    task = run_frame["task"].iloc[0]
    return StudyData(
        name=experiment.name, tracking_uri=uri, experiment_id=experiment.experiment_id,
        parent_run_id=parent.info.run_id if parent else None, sweep=sweep, distributions=distributions, runs=run_frame, steps=steps,
        exits=exits, trials=_trials_frame(runs, sweep), group_keys=group_keys, averaged_keys=averaged,
        counts=counts, difficulty_name=_difficulty_name(task),
        objective_metric=objective.get("metric", "val/acc_final"), direction=objective.get("direction", "maximize"))


def _sweep_distributions(sweep: Mapping[str, Any]) -> dict[str, optuna.distributions.BaseDistribution]:
    """The Optuna distribution of each swept param, as the sweep sampled it."""
    from ouro_lab.sweep_config import ParamSpec, SamplerSpec, distribution

    sampler = (sweep.get("sampler") or {}).get("name", SamplerSpec.name)
    return {k: distribution(ParamSpec(**spec), sampler) for k, spec in (sweep.get("params") or {}).items()}


def _search_all(client: MlflowClient, experiment_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
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


def _value(text: str) -> Any:
    """MLflow params are strings: give numbers back their type for sorting and axes."""
    for cast in (int, float):
        try:
            return cast(text)
        except (TypeError, ValueError):
            pass
    return {"True": True, "False": False, "None": None}.get(text, text)


def _runs_frame(done: list, sampled: Mapping[str, dict[str, str]],
                continuous: Sequence[str]) -> tuple[pd.DataFrame, list[str], list[str]]:
    """Unit runs as rows. Group keys: what varies besides T, arch and seed; a param the sweep
    samples from a range (or, outside sweeps, a key with many values) is averaged over instead."""
    rows, params = [], []
    for r in done:
        p = r.data.params | sampled.get(r.data.tags.get("mlflow.parentRunId"), {})
        m = r.data.metrics
        config = {k: v for k, v in p.items() if "." in k and not k.startswith(("derived.", "config/"))}
        params.append(config)
        seq_len = m.get("model/seq_len", _value(p.get("derived.seq_len", "nan")))
        tokens = _value(p.get("train.max_steps", "nan")) * _value(p.get("data.batch_size", "nan")) * seq_len
        arch = p["model.arch"]
        rows.append({
            "run_id": r.info.run_id, "trial": int(r.data.tags.get("ouro.trial", -1)),
            "seed": _value(p.get("train.seed", r.data.tags.get("ouro.seed", "0"))), "arch": arch,
            "loops": int(p.get("model.loops", r.data.tags.get("ouro.loops", "1"))),
            "trained_steps": int(p.get("model.loops", "1")) if arch == "looped" else 1,
            "task": p.get("data.task", r.data.tags.get("ouro.task", "?")),
            "n_params": m.get("model/n_params", math.nan),
            "forward_flops_per_token": m.get("model/forward_flops_per_token", math.nan),
            "train_flops": m.get("model/train_flops_per_token", math.nan) * tokens,
            "reused": "ouro.reused_from" in r.data.tags, "run_name": r.info.run_name,
            "config_hash": r.data.tags.get("ouro.config_hash", r.info.run_id),
        })
    frame = pd.DataFrame(rows)
    varying = sorted(k for k in set().union(*params)
                     if not k.startswith(NOT_GROUPING) and len({c.get(k) for c in params}) > 1)
    group_keys = [k for k in varying if k not in continuous and len({c.get(k) for c in params}) <= MAX_GROUP_VALUES]
    averaged = [k for k in varying if k not in group_keys]
    for key in varying:
        frame[key] = [_value(c[key]) if key in c else None for c in params]
    frame["group"] = [group_label({k: row[k] for k in group_keys}) for _, row in frame.iterrows()]
    # NOTE: the sweep copies an identical finished run instead of retraining it; a copy in the
    # same cell (group, arch, T) is the same model, not another seed
    frame = frame.drop_duplicates(["group", "arch", "loops", "config_hash"]).reset_index(drop=True)
    return frame, group_keys, averaged


def group_label(values: Mapping[str, Any]) -> str:
    """'data.state.length=8 objective.prior=uniform', or 'all runs' when nothing else varies."""
    return " ".join(f"{k}={v}" for k, v in values.items()) or "all runs"


def _tidy_metrics(done: list, run_frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    step_rows: dict[tuple, dict[str, float]] = {}
    exit_rows: dict[tuple, dict[str, float]] = {}
    for r in done:
        for name, value in r.data.metrics.items():
            if m := STEP_METRIC.match(name):
                key = (r.info.run_id, m["split"], int(m["step"]), _difficulty(m["level"]))
                step_rows.setdefault(key, {})[m["kind"]] = value
            elif m := EXIT_METRIC.match(name):
                key = (r.info.run_id, m["split"], _difficulty(m["level"]))
                exit_rows.setdefault(key, {})[m["kind"]] = value
    keep = ["run_id", "trial", "seed", "arch", "loops", "trained_steps", "task", "group",
            *[c for c in run_frame.columns if "." in c]]
    steps = pd.DataFrame([dict(run_id=k[0], split=k[1], step=k[2], difficulty=k[3], **v) for k, v in step_rows.items()])
    exits = pd.DataFrame([dict(run_id=k[0], split=k[1], difficulty=k[2], **v) for k, v in exit_rows.items()],
                         columns=["run_id", "split", "difficulty", "exit_expected_step", "exit_entropy"])
    steps = steps.merge(run_frame[keep], on="run_id").sort_values(["group", "arch", "loops", "seed", "split", "step"])
    exits = exits.merge(run_frame[keep], on="run_id")
    return steps.reset_index(drop=True), exits.reset_index(drop=True)


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
                     **{k: r.data.params.get(k) for k in keys}})
    return pd.DataFrame(rows, columns=["number", "state", "value", "std", *keys]).sort_values("number").reset_index(drop=True)


# --- statistics --------------------------------------------------------------------------

def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and a Student-t confidence interval over seeds (nan bounds with one seed)."""
    x = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return mean, mean - half, mean + half


def saturation_point(means: Mapping[int, float], epsilon: float, direction: str = "maximize") -> int | None:
    """The smallest trained T from which no larger T in the study improves the metric by epsilon
    or more; None when the largest T still improves on the one before it by epsilon or more
    ("not saturated within the range"). A plateau followed by a later gain is not saturation."""
    sign = 1.0 if direction == "maximize" else -1.0
    ts = sorted(means)
    for i, t in enumerate(ts):
        later = [sign * (means[u] - means[t]) for u in ts[i + 1:]]
        if i == len(ts) - 1:
            return t if len(ts) == 1 else None
        if max(later) < epsilon:
            return t
    return None


@dataclass
class Saturation:
    point: int | None  # saturation point of the seed means; None = not saturated within the range
    low: float  # bootstrap percentile interval of the point; math.inf = beyond the largest T
    high: float
    p_saturated: float  # share of bootstrap resamples that saturate within the range
    n_seeds: int  # the fewest seeds behind any T
    t_max: int  # the largest trained T in the study

    def __str__(self) -> str:
        point = f"T={self.point}" if self.point is not None else f"not saturated by T={self.t_max}"
        if self.n_seeds < 2:
            return f"{point} (1 seed: no interval)"

        def bound(v: float) -> str:
            return f">{self.t_max}" if math.isinf(v) else f"{v:g}"

        return f"{point} [{bound(self.low)}, {bound(self.high)}]"


def saturation(values: Mapping[int, Sequence[float]], epsilon: float = 0.01, direction: str = "maximize",
               level: float = 0.95, n_boot: int = 2000, seed: int = 0, paired: bool = False) -> Saturation:
    """Saturation point of a metric-vs-T curve with per-T seed values, and its uncertainty: the
    point is recomputed on `n_boot` resamples (seeds drawn with replacement) and the central
    `level` percentile interval reported; a resample that does not saturate counts as beyond the
    largest T (interval bound '>T_max'). `paired`: the i-th value of every T comes from the same
    seed, so seeds are resampled jointly across T; else independently at each T."""
    raw = {int(t): np.asarray(vs, dtype=float) for t, vs in values.items()}
    paired = paired and len({len(v) for v in raw.values()}) == 1 and all(np.isfinite(v).all() for v in raw.values())
    values = {t: v[np.isfinite(v)] for t, v in raw.items()}
    values = {t: v for t, v in values.items() if len(v)}
    if not values:
        raise AnalysisError("no finite values to find a saturation point in")
    point = saturation_point({t: float(v.mean()) for t, v in values.items()}, epsilon, direction)
    n_seeds = min(len(v) for v in values.values())
    t_max = max(values)
    if n_seeds < 2:
        return Saturation(point, math.nan, math.nan, math.nan, n_seeds, t_max)
    rng = np.random.default_rng(seed)
    boot = np.empty(n_boot)
    for b in range(n_boot):
        if paired:
            idx = rng.integers(0, n_seeds, n_seeds)
            means = {t: float(v[idx].mean()) for t, v in values.items()}
        else:
            means = {t: float(rng.choice(v, size=len(v)).mean()) for t, v in values.items()}
        found = saturation_point(means, epsilon, direction)
        boot[b] = math.inf if found is None else found
    alpha = (1 - level) / 2
    low, high = np.quantile(boot, [alpha, 1 - alpha], method="inverted_cdf")
    return Saturation(point, float(low), float(high), float(np.isfinite(boot).mean()), n_seeds, t_max)


def final_values(data: StudyData, kind: str | None = None, split: str | None = None) -> pd.DataFrame:
    """One row per unit run x difficulty: the metric at the run's trained (final) step."""
    kind, split = kind or data.kind, split or data.split
    s = data.steps[(data.steps["split"] == split) & (data.steps["step"] == data.steps["trained_steps"])]
    if s.empty:
        raise AnalysisError(f"no {split} metrics in study {data.name!r} (splits logged: "
                            f"{', '.join(sorted(set(data.steps['split'])))}; test needs eval.test=true)")
    if kind not in s.columns or s[kind].isna().all():
        raise AnalysisError(f"metric kind {kind!r} not logged in study {data.name!r}; "
                            f"kinds: {', '.join(c for c in ('acc', 'loss', 'bpb') if c in s.columns)}")
    return s.rename(columns={kind: "value"})[["run_id", "group", "arch", "loops", "seed", "difficulty", "value"]]


def curve_table(data: StudyData, kind: str | None = None, split: str | None = None,
                level: float = 0.95) -> pd.DataFrame:
    """Metric at the final step vs trained T: mean, CI and seed count per group x arch x T x difficulty."""
    rows = []
    for (group, arch, loops, diff), g in final_values(data, kind, split).groupby(
            ["group", "arch", "loops", "difficulty"], sort=True):
        mean, lo, hi = mean_ci(g["value"].tolist(), level)
        rows.append(dict(group=group, arch=arch, loops=loops, difficulty=diff, mean=mean, ci_low=lo, ci_high=hi,
                         n=int(g["value"].notna().sum()), std=float(g["value"].std(ddof=1)) if len(g) > 1 else math.nan))
    return pd.DataFrame(rows)


def saturation_table(data: StudyData, epsilon: float = 0.01, kind: str | None = None, split: str | None = None,
                     level: float = 0.95, n_boot: int = 2000) -> pd.DataFrame:
    """Saturation point per group x difficulty for each arch whose compute grows with T
    (looped and depth_matched; param_matched does not depend on T)."""
    kind = kind or data.kind
    direction = data.direction_of(kind)
    rows = []
    finals = final_values(data, kind, split)
    for (group, arch, diff), g in finals[finals["arch"] != "param_matched"].groupby(["group", "arch", "difficulty"]):
        cells = {t: gt.sort_values("seed") for t, gt in g.groupby("loops")}
        if len(cells) < 2:
            continue
        # the same seeds at every T (and one run each): resample them jointly
        seeds = {tuple(c["seed"]) for c in cells.values()}
        paired = len(seeds) == 1 and len(set(next(iter(seeds)))) == len(next(iter(seeds)))
        sat = saturation({t: c["value"].tolist() for t, c in cells.items()}, epsilon, direction, level, n_boot,
                         paired=paired)
        rows.append(dict(group=group, arch=arch, difficulty=diff, point=sat.point, low=sat.low, high=sat.high,
                         p_saturated=sat.p_saturated, n_seeds=sat.n_seeds, t_max=sat.t_max, text=str(sat),
                         paired=paired))
    table = pd.DataFrame(rows, columns=["group", "arch", "difficulty", "point", "low", "high", "p_saturated",
                                        "n_seeds", "t_max", "text", "paired"])
    return _in_group_order(data, table, ["arch", "difficulty"])


def _in_group_order(data: StudyData, table: pd.DataFrame, then: list[str]) -> pd.DataFrame:
    """Sort by group in value order (length 8 before 12), then by `then`."""
    order = {g: i for i, g in enumerate(data.groups)}
    return table.sort_values(["group", *then], key=lambda c: c.map(order) if c.name == "group" else c,
                             kind="stable").reset_index(drop=True)


# --- figures -----------------------------------------------------------------------------

def _grid(n_rows: int, n_cols: int, width: float = 3.4, height: float = 2.8):
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(width * n_cols, height * n_rows + 0.8), squeeze=False,
                             constrained_layout=True)
    return fig, axes


def _panel(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _figure_legend(fig, axes, title: str | None = None) -> None:
    """One legend for the whole figure, below the panels (per-panel legends hide the curves)."""
    seen: dict[str, Any] = {}
    for ax in np.ravel(axes):
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    if seen:
        fits = max(1, int(fig.get_figwidth() / 2.4))  # entries per legend row that fit the figure's width
        fig.legend(seen.values(), seen.keys(), loc="outside lower center", ncols=min(len(seen), fits), fontsize=8,
                   title=title, title_fontsize=8)


def _difficulty_title(data: StudyData, diff: str) -> str:
    return "all positions" if diff == ALL else f"{data.difficulty_name} {diff[1:]}"


def _bounded(kind: str, values):
    """Accuracy CIs are clipped to [0, 1] for display."""
    return np.clip(values, 0.0, 1.0) if kind == "acc" else values


def plot_vs_loops(data: StudyData, sat: pd.DataFrame | None = None, kind: str | None = None,
                  split: str | None = None, level: float = 0.95):
    """Metric at the final step vs trained loop count T, mean and CI over seeds: the looped model
    with both baselines at each T (param_matched is one model shown at every T). One row per
    group, one column per difficulty; the looped model's saturation point as a dotted line."""
    kind, split = kind or data.kind, split or data.split
    table = curve_table(data, kind, split, level)
    groups, diffs = [g for g in data.groups if g in set(table["group"])], difficulty_order(table["difficulty"])
    fig, axes = _grid(len(groups), len(diffs))
    for i, group in enumerate(groups):
        for j, diff in enumerate(diffs):
            ax, title = axes[i, j], f"{group}\n{_difficulty_title(data, diff)}"
            for arch in ARCHS:
                c = table[(table["group"] == group) & (table["difficulty"] == diff) & (table["arch"] == arch)]
                if c.empty:
                    continue
                style = ARCH_STYLE[arch]
                ax.plot(c["loops"], c["mean"], label=arch.replace("_", "-"), **style)
                ax.fill_between(c["loops"], _bounded(kind, c["ci_low"]), _bounded(kind, c["ci_high"]),
                                color=style["color"], alpha=0.12, linewidth=0)
            hit = sat[(sat["group"] == group) & (sat["difficulty"] == diff) & (sat["arch"] == "looped")] \
                if sat is not None else pd.DataFrame()
            if len(hit):
                title += f"\nlooped: {hit['text'].iloc[0]}"
                if pd.notna(hit["point"].iloc[0]):
                    ax.axvline(hit["point"].iloc[0], color=ARCH_STYLE["looped"]["color"], linestyle=":", linewidth=1.2,
                               label="looped saturation point")
            _panel(ax, title, "trained loop count T", f"{split} {kind}")
            ax.set_xticks(sorted(table["loops"].unique()))
    _figure_legend(fig, axes)
    fig.suptitle(f"{data.name}: {split} {kind} at the final loop step vs trained T "
                 f"(seed mean, band = {level:.0%} t-interval)")
    return fig


def plot_vs_step(data: StudyData, kind: str | None = None, split: str | None = None):
    """Looped models: metric at every evaluation loop step t, one line per trained T (seed mean).
    The dot marks t = T; the dashed part (t > T) is extrapolation, where over-looping shows."""
    kind, split = kind or data.kind, split or data.split
    s = data.steps[(data.steps["split"] == split) & (data.steps["arch"] == "looped")]
    if s.empty or kind not in s:
        return None
    mean = s.groupby(["group", "difficulty", "loops", "step"])[kind].mean().reset_index()
    groups, diffs = [g for g in data.groups if g in set(mean["group"])], difficulty_order(mean["difficulty"])
    loops = sorted(mean["loops"].unique())
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(loops)))
    fig, axes = _grid(len(groups), len(diffs))
    for i, group in enumerate(groups):
        for j, diff in enumerate(diffs):
            ax = axes[i, j]
            for color, t in zip(colors, loops):
                c = mean[(mean["group"] == group) & (mean["difficulty"] == diff) & (mean["loops"] == t)]
                inside, beyond = c[c["step"] <= t], c[c["step"] >= t]
                ax.plot(inside["step"], inside[kind], color=color, label=f"T={t}")
                ax.plot(beyond["step"], beyond[kind], color=color, linestyle="--")
                ax.plot(inside["step"].iloc[-1:], inside[kind].iloc[-1:], "o", color=color)
            _panel(ax, f"{group}\n{_difficulty_title(data, diff)}", "evaluation loop step t", f"{split} {kind}")
    _figure_legend(fig, axes, "trained loop count (dot: t = T; dashed: t > T, extrapolation)")
    fig.suptitle(f"{data.name}: looped model, {split} {kind} at every loop step (seed mean)")
    return fig


def compute_table(data: StudyData, kind: str | None = None, split: str | None = None) -> pd.DataFrame:
    """Metric (all positions) vs training FLOPs and inference FLOPs/token, per group x arch x T
    (param_matched, which does not depend on T, once per group)."""
    finals = final_values(data, kind, split)
    finals = finals[finals["difficulty"] == ALL].merge(
        data.runs[["run_id", "train_flops", "forward_flops_per_token", "n_params"]], on="run_id")
    table = (finals.groupby(["group", "arch", "loops"])
             .agg(mean=("value", "mean"), train_flops=("train_flops", "mean"),
                  forward_flops_per_token=("forward_flops_per_token", "mean"), n_params=("n_params", "mean"))
             .reset_index())
    # a reused param_matched run is the same model at every T: one point per group
    reused_only = table["arch"].eq("param_matched") & data.runs["reused"].any()
    table.loc[reused_only, "loops"] = None
    table = table.drop_duplicates(["group", "arch", "loops"])
    return _in_group_order(data, table, ["arch", "loops"]).rename(columns={"loops": "T"})


def plot_compute(data: StudyData, kind: str | None = None, split: str | None = None):
    """Compute-normalised view: the metric against training FLOPs and inference FLOPs/token
    (counted by structure: a shared block run T times costs T times). Labels give T."""
    kind, split = kind or data.kind, split or data.split
    table = compute_table(data, kind, split)
    groups = [g for g in data.groups if g in set(table["group"])]
    fig, axes = _grid(len(groups), 2, width=4.6)
    for i, group in enumerate(groups):
        for j, (x, label) in enumerate((("train_flops", "training FLOPs (total)"),
                                        ("forward_flops_per_token", "inference FLOPs / token"))):
            ax = axes[i, j]
            for arch in ARCHS:
                c = table[(table["group"] == group) & (table["arch"] == arch)].sort_values(x)
                if c.empty:
                    continue
                ax.plot(c[x], c["mean"], label=arch.replace("_", "-"), **ARCH_STYLE[arch])
                for _, row in c.iterrows():
                    if pd.notna(row["T"]):
                        ax.annotate(f"T={int(row['T'])}", (row[x], row["mean"]), fontsize=6,
                                    textcoords="offset points", xytext=(3, -9))
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(plt.NullFormatter())  # minor labels collide within a decade
            _panel(ax, group, label, f"{split} {kind} (all positions)")
    _figure_legend(fig, axes)
    fig.suptitle(f"{data.name}: compute-normalised, {split} {kind} (seed mean) vs FLOPs")
    return fig


def exit_table(data: StudyData, split: str | None = None) -> pd.DataFrame:
    """Exit-gate statistics of the looped runs (seed means) per group x T x difficulty."""
    split = split or data.split
    e = data.exits[data.exits["split"] == split]
    if e.empty:
        return pd.DataFrame(columns=["group", "loops", "difficulty", "exit_expected_step", "exit_entropy"])
    return e.groupby(["group", "loops", "difficulty"])[["exit_expected_step", "exit_entropy"]].mean().reset_index()


def exit_wide(data: StudyData, split: str | None = None) -> pd.DataFrame:
    """The exit table one row per group x T: E[t] and entropy per difficulty side by side."""
    table = exit_table(data, split)
    if table.empty:
        return table
    wide = table.pivot_table(index=["group", "loops"], columns="difficulty",
                             values=["exit_expected_step", "exit_entropy"]).reset_index()
    levels = difficulty_order(table["difficulty"])
    cols = [("group", ""), ("loops", "")] + [("exit_expected_step", d) for d in levels] + [("exit_entropy", d) for d in levels]
    wide = wide[cols]
    wide.columns = ["group", "T"] + [f"E[t] {d}" for d in levels] + [f"H {d}" for d in levels]
    return _in_group_order(data, wide, ["T"])


def plot_exit(data: StudyData, split: str | None = None):
    """Does the gate spend more loops on harder inputs? Row 1: expected exit step and exit
    entropy vs difficulty (one line per T, line style per group). One more row per exit-objective
    key the study varies (beta, prior, prior_p): the same two statistics against its value."""
    split = split or data.split
    table = exit_table(data, split)
    if table.empty:
        return None
    levels = [d for d in difficulty_order(table["difficulty"]) if d != ALL] or [ALL]
    varied = [k for k in EXIT_KEYS if k in data.group_keys + data.averaged_keys]
    groups = [g for g in data.groups if g in set(table["group"])]
    loops = [t for t in sorted(table["loops"].unique()) if t > 1] or sorted(table["loops"].unique())
    colors = {t: plt.cm.viridis(x) for t, x in zip(loops, np.linspace(0, 0.9, len(loops)))}
    dashes = ("-", "--", ":", "-.")
    stats_ = (("exit_expected_step", "expected exit step E[t]"), ("exit_entropy", "exit entropy (nats)"))
    fig, axes = _grid(1 + len(varied), 2, width=4.6, height=3.2)
    for j, (col, label) in enumerate(stats_):
        ax = axes[0, j]
        for gi, group in enumerate(groups):
            for t in loops:
                c = table[(table["group"] == group) & (table["loops"] == t)].set_index("difficulty").reindex(levels)
                ax.plot(range(1, len(levels) + 1), c[col], marker="o", color=colors[t], linestyle=dashes[gi % 4])
        ax.set_xticks(range(1, len(levels) + 1), [lv.removeprefix("d") for lv in levels])
        _panel(ax, f"{label} by {data.difficulty_name}", data.difficulty_name, label)
    e = data.exits[(data.exits["split"] == split) & (data.exits["difficulty"] == ALL)]
    for i, key in enumerate(varied, start=1):
        m = e.groupby([key, "loops"])[[c for c, _ in stats_]].mean().reset_index()
        numeric = pd.api.types.is_numeric_dtype(m[key])
        for j, (col, label) in enumerate(stats_):
            ax = axes[i, j]
            for t in loops:
                c = m[m["loops"] == t].sort_values(key)
                ax.plot(c[key] if numeric else c[key].astype(str), c[col], marker="o", color=colors[t])
            if numeric and key == "objective.entropy_weight" and (m[key] > 0).all():
                ax.set_xscale("log")
            _panel(ax, f"{label} (all positions) vs {key}", key, label)
    # legend: colour = T, line style = group
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors[t], marker="o", label=f"T={t}") for t in loops]
    if len(groups) > 1:
        handles += [Line2D([], [], color="black", linestyle=dashes[gi % 4], label=g) for gi, g in enumerate(groups)]
    axes[0, 0].legend(handles=handles, fontsize=7, ncols=2)
    fig.suptitle(f"{data.name}: exit gate of the looped runs ({split}, seed means)")
    return fig


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
            values = {k: _param_value(dists[k], row[k]) for k in dists if row.get(k) is not None}
        except ValueError as err:
            warnings.warn(f"trial {row['number']} left out of the Optuna view: {err}")
            continue
        study.add_trial(optuna.trial.create_trial(
            params=values, distributions={k: dists[k] for k in values}, state=state,
            value=float(row["value"]) if state == optuna.trial.TrialState.COMPLETE else None))
    return study


def _param_value(dist, text: str) -> Any:
    """A logged param (a string; a float config key logs choice 0 as '0.0') as the distribution's value."""
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        for choice in dist.choices:
            if str(choice) == text or (isinstance(choice, (int, float)) and _value(text) == choice):
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


# --- tables and words --------------------------------------------------------------------

def _fmt(mean: float, low: float, high: float, n: int) -> str:
    if not np.isfinite(mean):
        return "-"
    if n < 2 or not np.isfinite(low):
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {(high - low) / 2:.3f}"


def key_table(data: StudyData, difficulty: str = ALL, kind: str | None = None, split: str | None = None,
              level: float = 0.95) -> pd.DataFrame:
    """The report's main table: per group and T, each arch's final-step metric as 'mean ± CI half-width'."""
    table = curve_table(data, kind, split, level)
    table = table[table["difficulty"] == difficulty]
    table = table.assign(cell=[_fmt(r["mean"], r["ci_low"], r["ci_high"], r["n"]) for _, r in table.iterrows()])
    wide = table.pivot_table(index=["group", "loops"], columns="arch", values="cell", aggfunc="first").reset_index()
    wide.columns.name = None
    wide = wide.fillna("-")  # no finished run in that cell (pruned, failed, not swept)
    wide = _in_group_order(data, wide, ["loops"])
    return wide[["group", "loops", *[a for a in ARCHS if a in wide.columns]]].rename(columns={"loops": "T"})


def extrapolation_table(data: StudyData, kind: str | None = None, split: str | None = None) -> pd.DataFrame:
    """Looped models evaluated past their trained T: the seed-mean metric at t=T and at the last
    evaluated step, per group and T (all positions)."""
    kind, split = kind or data.kind, split or data.split
    s = data.steps[(data.steps["split"] == split) & (data.steps["arch"] == "looped") & (data.steps["difficulty"] == ALL)]
    rows = []
    for (group, t), g in s.groupby(["group", "loops"]):
        m = g.groupby("step")[kind].mean()
        last = int(m.index.max())
        if last > t:
            rows.append(dict(group=group, T=t, at_T=m.loc[t], last_step=last, at_last=m.loc[last],
                             change=m.loc[last] - m.loc[t]))
    return _in_group_order(data, pd.DataFrame(rows, columns=["group", "T", "at_T", "last_step", "at_last", "change"]),
                           ["T"])


def summary(data: StudyData, sat: pd.DataFrame, importances: Mapping[str, float] | None = None,
            kind: str | None = None, split: str | None = None, epsilon: float = 0.01) -> list[str]:
    """Sentences built only from the numbers above (no numbers of its own)."""
    kind, split = kind or data.kind, split or data.split
    table = curve_table(data, kind, split)
    sign = 1 if data.direction_of(kind) == "maximize" else -1
    lines = []
    task = ", ".join(sorted(data.runs["task"].unique()))
    for group in [g for g in data.groups if g in set(table["group"])]:
        where = f"on {task} ({group})" if group != "all runs" else f"on {task}"
        mean = {(r["arch"], r["loops"], r["difficulty"]): r["mean"] for _, r in table[table["group"] == group].iterrows()}
        levels = difficulty_order(table[table["group"] == group]["difficulty"])
        hardest = levels[-1]
        for diff in dict.fromkeys([ALL, hardest]):
            hit = sat[(sat["group"] == group) & (sat["arch"] == "looped") & (sat["difficulty"] == diff)]
            if hit.empty:
                continue
            h = hit.iloc[0]
            scope = "all positions" if diff == ALL else f"the hardest {data.difficulty_name} ({diff})"
            if pd.notna(h["point"]):
                t = int(h["point"])
                text = (f"{where.capitalize()}, {scope}: looped {split} {kind} saturates at {h['text']} "
                        f"(gain < {epsilon:g} from any larger T), reaching {mean[('looped', t, diff)]:.3f}")
            else:
                t = int(h["t_max"])
                text = (f"{where.capitalize()}, {scope}: looped {split} {kind} is not saturated within T <= {t} "
                        f"({h['text']}); at T={t} it is {mean[('looped', t, diff)]:.3f}")
            others = [(a, mean.get((a, t, diff))) for a in ("depth_matched", "param_matched")]
            others = [(a, v) for a, v in others if v is not None and np.isfinite(v)]
            if others:
                text += "; at that T " + ", ".join(
                    f"{a.replace('_', '-')} is {v:.3f} (looped {'ahead' if sign * (mean[('looped', t, diff)] - v) >= 0 else 'behind'} "
                    f"by {abs(mean[('looped', t, diff)] - v):.3f})" for a, v in others)
            lines.append(text + ".")
        dm = sat[(sat["group"] == group) & (sat["arch"] == "depth_matched") & (sat["difficulty"] == ALL)]
        if len(dm):
            lines.append(f"{where.capitalize()}: the depth-matched baseline (N*T distinct layers) "
                         f"{'saturates at ' + dm.iloc[0]['text'] if pd.notna(dm.iloc[0]['point']) else 'is ' + dm.iloc[0]['text']}.")
    extra = extrapolation_table(data, kind, split)
    if len(extra):
        worst, best = extra.loc[(sign * extra["change"]).idxmin()], extra.loc[(sign * extra["change"]).idxmax()]
        lines.append(f"Looping past the trained T (extrapolation) changes {split} {kind} by {worst['change']:+.3f} "
                     f"at worst (T={worst['T']} run to t={worst['last_step']}, {worst['group']}) and by "
                     f"{best['change']:+.3f} at best (T={best['T']} run to t={best['last_step']}, {best['group']}).")
    exits = exit_table(data, split)
    for group in [g for g in data.groups if g in set(exits["group"])]:
        e = exits[(exits["group"] == group) & (exits["difficulty"] != ALL)]
        t_max = e["loops"].max()
        by = e[e["loops"] == t_max].set_index("difficulty")["exit_expected_step"]
        if t_max > 1 and len(by) > 1:
            lo, hi = difficulty_order(by.index)[0], difficulty_order(by.index)[-1]
            trend = ("more loops at" if by[hi] > by[lo] + EXIT_TREND else "fewer loops at"
                     if by[hi] < by[lo] - EXIT_TREND else "about as many loops at")
            # NOTE: which end is harder is the task's business (more hops; but less context for text)
            lines.append(f"Exit gate at T={t_max} ({group}): expected exit step {by[lo]:.2f} at "
                         f"{data.difficulty_name} {lo[1:]} vs {by[hi]:.2f} at {hi[1:]}: it spends {trend} "
                         f"{data.difficulty_name} {hi[1:]} than at {lo[1:]} (a difference under {EXIT_TREND} "
                         "steps counts as none).")
    if importances:
        lines.append("Parameter importance for the objective (fANOVA): "
                     + ", ".join(f"{k} {v:.2f}" for k, v in importances.items()) + ".")
    return lines


# --- the report --------------------------------------------------------------------------

@dataclass
class Report:
    folder: Path
    markdown: str
    table: str  # the key table as printed to the terminal
    files: list[Path]


def _markdown_table(frame: pd.DataFrame, floatfmt: str = ".3f") -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "-" if not np.isfinite(v) else format(v, floatfmt)
        return str(v)

    head = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def write_report(data: StudyData, folder: str | Path, epsilon: float = 0.01, kind: str | None = None,
                 split: str | None = None, level: float = 0.95, n_boot: int = 2000, log: bool = True) -> Report:
    """Write report.md and its PNGs to `folder`; with `log`, also as artifacts `report/` on the
    study's parent run (or nowhere when the experiment has no sweep parent)."""
    kind, split = kind or data.kind, split or data.split
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sat = saturation_table(data, epsilon, kind, split, level, n_boot)
    study = optuna_study(data)
    importances = param_importances(study)
    figures = {"vs_loops.png": plot_vs_loops(data, sat, kind, split, level), "vs_step.png": plot_vs_step(data, kind, split),
               "compute.png": plot_compute(data, kind, split), "exit_gate.png": plot_exit(data, split)}
    optuna_figs = plot_optuna(study, importances, data.objective_metric)
    if optuna_figs:
        figures["optuna_history.png"], figures["optuna_importance.png"] = optuna_figs
    files = []
    for name, fig in figures.items():
        if fig is not None:
            fig.savefig(folder / name, dpi=110)
            plt.close(fig)
            files.append(folder / name)
    table = key_table(data, ALL, kind, split, level)
    lines = summary(data, sat, importances, kind, split, epsilon)
    text = _report_markdown(data, sat, table, lines, importances, {f.name for f in files}, kind, split, epsilon, level, n_boot)
    (folder / "report.md").write_text(text)
    files.insert(0, folder / "report.md")
    for name, frame in (("curves.csv", curve_table(data, kind, split, level)), ("saturation.csv", sat),
                        ("steps.csv", data.steps)):
        frame.to_csv(folder / name, index=False)
        files.append(folder / name)
    if log and data.parent_run_id:
        client = MlflowClient(data.tracking_uri)
        for path in files:
            client.log_artifact(data.parent_run_id, str(path), "report")
    printed = _terminal_table(table, sat, kind, split, level)
    return Report(folder, text, printed, files)


def _terminal_table(table: pd.DataFrame, sat: pd.DataFrame, kind: str, split: str, level: float) -> str:
    s = sat[sat["difficulty"].isin([ALL])][["group", "arch", "text"]].rename(columns={"text": "saturation (all positions)"})
    saturation = s.to_string(index=False) if len(s) else "saturation: needs runs at two or more trained T per arch"
    return (f"{split} {kind} at the final step (all positions), mean ± {level:.0%} CI half-width over seeds:\n"
            + table.to_string(index=False) + "\n\n" + saturation)


def _report_markdown(data: StudyData, sat: pd.DataFrame, table: pd.DataFrame, lines: list[str],
                     importances: Mapping[str, float], figures: set[str], kind: str, split: str,
                     epsilon: float, level: float, n_boot: int) -> str:
    n_seeds = data.runs.groupby(["group", "arch", "loops"])["run_id"].nunique()
    out = [f"# {data.name}: when do extra loops stop helping?", "",
           f"Study `{data.name}` (MLflow experiment {data.experiment_id}, store `{data.tracking_uri}`"
           + (f", study run `{data.parent_run_id}`" if data.parent_run_id else "") + ").",
           f"Unit runs by state: {', '.join(f'{k} {v}' for k, v in sorted(data.counts.items()))}; "
           f"runs per point (group x arch x T): {n_seeds.min()}-{n_seeds.max()}. Metric: **{split} {kind}** at the final (trained) "
           f"loop step; difficulty = {data.difficulty_name}.", ""]
    if data.averaged_keys:
        out += [f"Averaged over: {', '.join(data.averaged_keys)} (sampled from a range, or more than "
                f"{MAX_GROUP_VALUES} values): means, intervals and 'seeds' below pool runs over their values.", ""]
    if kind != data.kind or data.objective_metric.split("/", 1)[-1] != f"{kind}_final":
        out += [f"The sweep's objective is `{data.objective_metric}`; this report reads {kind} at each run's "
                "final trained step (and per step / per difficulty below).", ""]
    out += ["## Summary", "", *[f"- {line}" for line in lines], "",
            "## Metric vs trained loop count T", "",
            f"Mean ± half-width of the {level:.0%} Student-t interval over seeds (all positions). "
            "param_matched (N layers, one pass) does not depend on T: one model per seed, shown at every T.", "",
            _markdown_table(table), ""]
    if "vs_loops.png" in figures:
        out += ["![metric vs T](vs_loops.png)", ""]
    out += ["## Saturation points", "",
            f"Saturation point = the smallest trained T from which no larger T in the study improves the "
            f"seed-mean metric by ε = {epsilon:g} or more ('not saturated' when the largest T still gains ε on "
            "the one before it). NOTE: this is stricter than 'the next T gains less than ε': a plateau followed "
            "by a later gain is not called saturation, and gains are in the metric between trained T values "
            f"(not per loop). Interval: {level:.0%} percentile bootstrap over seeds ({n_boot} resamples; seeds "
            "drawn with replacement, jointly across T when every T has the same seeds (paired), else "
            "independently; a resample that does not saturate counts as beyond the largest T, written '>T'). "
            "p_saturated = share of resamples that saturate within the range. With 3 seeds a percentile "
            "bootstrap of a grid point is coarse: read a point interval such as [6, 6] as 'every resample "
            "agrees', not as certainty.", "",
            _markdown_table(sat[["group", "arch", "difficulty", "text", "p_saturated", "n_seeds", "paired"]]
                            .rename(columns={"text": "saturation point [interval]"}), ".2f")
            if len(sat) else "No saturation point: every arch has runs at one trained T only.", ""]
    extra = extrapolation_table(data, kind, split)
    out += ["## Metric vs evaluation loop step t", "",
            "Each looped model evaluated at every step up to its trained T and beyond (extrapolation).", ""]
    if "vs_step.png" in figures:
        out += ["![metric vs loop step](vs_step.png)", ""]
    if len(extra):
        out += [_markdown_table(extra.rename(columns={"at_T": f"{kind} at t=T", "at_last": f"{kind} at last t"})), ""]
    out += ["## Compute-normalised", "",
            "FLOPs counted by structure (a shared block run T times costs T times; the per-step LM heads "
            "included); training FLOPs = 3 x forward FLOPs/token x tokens seen.", "",
            _markdown_table(compute_table(data, kind, split), ".4g"), ""]
    if "compute.png" in figures:
        out += ["![compute](compute.png)", ""]
    exits = exit_wide(data, split)
    if len(exits):
        out += ["## Exit gate", "", "Seed means over the looped runs: expected exit step E[t] under the "
                "learned exit distribution and its entropy H (nats; uniform over T steps = ln T), by "
                f"{data.difficulty_name}.", "", _markdown_table(exits, ".2f"), ""]
        if "exit_gate.png" in figures:
            out += ["![exit gate](exit_gate.png)", ""]
    if "optuna_history.png" in figures:
        out += ["## The sweep", "",
                f"Objective `{data.objective_metric}` ({data.direction}); trials: "
                + ", ".join(f"{k} {v}" for k, v in data.trials["state"].value_counts().sort_index().items()) + ".", ""]
        if importances:
            out += ["fANOVA importance (Optuna's `FanovaImportanceEvaluator`, seed 0):", "",
                    _markdown_table(pd.DataFrame({"param": list(importances), "importance": list(importances.values())})), "",
                    "![importance](optuna_importance.png)", ""]
        out += ["![history](optuna_history.png)", ""]
    return "\n".join(out) + "\n"
