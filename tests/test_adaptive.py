"""The adaptive design over T (ouro_lab/sweep/adaptive.py) on synthetic objectives: a known
function of T plus seeded noise, no training."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from ouro_lab.saturation import saturation_point, saturation_points
from ouro_lab.sweep.adaptive import Point, decide, start_points

TS = [1, 2, 3, 4, 5, 6, 7, 8]
GRID_COST = 3 * sum(TS)  # every T at 3 seeds, a run costing T


def run_design(curves, noise: float, seed: int = 0, epsilon: float = 0.02, **kw):
    """Ask, train (evaluate the curves with seeded noise), tell, until the design stops."""
    observations, asked = {}, []
    while True:
        decision = decide(observations, TS, epsilon=epsilon, seed=seed, **kw)
        if decision.point is None:
            return decision, observations, asked
        p = decision.point
        assert p not in observations  # never the same point twice
        asked.append(p)
        rng = np.random.default_rng([seed, p.loops, p.seed])
        observations[p] = {name: f(p.loops) + noise * rng.standard_normal() for name, f in curves.items()}


def test_the_vectorised_saturation_point_is_the_scalar_one():
    rng = np.random.default_rng(0)
    for k in (1, 2, 3, 8):
        loops = sorted(rng.choice(np.arange(1, 20), k, replace=False).tolist())
        means = rng.normal(size=(300, k)).cumsum(1) * 0.01
        for direction in ("maximize", "minimize"):
            scalar = [saturation_point(dict(zip(loops, row)), 0.01, direction) for row in means]
            assert saturation_points(means, loops, 0.01, direction).tolist() == \
                [math.inf if s is None else s for s in scalar]


def test_the_design_finds_a_known_saturation_point_for_less_than_the_grid():
    curves = {"d1": lambda t: 0.95 - 0.5 * math.exp(-1.2 * t), "d2": lambda t: 0.9 - 0.6 * math.exp(-0.6 * t)}
    truth = {name: saturation_point({t: f(t) for t in TS}, 0.02) for name, f in curves.items()}
    assert truth == {"d1": 3, "d2": 6}
    costs = []
    for seed in range(3):
        decision, observations, _ = run_design(curves, noise=0.004, seed=seed)
        for name, answer in decision.answers.items():
            assert answer.low <= truth[name] <= answer.high and answer.steps <= 1, (seed, name, str(answer))
        costs.append(sum(p.loops for p in observations))
    assert sum(costs) / len(costs) < 0.75 * GRID_COST and min(costs) < GRID_COST / 2, costs


def test_a_plateau_that_gains_again_is_not_taken_for_saturation():
    """Flat from T=1 to 5, a gain at 6: the start sees the gain at T=8, and the answer must rest
    on trained T's (T=5 and 6 trained), not on a prediction between them."""
    decision, observations, _ = run_design({"all": lambda t: 0.6 if t < 6 else 0.8}, noise=0.004)
    answer = decision.answers["all"]
    assert answer.low <= 6 <= answer.high and answer.low > 2, str(answer)
    assert {Point(5, 0), Point(6, 0)} <= set(observations)
    assert sum(p.loops for p in observations) < GRID_COST / 2


def test_the_same_seed_asks_for_the_same_points_and_a_resume_asks_for_the_next_one():
    curves = {"all": lambda t: 0.9 - 0.6 * math.exp(-0.8 * t)}
    _, observations, asked = run_design(curves, noise=0.004, seed=1)
    assert run_design(curves, noise=0.004, seed=1)[2] == asked
    assert asked[:4] == start_points(TS)
    # a study resumed after its fifth point: the decision depends on the finished points alone
    finished = {p: observations[p] for p in asked[:5]}
    assert decide(dict(reversed(list(finished.items()))), TS, epsilon=0.02, seed=1).point == asked[5]


def test_the_design_stops_at_its_budget_and_when_no_point_is_left():
    curves = {"all": lambda t: 0.9 - 0.6 * math.exp(-0.8 * t)}
    decision, observations, _ = run_design(curves, noise=0.004, budget=20)
    assert decision.reason.startswith("budget spent") and decision.spent >= 20
    assert sum(p.loops for p in observations) - max(p.loops for p in observations) < 20  # stopped at once
    decision, observations, _ = run_design(curves, noise=0.05, tolerance=0, max_seeds=1)
    assert decision.reason.startswith("no point left") and len(observations) == len(TS)


@pytest.mark.parametrize("seed", [0, 1])
def test_each_decision_says_why_and_gives_the_answer_so_far(seed):
    curves = {"all": lambda t: 0.9 - 0.6 * math.exp(-0.8 * t)}
    rng = np.random.default_rng(seed)
    observations = {p: {"all": curves["all"](p.loops) + 0.01 * rng.standard_normal()} for p in start_points(TS)}
    decision = decide(observations, TS, epsilon=0.02, seed=seed)
    assert decision.point is not None and decision.point not in observations
    assert f"T={decision.point.loops}" in decision.reason and "expected entropy drop" in decision.reason
    assert set(decision.scores) >= {decision.point} and decision.scores[decision.point] == max(decision.scores.values())
    assert "T=" in str(decision.answers["all"])


def _design_sweep(tmp_path, choices=(1, 2, 3, 4), max_seeds=2):
    from ouro_lab.sweep.schema import load_sweep

    root = Path(__file__).resolve().parents[1]
    path = tmp_path / "ad.yaml"
    path.write_text(f"base: {root / 'conf' / 'state.yaml'}\nstudy_dir: {tmp_path / 'studies' / 'ad'}\n"
                    f"tracking_uri: sqlite:///{tmp_path / 'mlflow.db'}\n"
                    "overrides: [model.d_model=32, model.n_heads=2, model.n_layers=1, data.state.length=8, "
                    "data.n_val=64, data.n_test=64, train.max_steps=20, train.warmup_steps=2, train.val_every=10]\n"
                    f"params:\n  model.loops: {{choices: {list(choices)}}}\n"
                    f"sampler: {{name: adaptive, seed: 0}}\ndesign: {{epsilon: 0.02, max_seeds: {max_seeds}}}\n")
    return path, load_sweep(path)[0]


def test_workers_asking_at_once_get_different_points(tmp_path):
    """A trial running elsewhere is a pending point: the next ask gets another one."""
    import optuna

    from ouro_lab.sweep.design import SEED_PARAM, DesignSampler

    _, sweep = _design_sweep(tmp_path)
    study = optuna.create_study(sampler=DesignSampler(sweep), direction="maximize")
    points = []
    for _ in range(6):  # none finishes: every earlier one is still running
        trial = study.ask()
        points.append((trial.suggest_categorical("model.loops", [1, 2, 3, 4]),
                       trial.suggest_categorical(SEED_PARAM, [0, 1])))
    assert len(set(points)) == 6 and points[:4] == [(p.loops, p.seed) for p in start_points([1, 2, 3, 4])]


def test_an_adaptive_sweep_trains_each_point_once_logs_why_and_resumes(tmp_path):
    """Real tiny models: every trial is a new (T, seed) with its reason on the study run; the
    summary states the answer; a rerun of the same command trains nothing more."""
    from mlflow.tracking import MlflowClient

    from ouro_lab.sweep import run_sweep

    path, _ = _design_sweep(tmp_path, choices=(1, 2), max_seeds=2)
    summary = run_sweep(path, [], verbose=False)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    trials = client.search_runs([summary.experiment_id], "tags.`ouro.role` = 'trial'")
    seen = [(r.data.params["model.loops"], r.data.params["train.seed"]) for r in trials]
    assert len(seen) == len(set(seen)) == summary.counts["COMPLETE"] >= 3
    assert {p[1] for p in seen} <= {"0", "1"}  # train.seed + design.seed
    logged = {a.path for a in client.list_artifacts(summary.parent_run_id, "design")}
    assert len([p for p in logged if "trial_" in p]) == len(seen)
    assert summary.answer.startswith("all T=") or summary.answer.startswith("all not saturated")
    again = run_sweep(path, [], verbose=False)
    assert again.counts == summary.counts and again.answer == summary.answer
    # the report recomputes the design's answer from the runs, and states what it spent
    from ouro_lab import analysis

    report = analysis.write_report(analysis.load_study("ad", str(tmp_path / "mlflow.db")), tmp_path / "report",
                                   n_boot=50, log=False)
    section = report.markdown.split("## Adaptive design")[1].split("\n## ")[0]
    assert f"trained {len(seen)} of the grid's 4 runs" in section and f"| all | {summary.answer.split(';')[0][len('all '):]} |" in section


def test_an_adaptive_sweep_that_cannot_work_is_refused_naming_each_field(tmp_path):
    from ouro_lab.config import ConfigError
    from ouro_lab.sweep.schema import load_sweep

    path, _ = _design_sweep(tmp_path)
    text = path.read_text().replace("model.loops: {choices: [1, 2, 3, 4]}", "model.loops: {choices: [1, 2.5]}")
    path.write_text(text.replace("design: {epsilon: 0.02, max_seeds: 2}", "design: {epsilon: 0, max_seeds: 0}\nseeds: 2"))
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    for field in ("params.model.loops: the adaptive design needs distinct int choices", "seeds: the adaptive design",
                  "design.epsilon: must be > 0", "design.max_seeds: must be >= 2"):
        assert field in str(err.value)


def test_the_answer_is_not_called_known_while_the_start_trains_elsewhere():
    """Four workers: (1, 0) finishes first, the rest of the start is still training."""
    pending = {Point(4, 0), Point(8, 0), Point(4, 1)}
    decision = decide({Point(1, 0): {"all": 0.5, "d1": math.nan}}, [1, 2, 4, 8], epsilon=0.02, pending=pending)
    assert decision.point is not None and decision.point not in pending and "the start is still training" in decision.reason
    assert set(decision.answers) == {"all"}  # a curve with no finite value is no curve


def test_pruned_crashed_and_queued_points_are_never_asked_again():
    import optuna

    from ouro_lab.sweep.design import SEED_PARAM, decision

    from ouro_lab.sweep.schema import DesignSpec, ParamSpec, SweepConfig

    sweep = SweepConfig(params={"model.loops": ParamSpec(choices=[1, 2, 3, 4])}, design=DesignSpec(max_seeds=2))
    sweep.sampler.name = "adaptive"
    study = optuna.create_study(direction="maximize")
    dists = {"model.loops": optuna.distributions.CategoricalDistribution([1, 2, 3, 4]),
             SEED_PARAM: optuna.distributions.CategoricalDistribution([0, 1])}
    for loops, seed, state in ((1, 0, "PRUNED"), (3, 0, "FAIL")):
        study.add_trial(optuna.trial.create_trial(params={"model.loops": loops, SEED_PARAM: seed}, distributions=dists,
                                                  state=getattr(optuna.trial.TrialState, state)))
    study.enqueue_trial({"model.loops": 4, SEED_PARAM: 0})  # a queued retry: fixed params, no params yet
    asked = decision(sweep, study.get_trials()).point
    assert asked not in {Point(1, 0), Point(3, 0), Point(4, 0)} and asked == Point(3, 1)
