"""What a run records in MLflow besides its metrics: its name (`run_name`), the params it logs
(`used_params`), the kind of quality metric it logs (`metric_kind`, tag `ouro.metric_kind`), and
which config keys its hashes leave out (`drop_later_defaults`)."""

from __future__ import annotations

from typing import Any

import dataclasses

from ouro_lab.config import ExperimentConfig, InferConfig, flatten, to_dict
from ouro_lab.data import TASKS, Task


def used_params(cfg: ExperimentConfig) -> dict[str, Any]:
    """The flattened config a run logs as MLflow params: one name per key (`model.loops`), and
    of the task sections only the one `data.task` uses (the full config is the run's
    config.yaml artifact)."""
    d = to_dict(cfg)
    for task in TASKS:
        if task != cfg.data.task:
            d["data"].pop(task, None)
    if not cfg.has_stage2:
        d.pop("stage2")
    if cfg.infer == InferConfig():  # inference settings: logged only when an evaluation used them
        d.pop("infer")
    return flatten(d)


def run_name(cfg: ExperimentConfig) -> str:
    """tracking.run_name, else '{task}-looped-N2xT4-s0', '{task}-depth_matched-L8-s0'."""
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    m = cfg.model
    shape = f"N{m.n_layers}xT{m.loops}" if m.arch == "looped" else f"L{m.distinct_layers}"
    stage = "-stage2" if cfg.has_stage2 else ""
    return f"{cfg.data.task}-{m.arch}-{shape}{stage}-s{cfg.train.seed}"


# Config keys added after runs (the reuse hash) and studies (the definition hash) were first
# hashed: left out of a hash while at their schema default, so hashes made before them stay
# valid and old studies resume and reuse their runs.
RUN_HASH_LATER = (("model", "rope_layout"), ("model", "rope_base"), ("model", "norm_eps"), ("model", "prelude_layers"),
                  ("model", "coda_layers"), ("model", "injection"), ("model", "init_state"),
                  ("train", "loops_sampling"), ("train", "loops_min"), ("train", "loops_max"), ("train", "backprop_loops"))
STUDY_HASH_LATER = (("train", "strategy"), ("eval", "exit_q"), ("eval", "exit_confidence"), ("eval", "exit_step_change"),
                    ("eval", "exit_epsilon"), ("eval", "oracle_tolerance"), ("stage2", "init_from"), ("stage2", "k"),
                    ("stage2", "gamma"), ("stage2", "improvement"), ("stage2", "steps"), ("model", "rope_layout"),
                    ("model", "rope_base"), ("model", "norm_eps"),
                    *(("infer", f.name) for f in dataclasses.fields(InferConfig)),
                    ("model", "prelude_layers"), ("model", "coda_layers"), ("model", "injection"),
                    ("model", "init_state"), ("train", "loops_sampling"), ("train", "loops_min"),
                    ("train", "loops_max"), ("train", "backprop_loops"), ("data", "lm"))


def drop_later_defaults(d: dict, keys: tuple[tuple[str, str], ...]) -> None:
    """Remove from a config dict (`to_dict`'s) each (section, key) of `keys` that holds its
    schema default."""
    defaults = to_dict(ExperimentConfig())
    for section, key in keys:
        if section in d and key in d[section] and d[section][key] == defaults[section][key]:
            d[section].pop(key)


METRIC_KIND_TAG = "ouro.metric_kind"  # "acc" or "bpb": what the run's per-step quality metric is


def metric_kind(task: Task) -> str:
    """The per-step quality metric a task's runs report: bits per byte on byte-level tasks
    (`text`, `lm`), else accuracy. Decided here only; training and evaluation runs record it."""
    return "bpb" if task.byte_level else "acc"
