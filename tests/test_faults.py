"""The fault-injection harness on the embedded pipeline (`make faults` runs 20 kills): SIGKILL during
a stage's publish, during its MLflow logging and at a random moment; every rerun completes with the
uninterrupted run's figures, no staging folder, digests that match and no run left RUNNING."""

import subprocess
import sys

import pytest

from bench.fault_harness import HOOKS, harness, plan
from stages.runtime.manifest import clear_abandoned, publish, staging_folder


def test_the_plan_covers_every_stage_and_the_publish_and_logging_points():
    full = plan(20, seed=0, duration=30.0)
    assert len(full) == 20 and set(HOOKS) <= set(full)
    assert {h.split(":")[1] for h in HOOKS} == {"prepare", "sft", "comparisons", "reward_model", "ppo", "evaluate"}
    assert plan(20, seed=0, duration=30.0) == full  # seeded
    few = plan(3, seed=0, duration=30.0)
    assert [f.split(":")[0] for f in few] == ["publish", "logging", "after"]


def test_a_killed_writers_staging_folder_is_cleared_and_a_live_one_kept(tmp_path):
    abandoned = tmp_path / ".tmp-dead"
    abandoned.mkdir()
    (abandoned / "model.safetensors").write_bytes(b"half")
    code = (
        "import sys, time; from filelock import FileLock; from pathlib import Path\n"
        "lock = FileLock(sys.argv[1] + '.lock'); lock.acquire()\n"
        "Path(sys.argv[1]).mkdir(); print('ok', flush=True); time.sleep(60)"
    )
    live = tmp_path / ".tmp-live"
    writer = subprocess.Popen([sys.executable, "-c", code, str(live)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "ok"
        assert clear_abandoned(tmp_path) == [abandoned]
        assert live.is_dir() and not abandoned.exists()
    finally:
        writer.kill()
        writer.wait()
    with staging_folder(tmp_path) as tmp:  # the writer is gone: the next staging clears its folder
        assert not live.exists() and tmp.is_dir()
        publish(tmp, tmp_path / "final")
    assert not list(tmp_path.glob(".tmp-*")) and (tmp_path / "final").is_dir()


@pytest.mark.slow
def test_reruns_survive_kills_at_publish_logging_and_a_random_moment(tmp_path):
    report = harness(3, seed=0, work=tmp_path)
    assert [r["fault"].split(":")[0] for r in report["results"]] == ["publish", "logging", "after"]
    for r in report["results"]:
        assert r["attempt"] == "killed" and r["problems"] == [], r
    assert report["survived"] == report["kills"] == 3
