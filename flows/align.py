"""The alignment flow: `python -m flows.align [overrides]`, e.g. `stage.ppo.beta=0.05 peft=full`.

`pipeline=rlhf|dpo|rlaif|rlaif_direct` picks the branch; each is a small function in
`flows/branches.py` that reads as its DAG (rlhf: prepare -> sft -> comparisons -> reward_model ->
ppo -> evaluate). This module runs it: the cached stage runner, MLflow's parent run, the summary.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import flows  # (environment: project-local Prefect home, telemetry off)

_wait_for_server = flows.prestart_prefect_server() if __name__ == "__main__" else (lambda: None)

import hydra
import mlflow
from omegaconf import DictConfig
from prefect import flow

from flows import report
from flows.branches import BRANCHES
from flows.config import PIPELINES, Config, register, to_config
from flows.fingerprint import Fingerprints
from flows.preflight import preflight
from flows.runner import StageCall, flatten, stage_task
from stages.ai_labeler import JudgeError
from stages.labelers import LabelsMissing
from stages.manifest import MANIFEST, Manifest


class StopPipeline(Exception):
    """Raised by the runner at the first stage past `pipeline.stop_after`."""


class Pipeline:
    """Runs stage calls in order, recording status and timing; stops after `pipeline.stop_after`."""

    def __init__(self, cfg: Config, parent_run_id: str) -> None:
        self.cfg = cfg
        self.parent_run_id = parent_run_id
        self.task = stage_task()
        self.stages: dict[str, dict[str, Any]] = {}
        self.order = PIPELINES[cfg.pipeline.name]
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
        call = StageCall(stage, configs, inputs, digests, scalars, self.cfg.artifacts_dir, checkpointed)
        t0 = time.perf_counter()
        reset_peak_rss()
        state = self.task.with_options(task_run_name=name)(call, self.parent_run_id, return_state=True)
        manifest: Manifest = state.result()
        cached = state.name == "Cached"
        if cached and not Path(manifest.path, MANIFEST).exists():  # artifact deleted: recompute
            state = self.task.with_options(task_run_name=name, refresh_cache=True)(
                call, self.parent_run_id, return_state=True
            )
            manifest, cached = state.result(), False
        if cached:
            with mlflow.start_run(
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
        }
        if "verdict" in manifest.files:
            self.stages[name]["verdict"] = json.loads(manifest.file("verdict").read_text())
        return manifest


def reset_peak_rss() -> None:
    """Linux: restart the process's peak-RSS count (VmHWM), so each stage reports its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


@flow(name="align", log_prints=True)
def align(cfg: Config) -> dict[str, Any]:
    preflight(cfg)
    set_up_tracking(cfg)
    with mlflow.start_run(run_name=f"align-{cfg.pipeline.name}") as parent:
        mlflow.log_params(flatten(cfg))
        run = Pipeline(cfg, parent.info.run_id)
        summary: dict[str, Any] = {"pipeline": cfg.pipeline.name, "mlflow_run_id": parent.info.run_id}
        try:
            ev = BRANCHES[cfg.pipeline.name](run, cfg)
            summary["eval"] = json.loads(ev.file("eval").read_text())
        except StopPipeline:
            pass
        summary["stages"] = run.stages
        summary["verdict"] = report.verdict(run.stages)
        if "prepare" in run.stages:
            sources_json = Path(run.stages["prepare"]["artifact"], "sources.json")
            summary["data"] = json.loads(sources_json.read_text()) if sources_json.exists() else None
        path = report.write_summary(cfg.artifacts_dir, summary)
        mlflow.log_artifact(str(path))
    summary["summary_path"] = str(path)
    return summary


def set_up_tracking(cfg: Config) -> None:
    """Local default: SQLite store and artifact files both under the artifacts folder (MLflow would
    otherwise put artifacts in ./mlruns of the working directory)."""
    if cfg.tracking.uri is not None:
        mlflow.set_tracking_uri(cfg.tracking.uri)
    else:
        root = Path(cfg.artifacts_dir).resolve()
        root.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
        if mlflow.get_experiment_by_name(cfg.tracking.experiment) is None:
            mlflow.create_experiment(cfg.tracking.experiment, artifact_location=(root / "mlflow-artifacts").as_uri())
    mlflow.set_experiment(cfg.tracking.experiment)


register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(dcfg: DictConfig) -> None:
    cfg = to_config(dcfg)
    try:
        preflight(cfg)
    except (JudgeError, ValueError, OSError) as e:  # a config, model or data problem: one clear message
        raise SystemExit(f"error: {e}") from None
    _wait_for_server()
    try:
        summary = align(cfg)
    except LabelsMissing as e:
        print(f"\nwaiting for labels: {e}")
        raise SystemExit(2) from None
    except JudgeError as e:
        raise SystemExit(f"error: {e}") from None
    print(report.table(summary["stages"]))
    if "eval" in summary:
        print("\n" + report.eval_line(summary["eval"]))
    if summary["verdict"]["status"] != "ok":
        print("\nVERDICT: flagged\n  " + "\n  ".join(summary["verdict"]["reasons"]))
    print(f"\nsummary: {summary['summary_path']}")


if __name__ == "__main__":
    main()
