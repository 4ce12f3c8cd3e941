"""`ouro-lab sweep sweeps/X.yaml`: an Optuna study whose trials are `train()` runs nested
under one MLflow parent run; pruning, failure handling, resume and worker processes.

    schema.py    the sweep YAML: typed fields, CLI overrides, every check before a trial runs
    study.py     Optuna storage / sampler / pruner, the definition check, the study's parent run
    trial.py     what one trial does: claim, suggest, one run per seed (or reuse), the objective
    pruning.py   the Lightning callback that reports to the pruner (also under DDP)
    budget.py    which trials count toward the budget, and which claim a place in it
    dry_run.py   `--dry-run`: the validated sweep and the trials it would run, touching nothing
    recovery.py  trials of dead processes: failed, their runs ended, retries queued
    repair.py    a study journal a crash cut mid-record: checked, repaired with a backup, or named
    runner.py    run_sweep / run_worker / run_workers: the trial loop and the summary
    adaptive.py  the adaptive design over T: from the finished points, the next (T, seed) that
                 most narrows the saturation answer per unit cost, or why to stop (pure)
    design.py    that design in a sweep (sampler.name: adaptive): its Optuna sampler, the
                 decisions read from the study's storage, the curves a trial records

Layout of one study in MLflow (experiment = the study name):
    study parent run (tag ouro.study)
      trial run per Optuna trial (params = sampled values + config; state tag optuna.state)
        seed runs, when seeds > 1 (the trial run then holds their mean and spread)

Resume: rerunning the same command loads the study from its storage. Trials left RUNNING by
a dead process (journal storage has no heartbeat) are marked FAIL and, if `retries` allows,
re-enqueued with the same params; finished trials are kept and never repeated; a retry whose
trial's run had finished (killed before Optuna recorded it) takes that run over (trial.py).
"""

import importlib

# NOTE: resolved on first use (PEP 562), so `ouro_lab.sweep.schema` validates a sweep file
# without importing the trial machinery (Lightning, torch training code).
_EXPORTS = {
    "Discarded": "trial", "claim": "trial", "SweepSummary": "runner", "run_sweep": "runner", "run_worker": "runner",
    "SweepConfig": "schema", "load_sweep": "schema", "Study": "study", "make_pruner": "study",
    "make_sampler": "study", "open_study": "study", "run_trial": "trial", "suggest": "trial",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"ouro_lab.sweep.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'ouro_lab.sweep' has no attribute {name!r}")
