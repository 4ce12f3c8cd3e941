"""The run record: what writers record is what the reader parses back, and the tidy frames of
a study are built from plain run records (no MLflow, no fakes)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import optuna
import pytest

from ouro_lab import metric_names as names
from ouro_lab import run_record as rr
from ouro_lab.analysis.tidy import AnalysisError, study_data
from ouro_lab.run_record import RunRecord

PACKAGE = Path(__file__).resolve().parents[1] / "ouro_lab"


@pytest.mark.parametrize("err, state", [(None, "COMPLETE"), (optuna.TrialPruned("slow"), "PRUNED"),
                                        (ValueError("nan loss"), "FAIL"), (KeyboardInterrupt(), "FAIL")])
def test_the_state_a_sweep_run_ends_in_is_the_state_the_reader_reads(err, state):
    status, tags = rr.trial_ending(err)
    assert rr.state(status, rr.sweep_tags("s", rr.TRIAL_RUN, 3) | tags) == state
    if isinstance(err, ValueError):
        assert status == "FAILED" and tags[rr.ERROR] == "ValueError: nan loss"
    if isinstance(err, KeyboardInterrupt):
        assert status == "KILLED" and rr.INTERRUPTED in tags


def test_runs_outside_sweeps_take_their_state_from_mlflow_and_a_sweep_run_is_whole_only_when_tagged():
    assert [rr.state(*rr.ended_by(e)) for e in (None, ValueError("x"), SystemExit())] == ["COMPLETE", "FAIL", "FAIL"]
    # MLFlowLogger ends a run FINISHED after fit, before the sweep's final validation and tag
    assert rr.state("FINISHED", rr.sweep_tags("s", rr.SEED_RUN, 0)) == "RUNNING"
    assert rr.state("FAILED", rr.sweep_tags("s", rr.SEED_RUN, 0)) == "FAIL"


def test_builders_and_parsers_agree():
    assert rr.bundles(rr.bundle_tags({"recipe": "huginn"}) | {"ouro.trial": "1"}) == {"recipe": "huginn"}
    spread = rr.seed_spread("val/acc_final", [0.5, 0.7, 0.6])
    assert spread[rr.seed_std("val/acc_final")] == pytest.approx(0.1)
    assert rr.seed_spread("val/acc_final", [0.5]) == {}
    # the frontier's table: every tabled name and value back, nothing else taken
    metrics = {"val/exit_q0.5_acc": 0.9, "val/exit_q0.5_loops": 1.75, "val/exit_conf0.95_loss_d2": 0.125,
               "val/exit_change0.001_bpb": float("nan"), "val/oracle_stable_loops_d3": 2.0,
               "test/oracle_right_acc": 1.0, "val/acc_final": 0.8, "val/gate_efficiency": 0.7,
               "val/oracle_stable_share_step2": 0.5}
    tables = rr.metric_tables(metrics)
    assert sorted(tables) == ["frontier/test.csv", "frontier/val.csv"]
    assert tables["frontier/val.csv"].splitlines()[0] == "rule,threshold,difficulty,loops,acc,loss,bpb"
    back = {k: v for path, text in tables.items() for k, v in rr.table_metrics(path, text).items()}
    tabled = {k: v for k, v in metrics.items() if rr.tabled(k)}
    assert len(tabled) == 6 and back == pytest.approx(tabled, nan_ok=True)
    assert rr.metric_tables({"val/acc_final": 0.8}) == {}
    # the skip frontier's table: selection rows (no exited_kv) first, each variant's skip rows
    from ouro_lab import metric_names as names
    from ouro_lab.models.decoding import EXITED_KV
    skip = {f"test/{names.skip_frontier('select', 'q', 0.1, 'acc')}": 0.85,
            f"test/{names.skip_frontier('select', 'q', 0.1, 'flops', level=None)}": 1e6,
            **{f"test/{names.skip_frontier('skip', 'q', q, kind, kv, level)}": i + q
               for i, kv in enumerate(EXITED_KV) for q in (0.1, 0.5) for kind in ("acc", "flops") for level in (None, 2)},
            "test/full_acc": 0.9, "test/skip_acc": 0.5}
    tables = rr.metric_tables(skip)
    assert sorted(tables) == ["skip_frontier/test.csv"]
    lines = tables["skip_frontier/test.csv"].splitlines()
    assert lines[0] == "semantics,rule,threshold,exited_kv,difficulty,acc,flops"
    assert lines[1] == "select,q,0.1,,all,0.85,1000000.0" and lines[2].startswith("skip,q,0.1,frozen,all,")
    assert len(lines) == 2 + len(EXITED_KV) * 2 * 2
    assert rr.table_metrics("skip_frontier/test.csv", tables["skip_frontier/test.csv"]) == pytest.approx(
        {k: v for k, v in skip.items() if rr.tabled(k)})
    assert not rr.tabled("test/full_acc") and not rr.tabled("test/skip_minus_select_acc")
    assert rr.derived_params({"seq_len": 8, "corpus_key": "ab12"}) == {"derived.corpus_key": "ab12"}  # numbers: model/*
    assert rr.derived_of(rr.derived_params({"corpus_key": "ab12"}) | {"model.loops": "2"}) == {"derived.corpus_key": "ab12"}
    assert rr.model_metrics({"n_params": 10, "rope": "half"}) == {rr.N_PARAMS: 10}
    assert rr.study_metrics({"COMPLETE": 2}, "val/acc_final", 0.9) == {"study/n_complete": 2,
                                                                        "study/best_val_acc_final": 0.9}
    stopped = rr.trial_ending(optuna.TrialPruned(rr.pruned_message(500, "val/acc_final", 0.61, "it cannot matter")))
    assert stopped[0] == "KILLED" and rr.pruned_step(stopped[1]) == 500 and "it cannot matter" in stopped[1][rr.PRUNED]
    assert rr.pruned_step(rr.trial_ending(None)[1]) is None


def _unit(run_id: str, loops: int, kind_tag: str | None, **tags) -> RunRecord:
    params = {"model.arch": "looped", "model.loops": str(loops), "train.seed": "0", "data.task": "state",
              "train.max_steps": "10", "data.batch_size": "4"}
    metrics = {f"val/{names.step(k, t)}": 0.1 * t + (k == "bpb") for k in ("acc", "loss", "bpb")
               for t in range(1, loops + 1)} | {rr.N_PARAMS: 1000.0}
    tags = tags | ({rr.METRIC_KIND_TAG: kind_tag} if kind_tag else {})
    return RunRecord(run_id, f"run-{run_id}", params=params, metrics=metrics, tags=tags)


def test_a_study_is_built_from_plain_run_records_and_reads_the_recorded_metric_kind():
    runs = [_unit("a", 1, "acc"), _unit("b", 2, "acc"), RunRecord("c", params={"model.arch": "looped"},
                                                                    status="FAILED")]
    objective = {"objective": {"metric": "val/gate_efficiency", "direction": "maximize"}}
    data = study_data("test", "sqlite:///x.db", "1", runs, objective)
    assert sorted(data.runs["run_id"]) == ["a", "b"] and data.counts == {"COMPLETE": 2, "FAIL": 1}
    assert sorted(data.steps["step"]) == [1, 1, 2] and set(data.steps["difficulty"]) == {"all"}
    assert data.runs["n_params"].tolist() == [1000.0, 1000.0]
    # the objective is no per-step metric: the kind is the one the runs recorded, not a guess
    # from the logged columns (which hold bpb too, as a byte-level task's would)
    assert data.kind == "acc"
    older = study_data("test", "sqlite:///x.db", "1", [_unit("a", 1, None), _unit("b", 2, None)], objective)
    assert older.kind == "bpb"  # runs logged before the tag: the columns decide, as before
    with pytest.raises(AnalysisError, match="no finished runs yet"):
        study_data("test", "sqlite:///x.db", "1", runs[2:], {})


def test_evaluations_are_named_by_the_run_they_scored():
    ev = RunRecord("e", params={"model.arch": "looped", "model.loops": "2", "eval_split": "test",
                                "infer.exit_rule": "q", "infer.exit_threshold": "0.5", "data.task": "state",
                                "train.seed": "0"},
                   metrics={"test/skip_acc": 0.5, "test/acc_step1": 0.4, "test/acc_step2": 0.5},
                   tags=rr.evaluation_tags(rr.EVAL_RUN, "/ckpt/last.ckpt", "trained") | {rr.METRIC_KIND_TAG: "acc"})
    imported = RunRecord("i", params=ev.params, metrics=ev.metrics,
                         tags=rr.evaluation_tags(rr.EVAL_RUN, "/ckpt/ouro.ckpt", None))
    data = study_data("e", "sqlite:///x.db", "1", [ev, imported], {}, names={"trained": "state-looped-N2xT2-s0"})
    assert data.source == "eval"
    assert sorted(data.skip["evaluated"]) == ["ouro.ckpt", "state-looped-N2xT2-s0"]


def test_no_other_module_spells_the_run_record():
    """Tags, roles, states and the non-step metric families are spelt in run_record.py only."""
    record = re.compile(r"""["'](ouro\.[a-z_]+|optuna\.state|mlflow\.parentRunId|seeds/|study/n_|model/|derived\.)""")
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "run_record.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and record.match(repr(node.value)):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.value!r}")
    assert not found, found


def test_the_dataset_records_change_with_the_data_and_only_with_it():
    from ouro_lab.config import load_config
    from ouro_lab.data import build_task
    from ouro_lab.run_record import datasets

    def records(*overrides):
        cfg = load_config(None, list(overrides))
        train, evaluation = datasets(cfg, build_task(cfg.data))
        assert (train.context, evaluation.context) == ("training", "evaluation")
        return train, evaluation

    train, evaluation = records()
    assert (train.name, evaluation.name) == ("state (train)", "state (val, test)") and len(train.digest) == 12
    assert evaluation.source["data.state.length"] == "16" and evaluation.source["data.seed"] == "0"
    assert records("train.lr=0.01", "model.loops=8") == (train, evaluation)  # training settings: the same data
    assert all(a.digest != b.digest for a, b in zip(records("data.state.length=12"), (train, evaluation)))
    other_seed = records("train.seed=1")  # another train stream, the same val and test sets
    assert other_seed[0].digest != train.digest and other_seed[1] == evaluation
    assert records("data.seed=1")[1].digest != evaluation.digest
    assert records("data.task=arith")[0].name == "arith (train)"


def test_a_study_runs_loop_series_is_the_mean_per_t_for_each_setting_of_the_other_keys():
    values = [({"model.loops": 2, "model.arch": "looped", "design.seed": 0}, 0.5),
              ({"model.loops": 2, "model.arch": "looped", "design.seed": 1}, 0.7),
              ({"model.loops": 1, "model.arch": "looped", "design.seed": 0}, 0.4),
              ({"model.loops": 1, "model.arch": "depth_matched", "design.seed": 0}, 0.3),
              ({"train.lr": 0.1}, 0.9)]  # (no loop count: left out)
    series = rr.loop_series("val/acc_final", values, ignore=("design.seed",))
    assert series == {"study/series/val_acc_final_vs_loops/arch_looped": [(1, 0.4), (2, pytest.approx(0.6))],
                      "study/series/val_acc_final_vs_loops/arch_depth_matched": [(1, 0.3)]}
    assert rr.loop_series("val/bpb_final", [({"model.loops": 4}, 2.5)]) == \
        {"study/series/val_bpb_final_vs_loops": [(4, 2.5)]}


def test_a_dataset_another_run_inserted_first_is_logged_on_retry(tmp_path, monkeypatch):
    """Two runs logging the same dataset at once race on its unique key in MLflow's store (seen
    with two workers on PostgreSQL): the loser retries and finds it; other errors propagate."""
    from mlflow.exceptions import MlflowException

    from ouro_lab import tracking
    from ouro_lab.run_record import DatasetRecord

    record = DatasetRecord("state (train)", "abc123", {"data.state.length": "8"}, "training")
    run = tracking.Experiment.open(f"sqlite:///{tmp_path / 'mlflow.db'}", "e").create_run("r", {})
    real, calls = run.client.log_inputs, []

    def racing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise MlflowException('(psycopg.errors.UniqueViolation) duplicate key value violates unique constraint')
        return real(*args, **kwargs)

    monkeypatch.setattr(run.client, "log_inputs", racing)
    run.log_datasets([record])
    assert len(calls) == 2 and [i.dataset.name for i in run.fetch().inputs.dataset_inputs] == ["state (train)"]

    def broken(*args, **kwargs):
        raise MlflowException("Run 'x' not found")

    monkeypatch.setattr(run.client, "log_inputs", broken)
    with pytest.raises(MlflowException, match="not found"):
        run.log_datasets([record])
