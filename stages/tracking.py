"""Metric logging from inside stages without tying them to an orchestrator.

Stages call `log_metrics`; when the flow has opened an MLflow run, metrics go there, otherwise
(REPL, unit tests) they are dropped.
"""

from __future__ import annotations

from collections.abc import Mapping


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)
