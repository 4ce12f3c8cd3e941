"""The adaptive design (ouro_lab/sweep/adaptive.py) against the full grid on synthetic curves
with a known saturation point: no training, seconds. Prints one JSON line per (curve set,
tolerance, seed) and a summary per tolerance: whether the interval holds the true T*, and the
cost spent (a run at T costs T; the grid trains every T at max_seeds seeds).

    python benchmarks/adaptive_synthetic.py [--seeds 8] [--noise 0.004]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import numpy as np

from ouro_lab.saturation import saturation_point
from ouro_lab.sweep.adaptive import decide

TS = [1, 2, 3, 4, 5, 6, 7, 8]
CURVES = {  # name -> {curve: f(T)}
    "two levels": {"d1": lambda t: 0.95 - 0.5 * math.exp(-1.2 * t), "d2": lambda t: 0.9 - 0.6 * math.exp(-0.6 * t)},
    "plateau then gain": {"all": lambda t: 0.6 if t < 6 else 0.8},
    "never saturates": {"all": lambda t: 0.5 + 0.05 * t},
}


def run(curves, noise, seed, epsilon, tolerance, max_seeds):
    observations = {}
    while True:
        d = decide(observations, TS, epsilon=epsilon, tolerance=tolerance, max_seeds=max_seeds, seed=seed)
        if d.point is None:
            return d, observations
        rng = np.random.default_rng([seed, d.point.loops, d.point.seed])
        observations[d.point] = {c: f(d.point.loops) + noise * rng.standard_normal() for c, f in curves.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--noise", type=float, default=0.004)
    parser.add_argument("--epsilon", type=float, default=0.02)
    parser.add_argument("--max-seeds", type=int, default=3)
    args = parser.parse_args()
    grid = args.max_seeds * sum(TS)
    for tolerance in (0.0, 1.0, 2.0):
        held, costs = [], []
        for name, curves in CURVES.items():
            truth = {c: saturation_point({t: f(t) for t in TS}, args.epsilon) for c, f in curves.items()}
            for seed in range(args.seeds):
                d, obs = run(curves, args.noise, seed, args.epsilon, tolerance, args.max_seeds)
                ok = all(a.low <= (math.inf if truth[c] is None else truth[c]) <= a.high for c, a in d.answers.items())
                cost = sum(p.loops for p in obs)
                held.append(ok)
                costs.append(cost / grid)
                print(json.dumps({"curves": name, "tolerance": tolerance, "seed": seed, "truth": truth,
                                  "answer": {c: str(a) for c, a in d.answers.items()}, "holds_truth": ok,
                                  "runs": len(obs), "cost": cost, "grid_cost": grid, "stop": d.reason}))
        print(json.dumps({"summary": True, "tolerance": tolerance, "intervals_holding_truth": f"{sum(held)}/{len(held)}",
                          "mean_cost_vs_grid": round(statistics.fmean(costs), 3),
                          "max_cost_vs_grid": round(max(costs), 3)}))


if __name__ == "__main__":
    main()
