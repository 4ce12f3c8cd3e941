"""MLflow helpers: where the store is, runs (optionally nested), reproducibility tags, plots.

Lightning's `MLFlowLogger` does the metric logging; this module covers what it does not:
creating the run up front (so a sweep can nest it under a parent), the config artifact,
git and package versions, the per-loop-step plot, and telling the user where to look.
"""

from __future__ import annotations

import os
import subprocess
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import matplotlib
from filelock import FileLock

matplotlib.use("Agg")  # headless: plots are files and MLflow artifacts
import matplotlib.pyplot as plt  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

PACKAGES = ("torch", "lightning", "mlflow", "optuna", "omegaconf", "torchmetrics")


def resolve_tracking_uri(uri: str | None = None) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db (mlflow 3's own default).

    NOTE: always explicit: Lightning's MLFlowLogger would otherwise default to file:./mlruns,
    which mlflow >= 3.13 rejects as a tracking store.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


@contextmanager
def store_lock(uri: str):
    """Serialise first contact with a local sqlite store: several processes creating a fresh
    store at once race on its schema (DESIGN.md Part 3). No-op for other stores."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    path = Path(uri[len("sqlite:///"):])
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=300):
        yield


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


def open_experiment(uri: str, name: str) -> tuple[MlflowClient, str]:
    """A client on `uri` and the id of experiment `name` (created if missing), race-free."""
    with store_lock(uri):
        client = MlflowClient(uri)
        return client, get_or_create_experiment(client, name)


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # NOTE: another host created it first (a shared server; no file lock there)
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def create_run(client: MlflowClient, experiment_id: str, run_name: str, tags: dict[str, str],
               parent_run_id: str | None = None) -> str:
    """A RUNNING run; nested under parent_run_id when given (MLFlowLogger never nests by itself)."""
    tags = dict(tags)
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    return run.info.run_id


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    """All params, in the batches of 100 MLflow accepts."""
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Final values in batches of 1000 (MLflow's limit)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i : i + 1000])


def set_tags(client: MlflowClient, run_id: str, tags: dict[str, str]) -> None:
    """All tags in one request."""
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def end_run(client: MlflowClient, run_id: str, err: BaseException | None) -> str:
    """End a run by how its work ended; return the MLflow status.

    FINISHED; KILLED for an interruption (Ctrl-C, SystemExit) or an Optuna prune (tag
    `pruned`); FAILED otherwise, with the reason in tag `error`.
    """
    import optuna

    if err is None:
        status = "FINISHED"
    elif isinstance(err, optuna.TrialPruned):
        status = "KILLED"
        client.set_tag(run_id, "pruned", str(err))
    else:
        status = "KILLED" if isinstance(err, (KeyboardInterrupt, SystemExit)) else "FAILED"
        client.set_tag(run_id, "error", f"{type(err).__name__}: {err}"[:5000])
    client.set_terminated(run_id, status)
    return status


def reproducibility_tags() -> dict[str, str]:
    """Git commit (+ dirty flag) of the working tree and versions of the key packages."""
    tags = {f"versions.{p}": _version(p) for p in PACKAGES}
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["git.dirty"] = str(bool(_git("status", "--porcelain", "--untracked-files=no")))
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


def runs_url(experiment_id: str, run_id: str | None = None, host: str = "http://127.0.0.1:5000") -> str:
    """The MLflow UI page of a run (or the runs table). NOTE: the 3.17 UI opens an experiment
    on its GenAI overview page; the runs table is at #/experiments/<id>/runs."""
    if run_id:
        return f"{host}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"{host}/#/experiments/{experiment_id}/runs"


def where_to_look(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """How to see a run or an experiment's runs: the page itself on an MLflow server, else the
    `mlflow ui` command for the store and the page it will serve."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {runs_url(experiment_id, run_id, host=tracking_uri.rstrip('/'))}"
    return f"mlflow ui --backend-store-uri {tracking_uri}  then open {runs_url(experiment_id, run_id)}"


def loop_step_figure(history: dict[str, list[tuple[int, float]]], final: dict[str, float],
                     trained_steps: int, eval_steps: int, levels: list[int], difficulty_name: str,
                     title: str, kind: str = "acc") -> plt.Figure:
    """Left: validation loss of each loop step over training. Right: final validation
    accuracy (or bits per byte, kind="bpb") vs loop step, per difficulty level (steps after the
    trained T extrapolate)."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    cmap = plt.get_cmap("viridis")
    for t in range(1, eval_steps + 1):
        points = history.get(f"val/loss_step{t}", [])
        if points:
            steps, values = zip(*points)
            style = "-" if t <= trained_steps else ":"
            ax_loss.plot(steps, values, style, marker=".", color=cmap(t / (eval_steps + 1)), label=f"step {t}")
    ax_loss.set(xlabel="training step", ylabel="validation loss (nats/token)", title="val loss per loop step")
    ax_loss.legend(fontsize=8, ncol=2)
    steps = list(range(1, eval_steps + 1))
    for i, k in enumerate(levels):
        values = [final.get(f"val/{kind}_step{t}_d{k}", float("nan")) for t in steps]
        ax_acc.plot(steps, values, marker="o", color=plt.get_cmap("plasma")(i / max(1, len(levels))),
                    label=f"{difficulty_name} {k}")
    ax_acc.plot(steps, [final.get(f"val/{kind}_step{t}", float("nan")) for t in steps], "k--", marker="s", label="all")
    if eval_steps > trained_steps:
        ax_acc.axvline(trained_steps + 0.5, color="grey", lw=1)
        ax_acc.text(trained_steps + 0.6, 0.02, "extrapolation", color="grey", fontsize=8,
                    transform=ax_acc.get_xaxis_transform())
    if kind == "acc":
        ax_acc.set(ylabel="validation accuracy", ylim=(0, 1.02), title="final val accuracy by loop step")
    else:
        ax_acc.set(ylabel=f"validation {kind}", title=f"final val {kind} by loop step")
    ax_acc.set(xlabel="loop step t", xticks=steps)
    ax_acc.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
