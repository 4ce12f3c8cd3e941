"""ouro-lab: controlled ablations of looped language models (Ouro). The route from YAML to
MLflow runs one way through these rooms:

    config.py        YAML + key=value overrides -> typed, validated ExperimentConfig (once);
                     its derived facts (distinct_layers, trained_loops, eval_loops) live on it
    errors.py        ConfigError (names the key), StoreError (names the file), AnalysisError
    locations.py     writable folders, tracking URIs that can work
    data/            tasks (tokens, targets, difficulty per position) and the DataModule
    models/          pure nn.Modules: blocks, LoopedLM, StandardLM
    objectives.py    exit distribution, priors, the Stage-I objective, fused head + CE
    metric_names.py  the per-step, exit, frontier and bench metric names, built and parsed here
    exits.py         early-exit rules (Q-exit, confidence, step-change) and the oracles
    saturation.py    the saturation answer's math: seed t-intervals, saturation point + seed
                     bootstrap, the saturating law and its fit (analysis and sweep designs use it)
    metrics.py       the per-loop-step and exit-frontier torchmetrics Metrics
    modules.py       LightningModules: optimizer, schedule, objective, metrics
    tracking.py      MLflow: Experiment and the Run handle (one owner per run)
    run_record.py    the run record: every tag, param, role, run state and non-step metric name
                     (built and parsed here), the params a run logs, its name and metric kind
    views.py         a run's figure and terminal table
    builders.py      module (+ Stage-I weights), DataModule, Trainer, the setup logged per run
    train.py         train(cfg, run=None): the one way anything trains
    checkpoints.py   reading a checkpoint; load_checkpoint (eval-time overrides); import-hf
    evaluate.py      re-evaluate a checkpoint, with the builders training uses
    inference.py     skip vs selection, the cached-decoding table, generation
    choice.py        multiple-choice benchmarks per loop step
    sweep/           Optuna studies whose trials are train() runs (see its __init__)
    analysis/        a study read back from MLflow -> statistics, plots, report
    cli.py           `ouro-lab train | eval | generate | decode | bench | import-hf | tokenizer |
                     sweep | report | studies`
"""
