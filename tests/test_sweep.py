"""Sweeps: schema validation, real tiny studies end to end, pruning, failures, resume."""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from ouro_lab import analysis
from ouro_lab.cli import main
from ouro_lab.config import ConfigError
from ouro_lab.sweep import run_sweep
from ouro_lab.sweep import load_sweep
from ouro_lab.ui_view import read_view_tag

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.d_model=32", "model.n_heads=2", "data.state.length=8", "data.n_val=64", "data.n_test=64",
    "train.max_steps=30", "train.warmup_steps=3", "train.val_every=10",
]


def write_sweep(tmp_path: Path, body: str, name: str = "s", extra: tuple[str, ...] = (),
                tracking_uri: str | None = None) -> Path:
    path = tmp_path / f"{name}.yaml"
    overrides = "\n".join(f"  - {o}" for o in [*TINY, *extra])
    uri = tracking_uri or f"sqlite:///{tmp_path / 'mlflow.db'}"
    path.write_text(f"base: {ROOT / 'conf' / 'state.yaml'}\nstudy_dir: {tmp_path / 'studies' / name}\n"
                    f"tracking_uri: {uri}\noverrides:\n{overrides}\n" + textwrap.dedent(body))
    return path


@contextmanager
def spawned(cmd: list[str], **kwargs):
    """A subprocess in its own process group, killed with all it started (workers) when the
    test ends, passed or failed: no sweep is left running after pytest exits."""
    proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
    try:
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()


def load_study(tmp_path: Path, name: str = "s", storage=None) -> optuna.Study:
    from optuna.storages.journal import JournalFileBackend

    if storage is None:
        storage = optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / "studies" / name / "optuna.journal")))
    return optuna.load_study(study_name=name, storage=storage)


# --- schema ----------------------------------------------------------------------------

@pytest.mark.parametrize("body, message", [
    ("params: {model.loops: {choices: [1, 2]}}\ntrials: 2\nsampler: {name: tpe}\nbogus: 1\n",
     "unknown sweep field 'bogus'"),
    ("params: {model.loops: {choices: [1, 2]}}\ntrials: 2\nsampler: {name: tpe, sed: 3}\n",
     "unknown sweep field 'sampler.sed'; valid fields of sampler: name, seed"),
    ("params: {model.loops: {choices: [1, 2], scale: 3}}\ntrials: 2\n",
     "params.model.loops: unknown field 'scale'; a param takes choices, low, high, log, step"),
    ("params: {model.loopz: {choices: [1, 2]}}\ntrials: 2\n",
     "params.model.loopz: not a key of the experiment config"),
    ("params: {model.loops: {low: 4, high: 2}}\ntrials: 2\nsampler: {name: tpe}\n",
     "params.model.loops: empty range: low=4 must be < high=2"),
    ("params: {model.loops: {choices: []}}\ntrials: 2\n", "params.model.loops: choices is empty"),
    ("params: {model.loops: {choices: [1, two]}}\ntrials: 2\n",
     "params.model.loops: value 'two' is invalid: model.loops: Value 'two' of type 'str' could not be converted"),
    ("params: {model.loops: {choices: [0, 2]}}\ntrials: 2\n",
     "params.model.loops: value 0 is invalid: invalid config:\n  model.loops: must be >= 1"),
    ("params: {objective.entropy_weight: {low: 0.0, high: 1.0, log: true}}\ntrials: 2\nsampler: {name: tpe}\n",
     "params.objective.entropy_weight: log scale needs low > 0"),
    ("params: {objective.entropy_weight: {low: 0.01, high: 1.0}}\nsampler: {name: grid}\n",
     "the grid sampler needs choices"),
    ("params: {model.loops: {choices: [1, 2]}}\nsampler: {name: tpe}\n", "trials: set a trial budget"),
    ("params: {model.loops: {choices: [1, 2]}}\ntrials: 2\nsampler: {name: anneal}\n",
     "sampler.name: 'anneal' is not one of: grid, tpe, random, cmaes"),
    ("params: {model.loops: {choices: [1, 2]}}\ntrials: 2\npruner: {name: median, patience: 3}\n",
     "pruner.patience: not a setting of the median pruner"),
    ("params: {model.loops: {choices: [1, 2]}}\ntrials: 2\nobjective: {metric: accuracy}\n",
     "objective.metric: 'accuracy' is not a metric name"),
    ("params: {model.loops: {choices: [1, 2]}}\ntrials: two\n", "trials: Value 'two' of type 'str'"),
    ("params: {model.arch: {choices: [looped, param_matched]}}\nobjective: {metric: val/exit_entropy}\ntrials: 2\n",
     "objective.metric: 'val/exit_entropy' is not logged at model.arch=param_matched"),
    ("params: {model.loops: {choices: [2, 6]}}\nobjective: {metric: val/acc_step6}\ntrials: 2\n",
     "objective.metric: 'val/acc_step6' is not logged at model.loops=2"),
    ("params: {model.loops: {choices: [2]}}\nobjective: {metric: val/acc_final_d5}\ntrials: 2\n",
     "objective.metric: 'val/acc_final_d5' is not logged"),
    ("params: {model.arch: {choices: [looped, depth_matched]}}\nobjective: {metric: val/gate_efficiency}\ntrials: 2\n",
     "objective.metric: 'val/gate_efficiency' is not logged at model.arch=depth_matched"),
    ("params: {model.loops: {choices: [2]}}\nobjective: {metric: val/exit_q0.33_acc}\ntrials: 2\n",
     "objective.metric: 'val/exit_q0.33_acc' is not logged at model.loops=2"),
])
def test_schema_errors_name_the_field(tmp_path, body, message):
    with pytest.raises(ConfigError) as err:
        load_sweep(write_sweep(tmp_path, body))
    assert message in str(err.value)


def test_missing_base_and_missing_file(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("params: {model.loops: {choices: [1]}}\ntrials: 1\n")
    with pytest.raises(ConfigError, match="base: missing"):
        load_sweep(path)
    path.write_text("base: nope.yaml\nparams: {model.loops: {choices: [1]}}\ntrials: 1\n")
    with pytest.raises(ConfigError, match="base: .*nope.yaml not found"):
        load_sweep(path)
    with pytest.raises(ConfigError, match="sweep file not found"):
        load_sweep(tmp_path / "absent.yaml")


@pytest.mark.parametrize("path", sorted((ROOT / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweeps_validate(path, lm_setup):
    from conftest import NEEDS_SETUP

    sweep, base = load_sweep(path, lm_setup if path.name in NEEDS_SETUP else [])
    assert base.is_file() and sweep.params


def test_cli_overrides_split_between_sweep_and_experiment(tmp_path):
    path = write_sweep(tmp_path, "params: {model.loops: {choices: [1, 2]}}\ntrials: 2\n")
    sweep, _ = load_sweep(path, ["trials=5", "seeds=2", "train.max_steps=7", "pruner.name=median"])
    assert (sweep.trials, sweep.seeds, sweep.pruner["name"]) == (5, 2, "median")
    assert sweep.overrides[-1] == "train.max_steps=7"


def test_resuming_with_a_different_definition_is_refused(tmp_path):
    from ouro_lab.sweep import open_study

    path = write_sweep(tmp_path, "params: {model.loops: {choices: [1, 2]}}\nsampler: {name: grid}\n", "guard")
    open_study(*load_sweep(path, ["trials=1"]))  # budget changes are fine
    open_study(*load_sweep(path, ["trials=2"]))
    with pytest.raises(ConfigError, match="created from a different sweep definition.*name=guard-v2"):
        open_study(*load_sweep(path, ["train.max_steps=31"]))


def test_samplers_do_not_replay_draws_on_resume(tmp_path):
    from ouro_lab.sweep import make_sampler

    path = write_sweep(tmp_path, "params: {objective.entropy_weight: {low: 0.001, high: 1.0, log: true}}\n"
                                 "trials: 4\nsampler: {name: random, seed: 0}\n")
    sweep, _ = load_sweep(path)
    draws = []
    for n_existing in (0, 0, 3):
        study = optuna.create_study(sampler=make_sampler(sweep, n_existing))
        draws.append(study.ask().suggest_float("x", 0.001, 1.0, log=True))
    assert draws[0] == draws[1] and draws[2] != draws[0]


# --- real studies ----------------------------------------------------------------------

def test_two_trial_sweep_nests_runs_and_completes_trials(tmp_path):
    path = write_sweep(tmp_path, "params: {model.loops: {choices: [1, 2]}}\nsampler: {name: grid}\n", "two")
    summary = run_sweep(path, verbose=False)
    assert summary.counts == {"COMPLETE": 2}
    study = load_study(tmp_path, "two")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("two").experiment_id
    runs = client.search_runs([exp])
    (parent,) = [r for r in runs if r.data.tags.get("ouro.role") == "study"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 3 and len(children) == 2
    assert parent.info.status == "FINISHED"
    assert sorted(c.data.params["model.loops"] for c in children) == ["1", "2"]
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags["optuna.state"] == "COMPLETE"
        assert child.data.params["model.d_model"] == "32"  # the full config, fixed overrides included
        assert "val/acc_step1_d1" in child.data.metrics
        trial = trials[int(child.data.tags["ouro.trial"])]
        assert trial.user_attrs["mlflow_run_id"] == child.info.run_id
        assert trial.value == pytest.approx(child.data.metrics["val/acc_final"])
    assert "summary.txt" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    # the objective against T on the study run itself (step = T), the trials' own values
    series = client.get_metric_history(parent.info.run_id, "study/series/val_acc_final_vs_loops")
    assert [(m.step, m.value) for m in sorted(series, key=lambda m: m.step)] == \
        [(int(t.params["model.loops"]), pytest.approx(t.value)) for t in sorted(trials, key=lambda t: t.params["model.loops"])]
    assert "x = the trained loop count T" in parent.data.tags["mlflow.note.content"]  # the chart's axis, said
    assert "x = evaluation loop step t" in children[0].data.tags["mlflow.note.content"]
    # the best trial, its run and its checkpoint are findable from the study run
    best = study.best_trial
    assert parent.data.tags["ouro.best_trial"] == str(best.number)
    assert parent.data.tags["ouro.best_run_id"] == best.user_attrs["mlflow_run_id"]
    assert parent.data.tags["ouro.best_checkpoint"] == best.user_attrs["checkpoint"]
    assert Path(parent.data.tags["ouro.best_checkpoint"]).is_file()
    # the saved MLflow UI view the printed link opens: runs grouped by the swept key, its
    # columns, and charts of metrics these runs log
    view = read_view_tag(client.get_experiment(exp).tags["mlflow.sharedViewState.ouro-lab-study"])
    assert view["groupBy"]["groupByKeys"] == [{"mode": "param", "groupByData": "model.loops"}]
    assert view["selectedColumns"][:2] == ["params.`model.loops`", "metrics.`val/acc_final`"]
    charted = {k for c in view["compareRunCharts"] for k in c.get("selectedMetricKeys", [c["metricKey"]])}
    logged = set(parent.data.metrics) | {k for c in children for k in client.get_run(c.info.run_id).data.metrics}
    assert charted <= logged and "val/series/acc_vs_loop_step" in charted
    # rerunning the finished study trains nothing more
    again = run_sweep(path, verbose=False)
    assert again.counts == {"COMPLETE": 2} and len(client.search_runs([exp])) == 3


def test_seeds_give_seed_runs_under_a_trial_run_and_reuse_the_param_matched_baseline(tmp_path):
    path = write_sweep(tmp_path, "params: {model.loops: {choices: [1, 2]}}\nsampler: {name: grid}\nseeds: 2\n", "seeds",
                       extra=("model.arch=param_matched",))
    summary = run_sweep(path, verbose=False)
    assert summary.counts == {"COMPLETE": 2}
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("seeds").experiment_id])
    trial_runs = [r for r in runs if r.data.tags.get("ouro.role") == "trial"]
    seed_runs = [r for r in runs if r.data.tags.get("ouro.role") == "seed"]
    assert len(trial_runs) == 2 and len(seed_runs) == 4
    for trial_run in trial_runs:
        kids = [r for r in seed_runs if r.data.tags["mlflow.parentRunId"] == trial_run.info.run_id]
        assert sorted(k.data.params["train.seed"] for k in kids) == ["0", "1"]
        mean = sum(k.data.metrics["val/acc_final"] for k in kids) / 2
        assert trial_run.data.metrics["val/acc_final"] == pytest.approx(mean)
        assert "seeds/val/acc_final_std" in trial_run.data.metrics
    # param_matched ignores model.loops: the second trial reuses the first one's runs
    reused = [r for r in seed_runs if "ouro.reused_from" in r.data.tags]
    assert len(reused) == 2
    for r in reused:  # a copy carries the config of the trial it stands for, not its source's
        parent = next(t for t in trial_runs if t.info.run_id == r.data.tags["mlflow.parentRunId"])
        assert r.data.params["model.loops"] == parent.data.params["model.loops"]
        assert r.data.metrics["model/n_params"] == seed_runs[0].data.metrics["model/n_params"]
    values = [t.value for t in load_study(tmp_path, "seeds").get_trials()]
    assert values[0] == pytest.approx(values[1])


def test_pruning_stops_an_always_worse_configuration(tmp_path):
    path = write_sweep(tmp_path, """\
        params:
          train.lr: {choices: [0.01, 1.0e-9]}
          train.seed: {choices: [0, 1, 2]}
        objective: {metric: val/loss_final, direction: minimize}
        sampler: {name: grid, seed: 0}
        pruner: {name: median, n_startup_trials: 1, n_warmup_steps: 15}
        """, "prune")
    summary = run_sweep(path, verbose=False)
    study = load_study(tmp_path, "prune")
    pruned = [t for t in study.get_trials() if t.state == TrialState.PRUNED]
    assert pruned, summary.counts
    assert all(t.params["train.lr"] == 1e-9 for t in pruned)
    assert summary.counts.get("COMPLETE", 0) + len(pruned) == 6
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(pruned[0].user_attrs["mlflow_run_id"])
    assert run.data.tags["optuna.state"] == "PRUNED" and run.info.status == "KILLED"
    assert "pruned at step" in run.data.tags["pruned"]


def test_nan_trial_fails_with_reason_and_the_study_continues(tmp_path, capsys):
    path = write_sweep(tmp_path, "params: {train.lr: {choices: [0.003, 1.0e6]}}\nsampler: {name: grid}\n", "nan",
                       extra=("train.grad_clip=0",))
    summary = run_sweep(path, verbose=False)
    assert summary.counts == {"COMPLETE": 1, "FAIL": 1}
    (failed,) = [t for t in load_study(tmp_path, "nan").get_trials() if t.state == TrialState.FAIL]
    assert failed.params["train.lr"] == 1e6 and "training loss became" in failed.user_attrs["error"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(failed.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and "training loss became nan" in run.data.tags["error"]
    assert run.data.tags["optuna.state"] == "FAIL"


def test_sweep_where_every_trial_fails_exits_nonzero(tmp_path, capsys):
    path = write_sweep(tmp_path, "params: {train.lr: {choices: [1.0e6]}}\nsampler: {name: grid}\n", "allfail",
                       extra=("train.grad_clip=0",))
    assert main(["sweep", str(path)]) == 1
    printed = capsys.readouterr()
    assert "every trial of study 'allfail' failed" in printed.err
    # where to look: MLflow in model-training mode, and the study in Optuna's own UI
    assert "?workflowType=machine_learning&viewStateShareKey=ouro-lab-study" in printed.out
    assert re.search(r"optuna-dashboard \S+optuna\.journal", printed.out), printed.out[-1500:]


def test_a_ctrl_c_that_a_finalizer_swallows_still_stops_the_trial():
    """Python ignores a KeyboardInterrupt raised inside a finalizer ("Exception ignored in"); the
    sweep's handler also sets a flag its trials check at every batch. The previous handler comes
    back afterwards."""
    from ouro_lab.sweep import trial
    from ouro_lab.sweep.runner import ctrl_c_stops_trials

    before = signal.getsignal(signal.SIGINT)
    with ctrl_c_stops_trials():
        class Finalized:
            def __del__(self):
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(10_000):  # the handler runs here, inside the finalizer
                    pass

        Finalized()  # dropped at once: the KeyboardInterrupt raised in its __del__ goes nowhere
        assert trial.CTRL_C.is_set()
        with pytest.raises(KeyboardInterrupt, match="Ctrl-C"):
            trial.stop_if_orphaned()
    assert signal.getsignal(signal.SIGINT) is before and not trial.CTRL_C.is_set()
    # a sweep started in the background (SIGINT ignored) keeps ignoring Ctrl-C
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with ctrl_c_stops_trials():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "Ctrl-C"])
def test_killed_sweep_resumes_without_losing_or_repeating_trials(tmp_path, sig):
    path = write_sweep(tmp_path, """\
        params:
          model.loops: {choices: [1, 2, 3]}
        sampler: {name: grid}
        """, "resume", extra=("train.max_steps=150",))
    # NOTE: a shell starting CI in the background ignores SIGINT, and children inherit that;
    # restore the default so Python turns Ctrl-C into KeyboardInterrupt as in a terminal.
    with spawned([sys.executable, "-m", "ouro_lab.cli", "sweep", str(path)], cwd=tmp_path,
                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) as proc:
        seen = []
        for line in proc.stdout:  # kill as soon as trial 1 has started (trial 0 is complete); no clock:
            seen.append(line)     # the loop ends at that line or when the sweep ends without it
            if "trial 1 started" in line:
                time.sleep(2)
                proc.send_signal(sig)
                break
        assert any("trial 1 started" in line for line in seen), "".join(seen)
        proc.wait()
        rest = proc.stdout.read()
    study = load_study(tmp_path, "resume")
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL, "".join(seen)
        assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE, TrialState.RUNNING]
    else:  # Ctrl-C: the sweep ends the trial FAIL itself and says how to resume
        assert proc.returncode == 130, "".join(seen) + "\n--- after the signal ---\n" + rest
        assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE, TrialState.FAIL]
        assert "Rerun the same command to resume" in rest

    summary = run_sweep(path, verbose=False)
    trials = load_study(tmp_path, "resume").get_trials()
    states = [t.state for t in trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[1].user_attrs["interrupted"] == ("worker process died" if sig == signal.SIGKILL else "Ctrl-C")
    assert trials[2].user_attrs["retry_of"] == 1 and trials[2].params == trials[1].params
    assert sorted(t.params["model.loops"] for t in trials if t.state == TrialState.COMPLETE) == [1, 2, 3]
    assert summary.counts == {"COMPLETE": 3, "FAIL": 1}
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    by_trial = {}
    for r in runs:
        by_trial.setdefault(r.data.tags.get("ouro.trial"), []).append(r)
    assert len(by_trial["0"]) == 1  # the finished trial was not repeated
    (killed,) = by_trial["1"]
    assert killed.info.status == "KILLED" and killed.data.tags["optuna.state"] == "FAIL"
    assert all(r.info.status != "RUNNING" for r in runs)


@pytest.mark.parametrize("sampler", ["grid", "tpe", "random", "cmaes"])
@pytest.mark.parametrize("pruner", ["none: {}", "median: {n_startup_trials: 2}", "hyperband: {min_resource: 10}",
                                    "successive_halving: {min_resource: 10, reduction_factor: 2}"])
def test_every_sampler_and_pruner_is_built_from_yaml(tmp_path, sampler, pruner):
    from ouro_lab.sweep import make_pruner, make_sampler

    name, settings = pruner.split(": ", 1)
    settings = settings.strip("{}")
    pruner_yaml = f"{{name: {name}{', ' + settings if settings else ''}}}"
    path = write_sweep(tmp_path, f"params: {{model.n_layers: {{low: 1, high: 3}}}}\ntrials: 2\n"
                                 f"sampler: {{name: {sampler}, seed: 1}}\npruner: {pruner_yaml}\n")
    sweep, _ = load_sweep(path)
    study = optuna.create_study(sampler=make_sampler(sweep), pruner=make_pruner(sweep), direction="maximize")
    trial = study.ask()
    from ouro_lab.sweep import suggest

    values = suggest(trial, sweep)
    assert values["model.n_layers"] in (1, 2, 3)


# --- several workers on one study --------------------------------------------------------

@pytest.fixture(params=["journal", "postgres"])
def stores(request, tmp_path):
    """(sweep YAML lines, Optuna storage URL or None, MLflow URI) for the embedded default
    (journal file + sqlite) and for a real PostgreSQL server holding both (with heartbeat)."""
    if request.param == "journal":
        return "", None, f"sqlite:///{tmp_path / 'mlflow.db'}"
    make = request.getfixturevalue("postgres_db")
    optuna_url, mlflow_url = make("optuna"), make("mlflow")
    return f"storage: {optuna_url}\nheartbeat_interval: 1\ngrace_period: 5\n", optuna_url, mlflow_url


def _trial_runs(uri: str, name: str, trial: int | None = None) -> list:
    client = MlflowClient(uri)
    where = "tags.`ouro.role` = 'trial'" + (f" and tags.`ouro.trial` = '{trial}'" if trial is not None else "")
    return client.search_runs([client.get_experiment_by_name(name).experiment_id], filter_string=where)


def test_two_cpu_workers_share_one_study(tmp_path, stores):
    """`--workers 2`: two processes on one study and one MLflow store; the budget is met
    exactly, no grid point runs twice, every trial has exactly one MLflow run."""
    lines, storage, uri = stores
    path = write_sweep(tmp_path, "params: {model.loops: {choices: [1, 2, 3, 4, 5]}}\nsampler: {name: grid, seed: 0}\n"
                       + lines, name="w", tracking_uri=uri)
    with spawned([sys.executable, "-m", "ouro_lab.cli", "sweep", str(path), "--workers", "2"],
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path) as proc:
        stdout, stderr = proc.communicate()
    out = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    threads = max(1, len(os.sched_getaffinity(0)) // 2)  # the cores split between the workers
    assert "worker 0 pid" in out.stdout and "worker 1 pid" in out.stdout and f"CPU, {threads} thread(s)" in out.stdout
    trials = [t for t in load_study(tmp_path, "w", storage).get_trials() if not t.user_attrs.get("discarded")]
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 5
    assert sorted(t.params["model.loops"] for t in trials) == [1, 2, 3, 4, 5]
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both workers trained
    runs = _trial_runs(uri, "w")
    assert sorted(int(r.data.tags["ouro.trial"]) for r in runs) == sorted(t.number for t in trials)
    assert "5 complete" in out.stdout


def test_claim_discards_a_trial_another_worker_made_redundant():
    from types import SimpleNamespace

    from ouro_lab.sweep import Discarded, claim

    study = optuna.create_study()
    s = SimpleNamespace(study=study, sweep=SimpleNamespace(retries=1))
    first, second = study.ask(), study.ask()  # two workers handed the same grid point at once
    for t in (first, second):
        study._storage.set_trial_system_attr(t._trial_id, "grid_id", 0)
    claim(s, first, total=5)  # the earlier trial keeps it
    with pytest.raises(Discarded, match="grid point already taken by trial 0"):
        claim(s, second, total=5)
    study._storage.set_trial_user_attr(second._trial_id, "discarded", "grid point taken")
    study.tell(second, state=TrialState.FAIL)
    third = study.ask()
    claim(s, third, total=2)  # trial 0 running + the discarded one (not counted): room for one
    with pytest.raises(Discarded, match="budget of 1 trials already claimed"):
        claim(s, third, total=1)


def test_a_killed_worker_trial_is_failed_and_retried_by_the_other(tmp_path, stores):
    """One of two workers dies mid-trial: its trial ends FAIL and is retried, and the study
    completes its budget. Journal: SIGKILL, a surviving worker sees the pid gone. PostgreSQL:
    the worker is frozen (SIGSTOP: alive but silent, as a hung or cut-off host), so only
    Optuna's heartbeat can tell; then it is killed to let the sweep end."""
    lines, storage, uri = stores
    path = write_sweep(tmp_path, "params: {model.loops: {choices: [1, 2, 3, 4]}}\nsampler: {name: grid, seed: 0}\n"
                       + lines, name="k", extra=("train.max_steps=200", "train.val_every=50"), tracking_uri=uri)
    # NOTE: one storage object for all the polling below: a URL per load_study opened a new
    # connection pool each time ("too many clients" on PostgreSQL under load)
    polled = optuna.storages.RDBStorage(storage) if storage else None
    log = tmp_path / "sweep.log"  # (a file, not a pipe nobody reads while we poll)
    with open(log, "w") as out_file, spawned([sys.executable, "-m", "ouro_lab.cli", "sweep", str(path), "--workers", "2"],
                                             cwd=tmp_path, stdout=out_file, stderr=subprocess.STDOUT, text=True) as proc:
        victim = None
        while victim is None:  # stop the worker of the first trial seen running
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
            try:
                running = load_study(tmp_path, "k", polled).get_trials(states=(TrialState.RUNNING,))
            except (KeyError, FileNotFoundError):  # the study is not created yet
                continue
            if running and "worker" in running[0].user_attrs:
                victim = running[0]
        time.sleep(1)
        pid = int(victim.user_attrs["worker"].rpartition(":")[2])
        if storage is None:
            os.kill(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGSTOP)
            while sum(t.state == TrialState.COMPLETE for t in load_study(tmp_path, "k", polled).get_trials()) < 4:
                assert proc.poll() is None, "the sweep ended before the budget was completed without the frozen worker"
                time.sleep(1)
            os.kill(pid, signal.SIGKILL)
        proc.wait()
        out = log.read_text()
    assert proc.returncode == 0, out[-3000:]
    assert "ended with status -9" in out
    trials = load_study(tmp_path, "k", polled).get_trials()
    if polled is not None:
        polled.engine.dispose()
    killed = trials[victim.number]
    assert killed.state == TrialState.FAIL
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params["model.loops"] for t in done) == [1, 2, 3, 4]  # the budget, each point once
    (retry,) = [t for t in done if t.user_attrs.get("retry_of") == victim.number]
    assert retry.params == killed.params
    if storage is None:  # journal: a surviving worker saw the pid gone
        assert killed.user_attrs["interrupted"] == "worker process died"
    else:  # PostgreSQL: Optuna's heartbeat lapsed; our stale-trial callback queued the retry
        assert retry.user_attrs["retry_reason"] == "no heartbeat: its worker died"
    runs = _trial_runs(uri, "k", victim.number)
    assert [(r.info.status, r.data.tags["optuna.state"]) for r in runs] == [("KILLED", "FAIL")]


def test_ddp_trial_is_pruned_on_every_rank(tmp_path):
    """One trial trained by 2 CPU processes (Lightning ddp_spawn, gloo): rank 0 reports and asks
    the pruner, the decision stops both ranks (else the next collective would hang), and the
    trial's own process raises TrialPruned (check_pruned); MLflow gets one run per trial."""
    path = write_sweep(tmp_path, """\
        params:
          train.lr: {choices: [0.01, 1.0e-9]}
        objective: {metric: val/loss_final, direction: minimize}
        sampler: {name: grid, seed: 1}
        pruner: {name: median, n_startup_trials: 1, n_warmup_steps: 15}
        """, "ddp", extra=("train.devices=2", "train.accelerator=cpu"))
    summary = run_sweep(path, verbose=False)
    assert summary.counts == {"COMPLETE": 1, "PRUNED": 1}
    complete, pruned = load_study(tmp_path, "ddp").get_trials()  # grid seed 1 runs lr=0.01 first
    assert complete.params["train.lr"] == 0.01 and pruned.params["train.lr"] == 1e-9
    assert sorted(pruned.intermediate_values) == [10, 20]  # stopped at step 20 of 30 on both ranks
    assert "ouro:ddp_reported" in pruned.system_attrs  # reported from the DDP rank 0, replayed here
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id],
                              filter_string="tags.`ouro.role` = 'trial'")
    assert len(runs) == 2  # logged once per trial, not once per rank
    by_state = {r.data.tags["optuna.state"]: r for r in runs}
    assert by_state["PRUNED"].info.status == "KILLED" and "pruned at step 20" in by_state["PRUNED"].data.tags["pruned"]
    assert "val/acc_final" in by_state["COMPLETE"].data.metrics


def test_workers_draw_apart_but_share_one_grid(tmp_path):
    """Concurrent TPE/random workers must not sample in lockstep; grid workers must agree on
    what a grid id means, and a point held only by a discarded trial is still to be run."""
    from ouro_lab.sweep import make_sampler

    path = write_sweep(tmp_path, "params: {train.lr: {low: 0.0001, high: 0.1, log: true}}\ntrials: 4\n"
                                 "sampler: {name: random, seed: 0}\n")
    sweep, _ = load_sweep(path)
    draws = []
    for salt in (0, 1):
        study = optuna.create_study(sampler=make_sampler(sweep, 0, salt))
        draws.append(study.ask().suggest_float("train.lr", 1e-4, 0.1, log=True))
    assert draws[0] != draws[1]
    grid = load_sweep(write_sweep(tmp_path, "params: {model.loops: {choices: [1, 2, 3]}}\nsampler: {name: grid}\n",
                                  name="g"))[0]
    a, b = make_sampler(grid, 0, 0), make_sampler(grid, 5, 12345)
    assert a._all_grids == b._all_grids  # the same shuffle whatever the salt
    study = optuna.create_study(sampler=a)
    held = study.ask()
    study._storage.set_trial_system_attr(held._trial_id, "grid_id", 0)
    study.tell(held, 1.0)
    dropped = study.ask()
    study._storage.set_trial_system_attr(dropped._trial_id, "grid_id", 1)
    study._storage.set_trial_user_attr(dropped._trial_id, "discarded", "budget")
    study.tell(dropped, state=TrialState.FAIL)
    study.enqueue_trial({"model.loops": a._all_grids[2][0]}, user_attrs={"retry_of": 7})  # a retry holds point 2
    assert sorted(a._get_unvisited_grid_ids(study)) == [1]


@pytest.mark.parametrize("extra, flags, message", [
    (("train.strategy=ddp",), [], "train.strategy=ddp re-runs the whole command in every rank"),
    (("train.devices=2",), ["--workers", "2"], "train.devices=2 (DDP trials) with --workers/--gpus"),
])
def test_sweep_refuses_unsafe_parallel_settings(tmp_path, capsys, extra, flags, message):
    path = write_sweep(tmp_path, "params: {model.loops: {choices: [1, 2]}}\nsampler: {name: grid}\n", extra=extra)
    assert main(["sweep", str(path), *flags]) == 2
    assert message in capsys.readouterr().err


def test_a_sweep_judged_on_a_frontier_scalar_runs_end_to_end(tmp_path):
    path = write_sweep(tmp_path, """\
        params: {objective.entropy_weight: {choices: [0.01, 0.3]}}
        objective: {metric: val/gate_efficiency, direction: maximize}
        sampler: {name: grid}
        """, "frontier", extra=("model.loops=3",))
    summary = run_sweep(path, verbose=False)
    assert summary.counts == {"COMPLETE": 2}
    trials = load_study(tmp_path, "frontier").get_trials()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for t in trials:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert t.value == pytest.approx(run.data.metrics["val/gate_efficiency"])
        assert len(t.intermediate_values) == 3  # reported to the pruner at every validation


def test_bundle_params_choose_named_override_lists(tmp_path, capsys):
    """A loop recipe is several keys: a bundle param picks one named list of overrides per trial;
    the trial's runs carry the bundle's config and an `ouro.bundle.<param>` tag; a bad bundle
    or an unknown choice fails before any trial, naming it."""
    body = """
        objective: {metric: val/acc_final, direction: maximize}
        params:
          recipe: {choices: [ouro, additive]}
        bundles:
          recipe:
            ouro: []
            additive: [model.injection=additive, model.init_state=zeros]
        sampler: {name: grid}
        """
    path = write_sweep(tmp_path, body)
    assert main(["sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "recipe=additive (model.injection=additive model.init_state=zeros)" in out and "recipe=ouro (no overrides)" in out
    summary = run_sweep(path, [], verbose=False)
    assert summary.counts == {"COMPLETE": 2}
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("s").experiment_id], "tags.`ouro.role` = 'trial'")
    by_bundle = {r.data.tags["ouro.bundle.recipe"]: r.data.params for r in runs}
    assert by_bundle["additive"]["model.injection"] == "additive" and by_bundle["ouro"]["model.injection"] == "none"
    # the analysis groups by the bundle's name, not by the keys it sets
    data = analysis.load_study("s", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert data.group_keys == ["recipe"] and sorted(data.groups) == ["recipe=additive", "recipe=ouro"]
    bad = write_sweep(tmp_path, body.replace("[ouro, additive]", "[ouro, huginn]").replace("model.init_state=zeros",
                                                                                         "model.init_state=zero"), "bad")
    with pytest.raises(ConfigError) as err:
        load_sweep(bad)
    assert "bundles.recipe.additive: " in str(err.value) and "model.init_state: 'zero' is not one of" in str(err.value)
    assert "params.recipe: a bundle param takes choices among its bundles (ouro, additive); got ['huginn']" in str(err.value)


def test_trial_run_names_lead_with_the_swept_values():
    from ouro_lab.run_record import trial_run_name

    assert trial_run_name(3, {"model.loops": 4, "model.arch": "looped"}) == "loops=4 arch=looped (trial 3)"
    assert trial_run_name(0, {"model.loops": 2}, seed=1) == "loops=2 seed 1 (trial 0)"
    # two keys ending alike keep their whole names
    assert trial_run_name(1, {"data.state.length": 8, "data.arith.length": 3, "model.loops": 1}) == \
        "data.state.length=8 data.arith.length=3 loops=1 (trial 1)"


def test_a_params_override_changes_one_field_of_a_dotted_param_and_names_a_bad_field():
    sweep, _ = load_sweep(Path(__file__).resolve().parents[1] / "sweeps" / "loops.yaml",
                          ["params.model.loops.choices=[1,2]", "seeds=1"])
    assert sweep.params["model.loops"].choices == [1, 2] and sweep.params["data.state.length"].choices == [8, 12]
    assert sweep.seeds == 1
    with pytest.raises(ConfigError, match="params.<config key>.<field>"):
        load_sweep(Path(__file__).resolve().parents[1] / "sweeps" / "loops.yaml", ["params.model.loops.chioces=[1]"])
