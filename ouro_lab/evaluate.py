"""Re-evaluate a trained checkpoint at every loop step, including steps past the trained T."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ouro_lab import tracking
from ouro_lab.config import ConfigError, from_dict, used_params
from ouro_lab.modules import build_module, read_checkpoint
from ouro_lab.train import make_datamodule, make_trainer
from ouro_lab.views import run_tables

# Only evaluation and data-size keys may change on reload; anything else is a different model.
EVAL_OVERRIDABLE = ("eval.", "data.eval_batch_size", "data.n_val", "data.n_test", "train.accelerator", "train.precision")


@dataclass
class EvalResult:
    metrics: dict[str, float]
    split: str
    run_id: str | None = None  # the MLflow run the evaluation was logged to (None: not logged)
    where: str | None = None  # how to look at it

    @property
    def table(self) -> str:
        return run_tables(self.metrics, self.split)


def evaluate_checkpoint(path: Path, overrides: list[str] = (), split: str = "test", log: bool = False) -> EvalResult:
    """Evaluate a checkpoint on `split`. `log`: also as an MLflow run of its own in the
    checkpoint's experiment (tag `ouro.role=eval`, `ouro.evaluated_run_id` = the run that
    trained it, `ouro.checkpoint`, the overrides as params `eval_overrides`)."""
    for item in overrides:
        if not item.startswith(EVAL_OVERRIDABLE):
            raise ConfigError(f"override {item!r}: only {', '.join(EVAL_OVERRIDABLE)} can change when re-evaluating")
    ckpt = read_checkpoint(path)
    cfg = from_dict(ckpt["hyper_parameters"]["config"], overrides)  # validated once, here
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
    result = EvalResult(metrics=metrics, split=split)
    if log:
        result.run_id, result.where = _log_eval(cfg, path, ckpt.get("ouro_run_id"), overrides, split, metrics)
    return result


def _log_eval(cfg, path: Path, trained_run: str | None, overrides: list[str], split: str,
              metrics: dict[str, float]) -> tuple[str, str]:
    experiment = tracking.Experiment.open(tracking.resolve_tracking_uri(cfg.tracking.uri), cfg.tracking.experiment)
    name = f"eval-{cfg.tracking.run_name or cfg.default_run_name()}-{split}"
    tags = tracking.reproducibility_tags() | {"ouro.role": "eval", "ouro.checkpoint": str(path.resolve()),
                                              "ouro.evaluated_run_id": trained_run or "unknown"}
    with experiment.create_run(name, tags) as run:
        run.log_params(used_params(cfg) | {"eval_overrides": " ".join(overrides) or "none", "eval_split": split})
        run.log_metrics(metrics)
    return run.id, experiment.where_to_look(run.id)
