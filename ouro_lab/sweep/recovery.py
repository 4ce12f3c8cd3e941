"""Trials of dead processes: failed (no heartbeat on RDB storage; a vanished worker pid on this
host for the journal, which has no heartbeat), their MLflow runs ended, and their retries
queued while `retries` allows."""

from __future__ import annotations

import datetime
import os
import socket
import warnings

import optuna
from optuna.trial import TrialState

from ouro_lab import run_record as rr
from ouro_lab.sweep.budget import retried_trials, was_interrupted
from ouro_lab.sweep.study import Study


def recover_interrupted(s: Study, verbose: bool) -> None:
    """Mark trials left RUNNING by a dead worker as FAIL, end their MLflow runs, and enqueue
    retries for interrupted trials. Dead = no heartbeat (RDB storage, any host), or (journal
    storage, which has no heartbeat) a worker process on this host that no longer exists."""
    host = socket.gethostname()
    storage = s.study._storage
    if has_heartbeat(s.study):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(s.study)
    now = datetime.datetime.now()
    for t in s.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker", "")
        w_host, _, w_pid = worker.rpartition(":")
        # a worker names itself right after asking for the trial; silent for a minute = died in between
        unnamed = not worker and t.datetime_start is not None and (now - t.datetime_start).total_seconds() > 60
        if unnamed or (w_host == host and not pid_alive(int(w_pid or 0))):
            if not t.user_attrs.get("interrupted"):
                storage.set_trial_user_attr(t._trial_id, "interrupted", "worker process died")
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            if verbose:
                print(f"[sweep {s.sweep.name}] trial {t.number} was left running by a dead worker "
                      f"({worker}): marked FAIL", flush=True)
    states = {t.number: t for t in s.study.get_trials(deepcopy=False)}
    for run in s.experiment.find_runs(rr.RUNNING_FILTER):
        if run.info.run_id == s.parent.id:
            continue
        trial_no = run.data.tags.get(rr.TRIAL)
        if trial_no is not None and int(trial_no) in states and states[int(trial_no)].state.is_finished():
            s.experiment.run(run.info.run_id).end(status="KILLED", tags=rr.killed_with_sweep())
    trials = list(states.values())
    retried = retried_trials(trials)
    for t in trials:
        depth = t.user_attrs.get("retry_depth", 0)
        if was_interrupted(t) and t.params and t.number not in retried and depth < s.sweep.retries:
            s.study.enqueue_trial(t.params, user_attrs={"retry_of": t.number, "retry_depth": depth + 1},
                                  skip_if_exists=False)
            if verbose:
                print(f"[sweep {s.sweep.name}] re-queued interrupted trial {t.number} "
                      f"(retry {depth + 1}/{s.sweep.retries})", flush=True)


def has_heartbeat(study: optuna.Study) -> bool:
    from optuna.storages._heartbeat import is_heartbeat_enabled  # NOTE: not exported by Optuna 5

    return is_heartbeat_enabled(study._storage)


def pid_alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
