"""The loop recipes' table in docs/results/recipes.md: Ouro, additive, Huginn and Parcae loops
at T = 2 and 4 on the default `state` task, evaluated out to T + 4 loop steps, with the
saturating law fitted per recipe and T, from `sweeps/recipes.yaml`.

    python benchmarks/recipes_study.py [--out runs/recipes_study] [--page docs/results/recipes.md]

Runs the sweep in `--out` (a finished study is read back, an interrupted one resumes), prints
the table and rewrites it between the page's markers (`recipes-table`) with its provenance:
the commit and machine the runs were trained at (their MLflow tags). `--set KEY=VALUE` passes
sweep overrides (a smaller study: `--set train.max_steps=60`); the page is then left alone
unless `--page` is given.

"past T" says, by a fixed rule on the seed means m(t) with ε = 0.01, what evaluating past the
trained T does: "flat" (every later step within ε of m(T)), "gains, then flat" (the best step
is past T and the last within ε of it), "gains, then decays" (the best step is past T, the last
more than ε below it), "decays" (the best step is at most T and the last more than ε below m(T)).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from results_page import study_main  # noqa: E402

from ouro_lab.analysis.law import law_table  # noqa: E402

EPSILON = 0.01


def past_t(m, trained: int) -> str:
    """What the steps past the trained T do to the seed-mean curve m (indexed by step)."""
    after = m[m.index > trained]
    if after.empty:
        return "-"
    at_t, best_t, last = m.loc[trained], int(m.idxmax()), m.iloc[-1]
    if (after - at_t).abs().max() <= EPSILON:
        return "flat"
    if best_t > trained:
        return "gains, then flat" if last >= m.max() - EPSILON else f"gains to t={best_t}, then decays"
    return "decays" if last < at_t - EPSILON else "mixed"


def table(data, split: str = "test") -> list[str]:
    """One row per recipe x trained T (the sweep's recipe order)."""
    from mlflow.tracking import MlflowClient

    steps = data.steps
    s = steps[(steps["split"] == split) & (steps["arch"] == "looped") & (steps["difficulty"] == "all")]
    s = s.merge(data.runs[["run_id", "recipe"]], on="run_id")  # (the bundle's name: a run column only)
    laws = law_table(data, epsilon=EPSILON, split=split)
    laws = laws[laws["over"] == "step"].set_index(["group", "loops"])["fit"]
    client = MlflowClient(data.tracking_uri)
    seconds = {}
    for run_id, recipe, loops in data.runs[["run_id", "recipe", "loops"]].itertuples(index=False):
        info = client.get_run(run_id).info
        seconds[(recipe, loops)] = seconds.get((recipe, loops), 0.0) + (info.end_time - info.start_time) / 1000
    order = list(data.sweep.get("params", {}).get("recipe", {}).get("choices", sorted(s["recipe"].unique())))
    lines = ["| recipe | T | acc at T (per seed) | acc at 2T | best t (acc) | at T+4 | past T | "
             "law: within ε by | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for recipe in order:
        for loops in sorted(s[s["recipe"] == recipe]["loops"].unique()):
            g = s[(s["recipe"] == recipe) & (s["loops"] == loops)]
            m = g.groupby("step")["acc"].mean()
            seeds = " / ".join(f"{v:.3f}" for v in g[g["step"] == loops].sort_values("seed")["acc"])

            def at(t: int) -> str:
                return f"{m.loc[t]:.3f}" if t in m.index else "-"

            group = g["group"].iloc[0]
            lines.append(f"| {recipe} | {loops} | {m.loc[loops]:.3f} ({seeds}) | {at(2 * loops)} | "
                         f"{int(m.idxmax())} ({m.max():.3f}) | {at(loops + 4)} | {past_t(m, loops)} | "
                         f"{laws.get((group, loops), '-')} | {seconds.get((recipe, loops), 0):.0f} |")
    return lines


def blocks(data, summary: str, block: list[str]) -> dict[str, list[str]]:
    return {"recipes-table": [summary + " wall s per row: the training time of its seeds.", "", *table(data), "", *block]}


if __name__ == "__main__":
    study_main(__doc__, "recipes.yaml", "docs/results/recipes.md", blocks)
