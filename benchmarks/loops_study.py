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

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from results_page import provenance, rewrite  # noqa: E402

from ouro_lab import run_record as rr  # noqa: E402
from ouro_lab.analysis import load_study  # noqa: E402
from ouro_lab.sweep import run_sweep  # noqa: E402

ARCHS = (("looped", "looped"), ("param_matched", "param-matched"), ("depth_matched", "depth-matched"))
LENGTH = "data.state.length"


def run(out: Path, sets: list[str]) -> tuple[str, float]:
    """Run (or resume, or find finished) the sweep in `out`; its name and wall seconds (measured
    by the first call that ran it to the end, kept in out/wall.json)."""
    out.mkdir(parents=True, exist_ok=True)
    wall_file = out / "wall.json"
    here = os.getcwd()
    os.chdir(out)  # (the sweep's default store and journal: the working directory)
    try:
        start = time.perf_counter()
        summary = run_sweep(ROOT / "sweeps" / "loops.yaml", sets, verbose=True)
        seconds = time.perf_counter() - start
    finally:
        os.chdir(here)
    walls = json.loads(wall_file.read_text()) if wall_file.exists() else {}
    if summary.name not in walls or seconds > 60:  # (a rerun of a finished study takes seconds: keep the first)
        walls[summary.name] = seconds
        wall_file.write_text(json.dumps(walls, indent=1))
    return summary.name, walls[summary.name]


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "loops_study")
    parser.add_argument("--page", type=Path, default=None,
                        help="the page to rewrite (default: docs/results/loops-study.md, unless --set is given)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a sweep override")
    args = parser.parse_args()
    page = args.page or (None if args.set else ROOT / "docs" / "results" / "loops-study.md")
    name, wall = run(args.out, args.set)
    data = load_study(name, f"sqlite:///{(args.out / 'mlflow.db').resolve()}")
    runs = load_runs_tags(data)
    commits = {tags[rr.GIT_COMMIT][:7] + (" (with uncommitted changes)" if tags.get(rr.GIT_DIRTY) == "True" else "")
               for tags in runs if tags.get(rr.GIT_COMMIT)}
    machines = {tags.get(rr.MACHINE) for tags in runs if tags.get(rr.MACHINE)}
    seeds = ", ".join(str(s) for s in sorted(data.runs["seed"].unique()))
    command = "python benchmarks/loops_study.py" + "".join(f" --set {s}" for s in args.set)
    by_length = tables(data)
    wall_line = [f"The sweep: {len(data.trials)} trials x {len(seeds.split(','))} seeds, {len(data.runs)} runs "
                 f"(the reused param-matched ones included), **{wall:.0f} s wall ({wall / 60:.0f} min)** on "
                 f"{'; '.join(sorted(machines)) or 'this machine'}."]
    for length, lines in by_length.items():
        print("\n".join(lines) + "\n")
    print(wall_line[0])
    if page is None:
        return
    block = provenance(command, seeds, commits, machines)
    for length, lines in by_length.items():
        rewrite(page, f"loops-L{length}", [*lines, "", *block])
    rewrite(page, "loops-wall", wall_line)
    print(f"rewrote {page}")


def load_runs_tags(data) -> list[dict[str, str]]:
    """The tags of the study's training runs (their commit and machine)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(data.tracking_uri)
    return [client.get_run(run_id).data.tags for run_id in data.runs["run_id"]]


if __name__ == "__main__":
    main()
