"""Server mode: `alignflow server` starts PostgreSQL (initdb/pg_ctl in a temporary folder, as the postgres
user when the caller is root), a Prefect server and an MLflow server on it; two flows and a 2-job joblib
sweep run against them at once; after a restart every run, nested stage run, registry version, champion
alias and Prefect flow run is found again; the database password reaches no log, param or artifact."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import ROOT, Child, free_port

ALIGNFLOW = str(Path(sys.executable).with_name("alignflow"))
TINY = ["+experiment=tiny", "tracking=server"]
STAGES = ["prepare", "sft", "comparisons", "reward_model", "ppo", "evaluate"]


def _server(root: Path, ports: dict[str, int]) -> Child:
    command = [ALIGNFLOW, "server", "--dir", str(root / "srv"), "--pg-port", str(ports["pg"])]
    command += ["--prefect-port", str(ports["prefect"]), "--mlflow-port", str(ports["mlflow"])]
    server = Child(command, env={**os.environ, "OMP_NUM_THREADS": "1"})
    server.wait_for_line(lambda line: line.startswith("ready:"), timeout=400)
    return server


def _state(prefect_url: str, mlflow_url: str) -> dict:
    """What the servers hold: MLflow runs (id -> (parent, stage)), registry versions, the champion,
    and Prefect's flow runs."""
    import httpx
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_url, registry_uri=mlflow_url)
    exp = client.get_experiment_by_name("alignflow")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    versions = client.search_model_versions("name='alignflow-policy'")
    champion = client.get_model_version_by_alias("alignflow-policy", "champion").version
    flow_runs = httpx.post(f"{prefect_url}/flow_runs/filter", json={"limit": 200}, timeout=30).json()
    deployments = httpx.post(f"{prefect_url}/deployments/filter", json={"limit": 200}, timeout=30).json()
    return {
        "runs": {
            r.info.run_id: (r.data.tags.get("mlflow.parentRunId"), r.data.tags.get("alignflow.stage"), r.info.status)
            for r in runs
        },
        "versions": sorted((v.version, v.tags["alignflow.digest"]) for v in versions),
        "champion": champion,
        "flow_runs": sorted((f["id"], f["state_type"]) for f in flow_runs),
        "deployments": sorted((d["name"], d["flow_id"]) for d in deployments),
    }


def _deploy(prefect_url: str) -> None:
    """A deployment of the align flow on the server, as `make serve` makes one (through Prefect's API)."""
    import httpx

    flows_ = httpx.post(f"{prefect_url}/flows/filter", json={"flows": {"name": {"any_": ["align"]}}}, timeout=30)
    flow_id = flows_.json()[0]["id"] if flows_.json() else httpx.post(
        f"{prefect_url}/flows/", json={"name": "align"}, timeout=30).json()["id"]  # fmt: skip
    made = httpx.post(f"{prefect_url}/deployments/", json={"name": "retrain", "flow_id": flow_id}, timeout=30)
    assert made.status_code in (200, 201), made.text


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_team_servers_take_concurrent_flows_and_a_sweep_and_keep_everything_across_a_restart():
    root = Path(tempfile.mkdtemp(prefix="alignflow-team-", dir="/tmp"))  # pytest's tmp is private to root
    os.chmod(root, 0o755)
    try:
        _exercise(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _exercise(root: Path) -> None:
    art, sweep_dir = root / "artifacts", root / "sweep"
    ports = {"pg": free_port(), "prefect": free_port(), "mlflow": free_port()}
    prefect_url, mlflow_url = f"http://127.0.0.1:{ports['prefect']}/api", f"http://127.0.0.1:{ports['mlflow']}"
    env = {**os.environ, "PREFECT_API_URL": prefect_url, "MLFLOW_TRACKING_URI": mlflow_url, "OMP_NUM_THREADS": "1"}
    with _server(root, ports) as server:
        assert any(line.startswith(f"mlflow    {mlflow_url}") for line in server.seen)
        assert (root / "srv" / "server.env").read_text().split() == [
            "export", f"PREFECT_API_URL={prefect_url}", "export", f"MLFLOW_TRACKING_URI={mlflow_url}"
        ]  # fmt: skip
        common = [ALIGNFLOW, "align", *TINY, f"artifacts_dir={art}"]
        sweep = [ALIGNFLOW, "align", "-m", *TINY, f"artifacts_dir={art}", "hydra/launcher=joblib",
                 "hydra.launcher.n_jobs=2", "stage.ppo.beta=0.02,0.2", f"hydra.sweep.dir={sweep_dir}"]  # fmt: skip
        started = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                   for c in (common, common, sweep)]  # fmt: skip
        outputs = [p.communicate(timeout=1200)[0] for p in started]
        for p, out in zip(started, outputs, strict=True):
            assert p.returncode == 0, out[-3000:]
        summaries = [json.loads(Path(out.rsplit("summary: ", 1)[1].split()[0]).read_text()) for out in outputs[:2]]
        summaries += [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/summary.json"))]
        assert len(summaries) == 4
        for stage in STAGES:  # each distinct stage (digest) computed by exactly one of the four runs
            by_digest: dict[str, list[str]] = {}
            for s in summaries:
                by_digest.setdefault(s["stages"][stage]["digest"], []).append(s["stages"][stage]["status"])
            for digest, statuses in by_digest.items():
                assert statuses.count("ran") == 1, (stage, digest, statuses)
        _deploy(prefect_url)
        before = _state(prefect_url, mlflow_url)
        assert [name for name, _ in before["deployments"]] == ["retrain"]
        flows_ = {s["mlflow_run_id"] for s in summaries}
        assert flows_ <= set(before["runs"]) and len(flows_) == 4  # every run recorded, once
        for run_id in flows_:
            nested = sorted(stage for parent, stage, _ in before["runs"].values() if parent == run_id)
            assert nested == sorted(STAGES)  # one nested run per stage, none twice
        policies = {s["stages"]["evaluate"]["parents"]["policy"] for s in summaries}
        assert sorted(d for _, d in before["versions"]) == sorted(policies)  # one version per distinct policy
        assert len(before["flow_runs"]) >= 3 and {t for _, t in before["flow_runs"]} == {"COMPLETED"}
        champion = subprocess.run([ALIGNFLOW, "champion", "tracking=server", f"artifacts_dir={art}"], cwd=ROOT,
                                  env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert champion.returncode == 0 and f"version {before['champion']}" in champion.stdout, champion.stderr
    with pytest.raises(OSError):  # PostgreSQL stopped with the rest
        socket.create_connection(("127.0.0.1", ports["pg"]), timeout=2).close()
    with _server(root, ports):  # the same data folder: everything is found again
        after = _state(prefect_url, mlflow_url)
        assert after == before
        art.rename(root / "moved")  # as on another machine: the policy folder is not here
        exported = subprocess.run(  # the champion, downloaded from the server's artifact store
            [ALIGNFLOW, "export", "--out", str(root / "exported"), "--artifacts-dir", str(root / "elsewhere"),
             "--no-mlflow"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert exported.returncode == 0, exported.stderr[-2000:]
        assert (root / "elsewhere" / ".downloads" / f"alignflow-policy-v{after['champion']}").is_dir()
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=mlflow_url)
        champion = client.get_model_version_by_alias("alignflow-policy", "champion")
        moved_policy = root / "moved" / Path(champion.tags["alignflow.folder"]).relative_to(art.resolve())
        _same_logits(root / "exported", moved_policy)  # what was downloaded is the champion's policy
        parents = {run_id: client.get_run(run_id).data.params for run_id in flows_}  # the runs' configs
        assert {p["pipeline.name"] for p in parents.values()} == {"rlhf"}
        assert {float(p["stage.ppo.beta"]) for p in parents.values()} >= {0.02, 0.2}  # the sweep's two jobs
        params = [v for run_id in after["runs"] for v in client.get_run(run_id).data.params.values()]
    password = (root / "srv" / "pgpass").read_text().strip().rsplit(":", 1)[1]
    assert len(password) >= 16 and oct((root / "srv" / "pgpass").stat().st_mode & 0o777) == "0o600"
    for folder in (root / "srv" / "logs", root / "srv" / "mlflow-artifacts", root / "moved", sweep_dir):
        for path in folder.rglob("*"):
            if path.is_file():
                assert password.encode() not in path.read_bytes(), path
    for s in summaries:
        assert password not in json.dumps(s)
    assert not any(password in v for v in params)


def _same_logits(exported: Path, policy: Path) -> None:
    """The exported folder computes what the registered policy computes."""
    import torch
    from transformers import AutoModelForCausalLM

    from stages.models.modeling import load_causal_lm

    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        exported_logits = AutoModelForCausalLM.from_pretrained(exported)(ids).logits
        assert torch.equal(exported_logits, load_causal_lm(policy)(ids).logits)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_a_database_killed_mid_run_ends_it_in_one_line_in_bounded_time_and_the_rerun_resumes():
    root = Path(tempfile.mkdtemp(prefix="alignflow-pgkill-", dir="/tmp"))
    os.chmod(root, 0o755)
    try:
        _kill_database_mid_run(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _kill_database_mid_run(root: Path) -> None:
    import signal
    import time

    art = root / "artifacts"
    ports = {"pg": free_port(), "prefect": free_port(), "mlflow": free_port()}
    prefect_url, mlflow_url = f"http://127.0.0.1:{ports['prefect']}/api", f"http://127.0.0.1:{ports['mlflow']}"
    env = {**os.environ, "PREFECT_API_URL": prefect_url, "MLFLOW_TRACKING_URI": mlflow_url, "OMP_NUM_THREADS": "1"}
    command = [ALIGNFLOW, "align", *TINY, f"artifacts_dir={art}", "tracking.give_up_s=20"]
    with _server(root, ports) as server:
        other = [ALIGNFLOW, "server", "--dir", str(root / "other"), "--prefect-port", str(free_port())]
        given = f"postgresql://alignflow:wrong@127.0.0.1:{ports['pg']}"
        wrong = Child([*other, "--mlflow-port", str(free_port())], env={**env, "ALIGNFLOW_DATABASE_URL": given})
        wrong.proc.wait(timeout=120)
        wrong.stop()
        refused = [line for line in wrong.seen if line.startswith("error:")]
        assert len(refused) == 1 and "password authentication failed" in refused[0], wrong.seen
        with Child(command, env=env) as run:
            run.wait_for(lambda: any(art.glob("prepare/*/manifest.json")), 600, "prepare published")
            time.sleep(3)  # into SFT
            postmaster = int((root / "srv" / "pgdata" / "postmaster.pid").read_text().split()[0])
            os.kill(postmaster, signal.SIGKILL)
            killed = time.monotonic()
            server.proc.wait(timeout=60)  # the server noticed, said which service, and stopped
            said = [line for line in server.seen if line.startswith("error:")]
            assert len(said) == 1 and "PostgreSQL" in said[0], server.seen[-20:]
            run.proc.wait(timeout=20 + 30 + 90)
            elapsed = time.monotonic() - killed
        assert run.proc.returncode == 1, run.last_lines()
        errors = [line for line in run.seen if line.startswith("error:")]
        assert len(errors) == 1 and "server at http://127.0.0.1:" in errors[0], run.last_lines()
        assert not any("Traceback" in line for line in run.seen), run.last_lines()
        assert elapsed < 20 + 30 + 60, elapsed  # give_up_s, then the grace for stopping, then slack
    with _server(root, ports):
        rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
        assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
        summary = json.loads(Path(rerun.stdout.rsplit("summary: ", 1)[1].split()[0]).read_text())
        assert summary["stages"]["prepare"]["status"] == "cached"  # what finished before the kill
        state = _state(prefect_url, mlflow_url)
        finished = [run_id for run_id, (parent, stage, status) in state["runs"].items()
                    if parent is None and stage is None and status == "FINISHED"]  # fmt: skip
        assert finished == [summary["mlflow_run_id"]]  # the killed run is not recorded as a success
