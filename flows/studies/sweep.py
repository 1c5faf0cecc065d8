"""What a Hydra sweep (`python -m flows.align -m ...`) adds around its jobs: one MLflow parent run,
and the reward-vs-KL frontier of its jobs.

`SweepRun` is a Hydra callback (`hydra.callbacks` in `conf/config.yaml`), run in the sweeping
process. Before the first job it creates the sweep's MLflow run and exports its id, so every job's
`align` run, in whatever process the launcher starts (joblib, submitit), is its child. After the last
job it reads each job's `summary.json` from the job's Hydra folder, writes `sweep.json` and
`frontier.png` to the sweep folder and logs them to the sweep run.

The frontier is the DPO paper's Figure 2: one point per run, its KL to SFT per token against its
reward, coloured by branch. The reward is the gold score where the data has a gold rule, else the
win rate over SFT.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from flows.launch.resources import SWEEP_JOBS_ENV, SWEEP_RUN_ENV, sweep_size


def _tracking(config: DictConfig):
    from flows.config import Config, TrackingConfig
    from flows.runner import set_up_tracking

    tracking = TrackingConfig(**OmegaConf.to_container(config.tracking, resolve=True))
    set_up_tracking(Config(tracking=tracking, artifacts_dir=str(config.artifacts_dir)))


class SweepRun(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        import mlflow

        _tracking(config)
        overrides = list(config.hydra.overrides.task)
        run = mlflow.MlflowClient().create_run(
            mlflow.get_experiment_by_name(str(config.tracking.experiment)).experiment_id,
            run_name="sweep",
            tags={"alignflow.kind": "sweep", "alignflow.sweep_dir": str(config.hydra.sweep.dir)},
        )
        mlflow.MlflowClient().log_param(run.info.run_id, "overrides", " ".join(overrides)[:6000])
        os.environ[SWEEP_RUN_ENV] = run.info.run_id
        sweeper = config.hydra.sweeper
        os.environ[SWEEP_JOBS_ENV] = str(sweep_size(overrides, sweeper.get("params"), sweeper.get("n_jobs")))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        import mlflow

        run_id = os.environ.pop(SWEEP_RUN_ENV, None)
        if run_id is None:
            return
        folder = Path(str(config.hydra.sweep.dir))
        points = collect(folder)
        client = mlflow.MlflowClient()
        (folder / "sweep.json").write_text(json.dumps(points, indent=2))
        client.log_artifact(run_id, str(folder / "sweep.json"))
        if any(p["reward"] is not None for p in points):
            client.log_artifact(run_id, str(plot_frontier(points, folder / "frontier.png")))
        client.set_terminated(run_id)


def collect(*folders: Path) -> list[dict[str, Any]]:
    """One point per job summary under the sweep folders (`<sweep>/<job>/summary.json`)."""
    return [point(json.loads(p.read_text())) for f in folders for p in sorted(Path(f).glob("*/summary.json"))]


def point(summary: dict[str, Any]) -> dict[str, Any]:
    e = summary.get("eval") or {}
    gold = (e.get("gold_policy") or {}).get("mean")
    params = _params(summary)
    return {
        "pipeline": summary["pipeline"],
        "beta": params.get("stage.dpo.beta" if summary["pipeline"] == "dpo" else "stage.ppo.beta"),
        "kl_to_sft": e.get("kl_to_sft"),
        "reward": gold if gold is not None else e.get("win_rate"),
        "reward_name": "gold score" if gold is not None else "win rate over SFT",
        "reward_ci95": (e.get("gold_policy") or {}).get("ci95")
        if gold is not None
        else (e.get("win") or {}).get("ci95"),
        "gold_sft": (e.get("gold_sft") or {}).get("mean"),
        "mlflow_run_id": summary["mlflow_run_id"],
        "report": str(Path(summary["summary_path"]).with_name("report.html")) if "summary_path" in summary else None,
    }


def _params(summary: dict[str, Any]) -> dict[str, Any]:
    from mlflow import MlflowClient

    return MlflowClient().get_run(summary["mlflow_run_id"]).data.params


def plot_frontier(points: list[dict[str, Any]], out: Path) -> Path:
    """Reward against KL to SFT, one marker per run with its beta, one colour per branch (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for pipeline in sorted({p["pipeline"] for p in points}):
        mine = sorted(
            (p for p in points if p["pipeline"] == pipeline and p["reward"] is not None), key=lambda p: p["kl_to_sft"]
        )
        ax.errorbar(
            [p["kl_to_sft"] for p in mine],
            [p["reward"] for p in mine],
            yerr=[p["reward_ci95"] or 0 for p in mine],
            marker="o",
            capsize=3,
            label=pipeline,
        )
        for p in mine:
            ax.annotate(
                f"β={p['beta']}", (p["kl_to_sft"], p["reward"]), textcoords="offset points", xytext=(4, 4), fontsize=8
            )
    sft = [p["gold_sft"] for p in points if p["gold_sft"] is not None]
    if sft:
        ax.axhline(sum(sft) / len(sft), color="grey", linestyle="--", label="SFT")
    ax.set_xlabel("KL to SFT per token (evaluation prompts)")
    ax.set_ylabel(points[0]["reward_name"])
    ax.set_title("reward vs KL frontier")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
