"""Re-evaluate a trained checkpoint at every loop step, including steps past the trained T."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ouro_lab import tracking
from ouro_lab.builders import log_setup, make_datamodule, make_trainer
from ouro_lab.checkpoints import load_checkpoint
from ouro_lab.inference import device_for, exit_rule, frontier_rules, skip_evaluate, skip_frontier, skip_table
from ouro_lab.run_record import (EVAL_OVERRIDES, EVAL_RUN, EVAL_SPLIT, IMPORTED_FROM, METRIC_KIND_TAG, evaluation_tags,
                                 metric_kind, run_name, tabled)
from ouro_lab.views import run_tables, skip_frontier_frame, skip_frontier_text

@dataclass
class EvalResult:
    metrics: dict[str, float]
    split: str
    run_id: str | None = None  # the MLflow run the evaluation was logged to (None: not logged)
    store: str | None = None  # the MLflow store it went to
    experiment: str | None = None  # and its experiment
    where: str | None = None  # how to look at it
    skip: str | None = None  # the skip / selection / full-depth table (infer.exit_rule set)
    kind: str = "acc"  # the per-step quality metric: acc or bpb (run_record.metric_kind)
    frontier: str | None = None  # the skip frontier's rule and thresholds (infer.frontier)
    epsilon: float = 0.01  # eval.exit_epsilon: "within epsilon of full depth"

    @property
    def table(self) -> str:
        tables = run_tables(self.metrics, self.split, self.kind)
        if self.frontier:
            frame = skip_frontier_frame(self.metrics, self.split)
            return tables + (f"\n\nskip frontier ({self.frontier}; per exited_kv: skip {self.kind}, its gap to "
                             "selection, executed MFLOPs per token and the share saved against full depth)\n"
                             + skip_frontier_text(frame, self.epsilon, self.kind))
        return tables + (f"\n\nskip semantics vs selection semantics ({self.skip})\n"
                         + skip_table(self.metrics, self.split, self.kind == "bpb")
                         if self.skip else "")


def evaluate_checkpoint(path: Path, overrides: list[str] = (), split: str = "test", log: bool = False) -> EvalResult:
    """Evaluate a checkpoint on `split`. `log`: also as an MLflow run of its own, in the working
    folder's store ($MLFLOW_TRACKING_URI, else ./mlflow.db; `tracking.uri=` in `overrides` to
    choose) under the checkpoint's experiment name (tag `ouro.role=eval`, `ouro.evaluated_run_id`
    = the run that trained it, `ouro.checkpoint`, the overrides as params `eval_overrides`)."""
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
    result = EvalResult(metrics=metrics, split=split, kind=metric_kind(module.task), epsilon=cfg.eval.exit_epsilon)
    rule = exit_rule(cfg)
    if rule.name != "none":  # the rule in skip semantics, next to selection semantics and full depth
        loader = datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()
        args = (len(module.task.difficulty_levels), result.kind == "bpb", module.task.seq_len,
                getattr(module.task, "token_bytes", None))
        model = module.model.to(device_for(cfg))
        if cfg.infer.frontier:  # every threshold of the rule's eval.exit_* list x every exited_kv
            key = {"q": "exit_q", "conf": "exit_confidence", "change": "exit_step_change"}[rule.name]
            skip = skip_frontier(model, loader, frontier_rules(rule.name, getattr(cfg.eval, key)), *args)
            result.frontier = f"rule {rule.name} at eval.{key}"
        else:
            skip = skip_evaluate(model, loader, rule, *args)
            result.skip = str(rule)
        metrics |= {f"{split}/{k}": v for k, v in skip.items()}
    if log:
        result.run_id, result.store, result.where = _log_eval(cfg, path, module, overrides, split, metrics)
        result.experiment = cfg.tracking.experiment
    return result


def _log_eval(cfg, path: Path, module, overrides: list[str], split: str,
              metrics: dict[str, float]) -> tuple[str, str, str]:
    """The evaluation as an MLflow run, logged like a training run's setup (config params,
    derived facts, model/* metrics: what `ouro-lab report` reads from an experiment of evaluations)."""
    trained_run, source = module.ouro_run_id, module.ouro_source
    experiment = tracking.Experiment.open(tracking.resolve_tracking_uri(cfg.tracking.uri), cfg.tracking.experiment)
    name = f"eval-{run_name(cfg)}-{split}"
    tags = (tracking.reproducibility_tags() | evaluation_tags(EVAL_RUN, str(path.resolve()), trained_run)
            | {METRIC_KIND_TAG: metric_kind(module.task)})
    if source:
        tags[IMPORTED_FROM] = source["folder"]
    with experiment.create_run(name, tags) as run:
        log_setup(run, cfg, module.summary() | module.task.describe())
        run.log_params({EVAL_OVERRIDES: " ".join(overrides) or "none", EVAL_SPLIT: split})
        run.log_metrics({k: v for k, v in metrics.items() if not tabled(k)})
        run.log_tables(metrics)
    return run.id, experiment.tracking_uri, experiment.where_to_look(run.id)
