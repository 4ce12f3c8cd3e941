"""Re-evaluate a trained checkpoint at every loop step, including steps past the trained T."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ouro_lab.config import ConfigError, from_dict
from ouro_lab.modules import build_module
from ouro_lab.train import make_datamodule, make_trainer
from ouro_lab.views import run_tables

# Only evaluation and data-size keys may change on reload; anything else is a different model.
EVAL_OVERRIDABLE = ("eval.", "data.eval_batch_size", "data.n_val", "data.n_test", "train.accelerator", "train.precision")


@dataclass
class EvalResult:
    metrics: dict[str, float]
    split: str

    @property
    def table(self) -> str:
        return run_tables(self.metrics, self.split)


def evaluate_checkpoint(path: Path, overrides: list[str] = (), split: str = "test") -> EvalResult:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    for item in overrides:
        if not item.startswith(EVAL_OVERRIDABLE):
            raise ConfigError(f"override {item!r}: only {', '.join(EVAL_OVERRIDABLE)} can change when re-evaluating")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    config = ckpt.get("hyper_parameters", {}).get("config")
    if config is None:
        raise ConfigError(f"{path} has no ouro-lab config in its hyper_parameters; was it written by `ouro-lab train`?")
    cfg = from_dict(config, overrides)  # validated once, here
    module = build_module(cfg)
    module.load_state_dict(ckpt["state_dict"])
    # the training run's own builders: one process, nothing logged; fp32 unless asked otherwise
    # (a checkpoint trained in 16-mixed on a GPU must evaluate on a CPU too)
    cfg.train.devices = 1
    precision = cfg.train.precision if any(o.startswith("train.precision=") for o in overrides) else "32-true"
    trainer = make_trainer(cfg, logger=False, callbacks=[], verbose=False, strategy="auto", precision=precision)
    run = trainer.test if split == "test" else trainer.validate
    run(module, datamodule=make_datamodule(cfg, module.task), verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(f"{split}/")}
    return EvalResult(metrics=metrics, split=split)
