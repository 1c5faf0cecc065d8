"""`make bench-rerun`: the embedded default's cold run, then reruns with nothing changed, wall time and
peak RSS each, side by side in one run: artifacts/bench/cached_rerun.json.

Three kinds of rerun, each checked, not only timed: every stage `cached` in the printed summary and in
MLflow (one nested run per stage tagged `alignflow.status=cached` under the rerun's parent run);
- `no_server`: no Prefect server up, as after `make align` (no temporary server is started);
- `server_up`: a Prefect server answering at `schedule.api_url`, as `make serve` leaves one; the
  rerun's flow run and its cached task runs are then on that server;
- `import_only`: `python -c "import flows.pipeline"` alone, the floor the imports set, and whether it
  imported torch (a cached rerun needs none: tests/test_imports.py).

    python -m bench.cached_rerun [--reruns 3] [--artifacts DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import flows
from bench.common import write_results
from flows.launch import prefect_server

ALIGNFLOW = str(Path(sys.executable).with_name("alignflow"))
TIME = shutil.which("time") or "/usr/bin/time"


def timed(argv: list[str], env: dict | None = None) -> tuple[float, float | None, str]:
    """(wall seconds, peak RSS in MB of the command, its stdout)."""
    rss = tempfile.NamedTemporaryFile(suffix=".rss", delete=False).name
    gnu_time = [TIME, "-f", "%M", "-o", rss] if Path(TIME).exists() else []
    t0 = time.perf_counter()
    proc = subprocess.run([*gnu_time, *argv], capture_output=True, text=True, env=env or os.environ.copy())
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    text = Path(rss).read_text().strip().splitlines() if gnu_time else []
    Path(rss).unlink(missing_ok=True)
    return wall, (int(text[-1]) / 1024 if text else None), proc.stdout


def summary_of(stdout: str) -> dict:
    return json.loads(Path(stdout.rsplit("summary: ", 1)[1].strip()).read_text())


def mlflow_statuses(art: Path, parent: str) -> dict[str, str]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{art}/mlflow.db")
    exp = client.get_experiment_by_name("alignflow")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    return {r.data.tags["alignflow.stage"]: r.data.tags["alignflow.status"] for r in runs}


def rerun(art: Path, label: str, env: dict | None = None, overrides: tuple[str, ...] = ()) -> dict:
    wall, rss, out = timed([ALIGNFLOW, "align", f"artifacts_dir={art}", *overrides], env)
    summary = summary_of(out)
    stages = {name: s["status"] for name, s in summary["stages"].items()}
    recorded = mlflow_statuses(art, summary["mlflow_run_id"])
    if set(stages.values()) != {"cached"} or recorded != stages:
        raise SystemExit(f"{label}: not every stage was cached: summary {stages}, MLflow {recorded}")
    print(f"{label}: {wall:.2f} s, {rss or 0:.0f} MB, prefect {summary['prefect_api_url']}", flush=True)
    return {"wall_s": wall, "peak_rss_mb": rss, "prefect_api_url": summary["prefect_api_url"], "stages": stages}


def with_server(art: Path, reruns: int) -> list[dict]:
    """Reruns while a Prefect server answers at `schedule.api_url` (started here as `make serve` would)."""
    from flows.launch.launch import free_port

    url = f"http://127.0.0.1:{free_port()}/api"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    home = tempfile.mkdtemp(prefix="prefect-home-")
    prefect = str(Path(sys.executable).with_name("prefect"))
    server = subprocess.Popen(
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", url.split(":")[2].split("/")[0]],
        env={**env, "PREFECT_HOME": home, "PREFECT_UI_ENABLED": "false"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=flows.die_with_parent,
    )
    try:
        prefect_server.wait_for_url(url, server)
        results = [rerun(art, "server_up", env, (f"schedule.api_url={url}",)) for _ in range(reruns)]
        body = json.dumps({"task_runs": {"state": {"name": {"any_": ["Cached"]}}}}).encode()
        request = urllib.request.Request(
            f"{url}/task_runs/count", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            cached_tasks = json.loads(response.read())
        for r in results:
            r["prefect_cached_task_runs_on_server"] = cached_tasks
        if cached_tasks != reruns * len(results[0]["stages"]):
            raise SystemExit(f"server_up: the server holds {cached_tasks} cached task runs, expected more")
        return results
    finally:
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(home, ignore_errors=True)


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reruns", type=int, default=3)
    parser.add_argument("--artifacts", type=Path, default=None, help="default: a new temporary folder")
    parser.add_argument("--keep", action="store_true", help="keep the temporary artifacts folder")
    args = parser.parse_args(argv)
    art = args.artifacts or Path(tempfile.mkdtemp(prefix="alignflow-rerun-"))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    cold_wall, cold_rss, out = timed([ALIGNFLOW, "align", f"artifacts_dir={art}"], env)
    cold = summary_of(out)
    print(f"cold: {cold_wall:.1f} s, {cold_rss or 0:.0f} MB", flush=True)
    no_server = [rerun(art, "no_server", env) for _ in range(args.reruns)]
    server_up = with_server(art, args.reruns)
    probe = "import sys, flows.pipeline; print('torch' in sys.modules)"
    imports = [timed([sys.executable, "-c", probe]) for _ in range(args.reruns)]
    median = statistics.median(r["wall_s"] for r in no_server)
    results = {
        "machine": {"cores": len(os.sched_getaffinity(0)), "python": sys.version.split()[0]},
        "config": "embedded default (conf/config.yaml), `alignflow align`",
        "cold": {
            "wall_s": cold_wall,
            "peak_rss_mb": cold_rss,
            "stages": {k: s["status"] for k, s in cold["stages"].items()},
        },
        "no_server": no_server,
        "server_up": server_up,
        "import_only": [
            {"wall_s": w, "peak_rss_mb": r, "imports_torch": out.strip() == "True"} for w, r, out in imports
        ],
        "cached_wall_s_median": median,
        "cached_with_server_wall_s_median": statistics.median(r["wall_s"] for r in server_up),
        "cached_over_cold": median / cold_wall,
        "target_cached_wall_s": 2.0,
        "meets_target": median <= 2.0,
    }
    write_results(Path("artifacts/bench/cached_rerun.json"), results)
    if args.artifacts is None and not args.keep:
        shutil.rmtree(art, ignore_errors=True)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
