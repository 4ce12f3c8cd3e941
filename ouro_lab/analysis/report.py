"""`write_report`: the study's answer as report.md + PNGs + CSVs (what `ouro-lab report`
writes), with the summary sentences built only from the tables' numbers."""

from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import markdown
import numpy as np
import pandas as pd

from ouro_lab import metric_names as names
from ouro_lab.analysis.frontier import (frontier_summary, frontier_table, gate_table, plot_frontier, plot_oracle,
                                       plot_skip_frontier, skip_frontier_tables)
from ouro_lab.analysis.law import law_table, plot_law
from ouro_lab.analysis.design import DesignView, design_view, is_adaptive, test_time_view
from ouro_lab.analysis.load import attach_report
from ouro_lab.analysis.tidy import ALL, MAX_GROUP_VALUES, StudyData, difficulty_order
from ouro_lab.analysis.optuna_view import optuna_study, param_importances, plot_optuna
from ouro_lab.analysis.plots import plot_compute, plot_exit, plot_vs_loops, plot_vs_step
from ouro_lab.analysis.stats import (compute_table, curve_table, exit_table, exit_wide, extrapolation_table, final_values,
                                     key_table, saturation_table)
from ouro_lab.views import plt


EXIT_TREND = 0.05  # expected-exit-step difference (steps) the summary calls a trend


def summary(data: StudyData, sat: pd.DataFrame, importances: Mapping[str, float] | None = None,
            kind: str | None = None, split: str | None = None, epsilon: float = 0.01) -> list[str]:
    """Sentences built only from the numbers above (no numbers of its own)."""
    kind, split = kind or data.kind, split or data.split
    table = curve_table(data, kind, split)
    sign = 1 if data.direction_of(kind) == "maximize" else -1
    lines = []
    task = ", ".join(sorted(data.runs["task"].unique()))
    for group in [g for g in data.groups if g in set(table["group"])]:
        where = f"on {task} ({group})" if group != "all runs" else f"on {task}"
        mean = {(r["arch"], r["loops"], r["difficulty"]): r["mean"] for _, r in table[table["group"] == group].iterrows()}
        levels = difficulty_order(table[table["group"] == group]["difficulty"])
        hardest = levels[-1]
        for diff in dict.fromkeys([ALL, hardest]):
            hit = sat[(sat["group"] == group) & (sat["arch"] == "looped") & (sat["difficulty"] == diff)]
            if hit.empty:
                continue
            h = hit.iloc[0]
            scope = "all positions" if diff == ALL else f"the hardest {data.difficulty_name} ({diff})"
            if pd.notna(h["point"]):
                t = int(h["point"])
                text = (f"{where.capitalize()}, {scope}: looped {split} {kind} saturates at {h['text']} "
                        f"(gain < {epsilon:g} from any larger T), reaching {mean[('looped', t, diff)]:.3f}")
            else:
                t = int(h["t_max"])
                text = (f"{where.capitalize()}, {scope}: looped {split} {kind} is not saturated within T <= {t} "
                        f"({h['text']}); at T={t} it is {mean[('looped', t, diff)]:.3f}")
            others = [(a, mean.get((a, t, diff))) for a in ("depth_matched", "param_matched")]
            others = [(a, v) for a, v in others if v is not None and np.isfinite(v)]
            if others:
                text += "; at that T " + ", ".join(
                    f"{a.replace('_', '-')} is {v:.3f} (looped {'ahead' if sign * (mean[('looped', t, diff)] - v) >= 0 else 'behind'} "
                    f"by {abs(mean[('looped', t, diff)] - v):.3f})" for a, v in others)
            lines.append(text + ".")
        dm = sat[(sat["group"] == group) & (sat["arch"] == "depth_matched") & (sat["difficulty"] == ALL)]
        if len(dm):
            lines.append(f"{where.capitalize()}: the depth-matched baseline (N*T distinct layers) "
                         f"{'saturates at ' + dm.iloc[0]['text'] if pd.notna(dm.iloc[0]['point']) else 'is ' + dm.iloc[0]['text']}.")
    extra = extrapolation_table(data, kind, split)
    if len(extra):
        worst, best = extra.loc[(sign * extra["change"]).idxmin()], extra.loc[(sign * extra["change"]).idxmax()]
        lines.append(f"Looping past the trained T (extrapolation) changes {split} {kind} by {worst['change']:+.3f} "
                     f"at worst (T={worst['T']} run to t={worst['last_step']}, {worst['group']}) and by "
                     f"{best['change']:+.3f} at best (T={best['T']} run to t={best['last_step']}, {best['group']}).")
    exits = exit_table(data, split)
    for group in [g for g in data.groups if g in set(exits["group"])]:
        e = exits[(exits["group"] == group) & (exits["difficulty"] != ALL)]
        t_max = e["loops"].max()
        by = e[e["loops"] == t_max].set_index("difficulty")["exit_expected_step"]
        if t_max > 1 and len(by) > 1:
            lo, hi = difficulty_order(by.index)[0], difficulty_order(by.index)[-1]
            trend = ("more loops at" if by[hi] > by[lo] + EXIT_TREND else "fewer loops at"
                     if by[hi] < by[lo] - EXIT_TREND else "about as many loops at")
            # NOTE: which end is harder is the task's business (more hops; but less context for text)
            lines.append(f"Exit gate at T={t_max} ({group}): expected exit step {by[lo]:.2f} at "
                         f"{data.difficulty_name} {lo[1:]} vs {by[hi]:.2f} at {hi[1:]}: it spends {trend} "
                         f"{data.difficulty_name} {hi[1:]} {'as' if trend.startswith('about') else 'than'} at "
                         f"{lo[1:]} (a difference under {EXIT_TREND} "
                         "steps counts as none).")
    if importances:
        lines.append("Parameter importance for the objective (fANOVA): "
                     + ", ".join(f"{k} {v:.2f}" for k, v in importances.items()) + ".")
    return lines


@dataclass
class Report:
    folder: Path
    markdown: str
    table: str  # the key table as printed to the terminal
    files: list[Path]


def _markdown_table(frame: pd.DataFrame, floatfmt: str = ".3f") -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "-" if not np.isfinite(v) else format(v, floatfmt)
        return str(v)

    head = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def write_report(data: StudyData, folder: str | Path, epsilon: float = 0.01, kind: str | None = None,
                 split: str | None = None, level: float = 0.95, n_boot: int = 2000, log: bool = True) -> Report:
    """Write report.md and its PNGs to `folder`; with `log`, also as artifacts `report/` on the
    study's parent run (or nowhere when the experiment has no sweep parent)."""
    kind, split = kind or data.kind, split or data.split
    final_values(data, kind, split)  # an unknown metric kind or split is refused before the folder exists
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sat = saturation_table(data, epsilon, kind, split, level, n_boot)
    laws = law_table(data, epsilon, kind, split, level)
    study = optuna_study(data)
    importances = param_importances(study)
    figures = {"vs_loops.png": plot_vs_loops(data, sat, kind, split, level), "vs_step.png": plot_vs_step(data, kind, split),
               "compute.png": plot_compute(data, kind, split), "exit_gate.png": plot_exit(data, split),
               "frontier.png": plot_frontier(data, split, data.metric_kind), "oracle.png": plot_oracle(data, split),
               "law.png": plot_law(data, laws, kind, split), "bench.png": plot_bench(data.bench),
               "skip_frontier.png": plot_skip_frontier(data, data.metric_kind)}
    optuna_figs = plot_optuna(study, importances, data.objective_metric)
    if optuna_figs:
        figures["optuna_history.png"], figures["optuna_importance.png"] = optuna_figs
    files = []
    for name, fig in figures.items():
        if fig is not None:
            fig.savefig(folder / name, dpi=110)
            plt.close(fig)
            files.append(folder / name)
    table = key_table(data, ALL, kind, split, level)
    lines = summary(data, sat, importances, kind, split, epsilon) + frontier_summary(data, split)
    text = _report_markdown(data, sat, table, lines, importances, {f.name for f in files}, kind, split, epsilon, level, n_boot,
                            laws)
    (folder / "report.md").write_text(text)
    (folder / "report.html").write_text(report_html(text, folder, f"{data.name}: when do extra loops stop helping?"))
    files[:0] = [folder / "report.md", folder / "report.html"]
    for name, frame in (("curves.csv", curve_table(data, kind, split, level)), ("saturation.csv", sat), ("law.csv", laws),
                        ("steps.csv", data.steps), ("frontier.csv", frontier_table(data, split, data.metric_kind)),
                        *([("skip.csv", data.skip)] if len(data.skip) else []),
                        *([("skip_frontier.csv", data.skip_frontier)] if len(data.skip_frontier) else []),
                        *([("bench.csv", data.bench)] if len(data.bench) else [])):
        frame.to_csv(folder / name, index=False)
        files.append(folder / name)
    if log:
        attach_report(data, files)
    printed = _terminal_table(table, sat, kind, split, level)
    stale = _stale_runs(data)
    if len(stale):
        printed += (f"\n\nNOTE: checkpoints older than their metrics: {len(stale)} of {len(data.runs)} runs "
                    f"(logged before the fix; listed in {folder / 'report.md'})")
    gates = gate_table(data, split, level)
    if len(gates):
        printed += f"\n\n{split} early exit (the gate within epsilon of full depth; docs/guides/early-exit.md):\n" \
            + gates.to_string(index=False, float_format=lambda v: f"{v:.2f}")
    return Report(folder, text, printed, files)


def report_html(text: str, folder: Path, title: str) -> str:
    """The report's markdown as one self-contained HTML page, its figures embedded as data URIs.
    NOTE: MLflow's artifact viewer renders a markdown image only from an absolute http address,
    so report.md shows its figures as links there; an HTML artifact renders whole."""
    body = markdown.markdown(text, extensions=["tables", "fenced_code"])

    def embed(m: re.Match) -> str:
        path = folder / m.group(1)
        if not path.is_file():
            return m.group(0)
        return f'src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"'

    body = re.sub(r'src="([^":/]+\.png)"', embed, body)
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}"
             "table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:.2em .5em}"
             "img{max-width:100%}pre,code{background:#f5f5f5}")
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head>\n<body>\n{body}\n</body></html>\n")


def write_bench_report(name: str, bench: pd.DataFrame, folder: str | Path) -> Report:
    """report.md, bench.png and bench.csv for an experiment that holds `ouro-lab bench` runs
    only (an imported model benchmarked, never trained or evaluated here)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fig = plot_bench(bench)
    fig.savefig(folder / "bench.png", dpi=110)
    plt.close(fig)
    text = "\n".join([f"# {name}: accuracy vs loop step", "",
                      f"Experiment `{name}` holds benchmark runs only ({bench['run_id'].nunique()}): no training or "
                      "`ouro-lab eval` runs, so there is no saturation analysis.", "",
                      *_bench_markdown(bench, {"bench.png"})])
    (folder / "report.md").write_text(text)
    bench.to_csv(folder / "bench.csv", index=False)
    table = bench.assign(step=bench["step"].map(lambda t: "rule" if t == 0 else t)).pivot_table(
        index=["task", "step"], columns="evaluated", values="acc", sort=False).to_string(float_format=lambda v: f"{v:.3f}")
    return Report(folder, text, f"acc by loop step (step 'rule': under the exit rule):\n{table}",
                  [folder / "report.md", folder / "bench.png", folder / "bench.csv"])


def _bench_markdown(bench: pd.DataFrame, figures: set[str]) -> list[str]:
    if not len(bench):
        return []
    out = ["## Benchmarks: accuracy vs loop step", "",
           "`ouro-lab bench CKPT FILE.jsonl` (the latest per checkpoint and task): multiple-choice accuracy "
           "by log-likelihood (acc) and per character (acc_norm) at every loop step t (t > T: past the trained "
           "loops), and under the bench run's exit rule (step `rule`).", ""]
    for task, frame in bench.groupby("task", sort=True):
        wide = frame.assign(step=frame["step"].map(lambda t: "rule" if t == 0 else t)).pivot_table(
            index="step", columns="evaluated", values=["acc", "acc_norm"], sort=False)
        wide.columns = [f"{kind} {evaluated}" for kind, evaluated in wide.columns]
        out += [f"**accuracy on {task} vs loop step** (chance {frame['chance'].iloc[0]:.3f})", "",
                _markdown_table(wide.reset_index()), ""]
    return out + (["![benchmarks](bench.png)", ""] if "bench.png" in figures else [])


def plot_bench(bench: pd.DataFrame):
    """Accuracy vs loop step per benchmark task and checkpoint (None without bench runs)."""
    if not len(bench):
        return None
    tasks = sorted(bench["task"].unique())
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.8), squeeze=False, constrained_layout=True)
    for ax, task in zip(axes[0], tasks):
        frame = bench[(bench["task"] == task) & (bench["step"] > 0)]
        for evaluated, rows in frame.groupby("evaluated"):
            ax.plot(rows["step"], rows["acc"], marker="o", label=str(evaluated))
        ax.axhline(frame["chance"].iloc[0], ls=":", color="grey", lw=1)
        ax.set(title=f"accuracy on {task} vs loop step", xlabel="loop step t", ylabel="acc")
        ax.legend(fontsize=7)
    return fig


def _stale_runs(data: StudyData) -> pd.DataFrame:
    """Runs whose named checkpoint is older than their final metrics (load.stale_checkpoint)."""
    return data.runs[data.runs["stale_checkpoint"] != ""] if "stale_checkpoint" in data.runs else data.runs[:0]


def skip_table(skip: pd.DataFrame) -> pd.DataFrame:
    """The skip / select / full comparison, one row per evaluation (bpb where the task has it)."""
    kinds = [k for k in ("acc", "bpb") if f"skip_{k}" in skip.columns]
    cols = {"evaluated": "checkpoint", "split": "split", "rule": "rule", "threshold": "threshold",
            "exited_kv": "exited kv",
            **{f"{sem}_{k}": f"{sem} {k}" for k in kinds for sem in ("skip", "select", "full")},
            "skip_minus_select_acc": "skip - select acc", "skip_loops": "skip loops", "full_loops": "full loops"}
    table = skip.rename(columns=cols)[list(cols.values())]
    for sem in ("skip", "full"):
        table[f"{sem} MFLOPs/tok"] = skip[f"{sem}_flops"] / 1e6
        table[f"{sem} s"] = skip[f"{sem}_seconds"]
    return table


def _design_section(view: DesignView) -> list[str]:
    """An adaptive study: what the design trained, skipped and spent, and its answer."""
    d, points = view.decision, view.points
    share = view.spent_flops / view.grid_flops if view.grid_flops else math.nan
    stop = ("'s answer is in the sweep's summary (the objective is no {split}/{kind}_final metric, whose curves "
            "this report rebuilds)" if d is None else f" stopped: {d.reason}" if d.point is None
            else f" did not finish: its next point would be {d.reason}")
    grid_runs = int(points[["seeds trained", "seeds stopped", "seeds skipped"]].sum().sum())
    stopped = int(points["seeds stopped"].sum())
    out = ["## Adaptive design", "",
           f"The study trained {int(points['seeds trained'].sum())} of the grid's {grid_runs} runs"
           + (f" and stopped {stopped} early (their results could not change the answer)" if stopped else "")
           + f", and spent {view.spent_flops:.3g} training FLOPs, {share:.0%} of the full grid's "
           f"{view.grid_flops:.3g} (every T at max_seeds seeds; a skipped T's cost is read off the trained T's, "
           f"linear in T). The design{stop}.", "",
           "The answer per curve (T* of the seed means, its interval from the design's parametric bootstrap, "
           "and the law's loops to within epsilon), recomputed from the runs with the sweep's own rule:", "",
           _markdown_table(view.answers, ".2f"), "", "Points trained, stopped and skipped:", "",
           _markdown_table(points, ".3g"), ""]
    if stopped:
        out += ["Runs stopped by the design's pruner (never counted as finished):", "",
                _markdown_table(view.stopped, "g"), ""]
    return out


def _test_time_section(data: StudyData) -> list[str]:
    """The random-depth run beside the trained T's: what each question costs."""
    table, one, trained = test_time_view(data)
    high = data.test_time_runs["trained_loops"].max()
    return ["## One run for the test-time question", "",
            f"One looped model trained with a depth drawn per batch from the loop count's choices (up to T={high}) "
            f"and evaluated at every step t ({data.split} {data.kind}, all positions) answers \"how far can a model "
            f"loop at test time\" for {one:.3g} training FLOPs, {one / trained:.0%} of the {trained:.3g} the runs at "
            "fixed T spent. Those answer another question, \"which depth to train\": beside it, their seed mean "
            "at T = t.", "", _markdown_table(table, ".3f"), ""]


def _terminal_table(table: pd.DataFrame, sat: pd.DataFrame, kind: str, split: str, level: float) -> str:
    s = sat[sat["difficulty"].isin([ALL])][["group", "arch", "text"]].rename(columns={"text": "saturation (all positions)"})
    saturation = s.to_string(index=False) if len(s) else "saturation: needs runs at two or more trained T per arch"
    return (f"{split} {kind} at the final step (all positions), mean ± {level:.0%} CI half-width over seeds:\n"
            + table.to_string(index=False) + "\n\n" + saturation)


def _report_markdown(data: StudyData, sat: pd.DataFrame, table: pd.DataFrame, lines: list[str],
                     importances: Mapping[str, float], figures: set[str], kind: str, split: str,
                     epsilon: float, level: float, n_boot: int, laws: pd.DataFrame | None = None) -> str:
    n_seeds = data.runs.groupby(["group", "arch", "loops"])["run_id"].nunique()
    out = [f"# {data.name}: when do extra loops stop helping?", "",
           f"Study `{data.name}` (MLflow experiment {data.experiment_id}, store `{data.tracking_uri}`"
           + (f", study run `{data.parent_run_id}`" if data.parent_run_id else "") + ").",
           *([f"Unit runs: `ouro-lab eval` runs (the latest per checkpoint and split), not training runs: "
              f"{', '.join(sorted(data.runs['run_name']))}. Training FLOPs are unknown here."] if data.source == "eval" else []),
           f"Unit runs by state: {', '.join(f'{k} {v}' for k, v in sorted(data.counts.items()))}; "
           f"runs per point (group x arch x T): {n_seeds.min()}-{n_seeds.max()}. Metric: **{split} {kind}** at the final (trained) "
           f"loop step; difficulty = {data.difficulty_name}.", ""]
    stale = _stale_runs(data)
    if len(stale):
        out += [f"**Checkpoints older than their metrics: {len(stale)} of {len(data.runs)} runs** (logged before ouro-lab saved "
                "the weights of a final validation that fell between two `train.val_every` validations). The "
                "metrics in this report are right; re-evaluating, decoding from or starting Stage II from these "
                "checkpoints uses older weights. Retrain them to get matching checkpoints: "
                + "; ".join(f"`{r.run_name}` ({r.stale_checkpoint})" for r in stale.itertuples()) + ".", ""]
    if data.averaged_keys:
        out += [f"Averaged over: {', '.join(data.averaged_keys)} (sampled from a range, or more than "
                f"{MAX_GROUP_VALUES} values): means, intervals and 'seeds' below pool runs over their values.", ""]
    if kind != data.kind or data.objective_metric.split("/", 1)[-1] != names.final(kind):
        out += [f"The sweep's objective is `{data.objective_metric}`; this report reads {kind} at each run's "
                "final trained step (and per step / per difficulty below).", ""]
    out += ["## Summary", "", *[f"- {line}" for line in lines], "",
            "## Metric vs trained loop count T", "",
            f"Mean ± half-width of the {level:.0%} Student-t interval over seeds (all positions)."
            + (" param_matched (N layers, one pass) does not depend on T: one model per seed, shown at every T."
               if "param_matched" in set(data.runs["arch"]) else ""), "",
            _markdown_table(table), ""]
    if "vs_loops.png" in figures:
        out += ["![metric vs T](vs_loops.png)", ""]
    out += ["## Saturation points", "",
            f"Saturation point = the smallest trained T from which no larger T in the study improves the "
            f"seed-mean metric by ε = {epsilon:g} or more ('not saturated' when the largest T still gains ε on "
            "the one before it). NOTE: this is stricter than 'the next T gains less than ε': a plateau followed "
            "by a later gain is not called saturation, and gains are in the metric between trained T values "
            f"(not per loop). Interval: {level:.0%} percentile bootstrap over seeds ({n_boot} resamples; seeds "
            "drawn with replacement, jointly across T when every T has the same seeds (paired), else "
            "independently; a resample that does not saturate counts as beyond the largest T, written '>T'). "
            "p_saturated = share of resamples that saturate within the range. With 3 seeds a percentile "
            "bootstrap of a grid point is coarse: read a point interval such as [6, 6] as 'every resample "
            "agrees', not as certainty.", "",
            _markdown_table(sat[["group", "arch", "difficulty", "text", "p_saturated", "n_seeds", "paired"]]
                            .rename(columns={"text": "saturation point [interval]"}), ".2f")
            if len(sat) else "No saturation point: every arch has runs at one trained T only.", ""]
    if laws is not None and len(laws):
        out += ["## The saturating law", "",
                "m(t) = m_inf + a exp(-k t) (Parcae's form), least squares on the seed-mean curve: over the "
                "evaluation loop steps of each looped trained T (`over` = step, steps past T included) and over "
                "trained T for each arch with 4 or more T (`over` = T). 'within ε by' = the fitted loops at which "
                f"|a| exp(-k t) <= ε = {epsilon:g}, with a {level:.0%} seed-bootstrap interval (over resamples the "
                "law fits; p_fit = their share); compare it with the non-parametric saturation point above. "
                "'no fit' when R² < 0.9 or the curve turns back (gets worse past its best by more than its noise): "
                "the law is not forced onto such curves.", "",
                _markdown_table(laws[["group", "arch", "over", "loops", "fit", "p_fit", "n_seeds"]], ".2f"), ""]
        out += ["![saturating law](law.png)", ""] if "law.png" in figures else []
    if is_adaptive(data):
        out += _design_section(design_view(data))
    if not data.test_time_runs.empty:
        out += _test_time_section(data)
    extra = extrapolation_table(data, kind, split)
    out += ["## Metric vs evaluation loop step t", "",
            "Each looped model evaluated at every step up to its trained T and beyond (extrapolation).", ""]
    if "vs_step.png" in figures:
        out += ["![metric vs loop step](vs_step.png)", ""]
    if len(extra):
        out += [_markdown_table(extra.rename(columns={"at_T": f"{kind} at t=T", "at_last": f"{kind} at last t"})), ""]
    out += ["## Compute-normalised", "",
            "FLOPs counted by structure (a shared block run T times costs T times; the per-step LM heads "
            "included); training FLOPs = 3 x forward FLOPs/token x tokens seen (under random depth or truncated "
            "backprop: the forward of each step's drawn loops + 2 x that of the loops the gradient flows through, "
            "averaged over the run's own draws).", "",
            _markdown_table(compute_table(data, kind, split), ".4g"), ""]
    if "compute.png" in figures:
        out += ["![compute](compute.png)", ""]
    exits = exit_wide(data, split)
    if len(exits):
        out += ["## Exit gate", "", "Seed means over the looped runs: expected exit step E[t] under the "
                "learned exit distribution and its entropy H (nats; uniform over T steps = ln T), by "
                f"{data.difficulty_name}.", "", _markdown_table(exits, ".2f"), ""]
        if "exit_gate.png" in figures:
            out += ["![exit gate](exit_gate.png)", ""]
    gates = gate_table(data, split)
    if len(gates):
        out += ["## Early exit", "",
                "Selection semantics (all T steps computed, each token read at its exit step). The gate's "
                "efficiency = (T - its loops within epsilon of full-depth accuracy) / (T - the answer-stable "
                "oracle's loops): the share of the achievable saving it realises. The first-right oracle is an "
                "upper bound inflated by lucky guesses on unsolved tokens.", "",
                _markdown_table(gates, ".2f"), ""]
        out += ["![frontier](frontier.png)", ""] if "frontier.png" in figures else []
        out += ["![oracle](oracle.png)", ""] if "oracle.png" in figures else []
    if len(data.skip):
        out += ["## Early exit that skips compute", "",
                "`ouro-lab eval CKPT infer.exit_rule=R infer.exit_threshold=X`, every such evaluation in the "
                "experiment: skip semantics (an exited token is no longer computed; later loops read its keys and "
                "values as of its exit step) next to selection semantics (the same rule, all T steps computed) and "
                "full depth. MFLOPs per token are the executed ones; seconds are forward wall time.", "",
                _markdown_table(skip_table(data.skip), ".4g"), ""]
    if len(data.skip_frontier):
        gaps, by_level = skip_frontier_tables(data, epsilon, data.metric_kind)
        out += ["## Skip frontier: which exited_kv keeps selection's accuracy", "",
                "`ouro-lab eval CKPT infer.exit_rule=q infer.frontier=true`: the rule at each threshold of its "
                "`eval.exit_*` list, in skip semantics for each `exited_kv` (what later tokens read from an exited "
                "token: `frozen` its keys/values of its exit step, `propagate` each layer's projections of its exit "
                "state, `first` those of step 1), next to selection semantics (every step computed) and full depth. "
                f"At the threshold where selection stays within {epsilon:g} of full depth with the fewest loops: "
                "each variant's value, its gap to selection, whether it stays within epsilon of full depth, and the "
                "executed FLOPs it saves against full depth; then each variant's cheapest point within epsilon.", "",
                _markdown_table(gaps, ".4g"), ""]
        out += ["![skip frontier](skip_frontier.png)", ""] if "skip_frontier.png" in figures else []
        if len(by_level):
            out += [f"Where the gap sits: skip - select by {data.difficulty_name}, at the same threshold.", "",
                    _markdown_table(by_level, ".4f"), ""]
    out += _bench_markdown(data.bench, figures)
    if "optuna_history.png" in figures:
        out += ["## The sweep", "",
                f"Objective `{data.objective_metric}` ({data.direction}); trials: "
                + ", ".join(f"{k} {v}" for k, v in data.trials["state"].value_counts().sort_index().items()) + ".", ""]
        if importances:
            out += ["fANOVA importance (Optuna's `FanovaImportanceEvaluator`, seed 0):", "",
                    _markdown_table(pd.DataFrame({"param": list(importances), "importance": list(importances.values())})), "",
                    "![importance](optuna_importance.png)", ""]
        out += ["![history](optuna_history.png)", ""]
    return "\n".join(out) + "\n"
