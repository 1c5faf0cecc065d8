"""How one stage runs inside a flow: cache key, atomic content-addressed folder, MLflow run.

The cache key of a stage is derived from its config, the content digests of the files it reads
(inside upstream artifacts or named in the config, `flows/fingerprint.py`) and the stage's code
version (the source of its module and of every `stages` module it imports), so an unchanged stage
is never recomputed, across processes. Its output folder is named by the
digest of its content and written through a temporary folder, so a cached pointer never points at
a folder that a later run overwrote or a crash left half-written.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import json
import os
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from filelock import FileLock

import flows
from flows.config import Config
from flows.launch import faults, launch
from flows.launch.faults import LOCK_TAG
from flows.launch.metrics import to_mlflow
from flows.launch.resources import current_threads, peak_rss_mb, resource_error, run_lock
from stages.runtime import checkpoints
from stages.runtime.manifest import MANIFEST, Manifest, publish, sha256_json, staging_folder
from stages.runtime.progress import STOP
from stages.settings.distributed import DistributedConfig


def module_file(module: str) -> Path | None:
    """The source file of an alignflow module (`stages.data.tokens`), None for anything else."""
    base = flows.ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


@functools.cache
def stage_imports(module: str) -> tuple[str, ...]:
    """The `stages` modules (and packages) `module`'s source names in its imports; parsed once per process."""
    path = module_file(module)
    if path is None:
        return ()
    names = [module.rsplit(".", 1)[0]] if "." in module else []  # its package's `__init__`
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "stages":
            names += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names if a.name.split(".")[0] == "stages"]
    return tuple(names)


@functools.cache
def code_version(stage: str) -> str:
    """sha256 over the source of `stages.<stage>` and, transitively, every `stages` module it imports
    (a package's `__init__` included)."""
    seen: dict[str, Path] = {}
    todo = [f"stages.{stage}"]
    while todo:
        name = todo.pop()
        path = module_file(name)
        if name in seen or path is None:
            continue
        seen[name] = path
        todo += stage_imports(name)
    return sha256_json({name: seen[name].read_text() for name in sorted(seen)})


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{"stage.ppo.beta": 0.02, ...} from nested dataclasses / dicts."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): obj}


@dataclass(frozen=True)
class StageCall:
    """Everything that determines a stage's output: its config objects, upstream digests, scalars."""

    stage: str
    configs: tuple[Any, ...]
    inputs: dict[str, str]  # kwarg -> path inside an upstream artifact
    parents: dict[str, str]  # input -> content digest of the file or folder the stage reads
    scalars: dict[str, Any]
    artifacts_dir: str
    checkpointed: bool = False  # the stage takes a `checkpoint_dir` that outlives a crashed attempt
    launch: DistributedConfig | None = None  # set: the stage runs as a process group (`flows/launch/launch.py`)

    def key(self) -> str:
        launched = {"distributed": dataclasses.asdict(self.launch)} if self.launch is not None else {}
        return sha256_json(
            {
                **launched,
                "stage": self.stage,
                "configs": [dataclasses.asdict(c) for c in self.configs],
                "parents": self.parents,
                "scalars": self.scalars,
                "inputs": sorted(self.inputs),
                "code": code_version(self.stage),
                "artifacts_dir": str(Path(self.artifacts_dir).resolve()),
            }
        )


@contextmanager
def tracked_run(**kwargs: Any) -> Iterator[Any]:
    """`mlflow.start_run` whose run ends KILLED when the process is stopped (SIGTERM, which Prefect turns
    into its TerminationSignal, or Ctrl-C), FAILED on an error, FINISHED otherwise: never RUNNING forever."""
    lock = run_lock()
    if lock is not None:  # whose process ran it: a rerun marks the run KILLED if that process is gone
        kwargs["tags"] = {**kwargs.get("tags", {}), LOCK_TAG: lock}
    run = mlflow.start_run(**kwargs)
    try:
        yield run
    except Exception as e:
        record_failure(e)
        mlflow.end_run("FAILED")
        raise
    except BaseException:
        mlflow.end_run("KILLED")
        raise
    mlflow.end_run("FINISHED")


def record_failure(e: BaseException) -> None:
    """The failed run keeps the message as a tag and the whole traceback as `error.txt`, whatever the
    console showed (one `error:` line for an expected failure)."""
    try:
        mlflow.set_tag("alignflow.error", f"{type(e).__name__}: {e}"[:5000])
        mlflow.log_text("".join(traceback.format_exception(e)), "error.txt")
    except Exception:  # the tracking store itself failing must not hide the error being recorded
        pass


def _cache_key(context, parameters: dict[str, Any]) -> str:
    return parameters["call"].key()


def keys_file(call: StageCall) -> Path:
    return Path(call.artifacts_dir, call.stage, ".keys", call.key()[:32])


def remember(call: StageCall, manifest: Manifest) -> None:
    """Records the manifest the call's cache key produced (`<stage>/.keys/<key>`), as Prefect's result
    store does, so a later run finds it without Prefect; written to a temporary file and renamed. The
    folder's own manifest.json cannot serve: a folder is named by its content, so a stage whose inputs
    or code changed but whose output did not keeps the folder, and its manifest, of the first key."""
    path = keys_file(call)
    text = manifest.to_json()
    if path.exists() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def recall(call: StageCall) -> Manifest | None:
    """The manifest the call's cache key produced, if its folder is still published."""
    try:
        manifest = Manifest(**json.loads(keys_file(call).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    if manifest.key != call.key() or not Path(manifest.path, MANIFEST).exists():
        return None
    return manifest


def execute(call: StageCall, parent_run_id: str | None) -> Manifest:
    from stages.runtime import device_guard, tracking

    module = importlib.import_module(f"stages.{call.stage}")
    root = Path(call.artifacts_dir) / call.stage
    key = call.key()
    with tracked_run(
        run_name=call.stage,
        nested=parent_run_id is not None,
        parent_run_id=parent_run_id,
        tags={"alignflow.stage": call.stage, "alignflow.key": key, "alignflow.status": "ran"},
    ) as run:
        mlflow.log_params({k: v for c in call.configs for k, v in flatten(c, f"{call.stage}.").items()})
        try:
            with staging_folder(root) as tmp:
                t0 = time.perf_counter()
                extra = {"checkpoint_dir": root / ".checkpoints" / key[:16]} if call.checkpointed else {}
                faults.point(f"start:{call.stage}")
                kwargs = {**{k: Path(v) for k, v in call.inputs.items()}, **call.scalars, **extra}
                if call.launch is None:
                    logging = tracking.metrics_sink(to_mlflow(run.info.run_id))
                    with device_guard.maybe_guard(call.stage), logging:  # guard: ALIGNFLOW_DEVICE_GUARD=1 (the tests)
                        manifest = module.run(*call.configs, **kwargs, out_dir=tmp)
                else:  # every rank runs it; rank 0 writes into `tmp`, and this task publishes as always
                    group = root / ".launch" / key[:16]
                    manifest = launch.run_group(
                        call.launch,
                        call.stage,
                        call.configs,
                        kwargs,
                        out_dir=tmp,
                        folder=group,
                        run_id=run.info.run_id,
                        threads=current_threads(),
                    )
                seconds = time.perf_counter() - t0
                digest = manifest.digest  # the stage hashed its own folder
                final = root / digest[:16]  # content-addressed: the same content always has the same name
                manifest = dataclasses.replace(
                    manifest,
                    path=str(final.resolve()),
                    digest=digest,
                    key=key,
                    parents=call.parents,
                    run_id=run.info.run_id,
                    metrics={**manifest.metrics, f"{call.stage}/seconds": seconds, **_peak_rss(call.stage)},
                )
                (tmp / MANIFEST).write_text(manifest.to_json())
                faults.point(f"publish:{call.stage}")
                if STOP:  # an interrupt that a library swallowed: still nothing is published
                    raise KeyboardInterrupt(f"stopped by signal {STOP[0]}")
                publish(tmp, final)
                if call.checkpointed:  # published: a rerun finds the artifact, its checkpoints are spent
                    checkpoints.spent(extra["checkpoint_dir"])
        except (MemoryError, OSError, RuntimeError) as e:  # out of memory or disk: say what to change
            translated = resource_error(call.stage, root, e)
            if translated is e:
                raise
            raise translated from None
        faults.point(f"logging:{call.stage}")
        mlflow.set_tag("alignflow.digest", digest)
        mlflow.set_tag("alignflow.artifact", manifest.path)
        mlflow.log_metrics(manifest.metrics)
        mlflow.log_artifact(str(final / MANIFEST))
        for name in ("samples", "generations", "eval"):
            if name in manifest.files:
                mlflow.log_artifact(str(manifest.file(name)))
    return manifest


def _peak_rss(stage: str) -> dict[str, float]:
    """The process's peak RSS over the stage (the flow reset the count before it), kept in the manifest
    so a cached stage still says what computing it took (`make compare` reads it)."""
    peak = peak_rss_mb()
    return {} if peak is None else {f"{stage}/peak_rss_mb": peak}


def stage_task():
    from prefect import task

    return task(
        execute,
        name="stage",
        cache_key_fn=_cache_key,
        persist_result=True,
    )


def set_up_tracking(cfg: Config) -> None:
    """Local default: SQLite store and artifact files both under the artifacts folder (MLflow would
    otherwise put artifacts in ./mlruns of the working directory). Under a file lock: runs that start
    together would otherwise race to create the database's tables and the experiment."""
    if cfg.tracking.uri is not None:  # a tracking server: its database guards the state
        from mlflow.exceptions import MlflowException

        mlflow.set_tracking_uri(cfg.tracking.uri)
        for attempt in range(3):  # runs starting together race to create the experiment: the loser reads it
            try:
                mlflow.set_experiment(cfg.tracking.experiment)
                return
            except MlflowException:
                if attempt == 2:
                    raise
                time.sleep(1.0)
    root = Path(cfg.artifacts_dir).resolve()
    (root / ".locks").mkdir(parents=True, exist_ok=True)
    with FileLock(root / ".locks" / "tracking.lock"):
        create_database(root / "mlflow.db")
        mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
        if mlflow.get_experiment_by_name(cfg.tracking.experiment) is None:
            mlflow.create_experiment(cfg.tracking.experiment, artifact_location=(root / "mlflow-artifacts").as_uri())
        faults.reap(mlflow.set_experiment(cfg.tracking.experiment).experiment_id)  # runs a killed process left RUNNING


def create_database(path: Path) -> None:
    """MLflow's tables are built by a few seconds of migrations; a kill among them left a database no
    later run could open ("table _alembic_tmp_experiments already exists"). Build it beside its path,
    then rename: the path holds a complete database or none. Call under the tracking lock."""
    if path.exists():
        return
    import sqlalchemy
    from mlflow.store.db.utils import _initialize_tables

    staging = path.with_name(path.name + ".staging")
    for leftover in (staging, staging.with_name(staging.name + "-journal")):
        leftover.unlink(missing_ok=True)  # a killed build's
    engine = sqlalchemy.create_engine(f"sqlite:///{staging}")
    try:
        _initialize_tables(engine)
    finally:
        engine.dispose()
    faults.point("tracking:database")
    os.replace(staging, path)
