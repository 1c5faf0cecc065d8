"""Where a stage's `log_metrics` goes when the flow runs it: the stage's MLflow run (in the flow's own
process, or on rank 0 of a launched group, which gets the run's id and the tracking URI from its env)."""

from __future__ import annotations

import os

RUN_ID_ENV = "ALIGNFLOW_MLFLOW_RUN_ID"


def to_mlflow(run_id: str):
    """A `stages.runtime.tracking` sink that logs to the MLflow run `run_id`."""
    import mlflow

    def sink(metrics: dict[str, float], step: int | None) -> None:
        mlflow.log_metrics(metrics, step=step, run_id=run_id)

    return sink


def rank_sink():
    """Rank 0's sink when the launcher passed a run id; else None (the other ranks log nothing)."""
    run_id = os.environ.get(RUN_ID_ENV)
    return to_mlflow(run_id) if run_id and os.environ.get("RANK", "0") == "0" else None
