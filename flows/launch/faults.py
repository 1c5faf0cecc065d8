"""Fault injection for the reliability harness (`make faults`, `tests/test_faults.py`), and what a
rerun does about the runs a kill left behind.

`ALIGNFLOW_FAULT=<point>#<n>` makes the process SIGKILL itself the n-th time it reaches `point`:
`start:<stage>` (a stage begins computing), `publish:<stage>` (its folder is complete under its
temporary name, about to be renamed), `logging:<stage>` (published, its MLflow run not yet
finished). Unset, `point` costs one dictionary lookup. Kills at random moments need no hook.

A SIGKILLed process cannot end its MLflow runs: they would stay RUNNING forever. Every run is
tagged with this process's run lock (`flows/launch/resources.py`); `reap` marks KILLED each RUNNING run
whose lock no live process holds.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

from stages.runtime.manifest import lock_is_held

FAULT_ENV = "ALIGNFLOW_FAULT"
LOCK_TAG = "alignflow.run_lock"
_seen: Counter = Counter()


def point(name: str) -> None:
    fault = os.environ.get(FAULT_ENV)
    if not fault:
        return
    target, _, nth = fault.partition("#")
    if target == name:
        _seen[name] += 1
        if _seen[name] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)


def reap(experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs of a process that is gone; returns their ids."""
    from mlflow import MlflowClient

    client, reaped = MlflowClient(), []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=5000):
        lock = run.data.tags.get(LOCK_TAG)
        if not lock or lock_is_held(lock):
            continue  # not ours to judge, or its process is alive
        client.set_terminated(run.info.run_id, "KILLED")
        reaped.append(run.info.run_id)
    return reaped
