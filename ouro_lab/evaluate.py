"""Re-evaluate a trained checkpoint at every loop step, including steps past the trained T."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ouro_lab import tracking
from ouro_lab.config import ConfigError, ExperimentConfig, from_dict, used_params
from ouro_lab.inference import device_for, exit_rule, skip_evaluate, skip_table
from ouro_lab.modules import build_module, read_checkpoint
from ouro_lab.train import make_datamodule, make_trainer
from ouro_lab.views import run_tables

if TYPE_CHECKING:
    import lightning as L

# Only evaluation and data-size keys may change on reload; anything else is a different model.
EVAL_OVERRIDABLE = ("eval.", "infer.", "data.eval_batch_size", "data.n_val", "data.n_test", "train.accelerator",
                    "train.precision")
IMPORT_OVERRIDABLE = ("data.", "eval.", "infer.", "tracking.")  # import-hf: the network is the file's


@dataclass
class EvalResult:
    metrics: dict[str, float]
    split: str
    run_id: str | None = None  # the MLflow run the evaluation was logged to (None: not logged)
    where: str | None = None  # how to look at it
    skip: str | None = None  # the skip / selection / full-depth table (infer.exit_rule set)

    @property
    def table(self) -> str:
        tables = run_tables(self.metrics, self.split)
        return tables + (f"\n\nskip semantics vs selection semantics ({self.skip})\n"
                         + skip_table(self.metrics, self.split, f"{self.split}/skip_bpb" in self.metrics)
                         if self.skip else "")


def load_checkpoint(path: Path, overrides: list[str] = ()) -> tuple[ExperimentConfig, "L.LightningModule"]:
    """A checkpoint's config (with evaluation-time overrides) and its module, weights loaded, in eval mode."""
    for item in overrides:
        if not item.startswith(EVAL_OVERRIDABLE):
            raise ConfigError(f"override {item!r}: only {', '.join(EVAL_OVERRIDABLE)} can change when re-evaluating")
    ckpt = read_checkpoint(path)
    cfg = from_dict(ckpt["hyper_parameters"]["config"], overrides)  # validated once, here
    module = build_module(cfg)
    module.load_state_dict(ckpt["state_dict"])
    module.ouro_run_id = ckpt.get("ouro_run_id")
    module.ouro_source = ckpt.get("ouro_source")  # an imported checkpoint's origin (import_hf)
    return cfg, module.eval()


def import_hf(folder: Path, out: Path, overrides: list[str] = ()) -> tuple[ExperimentConfig, Path]:
    """A released Ouro checkpoint (Hugging Face layout, models/hf.py) as an ouro-lab checkpoint
    at `out`, which `ouro-lab eval / generate / decode` then read like a trained one. The
    network comes from config.json; `overrides` choose the task and evaluation (data.*,
    eval.*, infer.*, tracking.*). The checkpoint records where it came from (`ouro_source`)."""
    from ouro_lab.config import load_config, to_dict
    from ouro_lab.models import hf

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise hf.HFImportError(f"{folder}: not a folder (a Hugging Face model folder: config.json + model.safetensors)")
    for item in overrides:
        if not item.startswith(IMPORT_OVERRIDABLE):
            raise ConfigError(f"override {item!r}: the network comes from {folder / 'config.json'}; "
                              f"only {', '.join(IMPORT_OVERRIDABLE)} can be set")
    hf_config = hf.read_hf_config(folder)
    # a language model: the text task unless asked otherwise
    cfg = load_config(None, ["data.task=text", *hf.model_overrides(hf_config, str(folder / "config.json")), *overrides])
    module = build_module(cfg)
    if module.task.vocab_size != hf_config["vocab_size"]:
        raise hf.HFImportError(
            f"{folder / 'config.json'}: vocab_size {hf_config['vocab_size']}, but data.task={cfg.data.task} has a "
            f"vocabulary of {module.task.vocab_size} tokens. ouro-lab's tasks bring their own vocabularies (text: the "
            "256 byte values); the released Ouro models need their 49152-token tokenizer, which ouro-lab does not run")
    module.model.load_state_dict(hf.map_state_dict(hf.read_safetensors(folder), module.model,
                                                   str(folder / "model.safetensors")))
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": {"config": to_dict(cfg)},
                "ouro_source": hf.source_record(folder, hf_config)}, out)
    return cfg, out


def evaluate_checkpoint(path: Path, overrides: list[str] = (), split: str = "test", log: bool = False) -> EvalResult:
    """Evaluate a checkpoint on `split`. `log`: also as an MLflow run of its own in the
    checkpoint's experiment (tag `ouro.role=eval`, `ouro.evaluated_run_id` = the run that
    trained it, `ouro.checkpoint`, the overrides as params `eval_overrides`)."""
    cfg, module = load_checkpoint(path, overrides)
    # the training run's own builders: one process, nothing logged; fp32 unless asked otherwise
    # (a checkpoint trained in 16-mixed on a GPU must evaluate on a CPU too)
    cfg.train.devices = 1
    precision = cfg.train.precision if any(o.startswith("train.precision=") for o in overrides) else "32-true"
    trainer = make_trainer(cfg, logger=False, callbacks=[], verbose=False, strategy="auto", precision=precision)
    run = trainer.test if split == "test" else trainer.validate
    datamodule = make_datamodule(cfg, module.task)
    run(module, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(f"{split}/")}
    result = EvalResult(metrics=metrics, split=split)
    rule = exit_rule(cfg)
    if rule.name != "none":  # the rule in skip semantics, next to selection semantics and full depth
        loader = datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()
        skip = skip_evaluate(module.model.to(device_for(cfg)), loader, rule, len(module.task.difficulty_levels),
                             module.task.byte_level, module.task.seq_len)
        metrics |= {f"{split}/{k}": v for k, v in skip.items()}
        result.skip = str(rule)
    if log:
        result.run_id, result.where = _log_eval(cfg, path, module.ouro_run_id, overrides, split, metrics,
                                                module.ouro_source)
    return result


def _log_eval(cfg, path: Path, trained_run: str | None, overrides: list[str], split: str,
              metrics: dict[str, float], source: dict | None = None) -> tuple[str, str]:
    experiment = tracking.Experiment.open(tracking.resolve_tracking_uri(cfg.tracking.uri), cfg.tracking.experiment)
    name = f"eval-{cfg.tracking.run_name or cfg.default_run_name()}-{split}"
    tags = tracking.reproducibility_tags() | {"ouro.role": "eval", "ouro.checkpoint": str(path.resolve()),
                                              "ouro.evaluated_run_id": trained_run or "unknown"}
    if source:
        tags["ouro.imported_from"] = source["folder"]
    with experiment.create_run(name, tags) as run:
        run.log_params(used_params(cfg) | {"eval_overrides": " ".join(overrides) or "none", "eval_split": split})
        run.log_metrics(metrics)
    return run.id, experiment.where_to_look(run.id)
