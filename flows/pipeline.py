"""The align flow: the cached stage runner, MLflow's parent run, the promotion gate, the summary and
the report. `flows/align.py` is its command line (`python -m flows.align [overrides]`), `flows/ops/serve.py`
its deployment.

`pipeline=rlhf|dpo|rlaif|rlaif_direct` picks the branch; each is a small function in
`flows/branches.py` that reads as its DAG (rlhf: prepare -> sft -> comparisons -> reward_model ->
ppo -> evaluate).

Runs may share one artifacts folder: two `make align` at once, or a sweep's parallel jobs. Each
stage call holds an OS file lock on its cache key (`artifacts/.locks/`) while it computes, so a
second run that needs the same stage waits and then takes the first one's result from the cache:
a stage is never computed twice at the same time. A crashed process releases its lock.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from filelock import FileLock, Timeout

import flows
from flows.branches import BRANCHES
from flows.config import PIPELINES, Config
from flows.fingerprint import Fingerprints
from flows.launch import backends, launch, prefect_server
from flows.launch.resources import (
    SWEEP_RUN_ENV,
    cap_threads,
    concurrent_jobs,
    current_threads,
    live_runs,
    peak_rss_mb,
    register_run,
    reset_peak_rss,
    threads_per_job,
)
from flows.results import html_report, registry, report
from flows.runner import StageCall, execute, flatten, recall, remember, set_up_tracking, stage_task, tracked_run
from flows.steps import QualityGate
from stages.runtime.errors import ConfigError, ExpectedFailure, LabelsMissing
from stages.runtime.manifest import MANIFEST, Manifest
from stages.runtime.progress import STOP


class StopPipeline(Exception):
    """Raised by the runner at the first stage past `pipeline.stop_after`."""


class NotCached(Exception):
    """Raised by a probing runner at the first stage whose result the artifacts folder does not hold."""


class Pipeline:
    """Runs stage calls in order, recording status and timing; stops after `pipeline.stop_after`."""

    def __init__(self, cfg: Config, parent_run_id: str | None, *, probe: bool = False) -> None:
        """`probe`: walk the branch without running or recording anything; each call returns the
        published result of its cache key, or raises `NotCached`. Inside a Prefect flow run the stages
        are Prefect tasks (recorded on the server, Prefect's cache); outside one they run, or are
        found in the artifacts folder, without Prefect."""
        self.cfg = cfg
        self.parent_run_id = parent_run_id
        self.probe = probe
        self.task = stage_task() if in_prefect_flow() else None
        self.stages: dict[str, dict[str, Any]] = {}
        self.order = PIPELINES[cfg.pipeline.name]
        self.jobs = concurrent_jobs()  # a sweep's jobs running at once
        self.fingerprints = Fingerprints(flows.ROOT / ".prefect" / "fingerprints.json")

    def wanted(self, stage: str) -> bool:
        stop = self.cfg.pipeline.stop_after
        return stop is None or self.order.index(stage) <= self.order.index(stop)

    def __call__(
        self,
        stage: str,
        *configs: Any,
        files: dict[str, Path] | None = None,
        checkpointed: bool = False,
        name: str | None = None,
        serves: str | None = None,
        **kwargs: Any,
    ) -> Manifest:
        """Path arguments are the files the stage reads; their content digests, and those of `files`
        (inputs named in the config, outside the artifacts: a dataset, a rankings file), key the stage.
        `checkpointed`: the stage resumes from checkpoints after a crash; `name`: the row of a stage
        that runs more than once (iterative DPO's rounds); `serves`: the listed stage an extra call
        belongs to (the evaluation reward model serves evaluate), for `pipeline.stop_after`."""
        if not self.wanted(serves or stage):
            raise StopPipeline(stage)
        name = name or stage
        inputs = {k: str(v) for k, v in kwargs.items() if isinstance(v, Path)}
        scalars = {k: v for k, v in kwargs.items() if not isinstance(v, Path)}
        read = {k: Path(v) for k, v in inputs.items()} | {f"file:{k}": Path(v) for k, v in (files or {}).items()}
        digests = {k: self.fingerprints.digest(v) for k, v in read.items()}
        self.fingerprints.save()
        group = self.cfg.distributed if self.cfg.distributed.launches(stage) else None  # a process group
        call = StageCall(stage, configs, inputs, digests, scalars, self.cfg.artifacts_dir, checkpointed, group)
        if self.probe:
            found = recall(call)
            if found is None:
                raise NotCached(name)
            return found
        threads = threads_per_job(self.cfg.threads, max(self.jobs, live_runs()))  # runs start and end
        cap_threads(threads)
        t0 = time.perf_counter()
        reset_peak_rss()
        with stage_lock(self.cfg.artifacts_dir, name, call.key()):
            manifest, cached = self.run_task(call, name) if self.task is not None else self.run_plain(call)
            remember(call, manifest)
        if cached:
            with tracked_run(
                run_name=name,
                nested=True,
                parent_run_id=self.parent_run_id,
                tags={
                    "alignflow.stage": stage,
                    "alignflow.status": "cached",
                    "alignflow.digest": manifest.digest,
                    "alignflow.source_run": manifest.run_id,
                },
            ):
                mlflow.log_metrics(manifest.metrics)
        self.stages[name] = {
            "stage": stage,
            "status": "cached" if cached else "ran",
            "seconds": time.perf_counter() - t0,
            "artifact": manifest.path,
            "digest": manifest.digest,
            "metrics": manifest.metrics,
            "peak_rss_mb": None if cached else peak_rss_mb(),
            "run_id": manifest.run_id,  # the MLflow run that computed it (its metric history)
            "threads": threads,
            "inputs": inputs,
            "parents": digests,
        }
        if "verdict" in manifest.files:
            self.stages[name]["verdict"] = json.loads(manifest.file("verdict").read_text())
        return manifest

    def run_task(self, call: StageCall, name: str) -> tuple[Manifest, bool]:
        """As a Prefect task: Prefect's cache (its result store, keyed on `call.key()`) finds a result."""
        state = self.task.with_options(task_run_name=name)(call, self.parent_run_id, return_state=True)
        manifest: Manifest = state.result()
        cached = state.name == "Cached"
        if cached and not Path(manifest.path, MANIFEST).exists():  # artifact deleted: recompute
            state = self.task.with_options(task_run_name=name, refresh_cache=True)(
                call, self.parent_run_id, return_state=True
            )
            manifest, cached = state.result(), False
        return manifest, cached

    def run_plain(self, call: StageCall) -> tuple[Manifest, bool]:
        """Without Prefect: the artifacts folder's record of the key finds a result (`runner.recall`)."""
        found = recall(call)
        return (found, True) if found is not None else (execute(call, self.parent_run_id), False)


def in_prefect_flow() -> bool:
    if "prefect" not in sys.modules:  # nothing imported it: no flow can be running
        return False
    from prefect.context import FlowRunContext

    return FlowRunContext.get() is not None


@contextmanager
def stage_lock(artifacts_dir: str, name: str, key: str) -> Iterator[None]:
    """An OS lock (flock) per cache key, held while the stage is looked up in the cache or computed."""
    folder = Path(artifacts_dir, ".locks")
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / f"{key[:32]}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        # not print: inside the flow, Prefect turns prints into INFO logs, which the console does not show
        sys.stderr.write(f"{name}: another run is computing it; waiting for its result\n")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def align(cfg: Config) -> dict[str, Any]:
    """The callers (`job`, the deployment's `retrain`) have run `preflight(cfg)` before it. Called
    plainly, it runs without Prefect (a rerun whose every stage is cached, when no server is up);
    `align_flow()` is the same body as a Prefect flow."""
    set_up_tracking(cfg)
    sweep_run = os.environ.get(SWEEP_RUN_ENV)
    with tracked_run(
        run_name=f"align-{cfg.pipeline.name}", parent_run_id=sweep_run, tags={"alignflow.kind": "align"}
    ) as parent:
        mlflow.log_params(flatten(cfg))
        run = Pipeline(cfg, parent.info.run_id)
        summary: dict[str, Any] = {"pipeline": cfg.pipeline.name, "mlflow_run_id": parent.info.run_id}
        # the Prefect server that recorded this run; None: a cached rerun with no server up, in MLflow only
        summary["prefect_api_url"] = os.environ.get("PREFECT_API_URL") if run.task is not None else None
        stopped = None
        try:
            ev = BRANCHES[cfg.pipeline.name](run, cfg)
            summary["eval"] = json.loads(ev.file("eval").read_text())
        except StopPipeline:
            pass
        except QualityGate as e:  # a model at chance: the stages so far stay cached, nothing after runs
            stopped = str(e)
        summary["stages"] = run.stages
        summary["verdict"] = report.verdict(run.stages)
        if stopped is not None:
            summary["verdict"] = {"status": "stopped", "reasons": [stopped, *summary["verdict"]["reasons"]]}
        summary["lengths"] = report.lengths(run.stages)
        summary["threads"] = current_threads()
        if "prepare" in run.stages:
            sources_json = Path(run.stages["prepare"]["artifact"], "sources.json")
            summary["data"] = json.loads(sources_json.read_text()) if sources_json.exists() else None
        if "eval" in summary and cfg.registry.enabled:
            with FileLock(Path(cfg.artifacts_dir, ".locks", "registry.lock")):  # jobs finishing together
                summary["registry"] = registry.gate(cfg, summary)
        folder = report.run_folder(cfg.artifacts_dir, parent.info.run_id).resolve()
        summary["summary_path"], summary["report_path"] = str(folder / "summary.json"), str(folder / "report.html")
        page = html_report.write(summary, folder / "report.html")
        path = report.write_summary(folder, summary)
        mlflow.log_artifact(str(path))
        mlflow.log_artifact(str(page))
    return summary


def align_flow():
    """`align` as a Prefect flow: the run and its stages' task runs are recorded on the Prefect server."""
    from prefect import flow

    return flow(name="align", log_prints=True)(align)


def cached(cfg: Config) -> bool:
    """Whether the artifacts folder holds every stage this run needs, for the inputs and code of now:
    the branch walked with a probing runner (cache keys and file digests only, nothing computed).
    False too when the probe cannot read an input: preflight, which runs next, names it."""
    try:
        BRANCHES[cfg.pipeline.name](Pipeline(cfg, None, probe=True), cfg)
    except (StopPipeline, QualityGate):  # everything before the gate is cached, and nothing after runs
        pass
    except (NotCached, ExpectedFailure, ValueError, OSError, EOFError):
        return False
    return True


def check_before_compute(cfg: Config) -> None:
    """Preflight (`flows/preflight.py`: data rows, model folders, tokenizers, the judge, the machine),
    imported only by a run that computes: it loads torch and transformers."""
    from flows.preflight import preflight

    try:
        preflight(cfg)
    except ExpectedFailure:
        raise
    except (ValueError, OSError) as e:  # a data file that cannot be read: named like the rest
        raise ConfigError(str(e)) from e


def catch_interrupts() -> None:
    """Ctrl-C (SIGINT) raises KeyboardInterrupt as always, and is recorded, so that one swallowed on
    the way (see `stages/runtime/progress.STOP`) still stops the run at the next loop tick or publish."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return  # a sweep launcher's worker thread: signals belong to the main one

    def interrupted(signum, frame):
        STOP.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupted)


def run_job(cfg: Config) -> float | None:
    """One run of the command line or one job of a sweep, its config already typed and checked
    (`flows.align.job`): thread cap, the cache probe, preflight, the flow, the printed table; returns
    `sweep.objective` for a sweeper."""
    catch_interrupts()
    register_run()
    cap_threads(threads_per_job(cfg.threads, max(concurrent_jobs(), live_runs())))
    # a run whose every stage is cached reads its inputs' digests only: nothing loads, nothing to check
    everything_cached = cached(cfg)
    if not everything_cached:
        launch.accelerator_env(os.environ, cfg.compute.device)  # before DeepSpeed is first imported
        check_before_compute(cfg)
    # Prefect records the run when a server is up; a temporary one starts only when a stage must run
    recorded = prefect_server.choose(must_run=lambda: not everything_cached, local=cfg.schedule.api_url)
    try:
        if recorded:
            flow = align_flow()
            if not flows.debugging():
                quiet_expected_failures()
            summary = flow(cfg)
        else:
            summary = align(cfg)
    except LabelsMissing as e:
        print(f"\nwaiting for labels: {e}")
        raise SystemExit(2) from None
    if STOP:  # interrupted, the interrupt swallowed, and yet the run ran out: still not a success
        raise SystemExit(130)
    print(report.table(summary["stages"]))
    print("\n" + report.lengths_line(summary["lengths"]))
    if "eval" in summary:
        print("\n" + report.eval_line(summary["eval"]))
    if summary["verdict"]["status"] != "ok":
        print(f"\nVERDICT: {summary['verdict']['status']}\n  " + "\n  ".join(summary["verdict"]["reasons"]))
    if "registry" in summary:
        print("\n" + registry.describe(summary["registry"]))
    print(f"\nreport: {summary['report_path']}\nsummary: {summary['summary_path']}")
    if summary["verdict"]["status"] == "stopped":  # a quality gate: the run did not do what was asked
        raise SystemExit(1)
    return sweep_result(summary, cfg.sweep.objective)


class _ExpectedOffConsole(logging.Filter):
    """Keeps Prefect's task and flow run tracebacks of an expected failure, or of a tracking server that
    cannot be reached, off the console (its API handler still sends them to the server: the Prefect UI
    shows the stack); the command line prints the one line. A bug's traceback still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(("prefect.task_runs", "prefect.flow_runs")) or record.levelno < logging.ERROR:
            return True
        if record.exc_info and record.exc_info[1] is not None:
            return not (isinstance(record.exc_info[1], ExpectedFailure) or backends.unreachable(record.exc_info[1]))
        # "Finished in state Failed(...)": the exception itself reaches the command line
        return not record.getMessage().startswith("Finished in state Failed")


def quiet_expected_failures() -> None:
    """Install `_ExpectedOffConsole` on the console handlers Prefect configured (on the root logger)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not any(
            isinstance(f, _ExpectedOffConsole) for f in handler.filters
        ):
            handler.addFilter(_ExpectedOffConsole())


def sweep_result(summary: dict[str, Any], objective: str) -> float | None:
    """In a sweep, the job's summary goes to its Hydra output folder too (the sweep callback reads it);
    the value of `objective` (a dotted summary key) is returned to the sweeper."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        Path(HydraConfig.get().runtime.output_dir, "summary.json").write_text(json.dumps(summary, indent=2))
    return registry.lookup(summary, objective)
