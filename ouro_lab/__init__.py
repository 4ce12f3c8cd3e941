"""ouro-lab: controlled ablations of looped language models (Ouro). The route from YAML to
MLflow runs one way through these rooms:

    config.py        YAML + key=value overrides -> typed, validated ExperimentConfig (once);
                     its derived facts (distinct_layers, trained_loops, eval_loops) live on it
    data/            tasks (tokens, targets, difficulty per position) and the DataModule
    models/          pure nn.Modules: blocks, LoopedLM, StandardLM
    objectives.py    exit distribution, priors, the Stage-I objective, fused head + CE
    metric_names.py  every metric name, built and parsed here
    exits.py         early-exit rules (Q-exit, confidence, step-change) and the oracles
    metrics.py       the per-loop-step and exit-frontier torchmetrics Metrics
    modules.py       LightningModules: optimizer, schedule, objective, metrics
    tracking.py      MLflow: Experiment and the Run handle (one owner per run)
    views.py         a run's figure and terminal table
    train.py         train(cfg, run=None): the one way anything trains
    evaluate.py      re-evaluate a checkpoint, with train's builders
    sweep/           Optuna studies whose trials are train() runs (see its __init__)
    analysis/        a study read back from MLflow -> statistics, plots, report
    cli.py           `ouro-lab train | eval | sweep | report | studies`
"""
