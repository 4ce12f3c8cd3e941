"""MLflow, owned in one place: where the store is, the experiment, and one `Run` handle per
run that creates, logs to, tags and ends it (train, the sweep and the analysis's report all
go through it); plus reproducibility tags and telling the user where to look.

    experiment = Experiment.open(resolve_tracking_uri(cfg.tracking.uri), "loops")
    with experiment.create_run("trial-3", tags, parent=study_run.id) as run:
        train(cfg, run=run)            # logs config and metrics into `run`; the `with` ends it

Lightning's `MLFlowLogger` logs the training metrics into the run (train.py hands it the run
id); it neither logs the config nor ends the run: the handle does (one owner per run).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import tempfile
import time
import traceback
import uuid
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ouro_lab.errors import ConfigError, StoreError
from ouro_lab.locations import tracking_uri_problem, writable_dir
from ouro_lab.run_record import (ERROR_ARTIFACT, GIT_COMMIT, GIT_DIRTY, MACHINE, PARENT, TABLES, VERSIONS, DatasetRecord, ended_by,
                                  metric_tables, table_metrics, tabled)

PACKAGES = ("torch", "lightning", "mlflow", "optuna", "omegaconf", "torchmetrics")
LOCKED_RETRY_SECONDS = 120.0  # how long a write to a locked sqlite store is retried


def when_unlocked(write: Callable[[], Any], seconds: float = LOCKED_RETRY_SECONDS) -> Any:
    """Run an MLflow write, retrying it (backoff 0.1 s doubling to 5 s, for up to `seconds`)
    while the sqlite store answers "database is locked". NOTE: MLflow sets a 20 s busy timeout
    per session, but sqlite skips the busy handler where waiting could deadlock (a session that
    read, then writes, while another process commits), and MLflow does not retry. The failed
    transaction was rolled back, so a retry writes once. (The lost trial seen in CI was a
    different cause, a lock leaked by an interrupted write: `trial.StopWhenOrphaned` fixes that,
    no retry could.)"""
    from mlflow.exceptions import MlflowException

    delay, deadline = 0.1, time.monotonic() + seconds
    while True:
        try:
            return write()
        except MlflowException as err:
            if "database is locked" not in str(err) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(2 * delay, 5.0)


def resolve_tracking_uri(uri: str | None = None) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db (mlflow 3's own default).

    NOTE: always explicit: Lightning's MLFlowLogger would otherwise default to file:./mlruns,
    which mlflow >= 3.13 rejects as a tracking store.
    """
    where = "tracking.uri" if uri else "$MLFLOW_TRACKING_URI"
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        problem = tracking_uri_problem(uri)
        if problem:
            raise ConfigError(f"{where}: {problem}")
        return uri
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


@contextmanager
def store_lock(uri: str):
    """Serialise first contact with a local sqlite store: several processes creating a fresh
    store at once race on its schema (docs/design.md "MLflow"). No-op for other stores."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    path = Path(uri[len("sqlite:///"):])
    writable_dir(path.parent, "tracking.uri (its folder)")
    with FileLock(str(path) + ".lock", timeout=300):
        if not path.exists():
            _create_sqlite_store(path)
        yield


def _create_sqlite_store(path: Path) -> None:
    """Create a sqlite store whole or not at all: its tables are made in a scratch file that is
    renamed into place when complete. NOTE: MLflow creates them over several seconds on first
    contact; a process killed meanwhile left a half-made store every later command failed on."""
    for stale in path.parent.glob(f".{path.name}.creating-*"):  # (under the lock: left by a killed creator)
        stale.unlink(missing_ok=True)
    # (a new name each time: MLflow caches a store per URI, and would find this one's tables made)
    scratch = path.with_name(f".{path.name}.creating-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    MlflowClient(f"sqlite:///{scratch}").search_experiments(max_results=1)
    os.replace(scratch, path)


def store_problem(uri: str, err: Exception) -> StoreError:
    """The message for a store that fails on first contact: which file, whether it holds runs,
    what to do."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if not uri.startswith("sqlite:///"):
        return StoreError(f"MLflow store {uri} cannot be used: {type(err).__name__}: {first}")
    path = Path(uri[len("sqlite:///"):])
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            held = f"it holds {db.execute('select count(*) from runs').fetchone()[0]} run(s)"
    except sqlite3.Error:
        held = "its runs table cannot be read"
    return StoreError(
        f"MLflow store {path} is damaged or not an MLflow store ({type(err).__name__}: {first}); {held}. "
        f"If a process was killed while creating it, it holds nothing: move it aside (mv {path} {path}.damaged) "
        "and rerun. If it holds runs you need, keep it and point tracking.uri at a new file; nothing was deleted")


@contextmanager
def preserve_tracking_env():
    """NOTE: MLFlowLogger calls mlflow.set_tracking_uri, which (mlflow 3) also sets
    $MLFLOW_TRACKING_URI for the whole process; undo it so the next run in this process
    (tests, sweeps) resolves its own store."""
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


class Experiment:
    """An MLflow experiment on one store: opens (creates) it race-free, makes and finds runs.

    The only way ouro-lab code reaches the MLflow client: train, the sweep and the analysis
    ask this and `Run` for everything they write."""

    def __init__(self, tracking_uri: str, experiment_id: str, client: MlflowClient | None = None):
        self.tracking_uri, self.id = tracking_uri, experiment_id
        self.client = client or MlflowClient(tracking_uri)

    @classmethod
    def lookup(cls, tracking_uri: str, name: str) -> Experiment | None:
        """Experiment `name` if the store exists and holds it (not deleted); creates nothing,
        not even the store: what a refusal checks before anything is written."""
        if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):]).exists():
            return None
        try:
            client = MlflowClient(tracking_uri)
            experiment = client.get_experiment_by_name(name)
        except Exception as err:  # (sqlalchemy / MLflow errors of several types)
            raise store_problem(tracking_uri, err) from None
        if experiment is None or experiment.lifecycle_stage == "deleted":
            return None
        return cls(tracking_uri, experiment.experiment_id, client)

    @classmethod
    def open(cls, tracking_uri: str, name: str) -> Experiment:
        """Experiment `name` on the store (created if missing; a deleted one is restored)."""
        with store_lock(tracking_uri):
            try:
                client = MlflowClient(tracking_uri)
                experiment = client.get_experiment_by_name(name)
            except Exception as err:  # (sqlalchemy / MLflow errors of several types)
                raise store_problem(tracking_uri, err) from None
            if experiment is not None:
                if experiment.lifecycle_stage == "deleted":
                    client.restore_experiment(experiment.experiment_id)
                return cls(tracking_uri, experiment.experiment_id, client)
            try:
                return cls(tracking_uri, client.create_experiment(name), client)
            except Exception:  # NOTE: another host created it first (a shared server; no file lock there)
                experiment = client.get_experiment_by_name(name)
                if experiment is None:
                    raise
                return cls(tracking_uri, experiment.experiment_id, client)

    def create_run(self, name: str, tags: dict[str, str], parent: str | None = None) -> Run:
        """A new RUNNING run, nested under run id `parent` when given (MLFlowLogger never nests by itself)."""
        tags = dict(tags) | ({PARENT: parent} if parent else {})
        return Run(self, self.client.create_run(self.id, run_name=name, tags=tags).info.run_id)

    def run(self, run_id: str) -> Run:
        """A handle on an existing run of this experiment."""
        return Run(self, run_id)

    def has_run(self, run_id: str) -> bool:
        """Whether the run exists here and is not deleted."""
        try:
            return self.client.get_run(run_id).info.lifecycle_stage != "deleted"
        except Exception:  # MLflow raises for an unknown id
            return False

    def find_runs(self, filter_string: str = "", max_results: int | None = None) -> list:
        """MLflow `Run` entities matching an MLflow search filter (all pages unless max_results)."""
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.id], filter_string=filter_string, page_token=token,
                                           max_results=min(max_results or 1000, 1000))
            runs.extend(page)
            token = page.token
            if not token or (max_results and len(runs) >= max_results):
                return runs[:max_results] if max_results else runs

    def where_to_look(self, run_id: str | None = None, view: str | None = None) -> str:
        return where_to_look(self.tracking_uri, self.id, run_id, view)

    def set_tag(self, key: str, value: str) -> None:
        """An experiment tag (a saved UI view, ...)."""
        when_unlocked(lambda: self.client.set_experiment_tag(self.id, key, value))


@contextmanager
def quiet_artifacts():
    """No tqdm bar for a small download."""
    saved = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = saved


def read_metrics(client: MlflowClient, run) -> dict[str, float]:
    """An MLflow run's final metrics: its scalars (latest values) and the metrics its tables hold
    (tag ouro.metric_tables), under the names they were logged as."""
    metrics = dict(run.data.metrics)
    for path in filter(None, run.data.tags.get(TABLES, "").split(",")):
        with tempfile.TemporaryDirectory(prefix="ouro-lab-table-") as scratch, quiet_artifacts():
            try:
                text = Path(client.download_artifacts(run.info.run_id, path, scratch)).read_text()
            except (MlflowException, OSError) as err:
                raise StoreError(f"run {run.info.run_id}: its metric table {path} cannot be read ({err})") from err
        metrics |= table_metrics(path, text)
    return metrics


class Run:
    """One MLflow run, owned: what creates it (`Experiment.create_run`) logs to it through this
    handle and ends it, once, with the status its work ended in.

        with experiment.create_run("trial-3", tags) as run:   # ends FINISHED, or by `ended_by`
            run.log_params({...}); train(cfg, run=run)

    `ending`: err -> (status, tags), called when the run ends; a caller with its own states
    (the sweep's `optuna.state`) supplies its own, so its tags are set before the run ends."""

    def __init__(self, experiment: Experiment, run_id: str):
        self.experiment, self.id = experiment, run_id
        self.ending: Callable[[BaseException | None], tuple[str, dict[str, str]]] = ended_by
        self.status: str | None = None  # set once this handle has ended the run

    @property
    def client(self) -> MlflowClient:
        return self.experiment.client

    def fetch(self):
        """The run as the store has it now (MLflow `Run`: .info.status, .data.metrics/params/tags)."""
        return self.client.get_run(self.id)

    def log_params(self, params: dict[str, Any]) -> None:
        """All params, in the batches of 100 MLflow accepts."""
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            when_unlocked(lambda batch=items[i : i + 100]: self.client.log_batch(self.id, params=batch))

    def log_datasets(self, records: list[DatasetRecord]) -> None:
        """The run's data in MLflow's Dataset column, each with its context (training, evaluation)."""
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        inputs = [DatasetInput(MetaDataset(CodeDatasetSource(r.source), name=r.name, digest=r.digest)._to_mlflow_entity(),
                               [InputTag(MLFLOW_DATASET_CONTEXT, r.context)]) for r in records]
        for attempt in range(DATASET_RETRIES):
            try:
                when_unlocked(lambda: self.client.log_inputs(self.id, datasets=inputs))
                return
            except MlflowException as err:
                # NOTE: MLflow looks a dataset up, then inserts it: two runs logging the same
                # one at once (workers on PostgreSQL, seen in CI) race on its unique key, and
                # the loser's insert fails; a retry finds the row the winner wrote
                if "unique" not in str(err).lower() or attempt == DATASET_RETRIES - 1:
                    raise

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        """Values at one step; the final metrics `run_record.tabled` names go to their split's
        table artifact instead (`log_tables`)."""
        self.log_series({k: [(step, v)] for k, v in metrics.items() if not tabled(k)})
        self.log_tables(metrics)

    def log_tables(self, metrics: dict[str, float]) -> None:
        """The tabled metrics among `metrics` as their split's CSV table (frontier/val.csv), listed
        in the run's tag ouro.metric_tables; a table logged again replaces the earlier one."""
        tables = metric_tables(metrics)
        if not tables:
            return
        for path, text in tables.items():
            self.log_text(text, path)
        listed = set(filter(None, self.fetch().data.tags.get(TABLES, "").split(",")))
        self.set_tags({TABLES: ",".join(sorted(listed | set(tables)))})

    def final_metrics(self) -> dict[str, float]:
        """Every final metric of the run: its scalars and what its tables hold (`read_metrics`)."""
        return read_metrics(self.client, self.fetch())

    def log_series(self, series: dict[str, list[tuple[int, float]]]) -> None:
        """Curves as metric series: {name: [(step, value), ...]}, so the MLflow UI draws (and
        overlays across runs) value against step; in batches of 1000 (MLflow's limit)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(name, float(v), now, int(step)) for name, points in series.items() for step, v in points]
        for i in range(0, len(items), 1000):
            when_unlocked(lambda batch=items[i : i + 1000]: self.client.log_batch(self.id, metrics=batch))

    def set_tags(self, tags: dict[str, str]) -> None:
        """All tags in one request."""
        from mlflow.entities import RunTag

        if tags:
            batch = [RunTag(k, str(v)) for k, v in tags.items()]
            when_unlocked(lambda: self.client.log_batch(self.id, tags=batch))

    def log_text(self, text: str, path: str) -> None:
        self.client.log_text(self.id, text, path)

    def log_figure(self, figure, path: str) -> None:
        self.client.log_figure(self.id, figure, path)

    def log_artifacts(self, paths, folder: str) -> None:
        for path in paths:
            self.client.log_artifact(self.id, str(path), folder)

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(self.id, key)]

    def reopen(self) -> None:
        """Mark an ended run RUNNING again (a resumed study's parent run)."""
        self.client.update_run(self.id, status="RUNNING")
        self.status = None

    def end(self, err: BaseException | None = None, *, status: str | None = None,
            tags: dict[str, str] | None = None) -> str:
        """End the run: with `status` as given, else by `self.ending(err)`; `tags` are set first.
        Returns the status. A second call does nothing."""
        if self.status is not None:
            return self.status
        extra: dict[str, str] = {}
        if status is None:
            status, extra = self.ending(err)
        self.set_tags(extra | (tags or {}))
        if err is not None and err.__traceback__ is not None and not isinstance(err, (KeyboardInterrupt, SystemExit)):
            try:  # the whole traceback, for a failure the terminal showed in one line
                self.log_text("".join(traceback.format_exception(err)), ERROR_ARTIFACT)
            except Exception:  # noqa: BLE001 (the run still ends; its `error` tag has the reason)
                pass
        when_unlocked(lambda: self.client.set_terminated(self.id, status))
        self.status = status
        return status

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.end(exc)
        return False


def machine() -> str:
    """'Intel(R) Xeon(R) Processor, 2 cores, torch 2.13.0+cpu, CPU capability AVX512' (and the
    GPU, when there is one). The same seed gives different numbers on different CPUs (their
    kernels round differently), so every run and every published figure names it."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}{gpu}")


def reproducibility_tags() -> dict[str, str]:
    """Git commit (+ dirty flag) of the working tree, versions of the key packages, the machine."""
    tags = {f"{VERSIONS}{p}": _version(p) for p in PACKAGES} | {MACHINE: machine()}
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags[GIT_COMMIT] = commit
        tags[GIT_DIRTY] = str(bool(_git("status", "--porcelain", "--untracked-files=no")))
    return tags


def git_diff() -> str:
    """Uncommitted changes to tracked files ('' if clean or not a git checkout)."""
    return _git("diff", "HEAD") or ""


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@contextmanager
def system_metrics(run: "Run", on: bool = True):
    """While the block runs: the machine's CPU, memory, disk, network and (with nvidia-ml-py and
    an NVIDIA driver) GPU utilisation and memory on `run`, as MLflow's `system/*` metrics, by
    MLflow's own monitor (every 10 s; $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL sets it).
    NOTE: the monitor writes from a thread of its own, outside `when_unlocked`: a write that
    finds a sqlite store locked ends the monitor with a warning, never the run."""
    if not on:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # (its start/stop lines, every run)
    monitor = SystemMetricsMonitor(run.id, tracking_uri=run.experiment.tracking_uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def runs_url(experiment_id: str, run_id: str | None = None, host: str = "http://127.0.0.1:5000",
             view: str | None = None) -> str:
    """The MLflow UI page of a run (or the runs table), in model-training mode; `view`: a saved
    view's key (`ui_view.VIEW_KEY`), opened on the chart page. NOTE: the 3.17 UI opens an
    experiment on its GenAI pages (traces, judges) and ignores the experiment's
    `mlflow.experimentKind` tag; only the URL's `workflowType=machine_learning` (or the user's
    global switch) selects the runs table and the training charts."""
    page = f"runs/{run_id}" if run_id else "runs"
    shown = f"&viewStateShareKey={view}&compareRunsMode=CHART" if view and not run_id else ""
    return f"{host}/#/experiments/{experiment_id}/{page}?{UI_MODE}{shown}"


DATASET_RETRIES = 3  # log_datasets: tries when a concurrent run inserted the same dataset first
UI_MODE = "workflowType=machine_learning"  # the MLflow UI's model-training mode (runs_url)


def where_to_look(tracking_uri: str, experiment_id: str, run_id: str | None = None, view: str | None = None) -> str:
    """How to see a run or an experiment's runs: the page itself on an MLflow server, else the
    `mlflow ui` command for the store and the page it will serve."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {runs_url(experiment_id, run_id, host=tracking_uri.rstrip('/'), view=view)}"
    return f"mlflow ui --backend-store-uri {tracking_uri}  then open {runs_url(experiment_id, run_id, view=view)}"
