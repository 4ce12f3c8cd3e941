"""The loops study's tables in docs/results/loops-study.md: the looped model against both
baselines over the trained T on `state` at L=8 and L=12, val accuracy at the trained T (mean ±
std over seeds, and the mean per position quarter), from `sweeps/loops.yaml` as shipped.

    python benchmarks/loops_study.py [--out runs/loops_study] [--page docs/results/loops-study.md]

Runs the sweep in `--out` (its MLflow store and journal there; a finished study is read back,
an interrupted one resumes), then rewrites the tables between the page's markers
(`loops-L8`, `loops-L12`, `loops-wall`) with their provenance: the commit and the machine the
runs were trained at (their MLflow tags). `--set KEY=VALUE` passes sweep overrides (a smaller
study to try the script: `--set seeds=1 --set 'params.model.loops.choices=[1,2]'`); the page is
then left alone unless `--page` is given.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from results_page import study_main  # noqa: E402

ARCHS = (("looped", "looped"), ("param_matched", "param-matched"), ("depth_matched", "depth-matched"))
LENGTH = "data.state.length"


def tables(data) -> dict[int, list[str]]:
    """Per sequence length: the markdown table of val accuracy at the trained T."""
    steps = data.steps
    final = steps[(steps["split"] == "val") & (steps["step"] == steps["trained_loops"])]
    seeds = sorted(final["seed"].unique())
    out = {}
    for length, by_length in final.groupby(LENGTH):
        levels = sorted(d for d in by_length["difficulty"].unique() if d != "all")
        lines = [f"**L={length}**: val/acc_final mean ± std over {len(seeds)} seeds "
                 f"(per position quarter {'/'.join(levels)}: means)", "",
                 "| T | " + " | ".join(label for _, label in ARCHS) + " |", "|---|" + "---|" * len(ARCHS)]
        for loops in sorted(by_length["loops"].unique()):
            cells = []
            for arch, _ in ARCHS:
                rows = by_length[(by_length["arch"] == arch) & (by_length["loops"] == loops)]
                every = rows[rows["difficulty"] == "all"]["acc"]
                if every.empty:
                    cells.append("-")
                    continue
                quarters = "/".join(f"{rows[rows['difficulty'] == d]['acc'].mean():.2f}" for d in levels)
                std = every.std(ddof=1) if len(every) > 1 else float("nan")
                cells.append(f"{every.mean():.3f} ± {std:.3f} ({quarters})")
            lines.append(f"| {loops} | " + " | ".join(cells) + " |")
        out[int(length)] = lines
    return out


def blocks(data, summary: str, block: list[str]) -> dict[str, list[str]]:
    out = {"loops-wall": [f"The sweep: {summary.rstrip('.')}; the runs include the reused param-matched ones."]}
    out |= {f"loops-L{length}": [*lines, "", *block] for length, lines in tables(data).items()}
    return out


if __name__ == "__main__":
    study_main(__doc__, "loops.yaml", "docs/results/loops-study.md", blocks)
