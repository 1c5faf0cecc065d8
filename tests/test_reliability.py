"""Reliability and security: two runs at once on one artifacts folder, secrets kept out of MLflow,
remote code and pickles refused, servers on 127.0.0.1."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import without_session_server
from test_flow import NOISE, TINY, statuses

from stages.runtime.manifest import Manifest, folder_digest

ROOT = Path(__file__).resolve().parents[1]
SECRETS = {"ALIGNFLOW_TEST_API_KEY": "sk-test-secret-4242", "HF_TOKEN": "hf_test_secret_9191"}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two `python -m flows.align` processes started together on one artifacts folder, same config,
    with secrets in their environment."""
    art = tmp_path_factory.mktemp("two_runs")
    env = {**os.environ, **SECRETS}
    argv = [sys.executable, "-m", "flows.align", f"artifacts_dir={art}", *TINY]
    procs = [
        subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    summaries = [json.loads(Path(out.rsplit("summary: ", 1)[1].strip()).read_text()) for out, _ in outs]
    return art, summaries, ["".join(o) for o in outs]


@pytest.mark.slow
def test_two_runs_at_once_both_finish_and_compute_each_stage_once(two_runs):
    art, summaries, consoles = two_runs
    for stage in summaries[0]["stages"]:
        ran = [s for s in summaries if s["stages"][stage]["status"] == "ran"]
        assert len(ran) == 1, f"{stage}: computed by {len(ran)} runs"
        assert summaries[0]["stages"][stage]["digest"] == summaries[1]["stages"][stage]["digest"]
    manifests = list(art.glob("*/*/manifest.json"))  # every published stage folder
    assert len(manifests) == len(summaries[0]["stages"])
    for m in manifests:
        assert folder_digest(m.parent) == Manifest.load(m.parent).digest, m.parent
    assert not list(art.rglob(".tmp-*"))
    assert any("another run is computing it; waiting" in c for c in consoles)  # the second one waited
    for s in summaries:  # while both lived, each ran its stages on its share of the cores
        assert min(st["threads"] for st in s["stages"].values()) == max(1, len(os.sched_getaffinity(0)) // 2)
    for c in consoles:
        assert not [n for n in NOISE if n in c]
    import mlflow  # one store, readable, both runs finished

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{art}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("alignflow").experiment_id], max_results=200)
    parents = [r for r in runs if r.data.tags.get("alignflow.kind") == "align"]
    assert len(parents) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(statuses(summaries[0])) == sorted(
        ["prepare", "sft", "comparisons", "reward_model", "ppo", "evaluate"]
    )
    assert summaries[0]["registry"]["version"] == summaries[1]["registry"]["version"] == "1"  # registered once


@pytest.mark.slow
def test_no_environment_secret_reaches_mlflow(two_runs):
    """Params, tags, metrics keys and every logged artifact file, searched for the secrets' values."""
    art, _, _ = two_runs
    import sqlite3

    db = sqlite3.connect(art / "mlflow.db")
    tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    for table in tables:
        for row in db.execute(f"SELECT * FROM {table}"):  # noqa: S608 (table names from the schema)
            text = " ".join(str(v) for v in row)
            for name, value in SECRETS.items():
                assert value not in text, f"{name} in the {table} table"
    files = [p for p in (art / "mlflow-artifacts").rglob("*") if p.is_file()]
    assert files
    for path in files:
        data = path.read_bytes()
        for name, value in SECRETS.items():
            assert value.encode() not in data, f"{name} in {path}"


def test_remote_code_stays_off_unless_asked(tmp_path):
    """A model folder whose config points at its own Python: loading it must not run that code."""
    from stages.models.modeling import load_causal_lm
    from stages.settings.models import ModelConfig

    marker = tmp_path / "executed"
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "evil",
                "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"},
            }
        )
    )
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (folder / "model.safetensors").write_bytes(b"")
    assert ModelConfig().trust_remote_code is False
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_causal_lm(folder)
    assert not marker.exists()


def test_pickled_weights_are_refused(tmp_path):
    from stages.models.modeling import ModelError, check_model_folder

    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ModelError, match="Pickled weights can execute code"):
        check_model_folder(folder)


def _listening(pid: int) -> set[str]:
    import psutil

    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return {c.laddr.ip for p in procs for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}


def test_the_prestarted_prefect_server_binds_to_loopback_only():
    code = (
        "import time; from flows.launch import prefect_server; "
        "prefect_server.prestart()(); print('up', flush=True); time.sleep(60)"
    )
    env = without_session_server()
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        addresses = _listening(proc.pid)
        assert addresses == {"127.0.0.1"}, addresses
    finally:
        proc.kill()
        proc.wait()


def test_an_interrupted_wait_gives_no_half_lock(tmp_path):
    """A run killed while it holds a stage lock releases it: the OS drops flock locks with the process."""
    code = (
        "import sys, time; sys.path.insert(0, sys.argv[2]); from flows.pipeline import stage_lock\n"
        "with stage_lock(sys.argv[1], 'sft', 'k' * 64):\n    print('held', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(ROOT)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    from filelock import FileLock, Timeout

    lock = FileLock(tmp_path / ".locks" / f"{'k' * 32}.lock")
    with pytest.raises(Timeout):  # held by the live process
        lock.acquire(timeout=0)
    proc.kill()
    proc.wait()
    lock.acquire(timeout=0)  # free at once after the kill
    lock.release()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_signal_stops_the_run_marks_it_killed_and_keeps_the_checkpoint(tmp_path, sig):
    """What schedulers (SLURM, Kubernetes) and people send: the run stops within seconds, MLflow says
    KILLED, Prefect says crashed, the PPO checkpoint stays for the rerun, nothing half-written remains."""
    art, home = tmp_path / "artifacts", tmp_path / "prefect"
    long_ppo = [*TINY, "stage.ppo.updates=400", "stage.ppo.checkpoint_every=2"]
    env = {**without_session_server(), "PREFECT_HOME": str(home)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.align", f"artifacts_dir={art}", *long_ppo],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 600
    while not list(art.glob("ppo/.checkpoints/*/state.pt")):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    proc.send_signal(sig)
    # EOF on stderr comes once every process holding it is gone: the run and the Prefect server it
    # started (which, killed by a signal that skips atexit, used to outlive it)
    _, err = proc.communicate(timeout=60)  # seconds in practice; the limit only guards a hang
    if sig == signal.SIGINT:  # Ctrl-C: the shell's code for it, and nothing raised but the interrupt itself
        assert proc.returncode in (130, -signal.SIGINT), (proc.returncode, err[-2000:])
        assert {line.split(":")[0] for line in raised(err)} <= {"KeyboardInterrupt"}, err[-3000:]
    else:  # SIGTERM: ended by the signal itself (the shell's 143), after Prefect marked its runs crashed
        assert proc.returncode in (-signal.SIGTERM, 128 + signal.SIGTERM), (proc.returncode, err[-2000:])
        assert "Traceback" not in err, err[-3000:]
    assert list(art.glob("ppo/.checkpoints/*/state.pt"))  # kept for the rerun
    assert not [p for p in art.glob("ppo/*") if not p.name.startswith(".")]  # no PPO artifact published
    assert not list(art.rglob(".tmp-*"))
    import sqlite3

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{art}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("alignflow").experiment_id])
    status = {r.data.tags.get("alignflow.stage", r.data.tags.get("alignflow.kind")): r.info.status for r in runs}
    assert status["align"] == "KILLED" and status["ppo"] == "KILLED"
    assert "RUNNING" not in status.values()
    db = sqlite3.connect(home / "prefect.db")
    flow_states = {s for (s,) in db.execute("SELECT state_type FROM flow_run")}
    assert flow_states <= {"CRASHED", "CANCELLED"} and flow_states, flow_states


def raised(err: str) -> list[str]:
    """The exception line that ends each traceback printed in `err`."""
    lines, out = err.splitlines(), []
    for i, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last):"):
            out += [next((x for x in lines[i + 1 :] if x and not x.startswith(" ")), "")]
    return out


def test_a_kill_while_mlflow_builds_its_database_leaves_none_and_the_rerun_builds_it(tmp_path):
    """CI once killed a run among MLflow's table migrations: the half-built mlflow.db stopped every
    later run. The database is built beside its path and renamed, so a kill leaves none."""
    build = (
        "from flows.config import Config; from flows.runner import set_up_tracking; "
        f"set_up_tracking(Config(artifacts_dir={str(tmp_path)!r}))"
    )
    env = {**os.environ, "ALIGNFLOW_FAULT": "tracking:database"}
    killed = subprocess.run([sys.executable, "-c", build], env=env, cwd=ROOT, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "mlflow.db").exists() and (tmp_path / "mlflow.db.staging").exists()

    env.pop("ALIGNFLOW_FAULT")
    rerun = subprocess.run([sys.executable, "-c", build], env=env, cwd=ROOT, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlflow.db.staging").exists()
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert client.get_experiment_by_name("alignflow") is not None


def test_an_interrupt_swallowed_on_the_way_still_stops_the_next_loop_tick():
    """Python drops a KeyboardInterrupt raised inside a finalizer; the recorded signal raises again."""
    from stages.runtime.progress import STOP, progress

    bar = progress(3, "loop")
    bar.update(1)
    STOP.append(signal.SIGINT)
    try:
        with pytest.raises(KeyboardInterrupt, match="stopped by signal"):
            bar.update(1)
    finally:
        STOP.clear()
