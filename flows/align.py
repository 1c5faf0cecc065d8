"""The alignment flow's command line: `alignflow align [overrides]` or `python -m flows.align [overrides]`,
e.g. `stage.ppo.beta=0.05 peft=full`.

A sweep: `alignflow align -m stage.ppo.beta=0.01,0.05` (Hydra's basic launcher, one job after
another), `hydra/launcher=joblib hydra.launcher.n_jobs=2` (parallel jobs on one artifacts folder),
`hydra/launcher=submitit_local` or `submitit_slurm`, `+hparams_search=ppo_optuna` (Optuna). The flow
itself is `flows/pipeline.py`; the sweep's MLflow parent run and frontier are `flows/studies/sweep.py`.
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

import flows  # (environment: project-local Prefect home, telemetry off)
from flows.config import register
from flows.launch import prefect_server

register()


@hydra.main(version_base="1.3", config_path=str(flows.ROOT / "conf"), config_name="config")
def main(dcfg: DictConfig) -> float | None:
    # Sweep launchers (joblib, submitit) pickle this function into other processes: it refers to
    # this module by its importable name only.
    from flows.align import job

    return job(dcfg)


def job(dcfg: DictConfig) -> float | None:
    """The typed config first: a refused one stops here, before MLflow, Prefect or torch is imported.
    An expected failure (a config value, a model folder, a data row, a judge, a resource, a NaN, a
    killed rank: `ExpectedFailure`) prints one `error:` line and exits 1; `--debug` or
    HYDRA_FULL_ERROR=1 shows its stack."""
    from flows.config import to_config
    from flows.launch.backends import BackendDown
    from stages.runtime.errors import ExpectedFailure

    try:
        cfg = to_config(dcfg)
        if (note := cfg.preset_note()) is not None:
            print(note, file=sys.stderr)
        with watched_backends(cfg) as watch:
            try:
                from flows.pipeline import run_job

                return run_job(cfg)
            except BaseException as e:  # a dead server: one line naming it, whatever the clients raised
                if (down := watch.explains(e)) is None:
                    raise
                raise BackendDown(down) from e
    except ExpectedFailure as e:
        if flows.debugging():
            raise
        lead = "\n" if isinstance(e, BackendDown) else ""  # the dead clients' last complaint may end mid-line
        print(f"{lead}error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def watched_backends(cfg):
    """With a tracking server (`tracking.uri` over http): bounded client retries and `BackendWatch` on
    the MLflow server and the Prefect server of PREFECT_API_URL; otherwise a watch of nothing."""
    from flows.launch.backends import BackendWatch, bounded_clients, probes

    uri = cfg.tracking.uri or ""
    if not uri.startswith(("http://", "https://")):
        return BackendWatch({}, cfg.tracking.give_up_s)
    bounded_clients()
    return BackendWatch(probes(os.environ.get("PREFECT_API_URL"), uri, cfg.tracking.experiment), cfg.tracking.give_up_s)


def run(argv: list[str]) -> None:
    """`--debug`: an expected failure shows its stack (as HYDRA_FULL_ERROR=1 does), not one `error:` line."""
    if "--debug" in argv:
        argv = [a for a in argv if a != "--debug"]
        os.environ["ALIGNFLOW_DEBUG"] = "1"
        os.environ["HYDRA_FULL_ERROR"] = "1"
    if "-m" in argv or "--multirun" in argv:  # a sweep computes: its jobs share one server, booting now
        prefect_server.prestart()
    sys.argv = ["alignflow align", *argv]
    main()
    flows.exit_now(0)


if __name__ == "__main__":
    run(sys.argv[1:])
