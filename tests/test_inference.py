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
