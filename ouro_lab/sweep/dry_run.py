"""`ouro-lab sweep ... --dry-run`: what a sweep would do, touching nothing."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from ouro_lab.sweep.adaptive import bound, start_points
from ouro_lab.sweep.budget import budget
from ouro_lab.sweep.design import scale_of
from ouro_lab.sweep.schema import SweepConfig, grid_values, load_sweep, override_for


def _point_text(sweep: SweepConfig, point: dict[str, Any]) -> str:
    """'model.loops=4 recipe=huginn (model.prelude_layers=1 ...)' for the dry run."""
    return " ".join(f"{k}={v} ({' '.join(sweep.bundles[k][str(v)]) or 'no overrides'})" if k in sweep.bundles
                    else override_for(k, v) for k, v in point.items())


def describe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """`ouro-lab sweep ... --dry-run`: the validated sweep, the trials it would run (the grid's
    points, or the search space and budget) and the state of its study, touching nothing."""
    sweep, base = load_sweep(path, overrides)
    total = budget(sweep)
    lines = [f"sweep {sweep.name!r} ({path}) is valid: base {base}, objective {sweep.objective.direction} "
             f"{sweep.objective.metric}; {total} trial(s) x {sweep.seeds} seed(s) = {total * sweep.seeds} training "
             f"run(s) (fewer where an identical run is reused)"]
    if sweep.overrides:
        lines.append(f"fixed overrides: {' '.join(sweep.overrides)}")
    if sweep.sampler.name == "grid":
        points = list(itertools.product(*(grid_values(spec) for spec in sweep.params.values())))
        lines.append(f"grid sampler (seed {sweep.sampler.seed}; visits its points in a shuffled order), {len(points)} points:")
        lines += [f"  {_point_text(sweep, dict(zip(sweep.params, point)))}" for point in points[:total]]
    elif sweep.sampler.name == "adaptive":
        d, (key, spec) = sweep.design, next(iter(sweep.params.items()))
        best = bound(scale_of(d, sweep.objective.metric), sweep.objective.direction)
        start = ", ".join(f"T={p.loops} seed {p.seed}"
                          for p in start_points(spec.choices, d.max_seeds, bounded=best is not None))
        if best is not None:
            start += f" (a larger T only while the bound of {best:g} leaves room for a gain of epsilon)"
        lines.append(f"adaptive design over {key} {list(spec.choices)}, up to {d.max_seeds} seed(s) per T (at most "
                     f"{total} runs): starts with {start}, then trains the point that most narrows the saturation "
                     f"answer (epsilon {d.epsilon:g}) per unit cost, until every T* interval ({d.level:.0%}) is at "
                     f"most {d.tolerance:g} step(s) of the choices wide"
                     + ("; the design's pruner stops a run whose result cannot change the answer"
                        if sweep.pruner.get("name") == "design" else ""))
    else:
        lines.append(f"{sweep.sampler.name} sampler (seed {sweep.sampler.seed}) over:")
        for key, spec in sweep.params.items():
            space = (f"choices {list(spec.choices)}" if spec.choices is not None else
                     f"[{spec.low}, {spec.high}]" + (" log" if spec.log else "") + (f" step {spec.step}" if spec.step else ""))
            lines.append(f"  {key}: {space}")
    if sweep.test_time_run:
        choices = sweep.params["model.loops"].choices
        lines.append(f"then one test-time run: looped, T={max(choices)}, each batch at a depth drawn from "
                     f"[{min(choices)}, {max(choices)}], evaluated at every t")
    journal = Path(sweep.study_dir or Path("studies") / sweep.name) / "optuna.journal"
    where = sweep.storage or journal
    lines.append(f"study: {where} ({'exists: a run resumes it' if sweep.storage or journal.exists() else 'new'})")
    return "\n".join(lines)
