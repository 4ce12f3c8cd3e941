import pytest
import torch

from ouro_lab.config import load_config

# Variants of a real-sweep test whose path another test of the default run already takes: they
# run under `-m slow`, so the default run fits CI's ~20 minutes on 2 cores (each is 16-45 s).
# variant -> the default test that covers its path
SLOW_VARIANTS = {
    "test_sweep.py::test_a_killed_worker_trial_is_failed_and_retried_by_the_other[postgres]":
        "test_two_cpu_workers_share_one_study[postgres] (PostgreSQL storage with workers) and the [journal] variant",
    "test_sweep.py::test_two_cpu_workers_share_one_study[journal]":
        "test_a_killed_worker_trial_is_failed_and_retried_by_the_other[journal] (two journal workers)",
    "test_sweep.py::test_killed_sweep_resumes_without_losing_or_repeating_trials[Ctrl-C]":
        "the [SIGKILL] variant (the harder kill) and test_a_ctrl_c_that_a_finalizer_swallows_still_stops_the_trial",
    "test_reliability.py::test_a_trial_killed_after_its_run_finished_is_recovered_not_retrained[1]":
        "the [2] variant (the same recovery with seed runs under the trial run)",
}


@pytest.hookimpl(tryfirst=True)  # (before `-m` deselects by marker)
def pytest_collection_modifyitems(items):
    for item in items:
        if item.nodeid.split("/")[-1] in SLOW_VARIANTS:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(2)


@pytest.fixture
def tracking_uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def tiny_config(tmp_path, tracking_uri):
    """A small, fast config on `state` logging to a throwaway MLflow store."""

    def make(*overrides: str, path: str | None = None):
        base = [
            "model.d_model=32", "model.n_heads=2", "model.n_layers=1", "model.loops=2",
            "data.state.length=8", "data.batch_size=32", "data.n_val=128", "data.n_test=128",
            "train.max_steps=40", "train.warmup_steps=5", "train.val_every=20", "train.log_every=5",
            "train.progress_bar=false", f"tracking.uri={tracking_uri}", f"tracking.output_dir={tmp_path / 'outputs'}",
            "tracking.experiment=test",
        ]
        return load_config(path, [*base, *overrides])

    return make


# configs whose data needs the set-up their header names (a corpus package and a tokenizer)
NEEDS_SETUP = {"lm_cpu.yaml", "lm_loops_cpu.yaml", "exit_aware_lm.yaml"}


@pytest.fixture
def lm_setup(tmp_path):
    """Overrides standing in for that set-up: a corpus of 400 small documents, bytes."""
    root = tmp_path / "lm_corpus"
    root.mkdir()
    for i in range(400):
        (root / f"d{i}.txt").write_text(f"document {i}: " + "the loop exits when the gate says so. " * 6)
    return [f"data.lm.source={root}/*.txt", "data.lm.tokenizer=bytes", f"data.lm.cache_dir={tmp_path / 'lm_cache'}"]


# --- a real PostgreSQL server for the multi-worker tests --------------------------------

@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL server on loopback for this test session, or $OURO_TEST_POSTGRES_URL
    (postgresql://user@host:port, the server of a scaling-out test elsewhere). Skipped with the
    reason when no server binaries exist, except under CI, where `.ci/run` installs them."""
    import glob
    import os
    import shutil
    import socket
    import subprocess
    import tempfile

    if os.environ.get("OURO_TEST_POSTGRES_URL"):
        yield os.environ["OURO_TEST_POSTGRES_URL"].rstrip("/")
        return
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    bindir = bins[-1] if bins else (os.path.dirname(shutil.which("initdb") or "") or None)
    if bindir is None:
        message = "no PostgreSQL server binaries (apt-get install postgresql) and no OURO_TEST_POSTGRES_URL"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the PostgreSQL tests: {message}")
        pytest.skip(message)
    data = tempfile.mkdtemp(prefix="ouro-pg-")
    as_user = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        shutil.chown(data, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    subprocess.run([*as_user, f"{bindir}/initdb", "-D", data, "-A", "trust", "-U", "ouro", "--no-sync"],
                   check=True, capture_output=True)
    subprocess.run([*as_user, f"{bindir}/pg_ctl", "-D", data, "-l", f"{data}/server.log", "-w", "start", "-o",
                    f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off"], check=True, capture_output=True)
    try:
        yield f"postgresql://ouro@127.0.0.1:{port}"
    finally:
        subprocess.run([*as_user, f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def postgres_db(postgres_server):
    """make(name) -> URL of a new, empty database on the session's server."""
    import uuid

    import sqlalchemy

    engine = sqlalchemy.create_engine(f"{postgres_server}/postgres", isolation_level="AUTOCOMMIT")

    def make(name: str) -> str:
        db = f"{name}_{uuid.uuid4().hex[:8]}"
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text(f"CREATE DATABASE {db}"))
        return f"{postgres_server}/{db}"

    yield make
    engine.dispose()
