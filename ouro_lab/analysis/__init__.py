"""Turn a study into the answer to "when do extra loops stop helping?".

Data flows one way (STYLE.md): MLflow runs -> run records -> tidy DataFrames -> statistics -> plots -> report.

    load.py         MLflow -> run records -> `StudyData`; the only module that talks to MLflow
                    (it also attaches the report to the study run)
    tidy.py         run records -> `StudyData` (runs, steps, exits, trials, frontier, skip,
                    bench): pure, no MLflow
    stats.py        the tables of the answer: metric vs T, saturation points (math in
                    ouro_lab/saturation.py), extrapolation, compute, exit gate
    law.py          the saturating law m(t) = m_inf + a exp(-k t) (Parcae) on a study: table, plot
    optuna_view.py  the trials as an in-memory Optuna study: fANOVA importance, history
    plots.py        figures: metric vs T (with both baselines), vs loop step t, vs FLOPs, exit gate
    frontier.py     early exit: each rule's accuracy vs loops with fixed depth and the oracles, the
                    gate's efficiency, where tokens stop gaining
    design.py       an adaptive study: the design's answer recomputed from its runs, the points
                    trained and skipped, the FLOPs spent against the full grid
    report.py       report.md + PNGs + CSVs, and the summary sentences built from the tables

`ouro-lab report`, notebooks/loop_saturation.ipynb and the tests call these same functions:

    data = load_study("loops")                    # StudyData: runs, steps, exits, trials
    sat = saturation_table(data)                  # saturation point per group x difficulty x arch
    plot_vs_loops(data, sat)                      # metric vs trained T, both baselines alongside
    report = write_report(data, "reports/loops")  # Markdown + PNGs (+ artifacts on the study run)
"""

from ouro_lab.analysis.frontier import frontier_summary, frontier_table, gate_table, plot_frontier, plot_oracle
from ouro_lab.analysis.law import LawFit, fit_law, fit_law_seeds, law_table, plot_law
from ouro_lab.analysis.load import list_studies, load_bench, load_study, resolve_store
from ouro_lab.analysis.tidy import ALL, AnalysisError, StudyData, difficulty_order, group_label
from ouro_lab.analysis.optuna_view import optuna_study, param_importances, param_value, plot_optuna
from ouro_lab.analysis.plots import plot_compute, plot_exit, plot_vs_loops, plot_vs_step
from ouro_lab.analysis.report import Report, summary, write_bench_report, write_report
from ouro_lab.analysis.stats import (Saturation, compute_table, curve_table, exit_table, exit_wide, extrapolation_table,
                                     final_values, key_table, mean_ci, saturation, saturation_point, saturation_table)

__all__ = [
    "ALL", "AnalysisError", "LawFit", "Report", "fit_law", "fit_law_seeds", "law_table", "plot_law", "Saturation", "StudyData", "compute_table", "curve_table", "difficulty_order",
    "exit_table", "exit_wide", "extrapolation_table", "final_values", "frontier_summary", "frontier_table", "gate_table",
    "plot_frontier", "plot_oracle", "group_label", "key_table", "list_studies", "load_bench", "load_study",
    "mean_ci", "optuna_study", "param_importances", "param_value", "plot_compute", "plot_exit", "plot_optuna",
    "plot_vs_loops", "plot_vs_step", "resolve_store", "saturation", "saturation_point", "saturation_table",
    "summary", "write_bench_report", "write_report",
]
