"""`make serve`: scheduled retraining. A Prefect deployment of the align flow on a cron schedule, also
started by new data, one run at a time.

- The schedule and the runs' Hydra overrides come from `conf/schedule/` (`schedule.cron`,
  `schedule.overrides`); the overrides given to serve itself (`make serve ARGS="data=files ..."`)
  join them, except `schedule.*`.
- New data: `python -m flows.ops.notify <path>` emits the Prefect event `schedule.event`; the
  deployment's trigger starts a run at once. The run's stages are keyed on the content of the files
  they read, so prepare and what reads its changed outputs rerun and the rest is cached.
- One run at a time: the deployment's concurrency limit is 1 (`global_limit`), and this process
  runs at most one (`limit`); a run that fires during another waits.
- Events and triggers need a Prefect server: `schedule.api_url` (or PREFECT_API_URL); when none
  answers there, serve starts one on 127.0.0.1 (`prefect server start`) and stops it on exit.

    python -m flows.ops.serve [schedule.cron='*/30 * * * *'] [overrides for every run]
"""

from __future__ import annotations

import os
from typing import Any

from prefect import flow

import flows
from flows.launch import prefect_server

DATA_RESOURCE = "alignflow.data"  # events' resource ids: alignflow.data.<absolute path>


@flow(name="align-scheduled", log_prints=True)
def retrain(overrides: list[str] | None = None) -> dict[str, Any]:
    """Compose the config from `overrides` and run the align flow (as a subflow); returns its statuses."""
    from hydra import compose, initialize_config_dir

    from flows.config import register, to_config
    from flows.launch.launch import accelerator_env
    from flows.launch.resources import cap_threads, live_runs, register_run, threads_per_job
    from flows.pipeline import align_flow
    from flows.preflight import preflight
    from flows.results import report

    register()
    with initialize_config_dir(config_dir=str(flows.ROOT / "conf"), version_base="1.3"):
        cfg = to_config(compose("config", overrides=list(overrides or [])))
    register_run()
    cap_threads(threads_per_job(cfg.threads, live_runs()))
    accelerator_env(os.environ, cfg.compute.device)  # before DeepSpeed is first imported
    preflight(cfg)
    summary = align_flow()(cfg)
    print(report.table(summary["stages"]))
    return {
        "summary_path": summary["summary_path"],
        "statuses": {name: s["status"] for name, s in summary["stages"].items()},
    }


def run_overrides(cfg, task_overrides: list[str]) -> list[str]:
    return [*cfg.schedule.overrides, *(o for o in task_overrides if not o.lstrip("+~").startswith("schedule."))]


def ensure_server(api_url: str):
    """PREFECT_API_URL, else `api_url`; start a local server there when none answers. Returns the process or None."""
    import subprocess
    import sys
    import urllib.parse
    from pathlib import Path

    url = os.environ.setdefault("PREFECT_API_URL", api_url)
    try:
        prefect_server.ping(url)
        prefect_server.refresh_settings()
        return None
    except OSError:
        pass
    parts = urllib.parse.urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost"):
        raise SystemExit(f"error: no Prefect server answers at {url} (schedule.api_url / PREFECT_API_URL)")
    prefect = Path(sys.executable).with_name("prefect")
    proc = subprocess.Popen(
        [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(parts.port or 4200)],
        env={**os.environ, "PREFECT_UI_ENABLED": "false"},
        preexec_fn=flows.die_with_parent,
    )
    prefect_server.wait_for_url(url, proc)
    # This module imported Prefect before the URL was chosen: without this, `serve` registered the
    # deployment on a temporary server of its own, where the trigger's runs were cancelled (no slot).
    prefect_server.refresh_settings()
    print(f"started a Prefect server at {url}", flush=True)
    return proc


def serve(cfg, task_overrides: list[str]) -> None:
    from prefect.events import DeploymentEventTrigger

    overrides = run_overrides(cfg, task_overrides)
    server = ensure_server(cfg.schedule.api_url)
    trigger = DeploymentEventTrigger(
        name="new data",
        expect={cfg.schedule.event},
        match={"prefect.resource.id": f"{DATA_RESOURCE}.*"},
        parameters={"overrides": overrides},
    )
    print(
        f"serving deployment align-scheduled/{cfg.schedule.deployment}: cron '{cfg.schedule.cron}' "
        f"({cfg.schedule.timezone}), on event {cfg.schedule.event}, overrides {overrides}",
        flush=True,
    )
    try:
        retrain.serve(
            name=cfg.schedule.deployment,
            cron=cfg.schedule.cron,
            parameters={"overrides": overrides},
            triggers=[trigger],
            global_limit=1,
            limit=1,
            pause_on_shutdown=False,
        )
    finally:
        if server is not None:
            server.terminate()


def main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    from flows.config import register, to_config

    register()

    @hydra.main(version_base="1.3", config_path=str(flows.ROOT / "conf"), config_name="config")
    def compose(dcfg: DictConfig) -> None:
        serve(to_config(dcfg), list(HydraConfig.get().overrides.task))

    compose()


if __name__ == "__main__":
    main()
