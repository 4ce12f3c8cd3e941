"""Faults a real user meets: bad inputs named before anything runs, damaged or missing study
files, processes killed at the worst moment. Each test makes the fault happen for real."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from ouro_lab.cli import main
from ouro_lab.config import ConfigError, load_config
from ouro_lab.sweep import run_sweep
from ouro_lab.sweep.repair import repair_journal
from ouro_lab.train import train

from test_sweep import ROOT, load_study, spawned, write_sweep

STATE = str(ROOT / "conf" / "state.yaml")

GRID = """\
    params:
      model.loops: {choices: [1, 2]}
    sampler: {name: grid}
    """


# --- bad inputs: exit 2, the key or file named, before anything trains -----------------------

@pytest.mark.parametrize("overrides, message", [
    (["tracking.uri=/tmp/some/folder"], "tracking.uri: '/tmp/some/folder' is a plain path; MLflow needs a database"),
    (["tracking.uri=foo://bar"], "tracking.uri: 'foo://bar': unknown scheme 'foo'"),
    (["data.state.group={a: 1}"], "data.state.group: expects a single value, got a mapping"),
    (["train.lr=inf"], "train.lr: must be a finite number, got inf"),
    (["objective.entropy_weight=nan"], "objective.entropy_weight: must be a finite number, got nan"),
])
def test_bad_config_values_are_named(tmp_path, capsys, overrides, message):
    assert main(["train", STATE, *overrides, f"tracking.output_dir={tmp_path}"]) == 2
    assert message in capsys.readouterr().err


def test_a_short_run_needs_no_warmup_override(tiny_config):
    """train.warmup_steps is capped at half the run: max_steps=60 with the default 100 trains,
    warming up over 30 steps."""
    cfg = load_config(None, ["train.max_steps=60"])
    assert cfg.train.warmup_steps == 100
    from ouro_lab.builders import build_module

    module = build_module(tiny_config("train.max_steps=60", "train.warmup_steps=100"))
    schedule = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    factors = [schedule.lr_lambdas[0](step) for step in range(60)]
    assert factors[28] < 1.0 and factors[29] == 1.0 and factors[59] < factors[30]


def test_bad_tracking_uri_in_the_environment_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(tmp_path / "runs"))
    assert main(["train", STATE, "train.max_steps=1", f"tracking.output_dir={tmp_path}"]) == 2
    assert "$MLFLOW_TRACKING_URI: " in capsys.readouterr().err


def test_unwritable_output_dir_fails_before_any_run(tmp_path, tiny_config, tracking_uri):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ConfigError, match="tracking.output_dir: cannot create the folder .*a_file/out"):
        train(tiny_config(f"tracking.output_dir={tmp_path / 'a_file' / 'out'}"), verbose=False)
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("test")
    assert experiment is None or not client.search_runs([experiment.experiment_id])  # no FAILED run left behind


@pytest.mark.parametrize("edit, message", [
    (lambda text, tmp: text + "storage: foo://db\n", "storage: 'foo://db' is not an Optuna storage URL"),
    (lambda text, tmp: text + "tracking_uri: mlruns\n", "tracking_uri: 'mlruns' is a plain path"),
    (lambda text, tmp: text.replace("choices: [1, 2]", "choices: [1, 2, 2]"), "choices repeat 2"),
    (lambda text, tmp: "- a\n- list\n", "expected a mapping of sweep keys at the top level"),
])
def test_bad_sweep_files_are_named(tmp_path, capsys, edit, message):
    path = write_sweep(tmp_path, GRID)
    text = path.read_text()
    if "tracking_uri:" in edit("", tmp_path):  # (one tracking_uri per file)
        text = "\n".join(line for line in text.splitlines() if not line.startswith("tracking_uri:")) + "\n"
    path.write_text(edit(text, tmp_path))
    assert main(["sweep", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_study_dir_under_a_file_is_named(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    path = write_sweep(tmp_path, GRID)
    assert main(["sweep", str(path), f"study_dir={tmp_path / 'a_file' / 'studies'}"]) == 2
    assert "study_dir: cannot create the folder" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"not a checkpoint at all\n", None], ids=["text file", "truncated"])
def test_eval_of_a_file_that_is_no_checkpoint_is_named(tmp_path, tiny_config, capsys, content):
    path = tmp_path / "model.ckpt"
    if content is None:  # a real checkpoint cut in half (a copy interrupted)
        result = train(tiny_config("train.max_steps=5", "train.val_every=5", "eval.test=false"), verbose=False)
        data = Path(result.checkpoint).read_bytes()
        content = data[: len(data) // 2]
    path.write_bytes(content)
    assert main(["eval", str(path)]) == 2
    assert f"{path} is not a readable checkpoint" in capsys.readouterr().err


def test_eval_is_logged_as_its_own_run_linked_to_the_trained_one(tiny_config, tracking_uri, tmp_path, monkeypatch):
    from ouro_lab.evaluate import evaluate_checkpoint

    result = train(tiny_config("train.max_steps=5", "train.val_every=5", "eval.test=false"), verbose=False)
    client = MlflowClient(tracking_uri)
    assert client.get_run(result.run_id).data.tags["ouro.checkpoint"] == result.checkpoint
    monkeypatch.chdir(tmp_path)  # an evaluation logs into the working folder's store: here the trained run's
    evaluated = evaluate_checkpoint(Path(result.checkpoint), ["eval.extra_loops=1"], "val", log=True)
    run = client.get_run(evaluated.run_id)
    assert run.data.tags["ouro.role"] == "eval" and run.data.tags["ouro.evaluated_run_id"] == result.run_id
    assert run.data.params["eval_overrides"] == "eval.extra_loops=1"
    assert run.data.metrics["val/acc_final"] == pytest.approx(evaluated.metrics["val/acc_final"])


# --- damaged or missing study files ---------------------------------------------------------

def _journal(tmp_path: Path, name: str = "s") -> Path:
    return tmp_path / "studies" / name / "optuna.journal"


def test_a_journal_cut_mid_record_is_repaired_and_the_study_goes_on(tmp_path, capsys):
    path = write_sweep(tmp_path, GRID)
    run_sweep(path, ["trials=1"], verbose=False)
    journal = _journal(tmp_path)
    whole = journal.read_bytes()
    journal.write_bytes(whole[:-7])  # the last record cut by a crash mid-write
    summary = run_sweep(path, verbose=True)
    assert "repaired study journal" in capsys.readouterr().out
    assert summary.counts.get("COMPLETE") == 2
    assert [t.state for t in load_study(tmp_path).get_trials()].count(TrialState.COMPLETE) == 2
    backups = list(journal.parent.glob("optuna.journal.damaged-*"))
    assert len(backups) == 1 and backups[0].read_bytes() == whole[:-7]  # nothing lost


def test_a_fragment_with_a_record_appended_is_repaired(tmp_path):
    """The state older code left: a cut record, then the next write appended onto it."""
    path = write_sweep(tmp_path, GRID)
    run_sweep(path, ["trials=1"], verbose=False)
    journal = _journal(tmp_path)
    lines = journal.read_bytes().split(b"\n")[:-1]
    # a trial user-attr record (op 8; losing it harms nothing else) cut, the next record appended onto it
    k = next(i for i, line in enumerate(lines[:-2]) if json.loads(line)["op_code"] == 8)
    damaged = lines[:k] + [lines[k][:25] + lines[k + 1]] + lines[k + 2:]
    journal.write_bytes(b"\n".join(damaged) + b"\n")
    with pytest.raises(json.JSONDecodeError):  # what Optuna alone makes of it: the study is lost
        load_study(tmp_path)
    message = repair_journal(journal)
    assert "removed the cut fragment" in message and f"line(s) {k + 1};" in message
    assert [t.state for t in load_study(tmp_path).get_trials()] == [TrialState.COMPLETE]  # loads again


def test_a_journal_damaged_beyond_repair_is_named_with_the_line(tmp_path, capsys):
    path = write_sweep(tmp_path, GRID)
    run_sweep(path, ["trials=1"], verbose=False)
    journal = _journal(tmp_path)
    lines = journal.read_bytes().split(b"\n")
    lines[2] = b"garbage that is no record"
    journal.write_bytes(b"\n".join(lines))
    before = journal.read_bytes()
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"study journal {journal}: line 3 is not an Optuna record" in err and "sed -i '3d'" in err
    assert journal.read_bytes() == before  # untouched


def _sweep_cli(path: Path, *args: str) -> subprocess.CompletedProcess:
    """The sweep in a process of its own (as a user reruns it: MLflow caches an open store per
    process, which would outlive the file moved away below)."""
    return subprocess.run([sys.executable, "-m", "ouro_lab.cli", "sweep", str(path), *args], cwd=path.parent,
                          capture_output=True, text=True, timeout=600)


def test_deleted_store_or_journal_is_refused_not_duplicated(tmp_path):
    path = write_sweep(tmp_path, GRID)
    run_sweep(path, ["trials=1"], verbose=False)  # (in this process: only the reruns below need their own)
    store = tmp_path / "mlflow.db"
    store.rename(tmp_path / "moved.db")
    out = _sweep_cli(path)
    assert out.returncode == 2
    assert "has 1 finished trial(s), but its MLflow runs are not in" in out.stderr and "Point" in out.stderr
    assert not store.exists()  # the refusal made no new empty store
    (tmp_path / "moved.db").rename(store)
    journal = _journal(tmp_path)
    journal.rename(tmp_path / "moved.journal")
    out = _sweep_cli(path)
    assert out.returncode == 2
    assert "already holds study run" in out.stderr and "is new" in out.stderr
    assert not journal.exists() and not journal.with_name("optuna.journal.lock").exists()  # nor a new journal
    client = MlflowClient(f"sqlite:///{store}")
    runs = client.search_runs([client.get_experiment_by_name("s").experiment_id])
    assert sum(r.data.tags.get("ouro.role") == "study" for r in runs) == 1  # no second study run
    (tmp_path / "moved.journal").replace(journal)
    out = _sweep_cli(path)  # both put back: the study resumes
    assert out.returncode == 0 and "(2 complete)" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]


def test_a_half_made_store_is_named_with_what_to_do(tmp_path, capsys):
    import sqlite3

    store = tmp_path / "mlflow.db"
    with sqlite3.connect(store) as db:  # what a kill during MLflow's table creation used to leave
        db.execute("create table experiments (experiment_id integer primary key)")
    assert main(["train", STATE, "train.max_steps=1", f"tracking.uri=sqlite:///{store}",
                 f"tracking.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert f"MLflow store {store} is damaged" in err and f"mv {store} {store}.damaged" in err
    assert store.exists()  # nothing deleted for the user


def test_a_store_killed_while_being_created_leaves_no_half_made_store(tmp_path):
    """SIGKILL the moment MLflow starts creating the store's tables: the store is made in a
    scratch file, so the rerun finds no store (and makes one) instead of a broken one."""
    store = tmp_path / "mlflow.db"
    cmd = [sys.executable, "-m", "ouro_lab.cli", "train", STATE, "train.max_steps=2",
           "train.val_every=2", "data.n_val=64", "data.n_test=64", f"tracking.uri=sqlite:///{store}",
           f"tracking.output_dir={tmp_path}", "train.progress_bar=false"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not list(tmp_path.glob(".mlflow.db.creating-*")):
            assert proc.poll() is None, "the run ended before it created its store"
            time.sleep(0.005)
        proc.kill()
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert not store.exists()
    assert subprocess.run(cmd, cwd=tmp_path, capture_output=True).returncode == 0
    client = MlflowClient(f"sqlite:///{store}")
    (run,) = client.search_runs([client.get_experiment_by_name("state").experiment_id])
    assert run.info.status == "FINISHED"


# --- processes killed at the worst moment -----------------------------------------------------

KILL_AFTER_TRIAL = """\
import os, signal, sys
import ouro_lab.sweep.runner as runner
train_trial = runner.run_trial
def run_trial(*args, **kwargs):  # the trial trained, tested and its run ended; Optuna not told yet
    value = train_trial(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
runner.run_trial = run_trial
runner.run_sweep(sys.argv[1], sys.argv[2:], verbose=False)
"""


@pytest.mark.parametrize("seeds", [1, 2])
def test_a_trial_killed_after_its_run_finished_is_recovered_not_retrained(tmp_path, seeds):
    path = write_sweep(tmp_path, GRID, extra=("train.max_steps=20",))
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_TRIAL, str(path), f"seeds={seeds}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    (first,) = load_study(tmp_path).get_trials()
    assert first.state == TrialState.RUNNING  # the result never reached the study
    summary = run_sweep(path, [f"seeds={seeds}"], verbose=False)
    trials = load_study(tmp_path).get_trials()
    assert summary.counts == {"COMPLETE": 2, "FAIL": 1}
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == first.number)
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["recovered_from_trial"] == first.number
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("s").experiment_id])
    unit = [r for r in runs if r.data.tags.get("ouro.role") == ("trial" if seeds == 1 else "seed")]
    finished = [r for r in unit if r.info.status == "FINISHED"]
    assert len(finished) == 2 * seeds  # one per grid point and seed: nothing trained twice
    assert not any("ouro.reused_from" in r.data.tags for r in runs)
    assert all(r.info.status != "RUNNING" for r in runs)
    if seeds > 1:  # the dead trial's own trial-level run is ended as superseded
        trial_runs = [r for r in runs if r.data.tags.get("ouro.role") == "trial"]
        assert sorted(r.info.status for r in trial_runs) == ["FINISHED", "FINISHED", "KILLED"]


def test_a_write_to_a_locked_store_is_retried_and_other_errors_are_not():
    """tracking.when_unlocked: "database is locked" (sqlite's deadlock-avoiding answer, which
    skips MLflow's busy timeout) is retried with backoff; any other error is raised at once."""
    from mlflow.exceptions import MlflowException

    from ouro_lab import tracking

    calls = []

    def locked_twice():
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise MlflowException("(sqlite3.OperationalError) database is locked")
        return "written"

    assert tracking.when_unlocked(locked_twice) == "written" and len(calls) == 3
    assert calls[2] - calls[1] >= calls[1] - calls[0] >= 0.1  # backoff
    def failing(message, tries):
        def write():
            tries.append(1)
            raise MlflowException(message)
        return write

    other, always = [], []
    with pytest.raises(MlflowException, match="no such run"):
        tracking.when_unlocked(failing("no such run", other))
    assert other == [1]
    with pytest.raises(MlflowException, match="database is locked"):  # gives up after `seconds`
        tracking.when_unlocked(failing("database is locked", always), seconds=0.5)
    assert 3 <= len(always) <= 5


def test_workers_die_with_their_coordinator(tmp_path):
    path = write_sweep(tmp_path, GRID, extra=("train.max_steps=400",))
    log = tmp_path / "sweep.log"  # (a file: workers blocked on a full pipe nobody reads could not exit)
    workers = []
    with open(log, "w") as out, spawned([sys.executable, "-m", "ouro_lab.cli", "sweep", str(path), "--workers", "2"],
                                        cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, text=True) as proc:
        while not (len(workers) == 2 and log.read_text().count(" started") == 2):
            assert proc.poll() is None, log.read_text()
            workers = [int(line.split(" pid ")[1].split()[0]) for line in log.read_text().splitlines()
                       if line.startswith("[sweep] worker ") and " pid " in line]
            time.sleep(0.2)
        proc.kill()  # the coordinator dies without a word to its workers
        proc.wait(timeout=30)
        for pid in workers:  # each notices within a second or two and interrupts itself
            for _ in range(3000):  # (a guard, not a timing: it normally takes a second or two)
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                if _pid_is_zombie(pid):
                    break
                time.sleep(0.1)
            else:
                pytest.fail(f"worker {pid} still running 5 min after its coordinator died")
    trials = load_study(tmp_path).get_trials()
    assert all(t.state != TrialState.RUNNING for t in trials), [t.state for t in trials]
    assert all(t.user_attrs.get("interrupted") for t in trials if t.state == TrialState.FAIL), \
        [t.user_attrs for t in trials] + [log.read_text()[-3000:]]


def _pid_is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return False


def test_a_failed_trial_prints_one_line_and_keeps_its_traceback(tmp_path):
    path = write_sweep(tmp_path, """\
        params:
          train.lr: {choices: [1.0e+6]}
        sampler: {name: grid}
        """)
    proc = subprocess.run([sys.executable, "-m", "ouro_lab.cli", "sweep", str(path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr + proc.stdout and "failed with parameters" not in proc.stderr
    assert "FAIL FloatingPointError: training loss became" in proc.stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = [r for r in client.search_runs([client.get_experiment_by_name("s").experiment_id])
              if r.data.tags.get("ouro.role") == "trial"]
    text = Path(client.download_artifacts(run.info.run_id, "error.txt", str(tmp_path))).read_text()
    assert text.startswith("Traceback") and "FloatingPointError" in text


def test_dry_run_lists_the_grid_and_trains_nothing(tmp_path, capsys):
    path = write_sweep(tmp_path, GRID)
    assert main(["sweep", str(path), "seeds=2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "is valid" in out and "2 trial(s) x 2 seed(s) = 4 training run(s)" in out
    assert "  model.loops=1\n" in out and "  model.loops=2" in out and "(new)" in out
    assert not (tmp_path / "studies").exists() and not (tmp_path / "mlflow.db").exists()


def test_studies_lists_each_study_with_its_trial_states(tmp_path, capsys):
    path = write_sweep(tmp_path, GRID)
    run_sweep(path, verbose=False)
    other = write_sweep(tmp_path, GRID.replace("[1, 2]", "[3]"), name="other")
    run_sweep(other, verbose=False)
    assert main(["studies", "--store", str(tmp_path / "mlflow.db")]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert set(rows) == {"s", "other"}
    assert " 2 " in rows["s"] and "COMPLETE 2" in rows["s"] and "COMPLETE 1" in rows["other"]
