"""`train(cfg) -> TrainResult`: the only way anything trains (CLI, sweeps and tests call it)."""

from __future__ import annotations

import logging
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import lightning as L
import matplotlib.pyplot as plt
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import MLFlowLogger
from mlflow.tracking import MlflowClient

from ouro_lab import tracking
from ouro_lab.config import ExperimentConfig, flatten, to_dict, to_yaml
from ouro_lab.data import TaskDataModule
from ouro_lab.modules import build_module


class _DropAdverts(logging.Filter):
    """Lightning 2.6 prints '💡 Tip: try installing litlogger/litmodels' on every Trainer."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡")


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropAdverts())
# Lightning 2.6's own call into torch's pytree API; nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


@dataclass
class TrainResult:
    run_id: str
    experiment_id: str
    tracking_uri: str
    checkpoint: str | None
    seconds: float
    val: dict[str, float] = field(default_factory=dict)  # final val metrics, e.g. val["val/acc_final"]
    test: dict[str, float] = field(default_factory=dict)
    summary: dict[str, int] = field(default_factory=dict)  # params, FLOPs/token, depth

    def table(self, split: str = "val") -> str:
        return metrics_table(self.val if split == "val" else self.test, split)


def default_run_name(cfg: ExperimentConfig) -> str:
    m = cfg.model
    shape = f"N{m.n_layers}xT{m.loops}" if m.arch == "looped" else f"L{m.n_layers * (m.loops if m.arch == 'depth_matched' else 1)}"
    return f"{cfg.data.task}-{m.arch}-{shape}-s{cfg.train.seed}"


def resolve_precision(cfg: ExperimentConfig) -> str:
    """auto: fp32 on CPU (bf16 autocast on these CPUs is ~15x slower), bf16-mixed on GPU."""
    if cfg.train.precision != "auto":
        return cfg.train.precision
    on_gpu = cfg.train.accelerator in ("gpu", "cuda") or (cfg.train.accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if on_gpu else "32-true"


def resolve_strategy(cfg: ExperimentConfig) -> str:
    """auto: one process, or ddp_spawn for devices > 1. NOTE: Lightning's default for several
    devices ("ddp", a subprocess launcher) re-runs the command line in every rank, which would
    run a whole sweep (and create MLflow runs) K times; ddp_spawn starts the ranks from here."""
    if cfg.train.strategy != "auto":
        return cfg.train.strategy
    return "ddp_spawn" if cfg.train.devices > 1 else "auto"


def train(cfg: ExperimentConfig, *, parent_run_id: str | None = None, callbacks: Sequence[Callback] = (),
          extra_tags: dict[str, str] | None = None, verbose: bool = True, run_id: str | None = None) -> TrainResult:
    """Train one model from `cfg`, log it to MLflow, evaluate every loop step; return the result.

    The MLflow run is created before training (nested under `parent_run_id` if given; or
    `run_id`, an existing RUNNING run, is used) and ends FINISHED, or FAILED with an `error`
    tag if training raises, or KILLED if interrupted or pruned (`pruned` tag).
    """
    with tracking.preserve_tracking_env(), _lightning_log_level(logging.INFO if verbose else logging.WARNING):
        return _train(cfg, parent_run_id, callbacks, extra_tags, verbose, run_id)


@contextmanager
def _lightning_log_level(level: int):
    """Quiet Lightning's info lines ('GPU available', 'fit stopped') for non-verbose runs."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero",
                                                "lightning.fabric")]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, old in zip(loggers, saved):
            lg.setLevel(old)


def _train(cfg: ExperimentConfig, parent_run_id: str | None, callbacks: Sequence[Callback],
           extra_tags: dict[str, str] | None, verbose: bool, run_id: str | None) -> TrainResult:
    start = time.perf_counter()
    L.seed_everything(cfg.train.seed, verbose=False)  # NOTE: explicit per run; PL_GLOBAL_SEED leaks otherwise
    module = build_module(cfg)
    datamodule = make_datamodule(cfg, module)
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    client, experiment_id = tracking.open_experiment(uri, cfg.tracking.experiment)
    run_name = cfg.tracking.run_name or default_run_name(cfg)
    tags = tracking.reproducibility_tags() | {
        "ouro.task": cfg.data.task, "ouro.arch": cfg.model.arch, "ouro.loops": str(cfg.model.loops),
        "ouro.seed": str(cfg.train.seed),
    } | (extra_tags or {})
    if run_id is None:
        run_id = tracking.create_run(client, experiment_id, run_name, tags, parent_run_id)
    else:
        tracking.set_tags(client, run_id, tags | {"mlflow.runName": run_name})
    summary = module.summary()
    if verbose:
        print(f"[ouro-lab] run {run_name} ({run_id}) -> {uri}", flush=True)
        print(f"[ouro-lab] {cfg.model.arch}: {summary['n_params']:,} params, depth {summary['effective_depth']}, "
              f"{summary['forward_flops_per_token']:,} forward FLOPs/token", flush=True)
    try:
        _log_setup(client, run_id, cfg, summary | module.task.describe())
        logger = MLFlowLogger(experiment_name=cfg.tracking.experiment, tracking_uri=uri, run_id=run_id)
        ckpt_dir = Path(cfg.tracking.output_dir) / cfg.tracking.experiment / run_id / "checkpoints"
        # NOTE: plain file name; Lightning's default "epoch=..-val_loss=.." is rejected by MLflow.
        checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="last", auto_insert_metric_name=False,
                                     enable_version_counter=False)
        trainer = make_trainer(cfg, logger, [checkpoint, *callbacks], verbose)
        trainer.fit(module, datamodule=datamodule)
        for callback in callbacks:  # e.g. a pruning decision taken in a DDP rank (Optuna's check_pruned)
            if hasattr(callback, "check_pruned"):
                callback.check_pruned()
        if trainer.interrupted:
            raise KeyboardInterrupt("training interrupted")
        if trainer.global_step % min(cfg.train.val_every, cfg.train.max_steps):
            trainer.validate(module, datamodule=datamodule, verbose=False)  # always score the final weights
        val = _numbers(trainer.callback_metrics, "val/")
        test: dict[str, float] = {}
        if cfg.eval.test:
            trainer.test(module, datamodule=datamodule, verbose=False)
            test = _numbers(trainer.callback_metrics, "test/")
        _log_plot(client, run_id, module, val, run_name)
    except BaseException as err:
        status = tracking.end_run(client, run_id, err)
        if verbose:
            print(f"[ouro-lab] run {run_id} {status}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        raise
    tracking.end_run(client, run_id, None)
    result = TrainResult(run_id=run_id, experiment_id=experiment_id, tracking_uri=uri,
                         checkpoint=checkpoint.last_model_path or checkpoint.best_model_path or None,
                         seconds=time.perf_counter() - start, val=val, test=test, summary=summary)
    if verbose:
        print(result.table("val"))
        print(f"[ouro-lab] done in {result.seconds:.0f} s. checkpoint: {result.checkpoint}")
        print(f"[ouro-lab] view: {tracking.where_to_look(uri, experiment_id, run_id)}")
    return result


def make_datamodule(cfg: ExperimentConfig, module) -> TaskDataModule:
    return TaskDataModule(
        module.task, cfg.data.batch_size, cfg.data.eval_batch_size, cfg.data.n_val, cfg.data.n_test,
        data_seed=cfg.data.seed, seed=cfg.train.seed, num_workers=cfg.train.num_workers,
    )


def make_trainer(cfg: ExperimentConfig, logger, callbacks: Sequence[Callback], verbose: bool = True,
                 **overrides) -> L.Trainer:
    """The Trainer every run uses (the throughput benchmark times this same object)."""
    refresh = cfg.train.log_every  # NOTE: a bar refresh reads the loss on the host (a device sync)
    bar = [TQDMProgressBar(refresh_rate=refresh)] if cfg.train.progress_bar and verbose else []
    kwargs = dict(
        max_steps=cfg.train.max_steps,
        val_check_interval=min(cfg.train.val_every, cfg.train.max_steps),
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        gradient_clip_val=cfg.train.grad_clip or None,
        precision=resolve_precision(cfg),
        accelerator=cfg.train.accelerator,
        devices=cfg.train.devices,
        strategy=resolve_strategy(cfg),
        logger=logger,
        callbacks=[LearningRateMonitor("step"), *bar, *callbacks],
        log_every_n_steps=cfg.train.log_every,
        enable_progress_bar=cfg.train.progress_bar and verbose,
        enable_model_summary=verbose,
    )
    return L.Trainer(**(kwargs | overrides))


def _numbers(metrics: dict, prefix: str) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if k.startswith(prefix)}


def _log_setup(client: MlflowClient, run_id: str, cfg: ExperimentConfig, summary: dict[str, object]) -> None:
    """Flattened config and derived facts (model shape, the task's data) as params; the numbers
    among them as metrics model/*; config YAML (+ git diff) as artifacts."""
    params = flatten(to_dict(cfg)) | {f"derived.{k}": v for k, v in summary.items()}
    tracking.log_params(client, run_id, params)
    tracking.log_metrics(client, run_id, {f"model/{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
    client.log_text(run_id, to_yaml(cfg), "config.yaml")
    diff = tracking.git_diff()
    if diff:
        client.log_text(run_id, diff, "git_diff.patch")


def _log_plot(client: MlflowClient, run_id: str, module, val: dict[str, float], title: str) -> None:
    history = {}
    for t in range(1, module.eval_steps + 1):
        key = f"val/loss_step{t}"
        history[key] = [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
    fig = tracking.loop_step_figure(history, val, module.trained_steps, module.eval_steps,
                                    module.task.difficulty_levels, module.task.difficulty_name, title,
                                    kind="bpb" if module.task.byte_level else "acc")
    client.log_figure(run_id, fig, "plots/loop_steps.png")
    plt.close(fig)


def metrics_table(metrics: dict[str, float], split: str = "val") -> str:
    """Loss and accuracy (bits per byte for byte-level tasks) by loop step and difficulty, as a
    plain-text table."""
    steps = sorted({int(k.split("step")[1].split("_")[0]) for k in metrics if k.startswith(f"{split}/acc_step")})
    levels = sorted({int(k.rsplit("_d", 1)[1]) for k in metrics if k.startswith(f"{split}/acc_step1_d")})
    kind = "bpb" if f"{split}/bpb_step1" in metrics else "acc"
    header = ["step", "loss", *(["acc", "bpb"] if kind == "bpb" else ["acc"]), *[f"{kind}_d{k}" for k in levels]]
    rows = [header]
    for t in steps:
        row = [str(t), *(f"{metrics[f'{split}/{name}_step{t}']:.3f}" for name in header[1:len(header) - len(levels)])]
        rows.append(row + [f"{metrics[f'{split}/{kind}_step{t}_d{k}']:.3f}" for k in levels])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    extra = []
    if f"{split}/exit_expected_step" in metrics:
        extra.append(f"exit: expected step {metrics[f'{split}/exit_expected_step']:.2f}, "
                     f"entropy {metrics[f'{split}/exit_entropy']:.3f} nats, acc under exit dist "
                     f"{metrics[f'{split}/acc_exit']:.3f}")
    return f"{split} metrics by loop step (d = difficulty level):\n" + "\n".join(lines + extra)
