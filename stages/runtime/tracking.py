"""Metric logging from inside stages without tying them to an orchestrator or a tracking store.

Stages call `log_metrics`; the flow that runs a stage installs where metrics go (`metrics_sink`: its
MLflow run) for the stage's duration. Without a sink (a REPL, unit tests, the GPU check on a machine
without MLflow) metrics are dropped. Stages never import MLflow, Prefect or Hydra (an import-linter
contract): the GPU image has none of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

from stages.runtime.checkpoints import check_finite
from stages.runtime.progress import progress

Sink = Callable[[dict[str, float], "int | None"], None]
_sinks: list[Sink] = []


@contextlib.contextmanager
def metrics_sink(sink: Sink) -> Iterator[None]:
    """While inside, `log_metrics` hands every metric to `sink(metrics, step)`."""
    _sinks.append(sink)
    try:
        yield
    finally:
        _sinks.remove(sink)


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    if _sinks:
        _sinks[-1]({k: float(v) for k, v in metrics.items()}, step)


def trainer_callback(prefix: str):
    """A transformers `TrainerCallback` that forwards the trainer's numeric logs as `<prefix>/<name>`."""
    from transformers import TrainerCallback

    class _Metrics(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = progress(state.max_steps, f"{prefix.split('/')[0]}: training")

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(state.global_step - self.bar.n)

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

        def on_log(self, args, state, control, logs=None, **kwargs):
            scalars = {f"{prefix}/{k}": v for k, v in (logs or {}).items() if isinstance(v, (int, float))}
            log_metrics(scalars, step=state.global_step)
            if "loss" in (logs or {}):  # a NaN stops the stage before it is published
                check_finite(prefix.split("/")[0], float(logs["loss"]), state.global_step)
            if self.bar is not None and "loss" in (logs or {}):
                self.bar.set_postfix(loss=f"{logs['loss']:.3f}", refresh=False)

    return _Metrics()


# What every trl-based stage passes its trainer config: CPU, full precision (TRL defaults to bf16 even
# on CPU), no checkpoints or reporters of the trainer's own (the stage writes its artifact and metrics)
TRAINER_ARGS = dict(
    bf16=False,
    use_cpu=True,
    gradient_checkpointing=False,
    logging_steps=10,
    logging_nan_inf_filter=False,  # a NaN loss must be seen (and stop the stage), not averaged away
    save_strategy="no",
    report_to="none",
    dataloader_num_workers=0,
)
