"""End to end: real tiny models trained through `train()`, read back from MLflow."""

import math
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from mlflow.tracking import MlflowClient

from ouro_lab import run_record as rr
from ouro_lab import tracking
from ouro_lab.cli import main
from ouro_lab.evaluate import evaluate_checkpoint
from ouro_lab.config import ConfigError
from ouro_lab.train import train


@pytest.mark.parametrize("arch", ["looped", "param_matched", "depth_matched"])
def test_each_arch_trains_and_logs_to_mlflow(arch, tiny_config, tracking_uri):
    cfg = tiny_config(f"model.arch={arch}", "train.lr=1e-2")
    result = train(cfg, verbose=False)
    client = MlflowClient(tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert "cores, torch" in run.data.tags["ouro.machine"]  # results move across CPUs: every run names its own
    # loss went down: first logged training loss vs the mean of the last few
    history = [m.value for m in sorted(client.get_metric_history(result.run_id, "train/loss"), key=lambda m: m.step)]
    assert len(history) >= 5
    assert sum(history[-3:]) / 3 < history[0] - 0.05, history
    # flattened config as params, derived facts, config artifact, per-step plot
    params = run.data.params
    assert params["model.arch"] == arch and params["model.loops"] == "2" and params["data.state.length"] == "8"
    depth = {"looped": 2, "param_matched": 1, "depth_matched": 2}[arch]
    assert run.data.metrics["model/effective_depth"] == depth and "derived.effective_depth" not in params
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "plots"} <= artifacts
    # the data it trained and evaluated on, in MLflow's Dataset column
    inputs = {i.dataset.name: [t.value for t in i.tags] for i in run.inputs.dataset_inputs}
    assert inputs == {"state (train)": ["training"], "state (val, test)": ["evaluation"]}
    assert [a.path for a in client.list_artifacts(result.run_id, "plots")] == ["plots/loop_steps.png"]
    # per-loop-step validation metrics, logged at every validation, by difficulty
    steps = 4 if arch == "looped" else 1  # looped: T=2 plus eval.extra_loops=2
    metrics = run.data.metrics
    for t in range(1, steps + 1):
        assert len(client.get_metric_history(result.run_id, f"val/acc_step{t}")) == 2  # steps 20 and 40
        for k in range(1, 5):
            assert 0.0 <= metrics[f"val/acc_step{t}_d{k}"] <= 1.0
    assert f"val/acc_step{steps + 1}" not in metrics
    assert metrics["val/acc_final"] == metrics[f"val/acc_step{1 if arch != 'looped' else 2}"]
    assert "test/acc_final" in metrics
    if arch == "looped":
        assert 1.0 <= metrics["val/exit_expected_step"] <= 2.0
        assert metrics["val/exit_mass_step1"] + metrics["val/exit_mass_step2"] == pytest.approx(1.0, abs=1e-5)
        assert 0.0 <= metrics["val/exit_entropy"] <= math.log(2) + 1e-6
        # the frontier's rows: a table artifact per split, not metrics, read back under their names
        assert not any(n.startswith(("val/exit_q", "test/exit_conf", "test/oracle_right_", "val/oracle_stable_acc")) for n in metrics)
        assert run.data.tags["ouro.metric_tables"] == "frontier/test.csv,frontier/val.csv"
        read = tracking.read_metrics(client, run)
        frontier = {k: v for k, v in (result.val | result.test).items() if rr.tabled(k)}
        assert len(frontier) > 100 and {k: read[k] for k in frontier} == pytest.approx(frontier, nan_ok=True)
        assert set(read) - set(metrics) == set(frontier)
    else:
        assert "val/exit_expected_step" not in metrics
    assert result.checkpoint and result.checkpoint.endswith("last.ckpt")


def test_same_config_and_seed_give_same_metrics(tiny_config):
    cfg = tiny_config("train.max_steps=10", "train.val_every=10", "eval.test=false")
    a, b = train(cfg, verbose=False), train(cfg, verbose=False)
    assert a.val == b.val
    assert a.run_id != b.run_id


def test_eval_checkpoint_reproduces_test_metrics_and_extrapolates(tiny_config):
    result = train(tiny_config(), verbose=False)
    again = evaluate_checkpoint(Path(result.checkpoint), [], "test")
    assert again.metrics["test/acc_final"] == pytest.approx(result.test["test/acc_final"], abs=1e-6)
    more = evaluate_checkpoint(Path(result.checkpoint), ["eval.extra_loops=5"], "test")
    assert "test/acc_step7" in more.metrics and "test/acc_step8" not in more.metrics
    assert "step" in more.table and "acc_d4" in more.table
    with pytest.raises(ConfigError, match="only eval"):
        evaluate_checkpoint(Path(result.checkpoint), ["model.loops=3"], "test")
    # Lightning's own reload rebuilds the typed config from the checkpoint's dict
    from ouro_lab.modules import LoopedLMModule

    reloaded = LoopedLMModule.load_from_checkpoint(result.checkpoint, map_location="cpu")
    assert reloaded.cfg.model.loops == 2 and reloaded.eval_loops == 4


def _saved_step(path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["ouro_step"]


@pytest.mark.parametrize("max_steps, val_every, stage2_steps", [
    (20, 10, 0),  # divides: the last validation inside fit saves the checkpoint
    (14, 10, 0),  # does not: the final validation after fit must save it too
    (14, 10, 7),  # Stage I and Stage II in one run, neither a multiple of val_every
    (20, 10, 10),  # both multiples
])
def test_the_named_checkpoint_holds_the_weights_the_final_metrics_score(max_steps, val_every, stage2_steps,
                                                                        tiny_config, tracking_uri):
    cfg = tiny_config(f"train.max_steps={max_steps}", f"train.val_every={val_every}", "train.lr=1e-2",
                      *([f"stage2.steps={stage2_steps}", "stage2.k=5"] if stage2_steps else []))
    result = train(cfg, verbose=False)
    last_step = max_steps + stage2_steps
    assert _saved_step(result.checkpoint) == last_step
    run = MlflowClient(tracking_uri).get_run(result.run_id)
    assert run.data.tags["ouro.checkpoint_step"] == str(last_step)
    # re-evaluating the named checkpoint gives the run's own final test and val metrics, exactly
    for split, logged in (("test", result.test), ("val", result.val)):
        again = evaluate_checkpoint(Path(result.checkpoint), [], split).metrics
        for key in (f"{split}/acc_final", f"{split}/loss_final", f"{split}/acc_exit"):
            assert again[key] == pytest.approx(logged[key], abs=1e-6), key
    if stage2_steps:  # Stage I's checkpoint holds what Stage I's final validation scored
        stage1 = Path(result.checkpoint).parent / "stage1.ckpt"
        assert _saved_step(stage1) == max_steps
        history = MlflowClient(tracking_uri).get_metric_history(result.run_id, "val/acc_final")
        at_stage1_end = [m.value for m in history if m.step == max_steps - 1]
        again = evaluate_checkpoint(stage1, [], "val").metrics
        assert at_stage1_end, [m.step for m in history]
        assert again["val/acc_final"] == pytest.approx(at_stage1_end[-1], abs=1e-6)


def test_cli_eval(tiny_config, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the evaluation logs into the working folder's store: not the repository's
    result = train(tiny_config("train.max_steps=5", "train.val_every=5", "eval.test=false"), verbose=False)
    # overrides before or after an option alike
    for argv in (["eval.extra_loops=3", "--split", "val"], ["--split", "val", "eval.extra_loops=3"]):
        assert main(["eval", result.checkpoint, *argv, "--no-log"]) == 0
        out = capsys.readouterr().out
        assert "val metrics by loop step" in out
        assert re.search(r"^\s+5\s", out, re.M) and not re.search(r"^\s+6\s", out, re.M)  # T=2 + 3 extra steps
    assert main(["eval", result.checkpoint, "eval.extra_loops=3", "--split", "val"]) == 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (evaluation,) = [r for r in client.search_runs([client.get_experiment_by_name("test").experiment_id])
                     if r.data.tags.get("ouro.role") == "eval"]
    assert evaluation.data.tags["ouro.metric_kind"] == "acc"  # (state: accuracy)
    assert (tmp_path / "mlflow.db").exists()
    assert main(["eval", "nope.ckpt"]) == 2
    assert "checkpoint not found: nope.ckpt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", result.checkpoint, "--split", "val", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


class _PoisonWeights(L.Callback):
    """Sets a weight to NaN at a given step: the loss becomes NaN on the next step."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == 3:
            with torch.no_grad():
                module.model.tok_emb.weight.fill_(float("nan"))


def test_nan_loss_fails_the_run_with_a_clear_reason(tiny_config, tracking_uri):
    cfg = tiny_config()
    with pytest.raises(FloatingPointError, match="training loss became nan by step 4 \(checked every train.log_every=5 steps and at the last"):
        train(cfg, callbacks=[_PoisonWeights()], verbose=False)
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert run.info.status == "FAILED"
    assert "training loss became nan" in run.data.tags["error"]


def test_nested_run_under_parent(tiny_config, tracking_uri):
    client = MlflowClient(tracking_uri)
    cfg = tiny_config("train.max_steps=5", "train.val_every=5", "eval.test=false")
    exp = client.create_experiment("test")
    parent = client.create_run(exp, run_name="study").info.run_id
    with tracking.Experiment(tracking_uri, exp).create_run("trial", {}, parent=parent) as run:
        result = train(cfg, run=run, verbose=False)
        # the caller owns the run: train logs into it and leaves it open (Lightning does not end it)
        assert client.get_run(result.run_id).info.status == "RUNNING"
    assert client.get_run(result.run_id).data.tags["mlflow.parentRunId"] == parent
    assert client.get_run(result.run_id).info.status == "FINISHED"


def test_a_run_logs_its_config_once_and_only_the_sections_it_uses(tiny_config, tracking_uri):
    result = train(tiny_config("train.max_steps=5", "train.val_every=5", "eval.test=false"), verbose=False)
    run = MlflowClient(tracking_uri).get_run(result.run_id)
    params = run.data.params
    assert not [k for k in params if k.startswith("config/")]  # Lightning's second copy of the config
    assert params["data.task"] == "state" and "data.state.length" in params
    assert not [k for k in params if k.startswith(("data.arith.", "data.multihop.", "data.text.", "data.random."))]
    assert "train/loss_exit" in run.data.metrics and "train/expected_loss" not in run.data.metrics


def test_cli_train_prints_where_results_went(tiny_config, tmp_path, tracking_uri, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(["train", str(Path(__file__).resolve().parents[1] / "conf" / "state.yaml"),
               "model.d_model=32", "model.loops=2", "data.state.length=8", "data.n_val=64", "data.n_test=64",
               "train.max_steps=6", "train.warmup_steps=1", "train.val_every=6", "train.progress_bar=false"])
    assert rc == 0
    out = capsys.readouterr().out
    assert f"sqlite:///{tmp_path / 'mlflow.db'}" in out  # the embedded default store in the working dir
    assert "mlflow ui --backend-store-uri" in out and "#/experiments/" in out and "?workflowType=machine_learning" in out
    assert "val metrics by loop step" in out
    assert (tmp_path / "mlflow.db").is_file()


@pytest.mark.parametrize("task", ["multihop", "text"])
def test_multihop_and_text_log_per_step_per_difficulty_metrics(task, tiny_config, tracking_uri):
    small = {"multihop": ["data.multihop.width=6", "data.multihop.depth=3", "data.multihop.hops=3",
                          "data.multihop.relations=2", "data.multihop.query_tokens=12"],
             "text": ["data.text.context=16"]}[task]  # text: the default corpus, the stdlib
    cfg = tiny_config(*small, path=f"conf/{task}.yaml")
    assert cfg.data.task == task
    result = train(cfg, verbose=False)
    client = MlflowClient(tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["ouro.task"] == task
    assert run.data.tags["ouro.metric_kind"] == {"multihop": "acc", "text": "bpb"}[task] == result.kind
    metrics = run.data.metrics
    # memorised multihop holds out compositions only (k >= 2); text buckets context positions
    levels = {"multihop": [2, 3], "text": [1, 2, 3, 4]}[task]
    for split in ("val", "test"):
        for t in range(1, 5):  # T=2 plus eval.extra_loops=2
            assert len(client.get_metric_history(result.run_id, f"{split}/acc_step{t}")) >= 1
            for k in levels:
                assert 0.0 <= metrics[f"{split}/acc_step{t}_d{k}"] <= 1.0
        assert f"{split}/acc_step1_d1" in metrics if task == "text" else f"{split}/acc_step1_d1" not in metrics
    if task == "text":
        # one byte per target, but for the rare end-of-document byte, which covers none
        assert metrics["val/bpb_final"] == pytest.approx(metrics["val/loss_final"] / math.log(2), rel=2e-3)
        assert metrics["val/bpb_step3_d4"] == pytest.approx(metrics["val/loss_step3_d4"] / math.log(2), rel=2e-3)
        assert 0 < metrics["val/bpb_final"] < 8.5  # not worse than uniform over bytes by much
        from ouro_lab.data.lm import source_files

        assert run.data.metrics["model/corpus_files"] == len(source_files("stdlib"))
        assert len(run.data.params["derived.corpus_key"]) == 20
    else:
        assert "val/bpb_final" not in metrics
    assert [a.path for a in client.list_artifacts(result.run_id, "plots")] == ["plots/loop_steps.png"]


def test_compiled_training_matches_eager(tiny_config):
    """train.compile=true (each block compiled) trains to the same metrics as eager, on CPU."""
    base = ("train.max_steps=10", "train.val_every=10", "eval.test=false", "eval.extra_loops=1")
    eager = train(tiny_config(*base), verbose=False)
    compiled = train(tiny_config(*base, "train.compile=true"), verbose=False)
    for key in ("val/loss_step1", "val/loss_step3", "val/loss_final"):
        assert compiled.val[key] == pytest.approx(eager.val[key], rel=1e-3), key


def test_no_host_reads_of_tensors_between_log_steps(tiny_config, monkeypatch):
    """Reading a tensor on the host (.item(), bool(), float(), .tolist()) is a device sync on a
    GPU. Between the steps Lightning flushes logs, neither our module nor Lightning does one."""
    import sys

    reads = []
    window = {"open": False}

    def spy(name, original):
        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if window["open"] and ("ouro_lab" in caller or "lightning" in caller):
                reads.append(f"{name} from {caller}:{sys._getframe(1).f_lineno}")
            return original(self, *args, **kwargs)
        return wrapper

    for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, spy(name, getattr(torch.Tensor, name)))

    class Window(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            step = trainer.global_step + 1  # tiny_config: train.log_every=5; the last step is checked too
            window["open"] = step % 5 != 0 and step < 12

        def on_train_batch_end(self, trainer, *args):
            window["open"] = False

    train(tiny_config("train.max_steps=12", "train.val_every=12", "eval.test=false"), callbacks=[Window()],
          verbose=False)
    assert reads == []


def test_nan_after_the_last_log_step_is_still_caught(tiny_config):
    class PoisonLate(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == 11:  # after the log step at 10, before the last step (12)
                with torch.no_grad():
                    module.model.tok_emb.weight.fill_(float("nan"))

    with pytest.raises(FloatingPointError, match="training loss became nan by step 11"):
        train(tiny_config("train.max_steps=12", "train.val_every=12"), callbacks=[PoisonLate()], verbose=False)


def test_stage2_trains_only_the_gate_and_names_its_stage1_run(tiny_config, tracking_uri):
    stage1 = train(tiny_config("train.max_steps=20", "train.val_every=20", "eval.test=false"), verbose=False)
    stage2 = train(tiny_config("train.max_steps=10", "train.val_every=10", "eval.test=false", "train.lr=1e-2",
                               f"stage2.init_from={stage1.checkpoint}"), verbose=False)
    before = torch.load(stage1.checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    after = torch.load(stage2.checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    assert before.keys() == after.keys()
    for name in before:
        if name.startswith("model.exit_gate."):
            assert not torch.equal(before[name], after[name]), name  # the gate learnt
        else:
            assert torch.equal(before[name], after[name]), name  # bit-identical
    run = MlflowClient(tracking_uri).get_run(stage2.run_id)
    assert run.data.tags["ouro.stage"] == "2" and run.data.tags["ouro.stage1_run_id"] == stage1.run_id
    assert run.data.params["stage2.init_from"] == stage1.checkpoint and "stage2.k" in run.data.params
    assert "val/gate_efficiency" in run.data.metrics and "stage2" in run.info.run_name
    assert "stage2.init_from" not in MlflowClient(tracking_uri).get_run(stage1.run_id).data.params
    with pytest.raises(ConfigError, match="stage2.init_from: .* different model or task: model.loops=2 there, 3 here"):
        from ouro_lab.builders import build_module

        build_module(tiny_config("model.loops=3", "train.max_steps=5", f"stage2.init_from={stage1.checkpoint}"))
    # the Stage II checkpoint holds its own weights: it loads (from a str path) with its Stage-I file gone
    from ouro_lab.checkpoints import load_checkpoint

    Path(stage1.checkpoint).unlink()
    cfg, module = load_checkpoint(str(stage2.checkpoint))
    assert cfg.stage2.init_from == stage1.checkpoint and module.in_stage2
    assert all(torch.equal(module.state_dict()[k], after[k]) for k in after)


def test_stage2_after_stage1_in_one_run(tiny_config, tracking_uri):
    """stage2.steps: Stage I for train.max_steps, then the gate alone in the same run, whose
    metrics go on at the steps after Stage I's; Stage I's checkpoint is kept beside the final."""
    result = train(tiny_config("train.max_steps=20", "train.val_every=10", "eval.test=false", "stage2.steps=10",
                               "stage2.k=5", "train.lr=1e-2"), verbose=False)
    folder = Path(result.checkpoint).parent
    before = torch.load(folder / "stage1.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    after = torch.load(result.checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith("model.exit_gate.") for name in changed), changed
    client = MlflowClient(tracking_uri)
    run = client.get_run(result.run_id)
    assert run.data.tags["ouro.stage"] == "1+2" and run.data.params["stage2.steps"] == "10"
    assert "stage2" in run.info.run_name
    assert [m.step for m in client.get_metric_history(result.run_id, "val/gate_efficiency")] == [9, 19, 29]
    assert max(m.step for m in client.get_metric_history(result.run_id, "train/loss")) == 29
    stage1_exit = client.get_metric_history(result.run_id, "val/exit_expected_step")[1].value
    assert result.val["val/exit_expected_step"] == run.data.metrics["val/exit_expected_step"] != stage1_exit


def test_stage2_gate_exits_earlier_on_the_easiest_positions(tmp_path):
    """The default task at a small size (L=8, 2x3; ~15 s): after Stage II the gate's expected
    exit step is lower on the first quarter of positions (few group elements composed) than
    on the last (measured: 1.86 vs 2.72)."""
    from ouro_lab.config import load_config

    common = ["model.loops=3", "data.state.length=8", "data.n_val=256", "data.n_test=256", "train.progress_bar=false",
              f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"tracking.output_dir={tmp_path / 'out'}",
              "eval.test=false"]
    conf = Path(__file__).resolve().parents[1] / "conf" / "state.yaml"
    stage1 = train(load_config(conf, common + ["train.max_steps=300", "train.val_every=300"]), verbose=False)
    stage2 = train(load_config(conf, common + ["train.max_steps=100", "train.val_every=100", "train.warmup_steps=10",
                                               f"stage2.init_from={stage1.checkpoint}"]), verbose=False)
    assert stage2.val["val/exit_expected_step_d1"] < stage2.val["val/exit_expected_step_d4"] - 0.3, stage2.val


def test_training_runs_log_system_metrics_unless_switched_off(tiny_config, tracking_uri, monkeypatch):
    """MLflow's own monitor on the run while it trains (every 0.2 s here; 10 s by default)."""
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    client = MlflowClient(tracking_uri)
    on = client.get_run(train(tiny_config("train.max_steps=60"), verbose=False).run_id).data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(on), sorted(on)
    assert 0 <= on["system/cpu_utilization_percentage"] <= 100
    off = client.get_run(train(tiny_config("train.max_steps=60", "tracking.system_metrics=false"),
                               verbose=False).run_id).data.metrics
    assert not [k for k in off if k.startswith("system/")]


def test_exit_aware_training_changes_only_the_steps_after_it_begins(tiny_config, tracking_uri):
    """train.exit_aware: the first train.exit_aware_from of the steps are ordinary training, the
    rest train with tokens exiting (here every exit-aware kind and exited_kv, Stage II included).
    Two layers: with one, propagate is exact (an exited state's projections are what the one
    layer of the next step computes)."""
    base = ("train.max_steps=10", "train.val_every=10", "eval.test=false", "train.exit_aware_from=0.5",
            "model.n_layers=2")
    client = MlflowClient(tracking_uri)

    def losses(result) -> list[float]:
        return [m.value for m in sorted(client.get_metric_history(result.run_id, "train/loss"), key=lambda m: m.step)]

    plain = losses(train(tiny_config(*base), verbose=False))
    for kind, kv in (("sampled", "frozen"), ("q", "propagate"), ("sampled", "first")):
        aware = losses(train(tiny_config(*base, f"train.exit_aware={kind}", f"train.exited_kv={kv}",
                                         "train.exit_aware_q=0.3"), verbose=False))
        assert aware[0] == plain[0] and aware[1] != plain[1], (kind, kv)  # logged at steps 5 and 10
    result = train(tiny_config(*base, "stage2.steps=5", "train.exit_aware=q"), verbose=False)
    assert math.isfinite(result.val["val/gate_efficiency"])
