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


def test_an_accuracy_within_epsilon_of_1_needs_no_larger_t_and_one_below_it_does():
    """On the logit scale an accuracy is bounded by 1: a T whose accuracy is within epsilon of 1
    is saturated whatever a larger T would give, so the largest T (8, a third of a grid seed's
    cost here) is never trained; a plateau below 1 leaves room for a gain, which is looked for."""
    saturates = {"all": lambda t: min(0.999, 0.5 + 0.17 * t)}  # 0.67 0.84 0.999 ...: T* = 3
    for seed in (0, 1):
        decision, observations, asked = run_design(saturates, noise=0.001, seed=seed, scale="logit")
        assert asked[:3] == start_points(TS, 3, bounded=True) and Point(8, 0) not in asked[:3]
        assert decision.answers["all"].low <= 3 <= decision.answers["all"].high, str(decision.answers["all"])
        assert max(p.loops for p in observations) < 8, sorted(observations)
        # the same curve on the raw scale: no bound, so the start trains the largest T
        assert Point(8, 0) in run_design(saturates, noise=0.001, seed=seed, scale="raw")[1]
    plateau = {"all": lambda t: 0.6 if t < 6 else 0.8}
    decision, observations, _ = run_design(plateau, noise=0.004, scale="logit")
    answer = decision.answers["all"]
    assert answer.low <= 6 <= answer.high and {Point(5, 0), Point(6, 0)} <= set(observations), str(answer)


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
    # (val/acc_final is an accuracy: bounded by 1, so the start leaves out the largest T)
    assert len(set(points)) == 6 and points[:3] == [(p.loops, p.seed) for p in start_points([1, 2, 3, 4], 2, True)]


def test_an_adaptive_sweep_trains_each_point_once_logs_why_and_resumes(tmp_path):
    """Real tiny models: every trial is a new (T, seed) with its reason on the study run; the
    summary states the answer; a rerun of the same command trains nothing more."""
    from mlflow.tracking import MlflowClient

    from ouro_lab.sweep import run_sweep

    path, _ = _design_sweep(tmp_path, choices=(1, 2), max_seeds=2)
    path.write_text(path.read_text() + "test_time_run: true\n")
    summary = run_sweep(path, [], verbose=False)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    trials = client.search_runs([summary.experiment_id], "tags.`ouro.role` = 'trial'")
    seen = [(r.data.params["model.loops"], r.data.params["train.seed"]) for r in trials]
    assert len(seen) == len(set(seen)) == summary.counts["COMPLETE"] >= 3
    assert {p[1] for p in seen} <= {"0", "1"}  # train.seed + design.seed
    logged = {a.path for a in client.list_artifacts(summary.parent_run_id, "design")}
    assert len([p for p in logged if "trial_" in p]) == len(seen)
    assert summary.answer.startswith("all T=") or summary.answer.startswith("all not saturated")
    import optuna

    from ouro_lab.sweep.design import CURVE_STEPS_ATTR

    study = optuna.load_study(study_name="ad", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "studies" / "ad" / "optuna.journal"))))
    for t in study.get_trials(states=[optuna.trial.TrialState.COMPLETE]):  # learning curves, for the design's pruner
        assert sorted(t.user_attrs[CURVE_STEPS_ATTR], key=int) == ["10", "20"]
        assert t.user_attrs[CURVE_STEPS_ATTR]["20"] == t.user_attrs["curves"] and t.user_attrs["last_step"] == 20
        per_token = client.get_run(t.user_attrs["mlflow_run_id"]).data.metrics["model/train_flops_per_token"]
        assert t.user_attrs["train_flops"] == pytest.approx(per_token * 64 * 8 * 20)  # batch 64 x length 8 x 20 steps
    test_time = client.search_runs([summary.experiment_id], "tags.`ouro.role` = 'test_time'")
    assert len(test_time) == 1 and test_time[0].data.params["train.loops_sampling"] == "uniform"
    assert test_time[0].data.tags["mlflow.parentRunId"] == summary.parent_run_id
    again = run_sweep(path, [], verbose=False)
    assert again.counts == summary.counts and again.answer == summary.answer
    assert len(client.search_runs([summary.experiment_id], "tags.`ouro.role` = 'test_time'")) == 1  # not trained again
    # the report recomputes the design's answer from the runs, and states what it spent
    from ouro_lab import analysis

    data = analysis.load_study("ad", str(tmp_path / "mlflow.db"))
    assert test_time[0].info.run_id not in set(data.runs["run_id"])  # not one of the trained T's
    assert list(data.test_time_runs["run_id"]) == [test_time[0].info.run_id]
    report = analysis.write_report(data, tmp_path / "report", n_boot=50, log=False)
    section = report.markdown.split("## Adaptive design")[1].split("\n## ")[0]
    assert f"trained {len(seen)} of the grid's 4 runs" in section and f"| all | {summary.answer.split(';')[0][len('all '):]} |" in section
    # the random-depth run beside the trained T's, at every t up to 2 + eval.extra_loops, and not one of them
    section = report.markdown.split("## One run for the test-time question")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [int(r.split("|")[1]) for r in rows] == [1, 2, 3, 4]


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


STOP_TS = [1, 2, 3, 4, 6, 8]
STOP_OBS = {Point(1, 0): {"all": 0.60}, Point(1, 1): {"all": 0.62}, Point(2, 0): {"all": 0.85},
            Point(4, 0): {"all": 0.995}, Point(4, 1): {"all": 0.993}, Point(6, 0): {"all": 0.997},
            Point(8, 0): {"all": 0.998}}


def test_a_curve_that_never_saturates_gets_no_absurd_law_depth():
    """0.5 + 0.05 T fits the law with a tiny rate: its 'within epsilon by' would be hundreds of loops."""
    from ouro_lab.sweep.adaptive import answers_of

    obs = {Point(t, s): {"all": 0.5 + 0.05 * t + 0.002 * (s - 0.5)} for t in STOP_TS for s in (0, 1)}
    answer = answers_of(obs, STOP_TS, epsilon=0.02)["all"]
    assert math.isinf(answer.point) and math.isinf(answer.law_loops)
    assert str(answer) == "not saturated [not saturated, not saturated]; law: not within epsilon by twice the largest T"


def test_the_stopping_rule_ends_a_run_that_cannot_change_the_answer_and_keeps_one_that_can():
    from ouro_lab.sweep.adaptive import answers_of, can_change

    assert str(answers_of(STOP_OBS, STOP_TS, epsilon=0.01)["all"]).startswith("T=4 [T=3,")
    # a third seed at T=1, bound to end far below saturation: T* and its interval cannot move
    assert not can_change(STOP_OBS, Point(1, 2), {"all": 0.55}, {"all": 0.66}, STOP_TS, epsilon=0.01)
    # T=3, untrained: whether it lands at 0.95 or 0.999 decides whether T* is 3 or 4
    assert can_change(STOP_OBS, Point(3, 0), {"all": 0.95}, {"all": 0.999}, STOP_TS, epsilon=0.01)
    # even a T=3 bound to fall short moves the answer: a trained T=3 takes its mass off T*=3
    assert can_change(STOP_OBS, Point(3, 0), {"all": 0.90}, {"all": 0.93}, STOP_TS, epsilon=0.01)


def test_a_runs_final_value_is_bounded_by_its_neighbours_learning_curves():
    from ouro_lab.sweep.adaptive import final_bounds

    rises = {"250": {"all": 0.5}, "500": {"all": 0.8}, "1000": {"all": 0.95}}  # +0.15 after step 500
    dips = {"250": {"all": 0.6}, "500": {"all": 0.9}, "1000": {"all": 0.88}}  # -0.02 after step 500
    far = {"250": {"all": 0.1}, "500": {"all": 0.2}, "1000": {"all": 0.9}}  # at T=8: not a neighbour of T=2
    low, high = final_bounds({"all": 0.7}, 500, [(1, rises), (3, dips), (8, far)], 2, STOP_TS)
    assert low["all"] == pytest.approx(0.68) and high["all"] == pytest.approx(0.85)
    low, high = final_bounds({"all": 0.7}, 500, [(1, rises), (3, dips)], 2, STOP_TS, margin=2)
    assert low["all"] == pytest.approx(0.66) and high["all"] == pytest.approx(1.0)
    assert final_bounds({"all": 0.7}, 750, [(1, rises)], 2, STOP_TS) is None  # no value at step 750 to go by
    assert final_bounds({"all": 0.7}, 500, [(8, far)], 2, STOP_TS) is None  # no neighbour finished


def test_the_design_pruner_stops_through_optunas_interface_and_says_why():
    """Optuna's should_prune asks DesignPruner; the stopped trial records why (user attribute)."""
    import optuna

    from ouro_lab.sweep.design import CURVE_STEPS_ATTR, CURVES_ATTR, SEED_PARAM, DesignPruner
    from ouro_lab.sweep.pruning import PRUNED_BECAUSE
    from ouro_lab.sweep.schema import DesignSpec, ParamSpec, SweepConfig

    sweep = SweepConfig(params={"model.loops": ParamSpec(choices=STOP_TS)}, design=DesignSpec(epsilon=0.01))
    sweep.sampler.name = "adaptive"
    study = optuna.create_study(direction="maximize", pruner=DesignPruner(sweep))
    dists = {"model.loops": optuna.distributions.CategoricalDistribution(STOP_TS),
             SEED_PARAM: optuna.distributions.CategoricalDistribution([0, 1, 2])}
    for p, curves in STOP_OBS.items():  # learning curves: +0.02 from step 500 to the end
        history = {"500": {"all": curves["all"] - 0.02}, "1000": curves}
        study.add_trial(optuna.trial.create_trial(
            params={"model.loops": p.loops, SEED_PARAM: p.seed}, distributions=dists, value=curves["all"],
            user_attrs={CURVES_ATTR: curves, CURVE_STEPS_ATTR: history}))

    def running(loops: int, seed: int, value: float, step: int = 500) -> optuna.Trial:
        study.enqueue_trial({"model.loops": loops, SEED_PARAM: seed})
        trial = study.ask(dists)
        trial.set_user_attr(CURVE_STEPS_ATTR, {str(step): {"all": value}})
        trial.report(value, step)
        return trial

    finished = running(1, 2, 0.58)
    finished.set_user_attr("last_step", 500)  # its last validation: whole, never stopped
    assert not finished.should_prune()
    hopeless = running(1, 2, 0.58)
    hopeless.set_user_attr("last_step", 1000)
    assert hopeless.should_prune()
    assert "cannot change the answer" in study._storage.get_trial(hopeless._trial_id).user_attrs[PRUNED_BECAUSE]
    deciding = running(3, 0, 0.975)  # may end at 0.975-0.995: within epsilon of the best or not
    assert not deciding.should_prune() and PRUNED_BECAUSE not in deciding.user_attrs
    alone = running(2, 1, 0.58, step=250)
    assert not alone.should_prune()  # no finished run has a value at step 250 to bound it by


def test_the_design_stops_when_its_flops_budget_is_spent():
    import optuna

    from ouro_lab.sweep.design import SEED_PARAM, TRAIN_FLOPS_ATTR, decision
    from ouro_lab.sweep.schema import DesignSpec, ParamSpec, SweepConfig

    sweep = SweepConfig(params={"model.loops": ParamSpec(choices=STOP_TS)}, design=DesignSpec(epsilon=0.01, flops=1e9))
    sweep.sampler.name = "adaptive"
    study = optuna.create_study(direction="maximize")
    dists = {"model.loops": optuna.distributions.CategoricalDistribution(STOP_TS),
             SEED_PARAM: optuna.distributions.CategoricalDistribution([0, 1, 2])}
    for i, (p, curves) in enumerate(STOP_OBS.items()):
        study.add_trial(optuna.trial.create_trial(
            params={"model.loops": p.loops, SEED_PARAM: p.seed}, distributions=dists, value=curves["all"],
            user_attrs={"curves": curves, TRAIN_FLOPS_ATTR: 1e8 * p.loops}))  # 2.6e9 in all
        if i == 3:  # 0.8e9 after four runs: under the budget, the design goes on
            assert decision(sweep, study.get_trials()).point is not None
    stopped = decision(sweep, study.get_trials())
    assert stopped.point is None and stopped.reason == "FLOPs budget spent (2.6e+09 of design.flops 1e+09)"
    assert set(stopped.answers) == {"all"}  # the answer so far still stands beside it


def test_the_design_pruner_is_refused_outside_the_adaptive_design_and_rankers_inside_it(tmp_path):
    from ouro_lab.config import ConfigError
    from ouro_lab.sweep.schema import load_sweep

    path, _ = _design_sweep(tmp_path)
    text = path.read_text()
    path.write_text(text + "pruner: {name: median}\n")
    with pytest.raises(ConfigError, match="pruner: the adaptive design takes pruner.name none or design"):
        load_sweep(path)
    path.write_text(text + "pruner: {name: design, margin: 0.5}\n")
    with pytest.raises(ConfigError, match="pruner.margin: must be a number >= 1"):
        load_sweep(path)
    path.write_text(text + "pruner: {name: design, margin: 1.5}\n")
    sweep = load_sweep(path)[0]
    assert sweep.pruner == {"name": "design", "margin": 1.5}
    from ouro_lab.sweep.design import DesignPruner
    from ouro_lab.sweep.study import make_pruner

    assert isinstance(make_pruner(sweep), DesignPruner) and make_pruner(sweep).margin == 1.5
    path.write_text(text.replace("sampler: {name: adaptive", "sampler: {name: grid").replace(
        "design: {epsilon: 0.02, max_seeds: 2}\n", "") + "pruner: {name: design}\n")
    with pytest.raises(ConfigError, match="pruner.name: design stops runs of the adaptive design"):
        load_sweep(path)



def test_a_test_time_run_needs_the_loop_counts_as_choices(tmp_path):
    """A range of T (random sampler) gives the random-depth run nothing to draw its depth from."""
    from ouro_lab.config import ConfigError
    from ouro_lab.sweep.schema import load_sweep

    path, _ = _design_sweep(tmp_path)
    text = path.read_text().replace("design: {epsilon: 0.02, max_seeds: 2}\n", "test_time_run: true\ntrials: 4\n")
    path.write_text(text.replace("sampler: {name: adaptive", "sampler: {name: random").replace(
        "model.loops: {choices: [1, 2, 3, 4]}", "model.loops: {low: 1, high: 4}"))
    with pytest.raises(ConfigError, match="test_time_run: needs a sweep over model.loops alone, with distinct int"):
        load_sweep(path)
    path.write_text(text.replace("sampler: {name: adaptive", "sampler: {name: grid"))
    assert load_sweep(path)[0].test_time_run


# val/acc_final (all positions) of the looped model on `state` L=12, seeds 0-2 at T = 1..8
# (benchmarks/adaptive_vs_grid.py loops-L12): the seed noise is 0.04-0.1 below saturation and
# 0.0005 at the ceiling
L12 = {1: (0.5422, 0.576, 0.6171), 2: (0.7208, 0.5257, 0.7057), 3: (0.8971, 0.8359, 0.8297),
       4: (0.9554, 0.9341, 0.9421), 6: (1.0, 0.9998, 0.9991), 8: (0.9998, 0.9992, 0.9971)}


def test_an_accuracy_is_judged_on_the_logit_scale_where_its_seed_noise_is_even():
    from ouro_lab.sweep.adaptive import answers_of

    obs = {Point(t, s): {"all": v} for t, vs in L12.items() for s, v in enumerate(vs)}
    raw = answers_of(obs, list(L12), epsilon=0.01)["all"]
    logit = answers_of(obs, list(L12), epsilon=0.01, scale="logit")["all"]
    assert raw.point == logit.point == 6
    # pooled on the raw scale, the low T's noise makes T=6 vs T=8 look uncertain
    assert math.isinf(raw.high) and (logit.low, logit.high) == (6, 6)


def test_one_seed_at_the_answers_t_or_below_it_is_confirmed_before_the_answer_is_known():
    obs = {Point(1, 0): {"all": 0.5}, Point(3, 0): {"all": 1.0}, Point(4, 0): {"all": 1.0},
           Point(3, 1): {"all": 0.9995}, Point(2, 0): {"all": 0.995}}
    once = decide(obs, [1, 2, 3, 4], epsilon=0.01, confirm=1)
    assert once.point is None and str(once.answers["all"]).startswith("T=2")
    twice = decide(obs, [1, 2, 3, 4], epsilon=0.01, confirm=2)
    assert twice.point in (Point(1, 1), Point(2, 1)) and "the answer's T or the one below, at 1 seed(s)" in twice.reason
