"""Operations: stage locks, threads per job, the promotion gate, sweeps (joblib, submitit, Optuna), the
frontier and report in a real browser, and the served deployment retraining on new data."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import Child, free_port, without_session_server
from test_flow import TINY, statuses

from flows.config import Config, RegistryConfig
from stages.runtime.manifest import Manifest, folder_digest

ROOT = Path(__file__).resolve().parents[1]
ALIGNFLOW = str(Path(sys.executable).with_name("alignflow"))


# -- locks and threads -------------------------------------------------------------------------


def test_a_second_caller_of_the_same_stage_waits_for_the_first(tmp_path, capfd):
    from flows.pipeline import stage_lock

    events, release = [], threading.Event()

    def first():
        with stage_lock(str(tmp_path), "sft", "k" * 64):
            events.append("first in")
            release.wait(timeout=60)  # held until the second caller is seen waiting: no timing window
            events.append("first out")

    def second():
        with stage_lock(str(tmp_path), "sft", "k" * 64):
            events.append("second in")

    holder, waiter = threading.Thread(target=first), threading.Thread(target=second)
    holder.start()
    deadline = time.monotonic() + 60
    while not events:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    waiter.start()
    err = ""
    while "sft: another run is computing it; waiting for its result" not in err:
        assert time.monotonic() < deadline, err
        err += capfd.readouterr().err
        time.sleep(0.01)
    assert events == ["first in"]  # the second caller is blocked on the lock
    release.set()
    holder.join(timeout=60)
    waiter.join(timeout=60)
    assert events == ["first in", "first out", "second in"]
    with stage_lock(str(tmp_path), "sft", "j" * 64):  # another key does not wait
        pass


def test_threads_divide_the_usable_cores_between_concurrent_jobs(monkeypatch):
    from flows.launch import resources

    monkeypatch.setattr(resources, "usable_cores", lambda: 8)
    assert resources.threads_per_job(None, 1) == 8
    assert resources.threads_per_job(None, 2) == 4
    assert resources.threads_per_job(None, 3) == 2
    assert resources.threads_per_job(None, 16) == 1
    assert resources.threads_per_job(3, 2) == 3
    with pytest.raises(ValueError, match="threads"):
        resources.threads_per_job(0, 1)
    assert resources.sweep_size(["stage.ppo.beta=0.01,0.02,0.05", "pipeline=dpo,rlhf", "x=1"], None, None) == 6
    assert resources.sweep_size([], {"stage.ppo.beta": "0.1,0.2"}, None) == 2
    assert resources.sweep_size(["a=1,2,3"], None, 2) == 2  # Optuna: its batch of trials


# -- promotion gate ----------------------------------------------------------------------------


def test_gate_decisions_on_hand_values():
    from flows.results.registry import decide, lookup

    reg = RegistryConfig(metric="gold_policy.mean", margin=0.05, max_kl_per_token=0.5)
    assert decide(0.3, 0.1, None, reg)[0] is True
    assert decide(0.3, 0.6, None, reg) == (False, "KL to SFT 0.600/token is above registry.max_kl_per_token 0.5")
    assert decide(0.34, 0.1, 0.3, reg)[0] is False  # better, but not by more than the margin
    assert decide(0.36, 0.1, 0.3, reg)[0] is True
    assert decide(None, 0.1, 0.3, reg)[0] is False
    assert decide(0.2, 0.1, 0.3, RegistryConfig(metric="loss", higher_is_better=False))[0] is True
    assert lookup({"gold_policy": {"mean": 1.5}}, "gold_policy.mean") == 1.5
    assert lookup({"gold_policy": None}, "gold_policy.mean") is None


def _summary(tmp: Path, name: str, win_rate: float, kl: float) -> dict:
    """What the flow hands the gate: an evaluated policy folder and its evaluation."""
    policy = tmp / name / "policy"
    policy.mkdir(parents=True)
    (policy / "model.safetensors").write_text(name)  # distinct content, distinct digest
    ev = tmp / name / "evaluate"
    ev.mkdir()
    (ev / "eval.json").write_text(json.dumps({"win_rate": win_rate, "kl_to_sft": kl}))
    import mlflow

    with mlflow.start_run(run_name=f"align-{name}") as run:
        pass
    stages = {
        "prepare": {"stage": "prepare", "artifact": str(tmp), "digest": "p" * 64, "parents": {"file:data.x": "d" * 64}},
        "evaluate": {
            "stage": "evaluate",
            "artifact": str(ev),
            "digest": "e" * 64,
            "inputs": {"policy": str(policy)},
            "parents": {"policy": folder_digest(policy)},
        },
    }
    return {
        "pipeline": "rlhf",
        "mlflow_run_id": run.info.run_id,
        "eval": {"win_rate": win_rate, "kl_to_sft": kl},
        "stages": stages,
    }


def test_worse_candidate_is_not_promoted_and_a_better_one_is(tmp_path):
    from mlflow import MlflowClient

    from flows.results.registry import gate
    from flows.runner import set_up_tracking

    cfg = Config(artifacts_dir=str(tmp_path), registry=RegistryConfig(margin=0.02, max_kl_per_token=0.5))
    set_up_tracking(cfg)
    client = MlflowClient()
    first = gate(cfg, _summary(tmp_path, "v1", 0.60, 0.1))
    assert (first["version"], first["promoted"]) == ("1", True)
    worse = gate(cfg, _summary(tmp_path, "v2", 0.55, 0.1))
    assert (worse["version"], worse["promoted"], worse["alias"]) == ("2", False, "candidate")
    slightly = gate(cfg, _summary(tmp_path, "v3", 0.61, 0.1))  # better by less than the margin
    drifted = gate(cfg, _summary(tmp_path, "v4", 0.90, 0.8))  # better, but past the KL bound
    better = gate(cfg, _summary(tmp_path, "v5", 0.70, 0.2))
    assert [slightly["promoted"], drifted["promoted"], better["promoted"]] == [False, False, True]
    champion = client.get_model_version_by_alias("alignflow-policy", "champion")
    assert str(champion.version) == "5"
    assert str(client.get_model_version_by_alias("alignflow-policy", "candidate").version) == "4"
    tags = {v: client.get_model_version("alignflow-policy", v).tags for v in ("2", "3", "4", "5")}
    assert tags["2"]["alignflow.promoted"] == "false"
    assert "does not beat the champion's 0.6" in tags["2"]["alignflow.reason"]
    assert "by more than 0.02" in tags["3"]["alignflow.reason"]
    assert "above registry.max_kl_per_token" in tags["4"]["alignflow.reason"]
    assert "beats the champion's 0.6" in tags["5"]["alignflow.reason"]
    lineage = json.loads(tags["5"]["alignflow.lineage"])
    assert lineage["data_digests"] == {"file:data.x": "d" * 64}
    assert champion.source == str((tmp_path / "v5" / "policy").resolve())
    # a cached rerun evaluates the same policy folder: not registered twice
    again = _summary(tmp_path, "v5b", 0.70, 0.2)
    again["stages"]["evaluate"]["parents"]["policy"] = folder_digest(tmp_path / "v5" / "policy")
    assert gate(cfg, again)["reason"] == "already registered as version 5"
    assert len(client.search_model_versions("name='alignflow-policy'")) == 5

    from flows.ops.champion import describe

    text = describe(cfg)
    assert text.startswith("champion: alignflow-policy version 5") and "version 2: win_rate 0.55 does not" in text


# -- sweeps, frontier, report --------------------------------------------------------------------


def _python(*args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    return _alignflow(*args, env=env, timeout=timeout, program=sys.executable)


def _alignflow(*args: str, env: dict | None = None, timeout: int = 900, program: str = ALIGNFLOW):
    proc = subprocess.run(
        [program, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env or os.environ.copy()
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _runs(artifacts: Path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{artifacts}/mlflow.db")
    exp = client.get_experiment_by_name("alignflow")
    return client.search_runs([exp.experiment_id], max_results=1000)


def _assert_sweep(artifacts: Path, sweep_dir: Path, jobs: int, shared: list[str]) -> list[dict]:
    """The sweep's jobs: one parent MLflow run with `jobs` children, each `shared` stage computed
    once over all jobs, every artifact folder's digest matching its content, the cores divided."""
    summaries = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/summary.json"))]
    assert len(summaries) == jobs
    runs = _runs(artifacts)
    sweep = [
        r
        for r in runs
        if r.data.tags.get("alignflow.kind") == "sweep" and r.data.tags["alignflow.sweep_dir"] == str(sweep_dir)
    ]
    assert len(sweep) == 1 and sweep[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == sweep[0].info.run_id]
    assert sorted(r.info.run_id for r in children) == sorted(s["mlflow_run_id"] for s in summaries)
    for stage in shared:
        ran = [s for s in summaries if s["stages"][stage]["status"] == "ran"]
        assert len(ran) <= 1, f"{stage} computed by {len(ran)} jobs"
        assert len({s["stages"][stage]["digest"] for s in summaries}) == 1
    cores = len(os.sched_getaffinity(0))
    for s in summaries:
        assert s["threads"] == max(1, cores // min(jobs, cores))  # 2 jobs on 2 cores: one thread each
        for stage in s["stages"].values():
            manifest = Manifest.load(stage["artifact"])
            assert folder_digest(stage["artifact"]) == manifest.digest == stage["digest"]
    return summaries


@pytest.fixture(scope="module")
def frontier(tmp_path_factory):
    """`make frontier` on tiny settings: a 2-job joblib sweep of PPO's beta, a 1-job sweep of DPO's."""
    art = tmp_path_factory.mktemp("frontier")
    out = _alignflow(
        "frontier",
        "--ppo-betas",
        "0.02,0.2",
        "--dpo-betas",
        "0.3",
        "--jobs",
        "2",
        f"artifacts_dir={art}",
        *TINY,
    ).stdout
    folder = Path(out.rsplit("frontier: ", 1)[1].split()[0]).parent
    return art, folder


@pytest.mark.slow
def test_joblib_sweep_shares_stages_and_writes_the_frontier(frontier):
    art, folder = frontier
    rlhf = _assert_sweep(art, folder / "rlhf", 2, ["prepare", "sft", "comparisons", "reward_model"])
    assert sorted(s["stages"]["ppo"]["status"] for s in rlhf) == ["ran", "ran"]
    dpo = _assert_sweep(art, folder / "dpo", 1, [])
    assert statuses(dpo[0])["sft"] == "cached" and statuses(dpo[0])["dpo"] == "ran"
    points = json.loads((folder / "frontier.json").read_text())
    assert sorted((p["pipeline"], p["beta"]) for p in points) == [("dpo", "0.3"), ("rlhf", "0.02"), ("rlhf", "0.2")]
    assert all(p["reward_name"] == "gold score" and p["kl_to_sft"] is not None for p in points)
    png = (folder / "frontier.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    for s in rlhf + dpo:  # every run's report, logged to MLflow too
        report = Path(s["summary_path"]).with_name("report.html")
        assert report.stat().st_size > 1_000_000  # plotly inlined: no network needed
        logged = art / "mlflow-artifacts" / s["mlflow_run_id"] / "artifacts" / "report.html"
        assert logged.read_bytes() == report.read_bytes()


def _open_in_chromium(page_path: Path) -> dict:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page()
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(page_path.as_uri())
        page.wait_for_function("document.querySelectorAll('.plotly-graph-div .main-svg').length > 0")
        result = {
            "errors": errors,
            "plots": page.locator(".plotly-graph-div").count(),
            "rendered": page.evaluate(  # figures whose traces plotly drew as SVG
                "[...document.querySelectorAll('.plotly-graph-div')]"
                ".filter(d => d.querySelectorAll('.main-svg g.trace').length === d.data.length).length"
            ),
            "traces": page.evaluate("[...document.querySelectorAll('.plotly-graph-div')].map(d => d.data.length)"),
            "images": page.evaluate("[...document.images].map(i => i.complete && i.naturalWidth > 0)"),
            "text": page.inner_text("body"),
        }
        browser.close()
    return result


@pytest.mark.slow
def test_report_and_frontier_render_in_a_real_browser(frontier):
    art, folder = frontier
    summary = json.loads(next((folder / "rlhf").glob("*/summary.json")).read_text())
    report = _open_in_chromium(Path(summary["summary_path"]).with_name("report.html"))
    assert report["errors"] == []
    assert report["plots"] >= 5 and report["rendered"] == report["plots"]  # every figure drew its SVG
    assert all(n >= 1 for n in report["traces"])
    for heading in ("PPO updates", "accuracy by K", "gold score: SFT against the aligned policy", "Sample generations"):
        assert heading in report["text"]
    page = _open_in_chromium(folder / "frontier.html")
    assert page["errors"] == [] and page["rendered"] == 1 and page["traces"] == [2]  # one trace per branch
    assert page["images"] == [True]  # the PNG beside it


@pytest.mark.slow
def test_optuna_sweep_optimises_the_returned_metric(frontier):
    """Two Optuna trials over PPO's beta, on the frontier's artifacts (shared stages cached)."""
    art, _ = frontier
    sweep_dir = art / "optuna"
    _python(
        "-m",
        "flows.align",
        "-m",
        "+hparams_search=ppo_optuna",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={sweep_dir}",
        f"artifacts_dir={art}",
        *TINY,
    )
    import yaml

    result = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    golds = [json.loads(p.read_text())["eval"]["gold_policy"]["mean"] for p in sweep_dir.glob("*/summary.json")]
    assert len(golds) == 2 and result["best_value"] == pytest.approx(max(golds))
    assert set(result["best_params"]) == {"stage.ppo.beta", "stage.ppo.learning_rate"}


@pytest.mark.slow
def test_submitit_local_sweep_shares_stages(tmp_path):
    sweep_dir = tmp_path / "sweep"
    _python(
        "-m",
        "flows.align",
        "-m",
        "hydra/launcher=submitit_local",
        f"hydra.sweep.dir={sweep_dir}",
        f"artifacts_dir={tmp_path}",
        *TINY,
        "pipeline.stop_after=sft",
        "stage.sft.learning_rate=0.002,0.004",
    )
    summaries = _assert_sweep(tmp_path, sweep_dir, 2, ["prepare"])
    assert sorted(statuses(s)["prepare"] for s in summaries) == ["cached", "ran"]
    assert len({s["stages"]["sft"]["digest"] for s in summaries}) == 2


# -- the served deployment -----------------------------------------------------------------------


def _api(url: str, path: str, body: dict | None = None):
    import httpx

    r = httpx.post(f"{url}{path}", json=body or {}) if body is not None else httpx.get(f"{url}{path}")
    r.raise_for_status()
    return r.json()


def _wait_for_completed(serve: Child, url: str, deployment: str, n: int, timeout: float = 300) -> None:
    """Until `n` runs of the deployment completed; a failed, crashed or cancelled run fails at once."""

    def completed() -> bool:
        runs = _api(url, "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [deployment]}}})
        bad = [r for r in runs if r["state_type"] in ("FAILED", "CRASHED", "CANCELLED")]
        if bad:
            serve.fail(f"a run of the deployment ended {bad[0]['state_type']}: {bad[0]['state']['message']}")
        return len([r for r in runs if r["state_type"] == "COMPLETED"]) >= n

    serve.wait_for(completed, timeout, f"{n} completed runs of the deployment")


@pytest.mark.slow
def test_served_deployment_retrains_on_the_new_data_event(tmp_path):
    from conftest import build_tiny_model

    model = build_tiny_model(tmp_path / "model", "llama")
    demos, pairs = tmp_path / "demos.jsonl", tmp_path / "pairs.jsonl"
    demos.write_text(
        "".join(
            json.dumps({"instruction": "describe the garden", "input": "", "output": f"rose {i}"}) + "\n"
            for i in range(30)
        )
    )
    pair = {"prompt": "describe the ocean", "chosen": "lovely fish", "rejected": "sad bus"}
    pairs.write_text("".join(json.dumps({**pair, "chosen": f"fish {i}"}) + "\n" for i in range(30)))
    art = tmp_path / "artifacts"
    url = f"http://127.0.0.1:{free_port()}/api"
    # as the README runs it: no PREFECT_API_URL; serve starts its server at `schedule.api_url`
    env = without_session_server()
    env |= {"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    overrides = [
        f"artifacts_dir={art}",
        f"model.name_or_path={model}",
        "data=files",
        f"data.demonstrations.path={demos}",
        f"data.comparisons.path={pairs}",
        "pipeline.stop_after=reward_model",
        "stage.sft.epochs=1",
        "stage.reward_model.epochs=1",
        f"schedule.api_url={url}",
        "schedule.cron='0 4 * * *'",
    ]
    with Child([ALIGNFLOW, "serve", *overrides], env=env) as serve:
        deployments: list = []

        def deployed() -> bool:
            try:
                deployments[:] = _api(url, "/deployments/filter", {})
            except Exception:
                return False
            return bool(deployments)

        serve.wait_for(deployed, timeout=180, what="deployment")
        (dep,) = deployments
        assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["0 4 * * *"]  # the schedule from config
        assert dep["global_concurrency_limit"]["limit"] == 1  # one run at a time
        tree = [serve.proc.pid, *(c.pid for c in psutil.Process(serve.proc.pid).children(recursive=True))]
        listening = {c.laddr.ip for c in psutil.net_connections("inet") if c.status == "LISTEN" and c.pid in tree}
        assert listening == {"127.0.0.1"}  # the server serve started answers on loopback only

        def notify() -> None:
            done = subprocess.run(
                [ALIGNFLOW, "notify", str(pairs), "--api-url", url], cwd=ROOT, env=env, capture_output=True,
                text=True, timeout=120,
            )  # fmt: skip
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

        notify()  # first data: everything runs
        _wait_for_completed(serve, url, dep["id"], 1)
        first = json.loads((art / "summary.json").read_text())
        assert set(statuses(first).values()) == {"ran"}
        with pairs.open("a") as f:  # new comparisons land in the same file
            f.write(json.dumps({**pair, "chosen": "a wonderful wave"}) + "\n")
        notify()
        _wait_for_completed(serve, url, dep["id"], 2)
        second = json.loads((art / "summary.json").read_text())
        # prepare and what reads its changed outputs reran; SFT, keyed on the demonstrations, did not
        assert statuses(second) == {"prepare": "ran", "sft": "cached", "comparisons": "ran", "reward_model": "ran"}
        assert (
            second["stages"]["prepare"]["parents"]["file:data.comparisons"]
            != first["stages"]["prepare"]["parents"]["file:data.comparisons"]
        )


def test_prefect_yaml_deployments_are_valid_for_prefect_deploy():
    """`prefect deploy` reads prefect.yaml: its entrypoint is the served flow, its triggers and schedules
    are what Prefect's schemas accept, and every deployment runs one at a time."""
    import yaml
    from prefect.client.schemas.schedules import construct_schedule
    from prefect.events import DeploymentTriggerTypes
    from pydantic import TypeAdapter

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert {d["name"] for d in spec["deployments"]} == {"retrain", "retrain-k8s", "retrain-docker"}
    for d in spec["deployments"]:
        path, name = d["entrypoint"].split(":")
        assert (ROOT / path).exists() and f"def {name}(" in (ROOT / path).read_text()
        assert d["concurrency_limit"] == 1 and d["work_pool"]["name"].startswith("alignflow-")
        for s in d["schedules"]:
            assert construct_schedule(cron=s["cron"], timezone=s["timezone"]).cron == s["cron"]
        for t in d["triggers"]:
            trigger = TypeAdapter(DeploymentTriggerTypes).validate_python(t)
            assert trigger.expect == {"alignflow.data.updated"}
