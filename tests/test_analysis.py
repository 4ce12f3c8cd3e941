"""Analysis: the saturation statistics on curves with a known answer, and the report, the CLI
and the notebook end to end on a tiny real study."""

import math
import re
import textwrap
from pathlib import Path

import nbformat
import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient
from nbclient import NotebookClient
from scipy import stats

from ouro_lab import analysis
from ouro_lab.cli import main
from ouro_lab.sweep import run_sweep

ROOT = Path(__file__).resolve().parents[1]


# --- saturation on synthetic curves ------------------------------------------------------

def test_saturation_point_of_a_saturating_curve():
    curve = {1: 0.50, 2: 0.80, 3: 0.95, 4: 0.96, 6: 0.96, 8: 0.965}
    assert analysis.saturation_point(curve, epsilon=0.02) == 3
    assert analysis.saturation_point(curve, epsilon=0.001) is None  # 6 -> 8 still gains 0.005
    assert analysis.saturation_point(curve, epsilon=0.2) == 2


def test_never_saturating_and_late_gains():
    assert analysis.saturation_point({1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4}, epsilon=0.05) is None
    # a plateau followed by a later gain is not saturation
    assert analysis.saturation_point({1: 0.5, 2: 0.5, 3: 0.5, 4: 0.9}, epsilon=0.01) is None
    assert analysis.saturation_point({1: 0.5, 2: 0.5, 3: 0.9, 4: 0.9}, epsilon=0.01) == 3


def test_saturation_minimize_direction():
    loss = {1: 2.0, 2: 1.0, 3: 0.5, 4: 0.49}
    assert analysis.saturation_point(loss, 0.05, "minimize") == 3
    assert analysis.saturation_point(loss, 0.05, "maximize") == 1  # loss going down never "improves"


def test_saturation_interval_from_noisy_seeds():
    rng = np.random.default_rng(0)
    truth = {1: 0.4, 2: 0.7, 3: 0.9, 4: 1.0, 6: 1.0, 8: 1.0}
    clean = analysis.saturation({t: [v] * 3 for t, v in truth.items()}, epsilon=0.05)
    assert (clean.point, clean.low, clean.high, clean.p_saturated) == (4, 4, 4, 1.0)
    noisy = analysis.saturation({t: v + rng.normal(0, 0.02, 5) for t, v in truth.items()}, epsilon=0.05)
    assert noisy.point == 4 and noisy.low <= 4 <= noisy.high
    # gains near epsilon blurred by seed noise (3 seeds): the interval is no longer a point
    edge = {1: 0.4, 2: 0.7, 3: 0.95, 4: 1.0, 6: 1.0}
    blurred = analysis.saturation({t: v + rng.normal(0, 0.03, 3) for t, v in edge.items()}, epsilon=0.05)
    assert blurred.point in (3, 4) and blurred.low <= blurred.point <= blurred.high and blurred.low < blurred.high
    assert 0 < blurred.p_saturated <= 1
    assert str(blurred).startswith(f"T={blurred.point} [")


def test_unsaturated_interval_reaches_past_the_range():
    rising = {t: [0.1 * t - 0.01, 0.1 * t, 0.1 * t + 0.01] for t in (1, 2, 3, 4)}
    sat = analysis.saturation(rising, epsilon=0.05)
    assert sat.point is None and math.isinf(sat.high) and sat.p_saturated == 0.0
    assert str(sat).startswith("not saturated by T=4") and ">4" in str(sat)
    single = analysis.saturation({1: [0.5], 2: [0.9], 3: [0.9]}, epsilon=0.01)
    assert single.point == 2 and "no interval" in str(single)


def test_mean_ci_is_the_student_t_interval():
    x = [0.2, 0.5, 0.4, 0.6]
    mean, lo, hi = analysis.mean_ci(x, 0.9)
    ref = stats.t.interval(0.9, len(x) - 1, loc=np.mean(x), scale=stats.sem(x))
    assert mean == pytest.approx(np.mean(x)) and (lo, hi) == pytest.approx(ref)
    assert math.isnan(analysis.mean_ci([0.3])[1])


# --- a tiny real study -------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory):
    """loops {1, 2} x the three archs x 2 seeds on `state`, trained for real (a few seconds).
    Study 'smoke' in <tmp>/mlflow.db, as README's first command makes one in ./mlflow.db."""
    tmp = tmp_path_factory.mktemp("study")
    overrides = ["model.d_model=32", "model.n_heads=2", "model.n_layers=1", "data.state.length=8",
                 "data.n_val=64", "data.n_test=64", "train.max_steps=30", "train.warmup_steps=3", "train.val_every=15"]
    path = tmp / "smoke.yaml"  # named like README's smoke study: the notebook's defaults read it
    path.write_text(f"base: {ROOT / 'conf' / 'state.yaml'}\nstudy_dir: {tmp / 'studies' / 'smoke'}\n"
                    f"tracking_uri: sqlite:///{tmp / 'mlflow.db'}\noverrides: {overrides}\n" + textwrap.dedent("""
                    objective: {metric: val/acc_final, direction: maximize}
                    params:
                      model.loops: {choices: [1, 2]}
                      model.arch: {choices: [looped, param_matched, depth_matched]}
                    sampler: {name: grid, seed: 0}
                    seeds: 2
                    """))
    summary = run_sweep(path, [], verbose=False)
    assert summary.counts == {"COMPLETE": 6}
    return tmp


def test_study_reads_back_as_tidy_frames(tiny_study):
    data = analysis.load_study("smoke", str(tiny_study / "mlflow.db"))
    assert data.counts == {"COMPLETE": 12} and len(data.runs) == 12  # 6 trials x 2 seeds
    assert sorted(data.runs.groupby(["arch", "loops"]).size().tolist()) == [2] * 6
    assert data.runs["reused"].sum() == 2  # param_matched trained once per seed, reused at T=2
    # steps: one row per run x split x eval step x difficulty; looped T=2 evaluated past T (extra loops)
    looped2 = data.steps[(data.steps["arch"] == "looped") & (data.steps["loops"] == 2) & (data.steps["split"] == "val")]
    assert set(looped2["step"]) == {1, 2, 3, 4}
    assert set(looped2["difficulty"]) == {"all", "d1", "d2", "d3", "d4"}
    assert looped2[["acc", "loss"]].notna().all().all()
    assert len(data.trials) == 6 and set(data.trials["state"]) == {"COMPLETE"}
    table = analysis.key_table(data)
    assert list(table.columns) == ["group", "T", "looped", "param_matched", "depth_matched"]
    assert table["T"].tolist() == [1, 2]
    # param_matched is one model: identical at every T
    assert table["param_matched"].iloc[0] == table["param_matched"].iloc[1]
    compute = analysis.compute_table(data)
    looped = compute[compute["arch"] == "looped"].set_index("T")
    assert looped.loc[2, "forward_flops_per_token"] > 1.9 * looped.loc[1, "forward_flops_per_token"]
    assert looped.loc[2, "n_params"] == looped.loc[1, "n_params"]


def test_report_files_table_and_artifacts(tiny_study, tmp_path):
    data = analysis.load_study("smoke", str(tiny_study / "mlflow.db"))
    report = analysis.write_report(data, tmp_path / "report", epsilon=0.01, n_boot=200)
    names = {f.name for f in report.files}
    assert {"report.md", "vs_loops.png", "vs_step.png", "compute.png", "exit_gate.png", "optuna_history.png",
            "curves.csv", "saturation.csv", "law.csv", "law.png"} <= names
    assert all(f.stat().st_size > 0 for f in report.files)
    sat = analysis.saturation_table(data, 0.01, n_boot=200)
    assert set(sat["arch"]) == {"looped", "depth_matched"}  # param_matched does not depend on T
    assert len(sat) == 2 * 5  # x (all + 4 position buckets)
    laws = analysis.law_table(data, 0.01, n_boot=50)  # each looped T over its loop steps (tiny study: T = 1, 2)
    assert set(laws["over"]) == {"step"} and len(laws) == len(set(data.runs.query("arch == 'looped'")["loops"]))
    fits = dict(zip(laws["loops"], laws["fit"]))
    assert fits[1].startswith("no fit (3 points")  # T=1 + 2 extra steps: too few for 3 parameters
    assert all("exp(-" in f or f.startswith("no fit (") for f in fits.values())
    assert "## The saturating law" in report.markdown
    for heading in ("## Summary", "## Metric vs trained loop count T", "## Saturation points",
                    "## Metric vs evaluation loop step t", "## Compute-normalised", "## Exit gate", "## The sweep"):
        assert heading in report.markdown
    assert "looped" in report.table and "param_matched" in report.table
    client = MlflowClient(data.tracking_uri)
    logged = {a.path for a in client.list_artifacts(data.parent_run_id, "report")}
    assert {"report/report.md", "report/report.html", "report/vs_loops.png", "report/saturation.csv"} <= logged
    # the HTML page stands alone: every figure of report.md embedded, no file it must fetch
    page = (tmp_path / "report" / "report.html").read_text()
    shown = re.findall(r"!\[[^]]*\]\(([^)]+\.png)\)", report.markdown)
    assert shown and page.count('src="data:image/png;base64,') == len(shown)
    assert not re.search(r'src="(?!data:)', page) and "<table>" in page


def test_report_cli(tiny_study, tmp_path, capsys):
    store = str(tiny_study / "mlflow.db")
    assert main(["report", "smoke", "--store", store, "--out", str(tmp_path / "r"), "--no-log"]) == 0
    out = capsys.readouterr().out
    assert "saturation (all positions)" in out and (tmp_path / "r" / "report.md").exists()
    assert main(["report", "nosuch", "--store", store]) == 2
    assert "no study or MLflow experiment named 'nosuch'" in capsys.readouterr().err
    assert main(["report", "smoke", "--store", store, "--metric", "bpb", "--no-log", "--out", str(tmp_path / "x")]) == 2
    assert "metric kind 'bpb' not logged" in capsys.readouterr().err
    assert main(["report", "smoke", "--store", store, "--metric", "bogus", "--no-log", "--out", str(tmp_path / "y")]) == 2
    assert "metric kind 'bogus' not logged" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # refused: no empty report folder
    assert main(["report", "999", "--store", store]) == 2
    assert "no study or MLflow experiment named '999'" in capsys.readouterr().err


def test_plain_train_runs_are_a_study_too(tiny_config, tmp_path):
    """An experiment of `ouro-lab train` runs (no sweep) reports the same way, minus the Optuna view."""
    from ouro_lab.train import train

    for loops in (1, 2):
        train(tiny_config(f"model.loops={loops}", "train.max_steps=15"), verbose=False)
    data = analysis.load_study("test", str(tmp_path / "mlflow.db"))
    assert data.parent_run_id is None and data.trials.empty and sorted(data.runs["loops"]) == [1, 2]
    report = analysis.write_report(data, tmp_path / "r", n_boot=50)
    assert "## The sweep" not in report.markdown and "1 seed: no interval" in report.markdown
    # one trained T: no saturation point to find, said in words rather than an empty table
    # ... and a run logged before checkpoints held the final weights (no ouro.checkpoint_step
    # tag; 25 steps at val_every 20) is named with the step its checkpoint holds
    old = train(tiny_config("train.max_steps=25", "tracking.experiment=single"), verbose=False)
    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").delete_tag(old.run_id, "ouro.checkpoint_step")
    single = analysis.write_report(analysis.load_study("single", str(tmp_path / "mlflow.db")), tmp_path / "s", n_boot=50)
    assert "No saturation point: every arch has runs at one trained T only." in single.markdown
    assert "Checkpoints older than their metrics: 1 of 1 runs" in single.markdown
    assert "(checkpoint from step 20 of 25)" in single.markdown and "older than their metrics" in single.table
    assert "older than their metrics" not in report.markdown
    assert "saturation: needs runs at two or more trained T per arch" in single.table


def test_stale_checkpoints_of_old_runs_are_told_from_their_params():
    from ouro_lab.analysis.tidy import stale_checkpoint

    old = {"ouro.checkpoint": "/x/last.ckpt"}
    params = {"train.max_steps": "300", "train.val_every": "250"}
    assert stale_checkpoint(params, old) == "checkpoint from step 250 of 300"
    assert stale_checkpoint(params | {"train.max_steps": "500"}, old) == ""
    assert stale_checkpoint(params | {"train.max_steps": "100"}, old) == ""  # val_every capped at max_steps
    assert stale_checkpoint(params, old | {"ouro.checkpoint_step": "300"}) == ""  # logged after the fix
    # the shipped gate study's Stage II: 300 gate steps after 500 of Stage I
    gate = {"train.max_steps": "500", "train.val_every": "250", "stage2.steps": "300"}
    assert stale_checkpoint(gate, old) == "checkpoint from step 750 of 800"
    assert stale_checkpoint(gate | {"train.max_steps": "600"}, old) == \
        "checkpoint from step 850 of 900; stage1.ckpt from step 500 of 600"


def test_notebook_runs_top_to_bottom_with_no_edits(tiny_study):
    """Its defaults (study 'smoke' in ../mlflow.db) read a study made like README's smoke sweep."""
    nb = nbformat.read(ROOT / "notebooks" / "loop_saturation.ipynb", as_version=4)
    assert sum("parameters" in c.metadata.get("tags", []) for c in nb.cells) == 1  # papermill can set them
    cwd = tiny_study / "notebooks"
    cwd.mkdir(exist_ok=True)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 5  # the plots are inline
    text = "".join(o.get("text", "") for o in outputs)
    assert "study 'smoke': 12 finished runs" in text and "saturates" in text


def test_logged_params_map_back_to_the_sweep_distributions():
    cat = optuna.distributions.CategoricalDistribution([0, 0.1, 1])
    assert analysis.param_value(cat, "0.0") == 0 and analysis.param_value(cat, "0.1") == 0.1  # float key logs 0.0
    assert analysis.param_value(optuna.distributions.IntDistribution(1, 8), "4.0") == 4
    with pytest.raises(ValueError, match="not among the sweep's choices"):
        analysis.param_value(cat, "0.5")


def test_runs_logged_with_and_without_other_tasks_sections_form_one_group():
    """Runs log only their own data.<task> section now; runs logged before (every section, and
    Lightning's config/... copy) must fall in the same group as new runs of the same config."""
    from ouro_lab.analysis.tidy import runs_frame
    from ouro_lab.run_record import RunRecord

    def run(run_id, seed, old):
        params = {"model.arch": "looped", "model.loops": "2", "train.seed": str(seed), "data.task": "state",
                  "data.state.length": "8", "train.max_steps": "10", "data.batch_size": "4"}
        if old:
            params |= {"data.arith.modulus": "7", "data.text.context": "64", "config/model/loops": "2"}
        return RunRecord(run_id, run_id, params=params)

    frame, group_keys, _ = runs_frame([run("a", 0, True), run("b", 1, False)], {}, [])
    assert group_keys == [] and set(frame["group"]) == {"all runs"} and len(frame) == 2


def test_bundle_runs_group_by_the_bundle_and_other_runs_by_their_keys():
    """A sweep's bundle runs group as recipe=<name>; a run without the bundle tag (a plain train
    run in that experiment) keeps the keys the bundles set, so it is not merged with them."""
    from ouro_lab.analysis.tidy import runs_frame
    from ouro_lab.run_record import RunRecord, bundle_tags

    def run(run_id, injection, recipe=None):
        params = {"model.arch": "looped", "model.loops": "2", "train.seed": "0", "data.task": "state",
                  "model.injection": injection, "train.max_steps": "10", "data.batch_size": "4"}
        return RunRecord(run_id, run_id, params=params, tags=bundle_tags({"recipe": recipe} if recipe else {}))

    runs = [run("a", "none", "ouro"), run("b", "additive", "additive"), run("c", "additive"), run("d", "none")]
    frame, group_keys, _ = runs_frame(runs, {}, [], ["recipe"], {"model.injection"})
    groups = dict(zip(frame["run_id"], frame["group"]))
    assert group_keys == ["model.injection", "recipe"]
    assert groups == {"a": "model.injection=nan recipe=ouro", "b": "model.injection=nan recipe=additive",
                      "c": "model.injection=additive recipe=nan", "d": "model.injection=none recipe=nan"}


def test_the_latest_finished_evaluation_stands_for_its_checkpoint():
    """A re-evaluation still running (or crashed) does not hide the finished one."""
    from ouro_lab.analysis.tidy import latest_evals
    from ouro_lab.run_record import RunRecord

    def run(run_id, start, status):
        return RunRecord(run_id, status=status, start_time=start, params={"eval_split": "test"},
                         tags={"ouro.checkpoint": "/c.ckpt"})

    assert [r.run_id for r in latest_evals([run("old", 1, "FINISHED"), run("new", 2, "RUNNING")])] == ["old"]
    assert [r.run_id for r in latest_evals([run("old", 1, "FINISHED"), run("new", 2, "FINISHED")])] == ["new"]


def test_report_has_the_early_exit_frontier(tiny_study, tmp_path):
    data = analysis.load_study("smoke", str(tiny_study / "mlflow.db"))
    table = analysis.frontier_table(data)
    t2 = table[(table["loops"] == 2) & (table["difficulty"] == "all")]
    assert {"q", "conf", "change", "fixed", "oracle_stable", "oracle_right"} <= set(t2["rule"])
    assert sorted(t2[t2["rule"] == "fixed"]["loops_used"]) == [1.0, 2.0]  # fixed depth t = 1..T
    stable = t2[t2["rule"] == "oracle_stable"].iloc[0]
    full = t2[(t2["rule"] == "fixed") & (t2["threshold"] == 2.0)].iloc[0]
    assert stable["acc"] == pytest.approx(full["acc"], abs=1e-6) and 1.0 <= stable["loops_used"] <= 2.0
    assert (t2["n"] == 2).all()  # two seeds behind every point
    gates = analysis.gate_table(data)
    assert gates["T"].tolist() == [1, 2] and (gates["seeds"] == 2).all()
    assert any("gate efficiency" in line for line in analysis.frontier_summary(data))
    report = analysis.write_report(data, tmp_path / "report", n_boot=50, log=False)
    assert "## Early exit" in report.markdown
    assert {"frontier.png", "oracle.png", "frontier.csv"} <= {f.name for f in report.files}


def test_the_law_over_trained_t_recovers_a_known_curve(tiny_study):
    """With 4+ trained T per arch the report also fits the law to the final metric vs T: a study
    whose looped runs follow m(T) = 0.9 - 0.6 exp(-0.8 T) (3 seeds, noise 0.005) gets it back."""
    import dataclasses

    import pandas as pd

    from ouro_lab.analysis.law import law

    data = analysis.load_study("smoke", str(tiny_study / "mlflow.db"))
    rng = np.random.default_rng(0)
    rows = [dict(run_id=f"T{T}s{seed}", split="val", step=t, difficulty="all", group="all runs", arch="looped",
                 loops=T, trained_loops=T, seed=seed, acc=float(law(min(t, T), 0.9, -0.6, 0.8) + rng.normal(0, 0.005)))
            for T in range(1, 8) for seed in range(3) for t in range(1, T + 1)]
    synthetic = dataclasses.replace(data, steps=pd.DataFrame(rows))
    laws = analysis.law_table(synthetic, 0.01, "acc", "val", n_boot=100)
    over_t = laws[laws["over"] == "T"].iloc[0]
    assert over_t["arch"] == "looped" and over_t["n_seeds"] == 3 and over_t["p_fit"] > 0.9
    assert over_t["m_inf"] == pytest.approx(0.9, abs=0.01) and over_t["k"] == pytest.approx(0.8, rel=0.2)
    truth = math.log(0.6 / 0.01) / 0.8  # 5.1 trained loops to within epsilon
    assert over_t["low"] <= truth <= over_t["high"] and f"within ε by {over_t['loops_eps']:.1f}" in over_t["fit"]
