"""What every entry point builds from a config: the LightningModule (with a Stage-I
checkpoint's weights for `stage2.init_from`), the DataModule, the Trainer with its precision
and strategy, and the setup logged with every run. `train`, `evaluate`, `inference` and the
throughput benchmark share these, so they build the same objects."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import lightning as L
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, TQDMProgressBar
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import (_disable_module_memory_sharing,
                                                                     _MultiProcessingLauncher,
                                                                     _set_num_threads_if_needed)
from lightning.pytorch.utilities import move_data_to_device
from omegaconf import OmegaConf

from ouro_lab import tracking
from ouro_lab.checkpoints import read_checkpoint
from ouro_lab.config import ExperimentConfig
from ouro_lab.data import Task
from ouro_lab.data.datamodule import TaskDataModule
from ouro_lab.modules import new_module
from ouro_lab.run_record import CONFIG_ARTIFACT, DIFF_ARTIFACT, derived_params, model_metrics, used_params


def build_module(cfg: ExperimentConfig):
    """The LightningModule for `model.arch`; with `stage2.init_from`, the Stage-I checkpoint's
    weights loaded and all but the exit gate frozen."""
    module = new_module(cfg)
    if cfg.stage2.init_from:
        path = cfg.stage2.init_from
        module.load_stage1(read_checkpoint(Path(path).expanduser(), "stage2.init_from"), path)
    return module


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


class _ResultFile:
    """What rank 0 of a spawned DDP run sends back instead of its results: a file holding them,
    read on first use (Lightning reads attributes of its `_WorkerOutput` off this)."""

    def __init__(self, path: str):
        self.path = path

    def __getattr__(self, name: str):
        if name == "path" or name.startswith("__"):  # (pickle probes dunders before __dict__ is set)
            raise AttributeError(name)
        if "_output" not in self.__dict__:
            self.__dict__["_output"] = torch.load(self.path, weights_only=False)
            shutil.rmtree(os.path.dirname(self.path), ignore_errors=True)
        return getattr(self.__dict__["_output"], name)


class _FileResultLauncher(_MultiProcessingLauncher):
    """NOTE: Lightning 2.6's spawn launcher joins the ranks before it reads rank 0's results
    from a pipe; results bigger than the pipe buffer (64 KiB: ~230 logged metrics, and the
    exit frontier logs more) block rank 0 in `put` and the run hangs forever. Rank 0 writes
    them to a file and sends its name. (`_wrapping_function` as Lightning's, but for the put.)"""

    def _wrapping_function(self, process_idx, trainer, function, args, kwargs, return_queue, global_states=None):
        if global_states:
            global_states.restore()
        if self._start_method == "spawn" and isinstance(self._strategy.accelerator, CPUAccelerator):
            args, kwargs = _disable_module_memory_sharing((args, kwargs))
        _set_num_threads_if_needed(num_processes=self._strategy.num_processes)
        os.environ["LOCAL_RANK"] = str(process_idx)
        results = function(*args, **kwargs)
        if trainer is not None:
            results = self._collect_rank_zero_results(trainer, results)
        if process_idx == 0:
            path = os.path.join(tempfile.mkdtemp(prefix="ouro-rank0-"), "results.pt")
            torch.save(move_data_to_device(results, "cpu"), path)
            return_queue.put(_ResultFile(path))


class _SpawnDDP(DDPStrategy):
    def _configure_launcher(self) -> None:
        self._launcher = _FileResultLauncher(self, start_method=self._start_method)


def _spawn_strategy(strategy: str):
    """ddp_spawn / ddp_fork as a strategy whose ranks send results through a file (see above)."""
    if strategy in ("ddp_spawn", "ddp_fork"):
        return _SpawnDDP(start_method=strategy.removeprefix("ddp_"))
    return strategy


def make_datamodule(cfg: ExperimentConfig, task: Task) -> TaskDataModule:
    return TaskDataModule(
        task, cfg.data.batch_size, cfg.data.eval_batch_size, cfg.data.n_val, cfg.data.n_test,
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
        strategy=_spawn_strategy(resolve_strategy(cfg)),
        logger=logger,
        callbacks=[*([LearningRateMonitor("step")] if logger else []), *bar, *callbacks],
        log_every_n_steps=cfg.train.log_every,
        enable_progress_bar=cfg.train.progress_bar and verbose,
        enable_model_summary=verbose,
    )
    return L.Trainer(**(kwargs | overrides))


def log_setup(run: tracking.Run, cfg: ExperimentConfig, summary: dict[str, object]) -> None:
    """The config (one name per key, only the sections this run uses) and derived facts (model
    shape, the task's data) as params; the numbers among them as metrics model/*; the full
    config YAML (+ git diff) as artifacts."""
    run.log_params(used_params(cfg) | derived_params(summary))
    run.log_metrics(model_metrics(summary))
    run.log_text(to_yaml(cfg), CONFIG_ARTIFACT)
    diff = tracking.git_diff()
    if diff:
        run.log_text(diff, DIFF_ARTIFACT)


def to_yaml(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML (the run's config artifact)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
