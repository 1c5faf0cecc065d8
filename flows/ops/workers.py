"""`make workers`: a Prefect process work pool and local workers that run deployment runs and sweep
jobs in parallel, each job in a process of its own.

    python -m flows.ops.workers serve [--workers 2]         # server (when none answers), pool, deployment, workers
    python -m flows.ops.workers sweep [hydra overrides...]  # a sweep's jobs as flow runs of the deployment; waits

`serve` creates the pool `alignflow-process` (type process) and the deployment `align-scheduled/job`
of `flows/ops/serve.py:retrain` on it, then starts `--workers` workers, each taking one run at a time.
`sweep` expands Hydra's sweep syntax (`stage.ppo.beta=0.01,0.05 seed=1,2` is 4 jobs), submits one
flow run per job and waits for all; whichever worker is free takes the next. The runs share the
artifacts folder, so the stages the jobs have in common are computed once (the stage locks).

Other machines join the same pool with `prefect worker start --pool alignflow-process` against the
same PREFECT_API_URL; Kubernetes and Docker pools are in `prefect.yaml`. SLURM: Hydra's submitit
launcher (`python -m flows.align -m hydra/launcher=submitit_slurm ...`, README "Scaling out").
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import flows

POOL = "alignflow-process"
DEPLOYMENT = "job"
FLOW = "align-scheduled"  # flows/ops/serve.py:retrain


def ensure_pool(name: str = POOL) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
        except ObjectAlreadyExists:
            pass


def deploy(pool: str = POOL) -> str:
    """The align flow (`flows/ops/serve.py:retrain`, Hydra overrides as its parameter) as a deployment of `pool`."""
    from flows.ops.serve import retrain

    source = retrain.from_source(source=str(flows.ROOT), entrypoint="flows/ops/serve.py:retrain")
    source.deploy(name=DEPLOYMENT, work_pool_name=pool, print_next_steps=False)
    return f"{FLOW}/{DEPLOYMENT}"


def start_workers(n: int, pool: str = POOL) -> list[subprocess.Popen]:
    """`n` workers of `pool` on this machine, one flow run at a time each; they die with this process."""
    prefect = Path(sys.executable).with_name("prefect")
    return [
        subprocess.Popen(
            [str(prefect), "worker", "start", "--pool", pool, "--name", f"alignflow-worker-{i}", "--limit", "1"],
            env={**os.environ, "PREFECT_WORKER_QUERY_SECONDS": "2"},
            preexec_fn=flows.die_with_parent,
        )
        for i in range(n)
    ]


def expand(overrides: list[str]) -> list[list[str]]:
    """Hydra's basic sweep: the cartesian product of the sweep overrides (`a=1,2 b=3`: 2 jobs)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    axes = []
    for text, parsed in zip(overrides, OverridesParser.create().parse_overrides(overrides)):
        if parsed.is_sweep_override():
            key = parsed.get_key_element()
            axes.append([f"{key}={v}" for v in parsed.sweep_string_iterator()])
        else:
            axes.append([text])
    return [list(job) for job in itertools.product(*axes)]


def submit(jobs: list[list[str]], *, poll: float = 2.0) -> list[dict]:
    """One flow run of the deployment per job; waits until every run ends. Per run: its overrides,
    final state, start and end times (ISO) and the worker's process."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    runs = [run_deployment(f"{FLOW}/{DEPLOYMENT}", parameters={"overrides": job}, timeout=0) for job in jobs]
    with get_client(sync_client=True) as client:
        while True:
            now = [client.read_flow_run(r.id) for r in runs]
            if all(r.state is not None and r.state.is_final() for r in now):
                break
            time.sleep(poll)
    return [
        {
            "overrides": job,
            "flow_run": r.name,
            "state": r.state.name,
            "start": r.start_time.isoformat() if r.start_time else None,
            "end": r.end_time.isoformat() if r.end_time else None,
            "pid": r.infrastructure_pid,
        }
        for job, r in zip(jobs, now)
    ]


def main(argv: list[str]) -> None:
    from flows.ops.serve import ensure_server

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="server, pool, deployment and local workers; until Ctrl-C")
    serve.add_argument("--workers", type=int, default=2)
    serve.add_argument("--api-url", default="http://127.0.0.1:4200/api")
    sweep = sub.add_parser("sweep", help="submit a sweep's jobs to the pool and wait for them")
    sweep.add_argument("--json", help="write the runs' states and times here")
    sweep.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.command == "serve":
        server = ensure_server(args.api_url)
        ensure_pool()
        name = deploy()
        workers = start_workers(args.workers)
        print(f"{args.workers} workers on pool {POOL}, deployment {name}: ready", flush=True)
        try:
            for w in workers:
                w.wait()
        except KeyboardInterrupt:
            pass
        finally:
            for p in [*workers, *([server] if server else [])]:
                p.terminate()
        return
    if not os.environ.get("PREFECT_API_URL"):
        raise SystemExit("error: PREFECT_API_URL: point it at the server `make workers` serves (its first line)")
    runs = submit(expand(args.overrides))
    for r in runs:
        print(f"{r['state']:<10} {r['start']} -> {r['end']}  {' '.join(r['overrides'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2))
    if any(r["state"] != "Completed" for r in runs):
        raise SystemExit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
