"""Inference on trained checkpoints (ouro_lab/inference.py): `ouro-lab eval` with an exit rule
(skip vs selection vs full depth), `generate`, `decode`."""

from __future__ import annotations

from pathlib import Path

import pytest

from ouro_lab.models.decoding import ExitRule


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny looped model trained for real on `state` and one on `arith` (state: 40 steps)."""
    from ouro_lab.config import load_config
    from ouro_lab.train import train

    tmp = tmp_path_factory.mktemp("trained")
    base = ["model.d_model=32", "model.n_heads=2", "model.n_layers=1", "model.loops=3", "data.batch_size=32",
            "data.n_val=128", "data.n_test=128", "train.max_steps=40", "train.warmup_steps=5", "train.val_every=40",
            "train.progress_bar=false", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
            f"tracking.output_dir={tmp / 'outputs'}", "eval.test=false"]
    state = train(load_config(None, [*base, "data.state.length=8"]), verbose=False)
    arith = train(load_config("conf/arith.yaml", [*base, "data.arith.max_ops=2", "train.max_steps=20"]), verbose=False)
    return Path(state.checkpoint), Path(arith.checkpoint)


def test_skip_eval_with_rule_off_is_the_ordinary_evaluation(trained):
    from ouro_lab.checkpoints import load_checkpoint
    from ouro_lab.evaluate import evaluate_checkpoint
    from ouro_lab.inference import skip_evaluate
    from ouro_lab.builders import make_datamodule

    ckpt = trained[0]
    ordinary = evaluate_checkpoint(ckpt, [], "test").metrics
    cfg, module = load_checkpoint(ckpt)
    loader = make_datamodule(cfg, module.task).test_dataloader()
    off = skip_evaluate(module.model, loader, ExitRule(), len(module.task.difficulty_levels), False, module.task.seq_len)
    for semantics in ("skip", "select", "full"):
        assert off[f"{semantics}_acc"] == ordinary["test/acc_final"]  # exactly
        assert off[f"{semantics}_loss"] == pytest.approx(ordinary["test/loss_final"], abs=1e-6)
        assert off[f"{semantics}_loops"] == 3
        for k in (1, 2, 3):
            assert off[f"{semantics}_acc_d{k}"] == ordinary[f"test/acc_final_d{k}"]
    assert off["skip_flops"] == off["full_flops"] and off["skip_minus_select_acc"] == 0


def test_eval_with_an_exit_rule_reports_skip_next_to_selection(trained, capsys):
    from ouro_lab.cli import main

    assert main(["eval", str(trained[0]), "infer.exit_rule=q", "infer.exit_threshold=0.3", "--no-log"]) == 0
    out = capsys.readouterr().out
    assert "skip semantics vs selection semantics (q=0.3)" in out and "accuracy, skip minus selection" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["skip"], ["select"], ["full"])}
    skip_loops, full_loops = float(rows["skip"][3]), float(rows["full"][3])
    assert full_loops == 3 and skip_loops < 3  # the rule exits some tokens early
    assert float(rows["skip"][4]) < float(rows["full"][4])  # and fewer FLOPs were executed
    assert main(["eval", str(trained[0]), "infer.exit_rule=nope"]) == 2
    assert "infer.exit_rule: 'nope' is not one of: none, q, conf, change" in capsys.readouterr().err


def test_overrides_that_would_do_nothing_are_refused_and_an_eval_logs_here(trained, tmp_path, monkeypatch, capsys):
    """An empty prompt, a threshold without a rule: refused with the fix, nothing written. An
    evaluation logs into the working folder's store (not the one the checkpoint came from) and says so."""
    from mlflow.tracking import MlflowClient

    from ouro_lab.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ckpt = str(trained[0])
    for prompt in ("infer.prompt=''", "infer.prompt="):
        assert main(["generate", ckpt, prompt]) == 2
        assert "infer.prompt is empty: write the text to continue, e.g. infer.prompt=" in capsys.readouterr().err
    assert main(["eval", ckpt, "infer.exit_threshold=2"]) == 2
    assert "infer.exit_threshold=2 does nothing with infer.exit_rule=none" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    trained_store = MlflowClient(f"sqlite:///{trained[0].parents[4] / 'mlflow.db'}")
    experiment = trained_store.get_experiment_by_name("ouro-lab").experiment_id
    before = len(trained_store.search_runs([experiment]))
    assert main(["eval", ckpt, "eval.extra_loops=0", "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert f"in sqlite:///{tmp_path / 'mlflow.db'} (experiment 'ouro-lab'" in out
    here = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = here.search_runs([here.get_experiment_by_name("ouro-lab").experiment_id])
    assert [r.data.tags["ouro.role"] for r in runs] == ["eval"]
    assert len(trained_store.search_runs([experiment])) == before


def test_generate_answers_arith_and_decode_refuses_non_text(trained, capsys):
    from ouro_lab.cli import main

    assert main(["generate", str(trained[1]), "infer.samples=2", "infer.cache=last", "infer.exit_rule=conf",
                 "infer.exit_threshold=0.5"]) == 0
    out = capsys.readouterr().out
    assert out.count("<ans> -> ") == 2 and "expected" in out and "<bos> <len_" in out
    assert main(["decode", str(trained[0])]) == 2
    assert "on text tasks (text, lm)" in capsys.readouterr().err
    assert main(["generate", str(trained[0]), "infer.prompt=abc"]) == 2
    assert "infer.prompt is text" in capsys.readouterr().err


@pytest.mark.parametrize("rule", [ExitRule("q", 0.3), ExitRule("conf", 0.9), ExitRule("change", 0.01)])
def test_selection_semantics_is_the_frontier_of_the_ordinary_evaluation(trained, rule):
    """The selection column equals what the run's own frontier reports for the same rule."""
    from ouro_lab.checkpoints import load_checkpoint
    from ouro_lab.evaluate import evaluate_checkpoint
    from ouro_lab.inference import skip_evaluate
    from ouro_lab.builders import make_datamodule

    ordinary = evaluate_checkpoint(trained[0], [], "test").metrics
    cfg, module = load_checkpoint(trained[0])
    loader = make_datamodule(cfg, module.task).test_dataloader()
    values = skip_evaluate(module.model, loader, rule, len(module.task.difficulty_levels), False, module.task.seq_len)
    for kind in ("acc", "loops"):
        assert values[f"select_{kind}"] == pytest.approx(ordinary[f"test/exit_{rule.name}{rule.threshold:g}_{kind}"], abs=1e-6)


def test_the_report_of_a_trained_experiment_shows_its_skip_evaluations(trained, tmp_path):
    """`ouro-lab eval` runs logged beside training runs do not become unit runs; the report adds
    their skip / select / full table."""
    from mlflow.tracking import MlflowClient

    from ouro_lab import analysis
    from ouro_lab.evaluate import evaluate_checkpoint

    ckpt = trained[0]
    store = f"sqlite:///{ckpt.parents[4] / 'mlflow.db'}"  # the store it was trained into, asked for explicitly
    result = evaluate_checkpoint(ckpt, ["infer.exit_rule=conf", "infer.exit_threshold=0.6", f"tracking.uri={store}"],
                                 log=True)
    experiment = MlflowClient(store).get_run(result.run_id).info.experiment_id
    data = analysis.load_study(experiment, store)
    assert data.source == "train" and result.run_id not in set(data.runs["run_id"])
    row = data.skip.set_index("run_id").loc[result.run_id]
    assert (row["rule"], row["threshold"], row["split"]) == ("conf", 0.6, "test")
    assert row["skip_acc"] == pytest.approx(result.metrics["test/skip_acc"])
    assert row["full_flops"] == pytest.approx(result.metrics["test/full_flops"])
    report = analysis.write_report(data, tmp_path / "report", n_boot=50, log=False)
    assert "## Early exit that skips compute" in report.markdown and (tmp_path / "report" / "skip.csv").exists()
    assert "| test | conf | 0.6 |" in report.markdown


def test_the_skip_frontier_is_each_rule_evaluation_side_by_side(trained, capsys):
    """infer.frontier: each q of eval.exit_q x each exited_kv, in skip semantics, next to selection
    and full depth; each point equals `skip_evaluate` of the same rule; the table answers at the q
    where selection stays within epsilon; the frontier is logged as a table and read back."""
    from mlflow.tracking import MlflowClient

    from ouro_lab import metric_names as names
    from ouro_lab import tracking
    from ouro_lab.builders import make_datamodule
    from ouro_lab.checkpoints import load_checkpoint
    from ouro_lab.evaluate import evaluate_checkpoint
    from ouro_lab.inference import skip_evaluate
    from ouro_lab.models.decoding import EXITED_KV
    from ouro_lab.views import skip_frontier_frame, skip_gap

    ckpt = trained[0]
    store = f"sqlite:///{ckpt.parents[4] / 'mlflow.db'}"
    qs = [0.1, 0.3, 0.6]
    result = evaluate_checkpoint(ckpt, ["infer.exit_rule=q", "infer.frontier=true", f"eval.exit_q={qs}",
                                        f"tracking.uri={store}"], log=True)
    frame = skip_frontier_frame(result.metrics, "test")
    assert len(frame[(frame["difficulty"] == "all") & (frame["semantics"] == "skip")]) == len(qs) * len(EXITED_KV)
    cfg, module = load_checkpoint(ckpt)
    loader = make_datamodule(cfg, module.task).test_dataloader()
    levels = len(module.task.difficulty_levels)
    one = skip_evaluate(module.model, loader, ExitRule("q", 0.3, "propagate"), levels, False, module.task.seq_len)
    for kind in ("acc", "loops", "flops"):
        assert result.metrics[f"test/{names.skip_frontier('skip', 'q', 0.3, kind, 'propagate')}"] == pytest.approx(
            one[f"skip_{kind}"])
        assert result.metrics[f"test/{names.skip_frontier('select', 'q', 0.3, kind)}"] == pytest.approx(one[f"select_{kind}"])
    assert result.metrics["test/full_acc"] == pytest.approx(one["full_acc"])
    gap = skip_gap(frame, epsilon=1.0)  # everything is within 1.0: the cheapest selection point, q=0.1
    assert gap["threshold"] == 0.1 and set(gap["variants"]) == set(EXITED_KV) and set(gap["by_difficulty"]) == {str(k) for k in range(1, levels + 1)}
    frozen = gap["variants"]["frozen"]
    at = f"test/{names.skip_frontier('skip', 'q', 0.1, '{}', 'frozen')}"
    assert frozen["gap"] == pytest.approx(result.metrics[at.format("acc")] - result.metrics[
        f"test/{names.skip_frontier('select', 'q', 0.1, 'acc')}"])
    assert 0 < frozen["saved"] < 1 and frozen["saved"] == pytest.approx(
        1 - result.metrics[at.format("flops")] / result.metrics["test/full_flops"])
    text = result.table
    assert "skip frontier (rule q at eval.exit_q" in text and "selection within 0.01 of full depth" in text or \
        "selection is nowhere within 0.01" in text
    client = MlflowClient(store)
    run = client.get_run(result.run_id)
    assert run.data.tags["ouro.metric_tables"] == "frontier/test.csv,skip_frontier/test.csv"
    assert not any(names.SKIP_FRONTIER_METRIC.match(k) for k in run.data.metrics)
    read = tracking.read_metrics(client, run)
    tabled = {k: v for k, v in result.metrics.items() if names.SKIP_FRONTIER_METRIC.match(k)}
    assert {k: read[k] for k in tabled} == pytest.approx(tabled)
    with pytest.raises(Exception, match="infer.frontier: the frontier of which rule"):
        evaluate_checkpoint(ckpt, ["infer.frontier=true"])
    with pytest.raises(Exception, match="leave infer.exit_threshold and infer.exited_kv out"):
        evaluate_checkpoint(ckpt, ["infer.frontier=true", "infer.exit_rule=q", "infer.exited_kv=first"])


def test_the_report_shows_the_skip_frontier_of_an_evaluation(trained, tmp_path):
    """A frontier evaluation logged beside the training run: the report draws it (skip_frontier.png),
    tables the gap at selection's within-epsilon threshold per exited_kv and per difficulty."""
    from mlflow.tracking import MlflowClient

    from ouro_lab import analysis
    from ouro_lab.evaluate import evaluate_checkpoint

    ckpt = trained[0]
    store = f"sqlite:///{ckpt.parents[4] / 'mlflow.db'}"
    result = evaluate_checkpoint(ckpt, ["infer.exit_rule=q", "infer.frontier=true", "eval.exit_q=[0.2,0.9]",
                                        "eval.exit_epsilon=0.5", f"tracking.uri={store}"], log=True)
    experiment = MlflowClient(store).get_run(result.run_id).info.experiment_id
    data = analysis.load_study(experiment, store)
    assert result.run_id not in set(data.skip["run_id"]) if len(data.skip) else True
    mine = data.skip_frontier[data.skip_frontier["run_id"] == result.run_id]
    assert set(mine["semantics"]) == {"full", "select", "skip"} and set(mine["threshold"].dropna()) == {0.2, 0.9}
    report = analysis.write_report(data, tmp_path / "report", n_boot=50, log=False)
    assert "## Skip frontier: which exited_kv keeps selection's accuracy" in report.markdown
    assert (tmp_path / "report" / "skip_frontier.png").exists() and (tmp_path / "report" / "skip_frontier.csv").exists()
    section = report.markdown.split("## Skip frontier")[1]
    assert "| frozen |" in section and "| propagate |" in section and "skip - select by" in section
