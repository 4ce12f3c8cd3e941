"""The early-exit frontier of the default `state` model over seeds, written into its results page.

Trains `conf/state.yaml` at each seed (the shipped config, test split), reads each run's
frontier from its test metrics, and rewrites the table between the markers of
`docs/results/frontier.md` with the seed mean and the min-max over seeds of every cell, and
its provenance block (command, commit, date, machine, torch threads, seeds).

    python benchmarks/frontier_table.py [--seeds 0 1 2] [--out runs/frontier] [--page docs/results/frontier.md]

About 2.5 minutes per seed on 2 CPU cores. A seed already trained in `--out` is read back, not
trained again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ouro_lab import metric_names as names  # noqa: E402
from ouro_lab import run_record as rr  # noqa: E402
from ouro_lab.config import load_config  # noqa: E402
from results_page import provenance, rewrite  # noqa: E402

ROWS = [  # (row label, rule, thresholds shown)
    ("q-exit", "q", [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 0.9]),
    ("confidence", "conf", [0.5, 0.8, 0.9, 0.95, 0.99]),
    ("step-change", "change", [0.3, 0.1, 0.01, 0.001]),
]


def run_seed(seed: int, out: Path) -> tuple[dict[str, float], str]:
    """The test metrics of `conf/state.yaml` at this seed (trained once; read back after), and
    the commit it was trained at."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{out / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("frontier")
    if experiment is not None:
        done = client.search_runs([experiment.experiment_id], f"tags.`ouro.seed` = '{seed}' and "
                                  "attributes.status = 'FINISHED'")
        if done:
            from ouro_lab.tracking import read_metrics

            return ({k: v for k, v in read_metrics(client, done[0]).items() if k.startswith("test/")},
                    done[0].data.tags.get(rr.GIT_COMMIT, "not recorded"))
    from ouro_lab.train import train

    cfg = load_config(ROOT / "conf" / "state.yaml", [f"train.seed={seed}", f"tracking.uri={uri}",
                                                     "tracking.experiment=frontier", f"tracking.output_dir={out}",
                                                     "train.progress_bar=false"])
    print(f"[frontier] training conf/state.yaml seed {seed}", flush=True)
    result = train(cfg, verbose=False)
    return result.test, client.get_run(result.run_id).data.tags.get(rr.GIT_COMMIT, "not recorded")


def cell(values: list[float], digits: int) -> str:
    """'0.848 (0.81-0.86)': the seed mean and the min-max over seeds."""
    v = np.asarray(values)
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ({v.min():.{digits}f}-{v.max():.{digits}f})"


def table(runs: list[dict[str, float]]) -> list[str]:
    def get(name: str) -> list[float]:
        return [r[f"test/{name}"] for r in runs]

    loops = int(load_config(ROOT / "conf" / "state.yaml").model.loops)
    lines = ["| rule | threshold | mean loops | accuracy |", "|---|---|---|---|",
             f"| fixed depth | t={loops} (full depth) | {loops} | {cell(get(names.final('acc')), 3)} |"]
    for label, rule, thresholds in ROWS:
        for x in thresholds:
            lines.append(f"| {label} | {x:g} | {cell(get(names.exit_rule(rule, x, 'loops')), 2)} | "
                         f"{cell(get(names.exit_rule(rule, x, 'acc')), 3)} |")
    for label, which in (("answer-stable oracle", "stable"), ("first-right oracle", "right")):
        lines.append(f"| {label} | - | {cell(get(names.oracle(which, 'loops')), 2)} | "
                     f"{cell(get(names.oracle(which, 'acc')), 3)} |")
    lines.append(f"| the gate's efficiency (`gate_efficiency`) | - | - | {cell(get('gate_efficiency'), 2)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "frontier")
    parser.add_argument("--page", type=Path, default=ROOT / "docs" / "results" / "frontier.md")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs, commits = zip(*(run_seed(s, args.out.resolve()) for s in args.seeds))
    block = [*table(list(runs)), "",
             *provenance(f"python benchmarks/frontier_table.py --seeds {' '.join(map(str, args.seeds))}",
                         f"{', '.join(map(str, args.seeds))} (cells: seed mean (min-max))", set(commits))]
    print("\n".join(block))
    rewrite(args.page, "frontier_table.py", block)
    print(f"[frontier] wrote the table into {args.page}", flush=True)


if __name__ == "__main__":
    main()
