"""The adaptive design against the full grid on real studies, from the same seeds.

For each study below it trains the looped model's grid over T (every T at every seed, the
study's own settings), then the grid study's one test-time run (`test_time_run=true`: one
random-depth run evaluated at every t), and the adaptive design over the same T's and seeds
(`sampler.name: adaptive`, `design.max_seeds` = the grid's seeds, `pruner.name: design`), then
prints one table: T* per curve with its interval from each, the training FLOPs and the wall
time of each.

    python benchmarks/adaptive_vs_grid.py [STUDY ...] [--out runs/adaptive_vs_grid] [--stage grid|adaptive|table]
        [--page docs/results/adaptive.md]

STUDY: loops-L8, loops-L12 (`sweeps/loops.yaml`, looped arch, one sequence length each),
multihop (`sweeps/loops_multihop.yaml`, looped arch); default all three. A sweep that already
finished in `--out` is not trained again (its wall time is kept in `walls.json`), so the table
can be rebuilt, and a killed run resumed, by running the same command.

The grid's answer is the design's own rule (`sweep.adaptive.decide`) over every grid run: the
same uncertainty measure, so "agrees within the grid's interval" compares like with like. The
replay column runs the design again on the grid's runs (training is deterministic on one
machine, so a point the design trains has the grid run's value): it must ask for the very
points the real adaptive sweep trained, and it measures the design at other tolerances without
training anything.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ouro_lab.analysis import load_study  # noqa: E402
from ouro_lab.analysis.design import design_view, observations  # noqa: E402
from ouro_lab.sweep.adaptive import Point  # noqa: E402
from ouro_lab.sweep.design import decide_with  # noqa: E402
from ouro_lab.run_record import GIT_COMMIT  # noqa: E402
from ouro_lab.sweep.schema import DesignSpec  # noqa: E402
from results_page import provenance, rewrite  # noqa: E402

STUDIES = {  # name -> (sweep file, fixed overrides)
    "loops-L8": ("sweeps/loops.yaml", ["model.arch=looped", "data.state.length=8"]),
    "loops-L12": ("sweeps/loops.yaml", ["model.arch=looped", "data.state.length=12"]),
    "multihop": ("sweeps/loops_multihop.yaml", ["model.arch=looped"]),
}
LOOP_KEY = "model.loops"


def sweep_files(name: str, out: Path) -> dict[str, Path]:
    """The grid and adaptive sweep YAMLs of a study, written into `out` from the shipped file."""
    source, extra = STUDIES[name]
    raw = yaml.safe_load((ROOT / source).read_text())
    seeds = int(raw.get("seeds", 1))
    common = {"base": str((ROOT / source).parent / raw["base"]), "objective": raw["objective"],
              "overrides": [*raw.get("overrides", []), *extra, f"tracking.output_dir={out / 'outputs'}"],
              "params": {LOOP_KEY: raw["params"][LOOP_KEY]}, "pruner": {"name": "none"},
              "study_dir": str(out / "studies"), "tracking_uri": f"sqlite:///{out / 'mlflow.db'}"}
    files = {}
    for kind, extra_keys in (("grid", {"sampler": {"name": "grid", "seed": 0}, "seeds": seeds}),
                             ("adaptive", {"sampler": {"name": "adaptive", "seed": 0}, "seeds": 1,
                                           "design": {"max_seeds": seeds}, "pruner": {"name": "design"}})):
        path = out / f"{name}-{kind}.yaml"
        path.write_text(yaml.safe_dump({"name": f"{name}-{kind}", **common, **extra_keys}, sort_keys=False))
        files[kind] = path
    return files


def run_sweep(path: Path, walls: dict, out: Path, extra: tuple[str, ...] = (), name: str = "") -> None:
    name = name or path.stem
    if name in walls:
        print(f"[bench] {name}: done before ({walls[name]:.0f} s), not trained again", flush=True)
        return
    print(f"[bench] {name}: ouro-lab sweep {path} {' '.join(extra)}", flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ouro_lab.cli", "sweep", str(path), *extra], check=True, cwd=ROOT)
    walls[name] = time.perf_counter() - start
    (out / "walls.json").write_text(json.dumps(walls, indent=1))


def replay(spec: DesignSpec, candidates, metric, direction, grid_obs):
    """The design's points and answer when every point it asks for has the grid run's value."""
    seen: dict[Point, dict[str, float]] = {}
    while True:
        d = decide_with(spec, candidates, metric, direction, 0, seen)
        if d.point is None or d.point not in grid_obs:
            return d, list(seen)
        seen[d.point] = grid_obs[d.point]


def run_seconds(store: str, experiment: str, base_seed: int) -> dict[Point, float]:
    """Each grid run's own wall time (MLflow start to end), by (T, seed index)."""
    client = MlflowClient(store)
    exp = client.get_experiment_by_name(experiment)
    out = {}
    for r in client.search_runs([exp.experiment_id], "tags.`ouro.role` != 'study'", max_results=5000):
        p = r.data.params
        if LOOP_KEY in p and "train.seed" in p and r.info.end_time and r.data.tags.get("ouro.role") != "test_time":
            out[Point(int(p[LOOP_KEY]), int(p["train.seed"]) - base_seed)] = (r.info.end_time - r.info.start_time) / 1e3
    return out


VARIANTS = [  # (scale, confirm, tolerance): the default first
    ("logit", 2, 1.0), ("logit", 2, 0.0), ("logit", 2, 2.0), ("logit", 1, 1.0), ("raw", 2, 1.0), ("raw", 1, 1.0)]


def table(names: list[str], out: Path, walls: dict) -> list[str]:
    store = f"sqlite:///{out / 'mlflow.db'}"
    answers, costs = [], []
    for name in names:
        grid = load_study(f"{name}-grid", store)
        try:
            adaptive = load_study(f"{name}-adaptive", store)
        except Exception:  # (not run: the replay stands in for it)
            adaptive = None
        candidates = [int(c) for c in grid.sweep["params"][LOOP_KEY]["choices"]]
        base_seed = int(grid.runs["seed"].min())
        seeds = int(grid.sweep.get("seeds", 1))
        grid_obs = observations(grid, base_seed)
        metric, direction = grid.objective_metric, grid.direction
        flops = grid.runs.groupby("loops")["train_flops"].mean()
        grid_flops = float(grid.runs["train_flops"].sum())
        seconds = run_seconds(store, f"{name}-grid", base_seed)
        default = DesignSpec(max_seeds=seeds)
        grid_answer = decide_with(default, candidates, metric, direction, 0, grid_obs).answers
        costs.append(f"| {name} | full grid | {len(grid_obs)} | {grid_flops:.3g} (1.00) | "
                     f"{walls.get(f'{name}-grid', math.nan):.0f} | {len(grid_answer)}/{len(grid_answer)} |")
        if adaptive is not None:
            view = design_view(adaptive)
            got = view.decision.answers if view.decision else {}
            ok = sum(c in got and a.low <= got[c].point <= a.high for c, a in grid_answer.items())
            trained = set(observations(adaptive, base_seed))
            _, replayed = replay(DesignSpec(**(adaptive.sweep.get("design") or {})), candidates, metric, direction,
                                 grid_obs)
            costs.append(f"| {name} | adaptive sweep, real (defaults, pruner design) | {len(trained)} + "
                         f"{len(view.stopped)} stopped | {view.spent_flops:.3g} ({view.spent_flops / grid_flops:.2f}) | "
                         f"{walls.get(f'{name}-adaptive', math.nan):.0f} | {ok}/{len(grid_answer)} |")
            costs.append(f"| {name} | (its replay on the grid's runs trains "
                         f"{'the same points' if set(replayed) == trained else 'OTHER points'}) | | | | |")
            for c, a in grid_answer.items():
                answers.append(f"| {name} | {c} | {a} | {got.get(c)} | "
                               f"{'yes' if c in got and a.low <= got[c].point <= a.high else 'NO'} |")
        for scale, confirm, tol in VARIANTS:
            spec = DesignSpec(max_seeds=seeds, scale=scale, confirm=confirm, tolerance=tol)
            d, pts = replay(spec, candidates, metric, direction, grid_obs)
            spent = sum(float(flops[p.loops]) for p in pts)
            wall = sum(seconds.get(p, math.nan) for p in pts)
            ok = sum(c in d.answers and a.low <= d.answers[c].point <= a.high for c, a in grid_answer.items())
            costs.append(f"| {name} | replay: scale {scale}, confirm {confirm}, tolerance {tol:g} | {len(pts)} | "
                         f"{spent:.3g} ({spent / grid_flops:.2f}) | ~{wall:.0f} (its runs' own time) | "
                         f"{ok}/{len(grid_answer)} |")
            if adaptive is None and (scale, confirm, tol) == VARIANTS[0]:
                for c, a in grid_answer.items():
                    answers.append(f"| {name} | {c} | {a} | {d.answers.get(c)} (replay) | "
                                   f"{'yes' if c in d.answers and a.low <= d.answers[c].point <= a.high else 'NO'} |")
        if not grid.test_time_runs.empty:
            one = float(grid.test_time_runs["train_flops"].sum())
            costs.append(f"| {name} | one test-time run (random depth, evaluated at every t) | 1 | "
                         f"{one:.3g} ({one / grid_flops:.2f}) | {walls.get(f'{name}-test-time', math.nan):.0f} "
                         "(the rerun that trains it) | - |")
    return [
        "T* per curve (the design's own rule on every grid run, and the adaptive design's answer):", "",
        "| study | curve | grid: T* [interval] | adaptive: T* [interval] | adaptive T* in the grid's interval |",
        "|---|---|---|---|---|", *answers, "",
        "What each costs (curves: how many of the adaptive answers lie in the grid's interval):", "",
        "| study | design | runs | training FLOPs (share of the grid) | wall s | curves |", "|---|---|---|---|---|---|",
        *costs]


def run_commits(out: Path, names: list[str]) -> set[str]:
    """The commits the studies' runs were trained at (their MLflow git tag)."""
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    found = set()
    for name in names:
        for kind in ("grid", "adaptive"):
            exp = client.get_experiment_by_name(f"{name}-{kind}")
            if exp is not None:
                found |= {r.data.tags[GIT_COMMIT] for r in client.search_runs([exp.experiment_id], max_results=5000)
                          if GIT_COMMIT in r.data.tags}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("studies", nargs="*", choices=[*STUDIES, []], help="default: all")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "adaptive_vs_grid")
    parser.add_argument("--stage", choices=["grid", "adaptive", "table", "all"], default="all",
                        help="grid: the grid and its test-time run; adaptive: the adaptive design; table: print it")
    parser.add_argument("--page", type=Path, default=None,
                        help="a results page to write the tables into, between its adaptive_vs_grid.py markers "
                             "(docs/results/adaptive.md)")
    args = parser.parse_args()
    args.studies = args.studies or list(STUDIES)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    walls = json.loads((out / "walls.json").read_text()) if (out / "walls.json").exists() else {}
    for name in args.studies:
        files = sweep_files(name, out)
        for kind in ("grid", "adaptive"):
            if args.stage in (kind, "all"):
                run_sweep(files[kind], walls, out)
        if args.stage in ("grid", "all"):  # the grid study again: it trains the test-time run alone
            run_sweep(files["grid"], walls, out, ("test_time_run=true",), f"{name}-test-time")
    if args.stage in ("table", "all"):
        block = [*table(args.studies, out, walls), "",
                 *provenance(f"python benchmarks/adaptive_vs_grid.py {' '.join(args.studies)} --out {args.out}",
                             "train.seed + 0..max_seeds-1 (0, 1, 2 on the loops studies; 0, 1 on multihop)",
                             run_commits(out, args.studies))]
        print("\n".join(block))
        if args.page:
            rewrite(args.page, "adaptive_vs_grid.py", block)
            print(f"[bench] wrote the tables into {args.page}", flush=True)


if __name__ == "__main__":
    main()
