"""`make workers`: a Prefect process pool with two local workers runs two sweep jobs at the same time."""

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from conftest import Child

from flows.launch import launch
from flows.ops import workers

ROOT = Path(__file__).resolve().parents[1]
ALIGNFLOW = str(Path(sys.executable).with_name("alignflow"))


def test_a_sweep_expands_into_its_jobs():
    jobs = workers.expand(["+experiment=tiny", "stage.ppo.beta=0.01,0.05", "stage.sft.seed=1,2"])
    assert len(jobs) == 4
    assert jobs[0] == ["+experiment=tiny", "stage.ppo.beta=0.01", "stage.sft.seed=1"]
    assert jobs[-1] == ["+experiment=tiny", "stage.ppo.beta=0.05", "stage.sft.seed=2"]


@pytest.mark.slow
def test_two_workers_run_two_sweep_jobs_concurrently(tmp_path):
    url = f"http://127.0.0.1:{launch.free_port()}/api"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": url}
    with Child([ALIGNFLOW, "workers", "serve", "--workers", "2", "--api-url", url], env=env) as serve:
        # the server, the pool, the deployment, then the workers
        serve.wait_for_line(lambda line: line.endswith(": ready"), timeout=300)
        runs_json = tmp_path / "runs.json"
        jobs = ["+experiment=tiny", f"artifacts_dir={tmp_path / 'artifacts'}", "pipeline.stop_after=sft"]
        sweep = subprocess.run(
            [ALIGNFLOW, "workers", "sweep", "--json", str(runs_json), *jobs, "stage.sft.seed=1,2"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert sweep.returncode == 0, sweep.stdout[-2000:] + sweep.stderr[-2000:]
        runs = json.loads(runs_json.read_text())
        assert [r["state"] for r in runs] == ["Completed", "Completed"]
        (s0, e0), (s1, e1) = ((datetime.fromisoformat(r["start"]), datetime.fromisoformat(r["end"])) for r in runs)
        assert s0 < e1 and s1 < e0  # both ran at the same time
        assert runs[0]["pid"] != runs[1]["pid"]  # each in a process of its own
        assert len(list((tmp_path / "artifacts" / "sft").glob("[0-9a-f]*"))) == 2  # two seeds, two policies
