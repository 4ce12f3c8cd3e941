"""Sweep YAML schema (`sweeps/*.yaml`): typed, documented, validated before any trial runs
(without loading Lightning or touching any store).

    name: loops                      # study name (default: the file's stem)
    base: ../conf/state.yaml         # experiment config, relative to this file
    overrides: [train.max_steps=1000]
    objective: {metric: val/acc_final, direction: maximize}
    params:
      model.loops: {choices: [1, 2, 4, 8]}                        # categorical / grid
      objective.entropy_weight: {low: 0.001, high: 1.0, log: true}  # float range
      model.n_layers: {low: 1, high: 4}                            # int range (ints given)
      recipe: {choices: [ouro, huginn]}                            # a bundle: named override lists
    bundles:
      recipe:
        ouro: []
        huginn: [model.prelude_layers=1, model.coda_layers=1, model.injection=concat, model.init_state=random]
    sampler: {name: grid, seed: 0}   # grid | tpe | random | cmaes | adaptive (sweep/adaptive.py)
    design: {epsilon: 0.01, tolerance: 1}  # sampler adaptive only: see DesignSpec
    pruner: {name: median, n_startup_trials: 4, n_warmup_steps: 250}
    trials: 24                        # budget: trials that end (complete, pruned or failed)
    seeds: 3                          # runs per sampled configuration; trial value = their mean

Modelled on W&B sweep configs (`parameters` with `values` / `min`/`max`) and Optuna's own
distributions (`choices`, `low`/`high`, `log`, `step`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from ouro_lab import metric_names
from ouro_lab.config import ConfigError, load_config, override_key, read_yaml
from ouro_lab.locations import tracking_uri_problem

if TYPE_CHECKING:
    import optuna

STORAGE_SCHEMES = ("postgresql", "mysql", "sqlite:///")  # SQLAlchemy URLs Optuna's RDBStorage takes
SAMPLERS = ("grid", "tpe", "random", "cmaes", "adaptive")
PRUNERS = ("none", "median", "hyperband", "successive_halving", "design")
DIRECTIONS = ("maximize", "minimize")
PRUNER_SETTINGS = {
    "none": set(),
    "median": {"n_startup_trials", "n_warmup_steps", "interval_steps", "n_min_trials"},
    "hyperband": {"min_resource", "max_resource", "reduction_factor"},
    "successive_halving": {"min_resource", "reduction_factor", "min_early_stopping_rate"},
    "design": {"margin"},  # sampler adaptive only: stops a run that cannot change the answer (design.DesignPruner)
}


@dataclass
class ObjectiveSpec:
    metric: str = "val/acc_final"  # a metric logged at every validation (pruning reports it)
    direction: str = "maximize"  # maximize | minimize


@dataclass
class SamplerSpec:
    name: str = "tpe"  # grid | tpe | random | cmaes
    seed: int = 0  # sampler seed (grid: the order points are visited in)


@dataclass
class DesignSpec:
    """The adaptive design over the loop count (sampler.name: adaptive, one param: the loop
    count's choices): which (T, seed) to train next, and when the saturation answer is known."""

    epsilon: float = 0.01  # the saturation point's epsilon, on the objective's scale
    tolerance: float = 1.0  # stop once every T* interval is at most this wide (in T)
    level: float = 0.9  # the T* interval's coverage (central bootstrap interval)
    max_seeds: int = 3  # runs per T at most (seeds train.seed + 0 .. max_seeds - 1)
    flops: float = 0.0  # compute budget: stop once the runs trained this many training FLOPs (0 = none)
    scale: str = "auto"  # where the seed noise is modelled: raw | logit | auto (logit for an accuracy objective)
    confirm: int = 2  # seeds at each answer's T and the one below it before the answer is called known


@dataclass
class ParamSpec:
    choices: Optional[list[Any]] = None  # categorical values (the grid sampler's points)
    low: Any = None  # range start; an int range when low and high are written as ints (1, not 1.0)
    high: Any = None  # range end (inclusive)
    log: bool = False  # sample on a log scale
    step: Any = None  # discretisation step (int ranges: default 1)


@dataclass
class SweepConfig:
    name: str = ""  # Optuna study name and MLflow experiment; default: the file's stem
    base: str = ""  # experiment config the trials start from (relative to the sweep file)
    overrides: list[str] = field(default_factory=list)  # fixed key=value overrides for every trial
    objective: ObjectiveSpec = field(default_factory=ObjectiveSpec)
    params: dict[str, ParamSpec] = field(default_factory=dict)  # config key (or bundle name) -> distribution
    # a param named here chooses between named lists of overrides (several keys at once, e.g. a loop recipe)
    bundles: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    design: DesignSpec = field(default_factory=DesignSpec)  # sampler.name=adaptive only
    pruner: dict[str, Any] = field(default_factory=lambda: {"name": "none"})  # name + its settings
    trials: int = 0  # trial budget; 0 = the grid's size (grid), every T x max_seeds (adaptive)
    timeout: Optional[float] = None  # stop starting new trials after this many seconds
    seeds: int = 1  # training runs per sampled configuration, train.seed + 0 .. seeds-1
    # one more run after the trials: the looped model trained at a depth drawn uniformly from
    # the loop count's choices per batch, evaluated at every t (a sweep over model.loops alone)
    test_time_run: bool = False
    retries: int = 1  # re-run a trial interrupted by a kill / Ctrl-C this many times
    storage: Optional[str] = None  # Optuna storage URL; None = journal file in {study_dir}
    heartbeat_interval: int = 60  # RDB storage: seconds between a running trial's heartbeats
    grace_period: Optional[int] = None  # RDB storage: a trial silent this long is failed (None: 2 x interval)
    study_dir: Optional[str] = None  # None = studies/{name} in the working directory
    tracking_uri: Optional[str] = None  # MLflow; None = the base config's (or the embedded default)


SWEEP_KEYS = ("name", "trials", "timeout", "seeds", "test_time_run", "retries", "storage", "heartbeat_interval", "grace_period", "study_dir",
              "tracking_uri", "sampler.name", "sampler.seed", "objective.metric", "objective.direction",
              "design.epsilon", "design.tolerance", "design.level", "design.max_seeds", "design.flops", "design.scale", "design.confirm")


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[SweepConfig, Path]:
    """The validated sweep and the resolved path of its base config.

    `overrides`: sweep keys (`trials=4`, `seeds=1`, `sampler.seed=3`, `params.model.loops.choices=[1,2]`
    ...) change the sweep;
    any other `key=value` is added to the fixed experiment overrides (`train.max_steps=3000`).
    """
    path = Path(path)
    raw = read_yaml(path, "sweep")
    sweep_overrides, experiment_overrides = [], []
    for item in overrides:
        key = override_key(item, "trials=4 or train.max_steps=500")
        if key.startswith("params."):
            _set_param_field(raw, item, path)
            continue
        is_sweep_key = key in SWEEP_KEYS or key.startswith("pruner.")
        (sweep_overrides if is_sweep_key else experiment_overrides).append(item)
    _check_param_fields(raw, path)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(SweepConfig), raw, OmegaConf.from_dotlist(sweep_overrides))
        sweep: SweepConfig = OmegaConf.to_object(merged)
    except ConfigKeyError as err:
        key = str(err.full_key or err.key)
        section = {"sampler": SamplerSpec, "objective": ObjectiveSpec, "design": DesignSpec}.get(key.split(".")[0]) if "." in key else None
        where = f"fields of {key.split('.')[0]}" if section else "fields"
        message = (f"unknown sweep field '{key}'; valid {where}: "
                   f"{', '.join(sorted((section or SweepConfig).__dataclass_fields__))}")
        raise ConfigError(f"{path}: {message}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: {err.full_key}: {str(err).splitlines()[0]}") from None
    sweep.overrides = [*sweep.overrides, *experiment_overrides]
    sweep.name = sweep.name or path.stem
    base = (path.parent / sweep.base).resolve() if sweep.base else None
    validate_sweep(sweep, base, path)
    return sweep, base


def _set_param_field(raw, item: str, path: Path) -> None:
    """`params.model.loops.choices=[1,2]` on the raw sweep: the param key holds dots, which an
    OmegaConf dotlist would split. Its last part names the field; a new param is added."""
    key, value = item.split("=", 1)
    name, _, field_name = key.removeprefix("params.").rpartition(".")
    if not name or field_name not in ParamSpec.__dataclass_fields__:
        raise ConfigError(f"{path}: override {item!r}: expected params.<config key>.<field>=<value>, a field being "
                          f"one of {', '.join(ParamSpec.__dataclass_fields__)}")
    if raw.get("params") is None:
        raw["params"] = {}
    if name not in raw["params"]:
        raw["params"][name] = {}
    raw["params"][name][field_name] = OmegaConf.from_dotlist([f"value={value}"]).value


def _check_param_fields(raw, path: Path) -> None:
    """Checked by hand: param keys contain dots, which OmegaConf's error keys mangle."""
    params = raw.get("params") if hasattr(raw, "get") else None
    if params is None:
        return
    if not hasattr(params, "items"):
        raise ConfigError(f"{path}: params: expected a mapping of config key -> distribution")
    fields = ParamSpec.__dataclass_fields__
    for key, spec in params.items():
        if not hasattr(spec, "items"):
            raise ConfigError(f"{path}: params.{key}: expected a distribution like {{choices: [...]}} or "
                              f"{{low: .., high: ..}}, got {spec!r}")
        for name in spec:
            if name not in fields:
                raise ConfigError(f"{path}: params.{key}: unknown field {name!r}; a param takes "
                                  f"{', '.join(fields)}")


def validate_sweep(sweep: SweepConfig, base: Path | None, path: Path) -> None:
    """Every check that can fail before a trial runs, each naming the field."""
    problems: list[str] = []
    if base is None:
        problems.append("base: missing; name the experiment config the trials start from, e.g. base: ../conf/state.yaml")
    elif not base.is_file():
        problems.append(f"base: {base} not found")
    if sweep.objective.direction not in DIRECTIONS:
        problems.append(f"objective.direction: {sweep.objective.direction!r} is not one of: {', '.join(DIRECTIONS)}")
    if not metric_names.OBJECTIVE_METRIC.match(sweep.objective.metric):
        problems.append(f"objective.metric: {sweep.objective.metric!r} is not a metric name like val/acc_final, "
                        "val/loss_final, val/acc_step3 or val/acc_final_d4")
    if sweep.sampler.name not in SAMPLERS:
        problems.append(f"sampler.name: {sweep.sampler.name!r} is not one of: {', '.join(SAMPLERS)}")
    pruner = dict(sweep.pruner)
    pruner_name = pruner.pop("name", "none")
    if pruner_name not in PRUNERS:
        problems.append(f"pruner.name: {pruner_name!r} is not one of: {', '.join(PRUNERS)}")
    else:
        for key in sorted(set(pruner) - PRUNER_SETTINGS[pruner_name]):
            allowed = ", ".join(sorted(PRUNER_SETTINGS[pruner_name])) or "none"
            problems.append(f"pruner.{key}: not a setting of the {pruner_name} pruner (settings: {allowed})")
    if sweep.seeds < 1:
        problems.append(f"seeds: must be >= 1, got {sweep.seeds}")
    if sweep.retries < 0:
        problems.append(f"retries: must be >= 0, got {sweep.retries}")
    if sweep.timeout is not None and sweep.timeout <= 0:
        problems.append(f"timeout: must be > 0 seconds, got {sweep.timeout}")
    if not sweep.params:
        problems.append("params: empty; give at least one config key to sweep, e.g. model.loops: {choices: [1, 2, 4]}")
    for key, spec in sweep.params.items():
        problems += [f"params.{key}: {m}" for m in _check_param(spec, sweep.sampler.name)]
    uri_problem = tracking_uri_problem(sweep.tracking_uri) if sweep.tracking_uri is not None else None
    if uri_problem:
        problems.append(f"tracking_uri: {uri_problem}")
    if sweep.storage is not None and not sweep.storage.startswith(STORAGE_SCHEMES):
        problems.append(f"storage: {sweep.storage!r} is not an Optuna storage URL; use postgresql://user@host/db "
                        "(several hosts), mysql://... or sqlite:///path.db, or leave it out for the journal file "
                        "in study_dir")
    if sweep.trials < 0:
        problems.append(f"trials: must be >= 0, got {sweep.trials}")
    elif sweep.trials == 0 and sweep.sampler.name not in ("grid", "adaptive"):
        problems.append("trials: set a trial budget (0 means 'the whole grid', only for sampler.name=grid or adaptive)")
    if sweep.test_time_run and (list(sweep.params) != ["model.loops"] or not _loop_choices(sweep.params["model.loops"])):
        problems.append(f"test_time_run: needs a sweep over model.loops alone, with distinct int choices (the "
                        f"random-depth run draws its depth from them); params are {', '.join(sweep.params) or 'none'}")
    if sweep.sampler.name == "adaptive":
        problems += _check_design(sweep)
    elif sweep.pruner.get("name") == "design":
        problems.append(f"pruner.name: design stops runs of the adaptive design (sampler.name: adaptive), not of "
                        f"sampler {sweep.sampler.name!r}")
    elif sweep.design != DesignSpec():
        problems.append(f"design: set, but it is read by sampler.name=adaptive only (sampler.name is "
                        f"{sweep.sampler.name!r})")
    if not problems and base is not None:
        problems += _check_against_base(sweep, base)
    if problems:
        raise ConfigError(f"invalid sweep {path}:\n  " + "\n  ".join(problems))


def _loop_choices(spec: ParamSpec) -> bool:
    """A loop count's param: distinct int choices >= 1 (the T's the design or the test-time run draws from)."""
    choices = spec.choices or []
    return bool(choices) and len(set(choices)) == len(choices) and all(
        isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in choices)


def _check_design(sweep: SweepConfig) -> list[str]:
    """The adaptive design runs over one loop-count param's int choices and picks seeds itself."""
    d, problems = sweep.design, []
    specs = [(k, v) for k, v in sweep.params.items() if k not in sweep.bundles]
    if len(sweep.params) != 1 or len(specs) != 1:
        problems.append(f"params: the adaptive design takes one param, the loop count (e.g. model.loops: "
                        f"{{choices: [1, 2, 4, 8]}}); got {', '.join(sweep.params) or 'none'}")
    elif not _loop_choices(specs[0][1]):
        problems.append(f"params.{specs[0][0]}: the adaptive design needs distinct int choices >= 1 (the T's it "
                        f"may train); got {specs[0][1].choices}")
    if sweep.pruner.get("name", "none") not in ("none", "design"):
        problems.append(f"pruner: the adaptive design takes pruner.name none or design (which stops a run only when "
                        f"its result cannot change the answer), not {sweep.pruner['name']!r}: a pruner that ranks "
                        "runs would cut the points the answer rests on")
    margin = sweep.pruner.get("margin", 1.0)
    if not isinstance(margin, (int, float)) or isinstance(margin, bool) or margin < 1:
        problems.append(f"pruner.margin: must be a number >= 1 (it widens the learning-curve bounds), got {margin!r}")
    if sweep.seeds != 1:
        problems.append(f"seeds: the adaptive design picks seeds itself (up to design.max_seeds); set seeds: 1, "
                        f"got {sweep.seeds}")
    if d.epsilon <= 0:
        problems.append(f"design.epsilon: must be > 0, got {d.epsilon}")
    if not 1 <= d.confirm <= d.max_seeds:
        problems.append(f"design.confirm: must be between 1 and design.max_seeds ({d.max_seeds}), got {d.confirm}")
    if d.scale not in ("auto", "raw", "logit"):
        problems.append(f"design.scale: {d.scale!r} is not one of: auto, raw, logit")
    if d.flops < 0:
        problems.append(f"design.flops: must be >= 0 (0: no FLOPs budget), got {d.flops}")
    if d.tolerance < 0:
        problems.append(f"design.tolerance: must be >= 0, got {d.tolerance}")
    if not 0 < d.level < 1:
        problems.append(f"design.level: must be in (0, 1), got {d.level}")
    if d.max_seeds < 2:
        problems.append(f"design.max_seeds: must be >= 2 (the design measures the seed noise with a second seed), "
                        f"got {d.max_seeds}")
    return problems


def _check_param(spec: ParamSpec, sampler: str) -> list[str]:
    if spec.choices is not None:
        if spec.low is not None or spec.high is not None:
            return ["give either choices or low/high, not both"]
        if len(spec.choices) == 0:
            return ["choices is empty"]
        repeated = sorted({str(c) for c in spec.choices if list(spec.choices).count(c) > 1})
        if repeated:
            return [f"choices repeat {', '.join(repeated)} (a grid would train the same point twice)"]
        return []
    if spec.low is None or spec.high is None:
        return ["needs choices: [...] or a range low: .. high: .."]
    for name in ("low", "high", "step"):
        value = getattr(spec, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return [f"{name} must be a number, got {value!r}"]
    problems = []
    if not spec.low < spec.high:
        problems.append(f"empty range: low={spec.low} must be < high={spec.high}")
    if spec.log and spec.low <= 0:
        problems.append(f"log scale needs low > 0, got {spec.low}")
    if spec.log and spec.step is not None:
        problems.append("log and step cannot be combined (Optuna)")
    if spec.step is not None and spec.step <= 0:
        problems.append(f"step must be > 0, got {spec.step}")
    if sampler == "grid" and not (is_int_range(spec) and not spec.log):
        problems.append("the grid sampler needs choices (or an int range low/high with no log)")
    return problems


def is_int_range(spec: ParamSpec) -> bool:
    values = [spec.low, spec.high] + ([spec.step] if spec.step is not None else [])
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def distribution(spec: ParamSpec, sampler: str) -> optuna.distributions.BaseDistribution:
    """The Optuna distribution a param is sampled from (the grid sampler sees its points as choices)."""
    import optuna

    if spec.choices is not None or sampler == "grid":
        return optuna.distributions.CategoricalDistribution(spec.choices if spec.choices is not None else grid_values(spec))
    if is_int_range(spec):
        return optuna.distributions.IntDistribution(int(spec.low), int(spec.high), step=int(spec.step or 1), log=spec.log)
    return optuna.distributions.FloatDistribution(float(spec.low), float(spec.high), step=spec.step, log=spec.log)


def grid_values(spec: ParamSpec) -> list[Any]:
    if spec.choices is not None:
        return list(spec.choices)
    step = int(spec.step or 1)
    return list(range(int(spec.low), int(spec.high) + 1, step))


def _check_against_base(sweep: SweepConfig, base: Path) -> list[str]:
    """Each param path must exist in the experiment config, and every value it can take must
    make a valid config (so a wrong type fails now, not in trial 17)."""
    problems = []
    try:
        load_config(base, sweep.overrides)
    except ConfigError as err:
        return [f"overrides: {err}"]
    problems += _check_bundles(sweep, base)
    if not problems:
        problems += _check_objective_exists(sweep, base)
    for key, spec in sweep.params.items():
        if key in sweep.bundles:
            continue
        values = spec.choices if spec.choices is not None else [spec.low, spec.high]
        if spec.choices is None and is_int_range(spec):
            values = [int(v) for v in values]
        for value in values:
            try:
                load_config(base, [*sweep.overrides, f"{key}={_yaml_value(value)}"])
            except ConfigError as err:
                message = str(err)
                if "unknown config key" in message:
                    problems.append(f"params.{key}: not a key of the experiment config ({message})")
                    break
                problems.append(f"params.{key}: value {value!r} is invalid: {message}")
    return problems


def _check_bundles(sweep: SweepConfig, base: Path) -> list[str]:
    """Each bundle must make a valid config, and a bundle param choose among its bundles."""
    problems = []
    for key, named in sweep.bundles.items():
        for label, bundle in named.items():
            try:
                load_config(base, [*sweep.overrides, *bundle])
            except ConfigError as err:
                problems.append(f"bundles.{key}.{label}: {err}")
    for key, spec in sweep.params.items():
        if key in sweep.bundles:
            unknown = [c for c in (spec.choices or []) if str(c) not in sweep.bundles[key]]
            if spec.choices is None or unknown:
                problems.append(f"params.{key}: a bundle param takes choices among its bundles "
                                f"({', '.join(sweep.bundles[key])}); got {unknown or 'a range'}")
    return problems


def _check_objective_exists(sweep: SweepConfig, base: Path, max_points: int = 256) -> list[str]:
    """The objective metric must be logged at every point of the search space (the grid's
    points, or each range's ends): e.g. baselines log no val/exit_*, loops=2 no val/acc_step6."""
    import itertools

    from ouro_lab.data import build_task

    keys = list(sweep.params)
    axes = []
    for spec in sweep.params.values():
        if spec.choices is not None:
            axes.append(list(spec.choices))
        else:
            axes.append([int(spec.low), int(spec.high)] if is_int_range(spec) else [spec.low, spec.high])
    for point in itertools.islice(itertools.product(*axes), max_points):
        overrides = [*sweep.overrides, *point_overrides(sweep, dict(zip(keys, point)))]
        try:
            cfg = load_config(base, overrides)
        except ConfigError:
            continue  # reported per value by the caller
        task = build_task(cfg.data)
        trained = cfg.model.trained_loops
        e = cfg.eval
        names = metric_names.metric_names(cfg.eval_loops, trained, task.eval_difficulty_levels, cfg.model.has_exit_gate,
                                          ("val", "test") if e.test else ("val",), bpb=task.byte_level,
                                          exit_rules={"q": e.exit_q, "conf": e.exit_confidence, "change": e.exit_step_change})
        if sweep.objective.metric not in names:
            where = " ".join(point_overrides(sweep, dict(zip(keys, point))))
            return [f"objective.metric: {sweep.objective.metric!r} is not logged at {where} "
                    f"(model.arch={cfg.model.arch}, {trained} trained loop step(s), eval.test={cfg.eval.test}); "
                    "pick a metric every trial logs, e.g. val/acc_final"]
    return []


def _yaml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


def override_for(key: str, value: Any) -> str:
    return f"{key}={_yaml_value(value)}"


def point_overrides(sweep: SweepConfig, point: dict[str, Any]) -> list[str]:
    """The experiment overrides of one point of the search space: `key=value` per param, a
    bundle param's named override list in its place."""
    out = []
    for key, value in point.items():
        out += list(sweep.bundles[key][str(value)]) if key in sweep.bundles else [override_for(key, value)]
    return out
