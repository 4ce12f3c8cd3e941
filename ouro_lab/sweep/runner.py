"""`ouro-lab sweep sweeps/X.yaml`: run (or resume) a study until its budget or timeout is used
up, in this process or in worker processes sharing the study; then summarise it."""

from __future__ import annotations

import _thread
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import optuna
from optuna.trial import TrialState

from ouro_lab import run_record as rr
from ouro_lab import tracking, ui_view
from ouro_lab.config import ConfigError, load_config
from ouro_lab.sweep import design
from ouro_lab.sweep.budget import budget, budget_used
from ouro_lab.sweep.recovery import has_heartbeat, recover_interrupted
from ouro_lab.sweep.schema import load_sweep
from ouro_lab.sweep.study import Study, open_study, this_process
from ouro_lab.sweep.trial import COORDINATOR_GONE, CTRL_C, Discarded, run_trial, stop_if_orphaned, train_test_time_run


@dataclass
class SweepSummary:
    name: str
    study_dir: Path
    storage: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    counts: dict[str, int]
    best: list[dict[str, Any]]
    seconds: float
    answer: str = ""  # adaptive design: the saturation answer and why the design stopped

    def table(self, k: int = 5) -> str:
        lines = [f"best {min(k, len(self.best))} of {self.counts.get('COMPLETE', 0)} complete trials "
                 f"({', '.join(f'{n} {s.lower()}' for s, n in sorted(self.counts.items()))}):"]
        for row in self.best[:k]:
            spread = f" ± {row['std']:.4f}" if row.get("std") is not None else ""
            lines.append(f"  trial {row['number']:>3}  {row['value']:.4f}{spread}  "
                         + " ".join(f"{p}={v}" for p, v in row["params"].items()))
        if self.best and self.best[0].get("checkpoint"):
            lines.append(f"best trial's checkpoint (its first seed): {self.best[0]['checkpoint']}")
        if self.answer:
            lines.append(f"adaptive design: {self.answer}")
        return "\n".join(lines)


def run_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = (), verbose: bool = True,
              workers: int = 1, gpus: Sequence[str] = ()) -> SweepSummary:
    """Run (or resume) the study declared in `path` until its budget or timeout is used up:
    in this process, or with `workers` > 1 (or `gpus`) in that many worker processes sharing
    the study and the MLflow store (`run_workers`)."""
    sweep, base = load_sweep(path, overrides)
    cfg = load_config(base, sweep.overrides)
    if cfg.train.strategy == "ddp":
        raise ConfigError("train.strategy=ddp re-runs the whole command in every rank, this sweep included: "
                          "use ddp_spawn (the default for train.devices > 1)")
    if cfg.train.devices > 1 and (workers > 1 or gpus):
        raise ConfigError(f"train.devices={cfg.train.devices} (DDP trials) with --workers/--gpus: each worker is "
                          "pinned to one GPU; run DDP trials with one worker per host")
    s = open_study(sweep, base)  # the store, experiment, parent run and study exist before any worker
    total, start = budget(sweep), time.perf_counter()
    storage_desc = sweep.storage or str(s.study_dir / "optuna.journal")
    if verbose:
        print(f"[sweep {sweep.name}] study in {storage_desc}; runs in {s.tracking_uri} "
              f"(experiment {sweep.name!r}); budget {total} trials x {sweep.seeds} seed(s)"
              + (f"; {len(gpus) or workers} workers" if workers > 1 or gpus else ""), flush=True)
    with ctrl_c_stops_trials():  # (outside the clean-up below: a second Ctrl-C does not cut it short)
        try:
            if workers > 1 or gpus:
                run_workers(path, overrides, workers, gpus, verbose)
                # a worker that died late may have left its trial for nobody: finish the budget here
                work(s, total, start, sweep.name, verbose, wait=True)
            else:
                # RDB: a trial left RUNNING by a dead process elsewhere is failed once its heartbeat
                # lapses; wait for that rather than end the study short
                work(s, total, start, sweep.name, verbose, wait=has_heartbeat(s.study))
            if sweep.test_time_run:  # (after the trials: a rerun of a finished study adds it alone)
                train_test_time_run(s, verbose)
        except (KeyboardInterrupt, SystemExit):
            s.parent.end(status="KILLED")
            print(f"\n[sweep {sweep.name}] interrupted; finished trials are saved. Rerun the same command to resume.",
                  file=sys.stderr, flush=True)
            raise
    summary = summarize(s, time.perf_counter() - start, storage_desc)
    _log_summary(s, summary)
    if verbose:
        print(summary.table())
        print(f"[sweep {sweep.name}] done in {summary.seconds:.0f} s. study: {storage_desc}")
        print(f"[sweep {sweep.name}] view: {s.experiment.where_to_look(view=ui_view.VIEW_KEY)}")
        print(f"[sweep {sweep.name}] trials in Optuna's own UI: optuna-dashboard {storage_desc}  "
              "(pip install optuna-dashboard)")
        store = "" if sweep.tracking_uri is None and s.tracking_uri == tracking.resolve_tracking_uri() \
            else f" --store {s.tracking_uri}"
        print(f"[sweep {sweep.name}] analyse: ouro-lab report {sweep.name}{store}")
    return summary


def run_worker(path: str | Path, overrides: list[str] | tuple[str, ...], index: int, verbose: bool = True) -> None:
    """One worker of `run_workers`: the trial loop on the shared study, nothing else (the
    coordinating process made the study and summarises it)."""
    threads = int(os.environ.get("OURO_WORKER_THREADS", "0"))
    if threads:
        import torch

        torch.set_num_threads(threads)
    _exit_with_coordinator(int(os.environ.get("OURO_COORDINATOR_PID", "0")))
    sweep, base = load_sweep(path, overrides)
    s = open_study(sweep, base, worker=f"{socket.gethostname()}:{index}")
    with ctrl_c_stops_trials():
        work(s, budget(sweep), time.perf_counter(), f"{sweep.name} w{index}", verbose)


@contextmanager
def ctrl_c_stops_trials():
    """Ctrl-C raises KeyboardInterrupt as always, and also sets `trial.CTRL_C`, which stops the
    running trial at its next batch: a KeyboardInterrupt that lands inside a finalizer (a weakref
    callback during garbage collection) is swallowed by Python with "Exception ignored in ...",
    and the sweep would run on. The previous handler is restored on the way out (sweeps also run
    in-process, e.g. from a notebook). A process that ignores SIGINT (started in the background
    by a shell) keeps ignoring it."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, None):
        yield
        return

    def on_ctrl_c(signum, frame):
        CTRL_C.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        CTRL_C.clear()


def _exit_with_coordinator(pid: int, every: float = 1.0, grace: float = 30.0) -> None:
    """A worker whose coordinator died (killed, its terminal closed) interrupts itself like a
    Ctrl-C: its trial ends FAIL (interrupted) and is retried by the rerun, and no worker runs
    on beside a second set started by that rerun. The trial stops at its next batch
    (`trial.StopWhenOrphaned`); a worker still running `grace` s later (between trials, in a
    long evaluation) is interrupted wherever it is. NOTE: a thread polling the parent pid, as
    Linux's PR_SET_PDEATHSIG is not portable and would kill without the trial's clean-up."""
    if not pid:
        return

    def watch() -> None:
        while os.getppid() == pid:
            time.sleep(every)
        print(f"[sweep] worker pid {os.getpid()}: its coordinator (pid {pid}) is gone; interrupting its trial",
              file=sys.stderr, flush=True)
        COORDINATOR_GONE.set()
        time.sleep(grace)
        _thread.interrupt_main()  # a KeyboardInterrupt at the main thread's next Python step (as Ctrl-C)

    threading.Thread(target=watch, name="ouro-coordinator-watch", daemon=True).start()


def run_workers(path: str | Path, overrides: Sequence[str], workers: int, gpus: Sequence[str], verbose: bool) -> None:
    """Start one worker process per GPU (CUDA_VISIBLE_DEVICES pinned) or `workers` CPU workers
    (cores split between them so they do not oversubscribe), and wait for them. A worker that
    dies leaves its trial to the others: they mark it failed and retry it."""
    import torch

    if not gpus and torch.cuda.is_available():  # K workers over the visible GPUs, round robin
        gpus = [str(i % torch.cuda.device_count()) for i in range(workers)]
    n = len(gpus) or workers
    threads = max(1, len(os.sched_getaffinity(0)) // n)
    procs = []
    for i in range(n):
        env = os.environ | {"OURO_COORDINATOR_PID": str(os.getpid()), "OURO_WORKER_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
                            "MKL_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": gpus[i] if gpus else ""}
        cmd = [sys.executable, "-m", "ouro_lab.cli", "sweep", str(path), *overrides, "--as-worker", str(i)]
        procs.append(subprocess.Popen(cmd, env=env))
        if verbose:
            where = f"GPU {gpus[i]}" if gpus else f"CPU, {threads} thread(s)"
            print(f"[sweep] worker {i} pid {procs[-1].pid} on {where}", flush=True)
    try:
        # NOTE: reap each worker as soon as it ends: a dead child left unreaped is a zombie,
        # which still looks alive to the others' check of its pid
        while any(p.poll() is None for p in procs):
            time.sleep(0.5)
        codes = [p.returncode for p in procs]
    except KeyboardInterrupt:
        for p in procs:  # they got the terminal's SIGINT too; wait for them to save their state
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        raise
    for i, code in enumerate(codes):
        if code != 0 and verbose:
            print(f"[sweep] worker {i} ended with status {code}; its trial is retried by the others or by a rerun",
                  file=sys.stderr, flush=True)


def work(s: Study, total: int, start: float, label: str, verbose: bool, wait: bool = False) -> None:
    """The trial loop of one process: run trials until the budget is used up or the timeout.
    `wait`: while the rest of the budget is held by running trials, wait for them instead of
    returning (one of them may belong to a dead worker, to be failed and retried)."""
    sweep = s.sweep

    def objective(trial: optuna.Trial) -> float:
        try:
            stop_if_orphaned()
            return run_trial(s, trial, verbose, total)
        except Discarded as err:
            trial.set_user_attr("discarded", str(err))
            raise
        except (KeyboardInterrupt, SystemExit):
            trial.set_user_attr("interrupted", "Ctrl-C / SystemExit")
            raise
        except optuna.TrialPruned:
            raise
        except Exception as err:
            trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:2000])
            raise

    def report(study: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
        if not verbose:
            return
        if t.user_attrs.get("discarded"):
            print(f"[sweep {label}] trial {t.number} not run: {t.user_attrs['discarded']}", flush=True)
            return
        done = budget_used(study.get_trials(deepcopy=False), sweep.retries)
        try:
            best = f"best {study.best_value:.4f} (trial {study.best_trial.number})"
        except ValueError:
            best = "no complete trial yet"
        what = f"{sweep.objective.metric}={t.value:.4f}" if t.value is not None else (
            t.user_attrs.get("error") or t.user_attrs.get("interrupted") or "")
        print(f"[sweep {label}] {done}/{total} trial {t.number} {t.state.name} {what} | {best} | "
              f"{' '.join(f'{k}={v}' for k, v in t.params.items())} | "
              f"{(t.duration.total_seconds() if t.duration else 0):.0f} s", flush=True)

    try:
        while True:
            stop_if_orphaned()  # an orphaned worker takes no further trial
            recover_interrupted(s, verbose)  # trials of a dead process: an earlier killed run, another worker
            trials = s.study.get_trials(deepcopy=False)
            # queued retries are work left: only what ran or is running fills the budget
            done = budget_used(trials, sweep.retries)
            running = sum(t.state == TrialState.RUNNING for t in trials)
            waiting = any(t.state == TrialState.WAITING for t in trials)  # a queued retry: always pop it
            if not waiting and (done >= total or (done + running >= total and not wait)):
                break
            if sweep.timeout is not None and time.perf_counter() - start > sweep.timeout:
                if verbose:
                    print(f"[sweep {label}] timeout of {sweep.timeout:.0f} s reached", flush=True)
                break
            if not waiting and done + running >= total:  # wait: a running trial's worker may be dead
                time.sleep(1)
                continue
            if sweep.sampler.name == "adaptive" and not waiting and _design_stops(s, trials, label, verbose):
                break
            s.study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[report])
    except (KeyboardInterrupt, SystemExit):
        me = this_process()
        for t in s.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.user_attrs.get("worker") == me:  # Optuna leaves it RUNNING on a BaseException
                s.study._storage.set_trial_user_attr(t._trial_id, "interrupted", "Ctrl-C")
                s.study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        raise


def _design_stops(s: Study, trials: list, label: str, verbose: bool) -> bool:
    """Whether the adaptive design has stopped (then logged on the study run as design/stop.json
    and printed with the answer); else the next point and why are printed."""
    decided = s.study.sampler.decision(trials)  # (the trial that follows asks the sampler: the same decision)
    if verbose:
        what = f"stops: {decided.reason}" if decided.point is None else f"next {decided.reason}"
        print(f"[sweep {label}] design {what} | answer so far: {design.answer_line(decided)}", flush=True)
    if decided.point is None:
        s.parent.log_text(json.dumps(design.record(decided), indent=1), f"{rr.DESIGN_ARTIFACTS}/stop.json")
    return decided.point is None


def summarize(s: Study, seconds: float, storage_desc: str) -> SweepSummary:
    # a discarded trial never ran (another worker's trial made it redundant): not counted
    trials = [t for t in s.study.get_trials(deepcopy=False) if not t.user_attrs.get("discarded")]
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    reverse = s.sweep.objective.direction == "maximize"
    best = []
    for t in sorted(complete, key=lambda t: t.value, reverse=reverse):
        std = None
        run_id = t.user_attrs.get("mlflow_run_id")
        if s.sweep.seeds > 1 and run_id:
            std = s.experiment.run(run_id).fetch().data.metrics.get(rr.seed_std(s.sweep.objective.metric))
        best.append({"number": t.number, "value": t.value, "std": std, "params": t.params, "run_id": run_id,
                     "checkpoint": t.user_attrs.get("checkpoint")})
    answer = ""
    if s.sweep.sampler.name == "adaptive":
        decided = s.study.sampler.decision(trials)  # (the trial loop's last check made it: kept by its inputs)
        used = budget_used(trials, s.sweep.retries) >= budget(s.sweep)
        why = (f"stopped: {decided.reason}" if decided.point is None else
               f"{'budget of ' + str(budget(s.sweep)) + ' trials used' if used else 'stopped early (timeout or Ctrl-C)'}"
               f"; next would be {decided.reason}")
        answer = f"{design.answer_line(decided)} ({why})"
    return SweepSummary(s.sweep.name, s.study_dir, storage_desc, s.tracking_uri, s.experiment.id, s.parent.id,
                        counts, best, seconds, answer)


def _save_view(s: Study, study_series: list[str]) -> None:
    """The study's saved view in the MLflow UI (ui_view.py), for the link the sweep prints."""
    runs = s.experiment.find_runs(max_results=100)  # (the kind: any training run says it)
    kind = next((r.data.tags[rr.METRIC_KIND_TAG] for r in runs if rr.METRIC_KIND_TAG in r.data.tags), "acc")
    swept = [k for k in s.sweep.params if k not in s.sweep.bundles and k != design.SEED_PARAM]
    state = ui_view.study_view(s.sweep.objective.metric, swept, s.sweep.bundles, kind, s.sweep.seeds, study_series)
    s.experiment.set_tag(*ui_view.view_tag(state))


def _log_summary(s: Study, summary: SweepSummary) -> None:
    s.study_dir.mkdir(parents=True, exist_ok=True)
    text = summary.table(k=len(summary.best) or 1)
    (s.study_dir / rr.SUMMARY_ARTIFACT).write_text(text + "\n")
    s.parent.log_text(text, rr.SUMMARY_ARTIFACT)
    s.parent.log_metrics(rr.study_metrics(summary.counts, s.sweep.objective.metric,
                                          summary.best[0]["value"] if summary.best else None))
    series = rr.loop_series(s.sweep.objective.metric, [(b["params"], b["value"]) for b in summary.best],
                            ignore=(design.SEED_PARAM,))
    s.parent.log_series(series)
    _save_view(s, list(series))
    if summary.best:  # (the best checkpoint is findable from the study run, in the UI's tags)
        top = summary.best[0]
        s.parent.set_tags(rr.best_tags(top["number"], top["run_id"], top["checkpoint"]))
    failed_all = summary.counts and not summary.counts.get("COMPLETE") and not summary.counts.get("PRUNED")
    s.parent.end(status="FAILED" if failed_all else "FINISHED")
