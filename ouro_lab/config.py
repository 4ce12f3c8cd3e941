"""Typed experiment config: dataclass schema, YAML composition, CLI overrides, validation.

    cfg = load_config("conf/state.yaml", ["model.loops=4", "model.arch=depth_matched"])

A YAML file may start with `defaults: [other.yaml, ...]` (paths relative to it): those are
merged first, then the file itself, then the `key=value` overrides, all on top of the
schema below, whose defaults document themselves. Any unknown key, wrong type or invalid
combination raises `ConfigError` naming the key, the bad value and the valid choices.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from ouro_lab.data import TASKS
from ouro_lab.data.arith import ArithConfig
from ouro_lab.data.multihop import MultihopConfig
from ouro_lab.data.random_tokens import RandomConfig
from ouro_lab.data.state import StateConfig
from ouro_lab.data.lm import LMConfig
from ouro_lab.data.text import TextConfig
# online exit rules (infer.exit_rule), decode-time KV caches (infer.cache), what later tokens read from an exited one
from ouro_lab.models.decoding import EXITED_KV, RULES as EXIT_RULES, STRATEGIES as CACHE_STRATEGIES, decoding_refusal
from ouro_lab.models.exit_aware import HOW as EXIT_AWARE
from ouro_lab.models.transformer import CHECKPOINTING, INIT_STATES, INJECTIONS, ROPE_LAYOUTS
from ouro_lab.errors import ConfigError  # (re-exported: `from ouro_lab.config import ConfigError`)
from ouro_lab.locations import tracking_uri_problem
from ouro_lab.objectives import LOOP_SAMPLING, PRIORS, STAGE2_IMPROVEMENT

ARCHS = ("looped", "param_matched", "depth_matched")
POSITIONS = ("rope", "learned")
LOOP_STATES = ("normed", "residual")
# NOTE: "ddp" (Lightning's subprocess launcher) re-runs the whole command line in every rank, a
# sweep included; "ddp_spawn" starts the ranks from the training call itself.
STRATEGIES = ("auto", "ddp_spawn", "ddp_fork", "ddp", "ddp_notebook", "fsdp", "deepspeed", "single_device")
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true")


@dataclass
class ModelConfig:
    arch: str = "looped"  # looped | param_matched (N layers, 1 pass) | depth_matched (N*T layers, 1 pass)
    d_model: int = 64  # hidden width
    n_heads: int = 4  # attention heads; d_model must be divisible by it
    n_layers: int = 2  # N: blocks in the (shared) stack
    loops: int = 4  # T: times the looped stack runs; the baselines derive their depth from it
    d_ff: int = 0  # SwiGLU hidden width; 0 = 4 * d_model
    tie_embeddings: bool = True  # share embedding and LM head (paper: tied for small synthetic models)
    embed_init_std: float = 0.02  # init std of token/position embeddings when untied (tied: 0.02, the head's)
    positions: str = "rope"  # rope | learned (absolute, learned embeddings)
    loop_state: str = "normed"  # normed: final_norm(h_t) feeds loop t+1 (Ouro) | residual: raw h_t does
    # loop recipes (docs/guides/recipes.md): 0/0/none/input is Ouro's whole-stack loop
    prelude_layers: int = 0  # P distinct blocks run once before the loop (Huginn, Parcae); their output e is the input
    coda_layers: int = 0  # C distinct blocks after the loop; every step's readout goes through them
    injection: str = "none"  # e into every loop step: none (Ouro) | additive (h + e) | concat (Huginn: W[h; e]) | stable (Parcae)
    init_state: str = "input"  # the state before loop 1: input (e, Ouro) | zeros | random (Huginn: truncated normal)
    rope_layout: str = "interleaved"  # RoPE pairs dims (2i, 2i+1) | rotate_half: (i, i + Dh/2), the released Ouro weights
    rope_base: float = 10000.0  # RoPE base (HF config.json `rope_theta`; Ouro-1.4B: 1e6)
    norm_eps: float = 1e-6  # RMSNorm epsilon (HF `rms_norm_eps`)

    # --- derived, in one place (litgpt's Config): every caller asks these ---------------------
    @property
    def distinct_layers(self) -> int:
        """Distinct blocks: P + N + C (looped, param_matched) or P + N*T + C (depth_matched)."""
        core = self.n_layers * self.loops if self.arch == "depth_matched" else self.n_layers
        return self.prelude_layers + core + self.coda_layers

    @property
    def decoding_refusal(self) -> str | None:
        """Why skip semantics and cached decoding refuse this model, or None (`decoding.decoding_refusal`)."""
        return decoding_refusal(self.arch == "looped", self.prelude_layers, self.coda_layers, self.injection,
                                self.init_state)

    @property
    def trained_loops(self) -> int:
        """Times the stack runs in training, and the step scored as `final`: T looped, 1 baselines."""
        return self.loops if self.arch == "looped" else 1

    @property
    def effective_depth(self) -> int:
        """Blocks a token passes through to its final readout: P + N*T + C (looped), distinct_layers (baselines)."""
        if self.arch != "looped":
            return self.distinct_layers
        return self.prelude_layers + self.n_layers * self.loops + self.coda_layers

    @property
    def has_exit_gate(self) -> bool:
        return self.arch == "looped"


@dataclass
class ObjectiveConfig:
    prior: str = "uniform"  # exit prior: uniform (paper) | geometric (PonderNet) | none (mean of step losses, no gate)
    entropy_weight: float = 0.1  # beta in sum_t p_t L_t + beta * KL(p || prior) (paper: 0.1 early, 0.05 later)
    prior_p: float = 0.5  # geometric prior's lambda_p
    detach_exit_probs: bool = False  # stop the task loss's gradient into p (the paper does not say)


@dataclass
class TrainConfig:
    seed: int = 0  # model init and training-data order
    max_steps: int = 1500  # optimizer steps
    lr: float = 3e-3  # peak AdamW learning rate
    warmup_steps: int = 100  # linear warmup, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1  # on matrices only (not norms, gate bias)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    grad_clip: float = 1.0  # max grad norm; 0 = off
    precision: str = "auto"  # auto (32-true on CPU, bf16-mixed on GPU) | 32-true | bf16-mixed | 16-mixed | bf16-true
    accelerator: str = "auto"  # Lightning accelerator: auto | cpu | gpu ...
    devices: int = 1  # Lightning devices; > 1 trains one run with DDP (see strategy)
    strategy: str = "auto"  # auto (ddp_spawn when devices > 1) | ddp_spawn | ddp_fork | ddp | ...
    val_every: int = 250  # validate every this many steps (and always at the last step)
    log_every: int = 25  # log training metrics every this many steps
    num_workers: int = 0  # DataLoader workers for the training stream
    progress_bar: bool = True  # Lightning's progress bar
    compile: bool = False  # torch.compile each block (fullgraph); the loop over T stays in Python, so T can change
    activation_checkpointing: str = "none"  # none | block | loop: recompute activations per block / per loop step in backward
    ce_chunk_tokens: int = 0  # tokens per chunk of the fused LM head + cross-entropy; 0 = ~256 MiB of fp32 logits
    # loop count in training (looped models; docs/guides/recipes.md): evaluation always runs model.loops (+ extra)
    loops_sampling: str = "fixed"  # fixed (model.loops) | lognormal_poisson (Huginn) | poisson (Parcae) | uniform, one draw per batch
    loops_min: int = 1  # uniform: the range [loops_min, loops_max]
    loops_max: int = 0  # uniform: upper end; other samplers: a cap on the draw (0 = none)
    backprop_loops: int = 0  # truncated backprop: gradient through the last k loop steps only; 0 = all
    exit_aware: str = "none"  # exit-aware training (docs/guides/train.md): none | sampled (each token's exit step drawn from its gate) | q (where its gate CDF reaches exit_aware_q)
    exit_aware_q: float = 0.5  # q of exit_aware=q
    exit_aware_from: float = 0.5  # fraction of train.max_steps trained as usual first (an untrained gate exits at random)
    exited_kv: str = "frozen"  # what later tokens read from an exited one in exit-aware training (as infer.exited_kv)


@dataclass
class EvalConfig:
    extra_loops: int = 2  # looped models are also evaluated at steps T+1..T+extra (extrapolation)
    test: bool = True  # evaluate on the held-out test split after training (metrics test/...)
    # early-exit frontier of looped models (docs/guides/early-exit.md; metrics exit_*, oracle_*, gate_*)
    # Q-exit: gate CDF >= q (1 = full depth); the low end measured: the default state model's knee lies below 0.1
    exit_q: list[float] = field(default_factory=lambda: [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    exit_confidence: list[float] = field(default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99])  # max softmax prob >= tau (CALM)
    exit_step_change: list[float] = field(default_factory=lambda: [0.3, 0.1, 0.03, 0.01, 0.003, 0.001])  # KL(p_t||p_t-1) < delta (Huginn)
    exit_epsilon: float = 0.01  # "within epsilon of full depth": accuracy (bits per byte for byte-level tasks)
    oracle_tolerance: float = 0.01  # loss-scored tasks: the answer-stable oracle's per-token loss tolerance (nats)


@dataclass
class InferConfig:
    # Inference that really skips compute (docs/guides/evaluate.md): read by `ouro-lab eval` (exit_rule != none
    # adds the skip-semantics evaluation), `ouro-lab generate` and `ouro-lab decode`; never by training
    exit_rule: str = "none"  # none (full depth) | q (gate CDF >= threshold) | conf (max prob >= threshold) | change (KL(p_t||p_t-1) < threshold)
    exit_threshold: float = 0.5  # q, tau or delta of exit_rule
    frontier: bool = False  # `eval` with exit_rule: the rule at each of its eval.exit_* thresholds x each exited_kv (skip frontier)
    exited_kv: str = "frozen"  # what later tokens read from an exited token: frozen (its exit step's keys/values) | propagate (each layer's projections of its exit state, CALM) | first (its step-1 keys/values, MoR)
    cache: str = "full"  # decode-time KV cache: full (one per loop step and layer) | last | first | mean (one per layer)
    prompt: Optional[str] = None  # `generate`: text prompt (byte-level tasks); None = prompts from the test split
    max_new_tokens: int = 64  # `generate`: tokens to generate (at most the model's context)
    samples: int = 3  # `generate`: prompts taken from the test split when prompt is None
    temperature: float = 0.0  # `generate`: 0 = greedy, else sampling at this temperature
    seed: int = 0  # `generate`: test prompts and sampling
    show_exits: bool = False  # `generate`: print each generated token with the loop step it exited at
    windows: int = 64  # `decode`: test windows decoded token by token per cache strategy
    prefill: int = 32  # `decode`: tokens of each window prefilled at full depth; the rest is decoded and scored


@dataclass
class Stage2Config:
    # Stage II (docs/concepts/method.md "Stage II"): only the exit gate trains, all else frozen at Stage I's values; in the
    # same run after Stage I (steps > 0), or alone from a Stage-I checkpoint (init_from; train.* then schedules Stage II)
    init_from: Optional[str] = None  # a Stage-I checkpoint (.ckpt of `ouro-lab train`, looped); None = Stage I
    steps: int = 0  # > 0: after train.max_steps of Stage I, this many gate-only steps in the same run
    k: float = 50.0  # label sharpness, w_t = sigmoid(k (I_t - gamma)) (paper: 50)
    gamma: float = 0.005  # loss improvement (nats) below which a step counts as not helping (paper: 0.005)
    improvement: str = "into"  # the label of lambda_t: into = I_t, the paper's formula | after = I_{t+1} (our variant)


@dataclass
class TrackingConfig:
    uri: Optional[str] = None  # MLflow tracking URI; None = $MLFLOW_TRACKING_URI or sqlite:///mlflow.db in the working dir
    experiment: str = "ouro-lab"  # MLflow experiment name
    run_name: Optional[str] = None  # None = "{task}-{arch}-N{n_layers}xT{loops}-s{seed}"
    output_dir: str = "outputs"  # checkpoints go to {output_dir}/{experiment}/{run_id}/checkpoints
    system_metrics: bool = True  # CPU/GPU utilisation and memory while training, MLflow's system/* metrics (every 10 s)


@dataclass
class DataConfig:
    task: str = "state"  # which registered task to train on (its section below is the one used)
    batch_size: int = 64  # training sequences per step
    eval_batch_size: int = 512
    n_val: int = 2048  # validation examples (fixed by data.seed)
    n_test: int = 2048  # test examples (fixed by data.seed)
    seed: int = 0  # fixes val/test sets; the train stream also uses train.seed
    # one section per registered task (data.<task>.*); only data.task's is read
    arith: ArithConfig = field(default_factory=ArithConfig)
    multihop: MultihopConfig = field(default_factory=MultihopConfig)
    random: RandomConfig = field(default_factory=RandomConfig)
    state: StateConfig = field(default_factory=StateConfig)
    text: TextConfig = field(default_factory=TextConfig)
    lm: LMConfig = field(default_factory=LMConfig)


# NOTE: a task registered without its section here could not be configured
assert {f.name for f in dataclasses.fields(DataConfig)} >= set(TASKS), "DataConfig lacks a section for a task"


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)  # type: ignore[valid-type]
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    infer: InferConfig = field(default_factory=InferConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def eval_loops(self) -> int:
        """Loop steps scored at evaluation: T + eval.extra_loops for looped models (t > T
        extrapolates), 1 for the baselines."""
        return self.model.trained_loops + (self.eval.extra_loops if self.model.arch == "looped" else 0)

    @property
    def has_stage2(self) -> bool:
        """The run trains the gate alone (Stage II): from a checkpoint, or after its Stage I."""
        return self.stage2.init_from is not None or self.stage2.steps > 0

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run: train.max_steps (+ stage2.steps of gate-only training)."""
        return self.train.max_steps + self.stage2.steps


def read_yaml(path: str | Path, what: str = "config") -> DictConfig:
    """One YAML file whose top level is a mapping (experiment configs and sweep files alike)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    try:
        raw = OmegaConf.load(path)
    except Exception as err:  # yaml errors come in several types
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of {what} keys at the top level")
    return raw


def load_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> DictConfig:
    """A YAML file with its `defaults:` list merged in first (paths relative to the file)."""
    path = Path(path)
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'defaults' includes itself (cycle through {[str(p) for p in _seen]})")
    raw = read_yaml(path)
    defaults = raw.pop("defaults", [])
    if isinstance(defaults, str):
        defaults = [defaults]
    parts = [load_yaml(path.parent / d, _seen + (path.resolve(),)) for d in defaults]
    return OmegaConf.merge(*parts, raw) if parts else raw


def override_key(item: str, example: str = "model.loops=4") -> str:
    """The key of a `key=value` override; ConfigError if it is not of that form."""
    if "=" not in item or item.startswith("="):
        raise ConfigError(f"override {item!r} is not of the form key=value, e.g. {example}")
    return item.split("=", 1)[0]


def parse_overrides(overrides: list[str]) -> DictConfig:
    for item in overrides:
        override_key(item)
    return OmegaConf.from_dotlist(list(overrides))


def merge(*parts: DictConfig | dict) -> DictConfig:
    """Merge parts onto the schema; unknown keys and wrong types raise ConfigError."""
    schema = OmegaConf.structured(ExperimentConfig)
    try:
        return OmegaConf.merge(schema, *parts)
    except ConfigKeyError as err:
        raise ConfigError(_unknown_key_message(err)) from None
    except ValidationError as err:
        message = str(err).splitlines()[0]
        if "Cannot convert 'DictConfig'" in message or "Cannot convert 'ListConfig'" in message:
            got = "a mapping" if "DictConfig" in message else "a list"
            message = f"expects a single value, got {got} ({message.split(': ', 1)[-1]}); quote it if it is one string"
        raise ConfigError(f"{err.full_key}: {message}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{getattr(err, 'full_key', '')}: {str(err).splitlines()[0]}") from None


def _unknown_key_message(err: ConfigKeyError) -> str:
    full_key = err.full_key or str(err.key)
    parent = full_key.rsplit(".", 1)[0] if "." in full_key else ""
    node: Any = ExperimentConfig
    for part in parent.split(".") if parent else []:
        fields = {f.name: f for f in dataclasses.fields(node)}
        node = fields[part].default_factory if part in fields else None
        if node is None:
            break
    valid = sorted(f.name for f in dataclasses.fields(node)) if node and dataclasses.is_dataclass(node) else []
    where = f"under '{parent}'" if parent else "at the top level"
    return f"unknown config key '{full_key}'; valid keys {where}: {', '.join(valid)}"


def validate(cfg: ExperimentConfig, saved: bool = False) -> ExperimentConfig:
    """Check ranges and combinations; raise ConfigError listing every problem. `saved`: a
    checkpoint's own config (a Stage-I file it was trained from need not exist any more)."""
    problems: list[str] = []

    def check(ok: bool, key: str, message: str) -> None:
        if not ok:
            problems.append(f"{key}: {message}")

    def choice(key: str, value: str, choices) -> None:
        check(value in choices, key, f"{value!r} is not one of: {', '.join(choices)}")

    m, o, t, d = cfg.model, cfg.objective, cfg.train, cfg.data
    choice("model.arch", m.arch, ARCHS)
    choice("model.positions", m.positions, POSITIONS)
    choice("model.loop_state", m.loop_state, LOOP_STATES)
    choice("model.rope_layout", m.rope_layout, ROPE_LAYOUTS)
    for key in ("rope_base", "norm_eps", "embed_init_std"):
        check(getattr(m, key) > 0, f"model.{key}", f"must be > 0, got {getattr(m, key)}")
    for key in ("d_model", "n_heads", "n_layers", "loops"):
        check(getattr(m, key) >= 1, f"model.{key}", f"must be >= 1, got {getattr(m, key)}")
    for key in ("prelude_layers", "coda_layers"):
        check(getattr(m, key) >= 0, f"model.{key}", f"must be >= 0, got {getattr(m, key)}")
    choice("model.injection", m.injection, INJECTIONS)
    choice("model.init_state", m.init_state, INIT_STATES)
    check(m.init_state == "input" or m.injection != "none", "model.init_state",
          f"{m.init_state!r} with model.injection=none: the input would never reach the loop; set model.injection")
    choice("train.loops_sampling", t.loops_sampling, LOOP_SAMPLING)
    check(t.backprop_loops >= 0, "train.backprop_loops", f"must be >= 0 (0 = through every loop), got {t.backprop_loops}")
    check(t.loops_max >= 0 and t.loops_min >= 1, "train.loops_min",
          f"loops_min must be >= 1 and loops_max >= 0, got {t.loops_min} and {t.loops_max}")
    if t.loops_sampling == "uniform":
        check(t.loops_min <= t.loops_max, "train.loops_max",
              f"the uniform range [train.loops_min, train.loops_max] = [{t.loops_min}, {t.loops_max}] is empty")
    check(m.d_ff >= 0, "model.d_ff", f"must be >= 0 (0 = 4 * d_model), got {m.d_ff}")
    if m.d_model >= 1 and m.n_heads >= 1:
        check(m.d_model % m.n_heads == 0, "model.d_model",
              f"d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}")
        if m.positions == "rope" and m.d_model % m.n_heads == 0:
            check((m.d_model // m.n_heads) % 2 == 0, "model.n_heads",
                  f"RoPE needs an even head dim, d_model/n_heads = {m.d_model // m.n_heads}")
    choice("objective.prior", o.prior, PRIORS)
    check(o.entropy_weight >= 0, "objective.entropy_weight", f"must be >= 0, got {o.entropy_weight}")
    if o.prior == "geometric":
        check(0 < o.prior_p < 1, "objective.prior_p", f"must be in (0, 1) for the geometric prior, got {o.prior_p}")
    check(t.max_steps >= 1, "train.max_steps", f"must be >= 1, got {t.max_steps}")
    check(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    check(t.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0 (capped at max_steps / 2), got {t.warmup_steps}")
    check(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", f"must be in [0, 1], got {t.min_lr_ratio}")
    for key in ("weight_decay", "grad_clip", "num_workers"):
        check(getattr(t, key) >= 0, f"train.{key}", f"must be >= 0, got {getattr(t, key)}")
    choice("train.precision", t.precision, PRECISIONS)
    choice("train.strategy", t.strategy, STRATEGIES)
    for key in ("val_every", "log_every", "devices"):
        check(getattr(t, key) >= 1, f"train.{key}", f"must be >= 1, got {getattr(t, key)}")
    choice("train.activation_checkpointing", t.activation_checkpointing, CHECKPOINTING)
    check(t.ce_chunk_tokens >= 0, "train.ce_chunk_tokens", f"must be >= 0 (0 = automatic), got {t.ce_chunk_tokens}")
    e = cfg.eval
    for key in ("extra_loops", "exit_epsilon", "oracle_tolerance"):
        check(getattr(e, key) >= 0, f"eval.{key}", f"must be >= 0, got {getattr(e, key)}")
    for key, high in (("exit_q", 1.0), ("exit_confidence", 1.0), ("exit_step_change", math.inf)):
        values = getattr(e, key)
        bound = "in (0, 1]" if high == 1.0 else "finite and > 0"
        check(all(0 < v <= high and math.isfinite(v) for v in values), f"eval.{key}",
              f"every threshold must be {bound}, got {values}")
        check(len(set(values)) == len(values), f"eval.{key}", f"has duplicate thresholds: {values}")
    s2 = cfg.stage2
    if s2.init_from is not None and not saved:  # (a saved Stage II config: its weights are its checkpoint's)
        check(Path(s2.init_from).expanduser().is_file(), "stage2.init_from", f"checkpoint not found: {s2.init_from}")
    check(s2.steps >= 0, "stage2.steps", f"must be >= 0 (0 = no Stage II after Stage I), got {s2.steps}")
    if s2.steps > 0:
        check(s2.init_from is None, "stage2.steps",
              "runs Stage II after this run's own Stage I; stage2.init_from runs Stage II alone from a checkpoint "
              "(for train.max_steps): set one of them")
    if cfg.has_stage2:  # from a checkpoint or after Stage I: the key that asked for it is named
        key = "stage2.init_from" if s2.init_from is not None else "stage2.steps"
        check(m.arch == "looped", key, f"Stage II trains the exit gate of a looped model; model.arch={m.arch}")
        check(m.loops >= 2, key, f"Stage II needs model.loops >= 2 (the gate labels compare steps), got {m.loops}")
    check(s2.k > 0, "stage2.k", f"must be > 0, got {s2.k}")
    check(s2.gamma >= 0, "stage2.gamma", f"must be >= 0, got {s2.gamma}")
    choice("stage2.improvement", s2.improvement, STAGE2_IMPROVEMENT)
    i = cfg.infer
    choice("infer.exit_rule", i.exit_rule, EXIT_RULES)
    check(i.exit_rule == "none" or not m.decoding_refusal, "infer.exit_rule", m.decoding_refusal)
    check(i.exit_rule != "q" or m.arch == "looped", "infer.exit_rule",
          f"the q rule reads the exit gate; model.arch={m.arch} has none (conf or change work on any model)")
    for key, value, choices in (("infer.cache", i.cache, CACHE_STRATEGIES), ("infer.exited_kv", i.exited_kv, EXITED_KV),
                                ("train.exited_kv", t.exited_kv, EXITED_KV), ("train.exit_aware", t.exit_aware, EXIT_AWARE)):
        choice(key, value, choices)
    check(t.exit_aware == "none" or (m.arch == "looped" and not m.decoding_refusal), "train.exit_aware",
          f"{t.exit_aware!r} needs a looped model with Ouro's whole-stack loop (skip semantics), got model.arch={m.arch}")
    check(0 < t.exit_aware_q <= 1 and 0 <= t.exit_aware_from < 1, "train.exit_aware_q",
          f"exit_aware_q must be in (0, 1] and exit_aware_from in [0, 1), got {t.exit_aware_q}, {t.exit_aware_from}")
    check(i.exit_threshold > 0 and (i.exit_threshold <= 1 or i.exit_rule not in ("q", "conf")), "infer.exit_threshold",
          f"must be > 0, and <= 1 for rules q and conf; got {i.exit_threshold} for rule {i.exit_rule!r}")
    check(i.prefill >= 0, "infer.prefill", f"must be >= 0, got {i.prefill}")
    for key in ("max_new_tokens", "samples", "windows"):
        check(getattr(i, key) >= 1, f"infer.{key}", f"must be >= 1, got {getattr(i, key)}")
    check(i.temperature >= 0, "infer.temperature", f"must be >= 0 (0 = greedy), got {i.temperature}")
    for key in ("batch_size", "eval_batch_size", "n_val", "n_test"):
        check(getattr(d, key) >= 1, f"data.{key}", f"must be >= 1, got {getattr(d, key)}")
    choice("data.task", d.task, sorted(TASKS))
    if d.task in TASKS:
        for key, message in TASKS[d.task].check_config(getattr(d, d.task)):
            problems.append(f"data.{d.task}.{key}: {message}")
    if cfg.tracking.uri is not None:
        problem = tracking_uri_problem(cfg.tracking.uri)
        check(problem is None, "tracking.uri", problem or "")
    problems += [f"{key}: must be a finite number, got {value}" for key, value in flatten(to_dict(cfg)).items()
                 if isinstance(value, float) and not math.isfinite(value)]
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Schema defaults <- YAML file (with its defaults) <- key=value overrides, validated."""
    parts = [load_yaml(path)] if path is not None else []
    merged = merge(*parts, parse_overrides(list(overrides)))
    return validate(OmegaConf.to_object(merged))


def from_dict(config: dict, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """A config saved as a plain dict (a checkpoint's hyperparameters) back as a validated object."""
    return validate(OmegaConf.to_object(merge(config, parse_overrides(list(overrides)))), saved=True)


def to_dict(cfg: ExperimentConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'model': {'loops': 4}} -> {'model.loops': 4}: one namespace for MLflow params."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out
