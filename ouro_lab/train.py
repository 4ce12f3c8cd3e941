"""`train(cfg) -> TrainResult`: the only way anything trains (CLI, sweeps and tests call it)."""

from __future__ import annotations

import logging
import math
import shutil
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.trainer.states import TrainerFn

from ouro_lab import metric_names as names
from ouro_lab import tracking
from ouro_lab.builders import build_module, log_setup, make_datamodule, make_trainer
from ouro_lab.config import ConfigError, ExperimentConfig
from ouro_lab.data.datamodule import TaskDataModule
from ouro_lab.data.lm import CorpusError
from ouro_lab.locations import writable_dir
from ouro_lab.run_record import checkpoint_tags, datasets, metric_kind, run_name, tabled, training_tags
from ouro_lab.views import curve_series, loop_step_figure, plt, run_tables


class _DropAdverts(logging.Filter):
    """Lightning 2.6 prints '💡 Tip: try installing litlogger/litmodels' on every Trainer."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡")


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropAdverts())
# Lightning 2.6's own call into torch's pytree API; nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
# every run has its own checkpoint folder; only Stage II after Stage I writes into it twice (on purpose)
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


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
    kind: str = "acc"  # the per-step quality metric: acc or bpb (run_record.metric_kind)

    def table(self, split: str = "val") -> str:
        return run_tables(self.val if split == "val" else self.test, split, self.kind)


def train(cfg: ExperimentConfig, *, run: tracking.Run | None = None, callbacks: Sequence[Callback] = (),
          verbose: bool = True) -> TrainResult:
    """Train one model from `cfg`, log it to MLflow, evaluate every loop step; return the result.

    `run`: the MLflow run to log into, owned (and ended) by the caller, e.g. a sweep's trial
    run. Without it, train makes its own run in `tracking.experiment` and ends it: FINISHED, or
    FAILED with an `error` tag (and error.txt) if training raises, or KILLED (tag `interrupted`).
    """
    with tracking.preserve_tracking_env(), _lightning_log_level(logging.INFO if verbose else logging.WARNING):
        start = time.perf_counter()
        L.seed_everything(cfg.train.seed, verbose=False)  # NOTE: explicit per run; PL_GLOBAL_SEED leaks otherwise
        # before any run exists: a task that cannot be built or a folder that cannot be written
        # leaves no run behind
        writable_dir(Path(cfg.tracking.output_dir), "tracking.output_dir")
        module = build_module(cfg)
        try:
            module.task.describe()  # a corpus left unset (data.lm.source) fails here, before any run exists
        except CorpusError as err:
            raise ConfigError(f"data.{cfg.data.task}: {err}") from None
        datamodule = make_datamodule(cfg, module.task)
        if run is not None:
            return _train(cfg, run, module, datamodule, callbacks, verbose, start)
        experiment = tracking.Experiment.open(tracking.resolve_tracking_uri(cfg.tracking.uri), cfg.tracking.experiment)
        own = experiment.create_run(run_name(cfg), {})
        try:
            result = _train(cfg, own, module, datamodule, callbacks, verbose, start)
        except BaseException as err:
            status = own.end(err)
            if verbose:
                print(f"[ouro-lab] run {own.id} {status}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            raise
        own.end()
        if verbose:
            print(result.table("val"))
            print(f"[ouro-lab] done in {result.seconds:.0f} s. checkpoint: {result.checkpoint}")
            print(f"[ouro-lab] view: {experiment.where_to_look(own.id)}")
        return result


class _MetricsLogger(MLFlowLogger):
    """Lightning's MLFlowLogger for the metrics only. NOTE: its `log_hyperparams` would log the
    module's saved config a second time under other names (`config/model/loops` beside our
    `model.loops`), and its `finalize` would end the run at the end of `fit`, before the final
    validation and test: the run's `tracking.Run` handle does both, once."""

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    step_offset = 0  # Stage II after Stage I: its Trainer counts from 0, the run's steps go on

    def log_metrics(self, metrics, step=None) -> None:
        # NOTE: MLflow takes at most 1000 metrics per request; a validation with the exit
        # frontier per difficulty level can log more, which MLFlowLogger would send as one
        step = None if step is None else step + self.step_offset
        # (the frontier's rows go to its table once, after training: `_train`, Run.log_tables)
        items = [(k, v) for k, v in metrics.items() if not tabled(k)]
        for i in range(0, len(items), 1000):
            batch = dict(items[i : i + 1000])
            tracking.when_unlocked(lambda: super(_MetricsLogger, self).log_metrics(batch, step))

    def finalize(self, status: str = "success") -> None:
        pass


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


def _train(cfg: ExperimentConfig, run: tracking.Run, module, datamodule: TaskDataModule, callbacks: Sequence[Callback],
           verbose: bool, start: float) -> TrainResult:
    experiment = run.experiment
    module.run_id = run.id  # saved in the checkpoint, so a Stage II run can name where it came from
    kind = metric_kind(module.task)
    stage1_run_id = module.stage1_run_id if cfg.stage2.init_from else None  # (looped modules only)
    run.set_tags(tracking.reproducibility_tags() | training_tags(cfg, module.task, stage1_run_id))
    summary = module.summary()
    if verbose:
        print(f"[ouro-lab] run {run_name(cfg)} ({run.id}) -> {experiment.tracking_uri}",
              flush=True)
        print(f"[ouro-lab] {cfg.model.arch}: {summary['n_params']:,} params, depth {summary['effective_depth']}, "
              f"{summary['forward_flops_per_token']:,} forward FLOPs/token", flush=True)
    log_setup(run, cfg, summary | module.task.describe())
    run.log_datasets(datasets(cfg, module.task))
    logger = _MetricsLogger(experiment_name=cfg.tracking.experiment, tracking_uri=experiment.tracking_uri, run_id=run.id)
    ckpt_dir = Path(cfg.tracking.output_dir) / cfg.tracking.experiment / run.id / "checkpoints"
    with tracking.system_metrics(run, cfg.tracking.system_metrics):
        trainer, checkpoint = _fit(cfg, module, datamodule, logger, ckpt_dir, callbacks, verbose, cfg.train.max_steps)
        if cfg.stage2.steps:  # Stage II in the same run: the gate alone, from Stage I's final weights
            shutil.copyfile(ckpt_dir / "last.ckpt", ckpt_dir / "stage1.ckpt")
            if verbose:
                efficiency = float(trainer.callback_metrics.get("val/gate_efficiency", math.nan))
                print(f"[ouro-lab] Stage I done (val/gate_efficiency {efficiency:.3f}; checkpoint "
                      f"{ckpt_dir / 'stage1.ckpt'}); Stage II: {cfg.stage2.steps} steps training the exit gate alone",
                      flush=True)
            module.start_stage2()
            module.step_offset = logger.step_offset = cfg.train.max_steps
            trainer, checkpoint = _fit(cfg, module, datamodule, logger, ckpt_dir, callbacks, verbose, cfg.stage2.steps)
        val = _numbers(trainer.callback_metrics, "val/")
        test: dict[str, float] = {}
        if cfg.eval.test:
            trainer.test(module, datamodule=datamodule, verbose=False)
            test = _numbers(trainer.callback_metrics, "test/")
    last = str(checkpoint) if checkpoint.exists() else None
    if last:  # the step its weights are from, as saved: runs without this tag may name an older checkpoint
        step = torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=False).get("ouro_step")
        run.set_tags(checkpoint_tags(str(checkpoint.resolve()), step))
    _log_plot(run, module, val, run_name(cfg))
    run.log_tables(val | test)
    for split in (val, test):
        run.log_series(curve_series(split, module.trained_loops, kind=kind))
    return TrainResult(run_id=run.id, experiment_id=experiment.id, tracking_uri=experiment.tracking_uri,
                       checkpoint=last,
                       seconds=time.perf_counter() - start, val=val, test=test, summary=summary, kind=kind)


class _SaveAfterFinalValidation(Callback):
    """Saves `path` at the end of a `trainer.validate` (the final validation after `fit` when
    `max_steps` is not a multiple of `val_every`). NOTE: ModelCheckpoint saves only while
    fitting; without this, `last.ckpt` held the weights of the last validation *inside* fit,
    older than the final metrics the run logged (runs before tag `ouro.checkpoint_step`)."""

    def __init__(self, path: Path):
        self.path = path

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:
            trainer.save_checkpoint(self.path)  # every rank calls it; the strategy writes on rank 0


def _fit(cfg: ExperimentConfig, module, datamodule: TaskDataModule, logger, ckpt_dir: Path,
         callbacks: Sequence[Callback], verbose: bool, steps: int) -> tuple[L.Trainer, Path]:
    """`steps` optimizer steps with validation every `train.val_every` and at the last step;
    returns the trainer and `ckpt_dir/last.ckpt`, which holds the final weights: those the final
    validation scored."""
    # NOTE: plain file name; Lightning's default "epoch=..-val_loss=.." is rejected by MLflow.
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="last", auto_insert_metric_name=False,
                                 enable_version_counter=False)
    last = ckpt_dir / "last.ckpt"
    every = min(cfg.train.val_every, steps)
    # NOTE: inference_mode=False: the final `validate` would otherwise reset the metric states
    # as inference tensors, which Stage II's validations inside fit (under no_grad) cannot update
    trainer = make_trainer(cfg, logger, [checkpoint, _SaveAfterFinalValidation(last), *callbacks], verbose,
                           max_steps=steps, val_check_interval=every, inference_mode=False)
    trainer.fit(module, datamodule=datamodule)
    for callback in callbacks:  # e.g. a pruning decision taken in a DDP rank (Optuna's check_pruned)
        if hasattr(callback, "check_pruned"):
            callback.check_pruned()
    if trainer.interrupted:
        raise KeyboardInterrupt("training interrupted")
    if trainer.global_step % every:  # always score (and save) the final weights
        # NOTE: validations inside fit log at the step before the counter moves on (step - 1);
        # this one, after fit, would log at `step`: shifted back onto the same axis
        logger.step_offset -= 1
        try:
            trainer.validate(module, datamodule=datamodule, verbose=False)
        finally:
            logger.step_offset += 1
    return trainer, last


def _numbers(metrics: dict, prefix: str) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if k.startswith(prefix)}


def _log_plot(run: tracking.Run, module, val: dict[str, float], title: str) -> None:
    history = {f"val/{names.step('loss', t)}": run.metric_history(f"val/{names.step('loss', t)}")
               for t in range(1, module.eval_loops + 1)}
    fig = loop_step_figure(history, val, module.trained_loops, module.eval_loops, module.task.difficulty_levels,
                           module.task.difficulty_name, title, kind=metric_kind(module.task))
    run.log_figure(fig, "plots/loop_steps.png")
    plt.close(fig)
