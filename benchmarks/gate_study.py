"""The gate study's table in docs/results/gate-study.md: exit prior x entropy weight beta x
Stage II off / on on the default `state` model, judged on the exit gate (test split): its
efficiency and the loops it needs within 0.01 of full depth, per seed, from `sweeps/gate.yaml`.

    python benchmarks/gate_study.py [--out runs/gate_study] [--page docs/results/gate-study.md]

Runs the sweep in `--out` (a finished study is read back, an interrupted one resumes), prints
the table and rewrites it between the page's markers (`gate-table`) with its provenance: the
commit and machine the runs were trained at (their MLflow tags). `--set KEY=VALUE` passes sweep
overrides (a smaller study: `--set train.max_steps=60`); the page is then left alone unless
`--page` is given.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from results_page import study_main  # noqa: E402


PRIOR, BETA, STAGE2 = "objective.prior", "objective.entropy_weight", "stage2.steps"


def table(data, split: str = "test") -> list[str]:
    """One row per prior x beta: per seed, the gate's efficiency / loops within epsilon with
    Stage I only and after Stage II, and the accuracy at full depth (Stage I runs)."""
    gate = data.gate[data.gate["split"] == split]
    steps = data.steps
    full = steps[(steps["split"] == split) & (steps["step"] == steps["trained_loops"]) & (steps["difficulty"] == "all")]
    stage2 = sorted(gate[STAGE2].unique())
    loops = int(gate["loops"].iloc[0])

    def per_seed(frame, column: str, fmt: str) -> str:
        return ", ".join(format(v, fmt) for v in frame.sort_values("seed")[column]) or "-"

    head = ["prior", "beta", *[("Stage I only" if s == 0 else f"+ Stage II ({s} steps)") + ": efficiency / loops"
                                for s in stage2], f"{split} acc at t={loops}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (prior, beta), cell in gate.groupby([PRIOR, BETA], sort=True):
        cells = [str(prior), f"{beta:g}"]
        for s in stage2:
            runs = cell[cell[STAGE2] == s]
            cells.append(f"{per_seed(runs, 'gate_efficiency', '.2f')} / {per_seed(runs, 'gate_loops_at_eps', '.2f')}")
        stage1 = full[(full[PRIOR] == prior) & (full[BETA] == beta) & (full[STAGE2] == stage2[0])]
        cells.append(per_seed(stage1, "acc", ".3f"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def blocks(data, summary: str, block: list[str]) -> dict[str, list[str]]:
    return {"gate-table": [summary, "", *table(data), "", *block]}


if __name__ == "__main__":
    study_main(__doc__, "gate.yaml", "docs/results/gate-study.md", blocks)
