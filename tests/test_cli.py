"""`alignflow`, the one command: every subcommand's help, and each run on tiny settings as a user would,
sharing one tiny pipeline's artifacts. The served deployment and the workers have their own tests
(test_operations.py, test_workers.py), also through `alignflow`."""

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, Child, free_port, without_session_server
from test_flow import reads_what_was_computed

ALIGNFLOW = str(Path(sys.executable).with_name("alignflow"))
TINY = ["+experiment=tiny"]
STAGES = ["prepare", "sft", "comparisons", "reward_model", "ppo", "evaluate"]
COMMANDS = [
    "align",
    "compare",
    "frontier",
    "serve",
    "notify",
    "workers",
    "champion",
    "server",
    "serve-model",
    "chat",
    "export",
    "ui",
]


def alignflow(*args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [ALIGNFLOW, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env or os.environ.copy()
    )
    assert done.returncode == 0, f"alignflow {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def summary_of(done: subprocess.CompletedProcess) -> dict:
    return json.loads(Path(done.stdout.rsplit("summary: ", 1)[1].strip()).read_text())


def statuses(summary: dict) -> dict[str, str]:
    return {name: s["status"] for name, s in summary["stages"].items()}


def test_help_lists_every_subcommand_and_each_has_its_own():
    top = alignflow("--help").stdout
    assert [line.split()[0] for line in top.split("commands:\n", 1)[1].split("\n\n")[0].splitlines()] == COMMANDS
    for name in COMMANDS:
        text = alignflow(name, "--help").stdout
        assert text.startswith("usage: alignflow") or text.startswith("usage: python -m"), (name, text[:200])
        assert name in text.splitlines()[0]
    wrong = subprocess.run([ALIGNFLOW, "algin"], capture_output=True, text=True, timeout=60)
    assert wrong.returncode != 0 and "no command 'algin'" in wrong.stderr


@pytest.fixture(scope="module")
def tiny(shared_tiny_run):
    """`alignflow align +experiment=tiny`: the session's tiny run (conftest), read and rerun by the tests below."""
    return shared_tiny_run


def child_runs(art: Path, parent: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{art}/mlflow.db")
    exp = client.get_experiment_by_name("alignflow")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")


@pytest.mark.slow
def test_align_runs_the_flow_and_its_cached_rerun_needs_no_prefect_server(tiny):
    art, first = tiny
    assert statuses(first) == dict.fromkeys(STAGES, "ran")
    assert first["prefect_api_url"].startswith("http://127.0.0.1:")  # a temporary server recorded it
    rerun = summary_of(alignflow("align", *TINY, f"artifacts_dir={art}", env=without_session_server()))
    assert statuses(rerun) == dict.fromkeys(STAGES, "cached")
    assert rerun["prefect_api_url"] is None  # no server was up and none was started: nothing had to run
    reads_what_was_computed(rerun, first)
    runs = child_runs(art, rerun["mlflow_run_id"])  # MLflow still records the run and every stage as cached
    assert sorted(r.data.tags["alignflow.stage"] for r in runs) == sorted(STAGES)
    assert {r.data.tags["alignflow.status"] for r in runs} == {"cached"}
    assert {r.info.status for r in runs} == {"FINISHED"}


@pytest.mark.slow
def test_a_cached_rerun_is_recorded_by_the_prefect_server_that_is_up(tiny, tmp_path):
    """`make serve`'s server answering at `schedule.api_url`: a rerun reuses it (no PREFECT_API_URL)."""
    art, _ = tiny
    url = f"http://127.0.0.1:{free_port()}/api"
    env = without_session_server()
    prefect = str(Path(sys.executable).with_name("prefect"))
    command = [prefect, "server", "start", "--host", "127.0.0.1", "--port", url.split(":")[2].split("/")[0]]
    with Child(command, env={**env, "PREFECT_HOME": str(tmp_path), "PREFECT_UI_ENABLED": "false"}) as server:
        server.wait_for_url(f"{url}/health", timeout=120)
        rerun = summary_of(alignflow("align", *TINY, f"artifacts_dir={art}", f"schedule.api_url={url}", env=env))
        assert statuses(rerun) == dict.fromkeys(STAGES, "cached")
        assert rerun["prefect_api_url"] == url
        (flow_run,) = _post(url, "/flow_runs/filter", {})
        assert flow_run["state"]["type"] == "COMPLETED"
        tasks = _post(url, "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run["id"]]}}})
        assert sorted(t["name"] for t in tasks) == sorted(STAGES)
        assert {t["state"]["name"] for t in tasks} == {"Cached"}


def _post(url: str, path: str, body: dict) -> list:
    request = urllib.request.Request(
        f"{url}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def registered_version(art: Path, version: str | None = None, *, digest: str | None = None):
    """A model version read from the registry itself: by number, or the one of the policy `digest`.
    Which version is champion depends on which other runs (`make compare`'s, on another worker) have
    registered policies in the session's shared folder meanwhile; a version never changes."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{art}/mlflow.db")
    if version is not None:
        return client.get_model_version("alignflow-policy", version)
    versions = client.search_model_versions("name='alignflow-policy'")
    return next(v for v in versions if v.tags["alignflow.digest"] == digest)


@pytest.mark.slow
def test_champion_prints_the_promoted_policy_and_its_lineage(tiny):
    art, first = tiny
    out = alignflow("champion", f"artifacts_dir={art}").stdout
    head = out.splitlines()[0].split()
    assert head[:3] == ["champion:", "alignflow-policy", "version"], out
    printed = registered_version(art, head[3])  # the version it names, and that version's own lineage
    assert printed.tags["alignflow.promoted"] == "true"
    assert printed.run_id in out
    for artifact in json.loads(printed.tags["alignflow.lineage"])["artifacts"]:
        assert artifact["digest"][:16] in out and artifact["path"] in out


@pytest.mark.slow
def test_export_writes_the_champion_as_a_plain_folder_with_its_lineage_and_logs_it_to_mlflow(tiny, tmp_path):
    import mlflow
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.models.modeling import load_causal_lm

    art, first = tiny
    # the shared run's own version (the first it registered, so promoted): fixed whatever runs meanwhile
    own = registered_version(art, digest=first["stages"]["evaluate"]["parents"]["policy"])
    out = tmp_path / "exported"
    done = alignflow(
        "export", "--out", str(out), "--artifacts-dir", str(art), "--source", f"models:/alignflow-policy/{own.version}"
    )
    exported, tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    policy = load_causal_lm(first["stages"]["evaluate"]["inputs"]["policy"])
    text = tok.apply_chat_template([{"role": "user", "content": "Say something kind."}], tokenize=False,
                                   add_generation_prompt=True)  # fmt: skip
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, policy(ids).logits)
    card = (out / "README.md").read_text()
    assert first["mlflow_run_id"] in card and first["stages"]["ppo"]["digest"] in card
    for name, digest in first["stages"]["prepare"]["parents"].items():
        if name.startswith("file:"):
            assert digest in card
    assert "promoted to champion" in card and "| kl_to_sft |" in card and "Evaluation verdict" in card
    uri = done.stdout.split("logged to MLflow as ", 1)[1].split()[0]
    mlflow.set_tracking_uri(f"sqlite:///{art}/mlflow.db")
    assert "transformers" in mlflow.models.get_model_info(uri).flavors
    again = subprocess.run([ALIGNFLOW, "export", "--out", str(out), "--artifacts-dir", str(art)],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert again.returncode == 1 and "exists and is not empty" in again.stderr and "Traceback" not in again.stderr


@pytest.mark.slow
def test_make_compare_writes_its_table_on_tiny_settings(tiny):
    from stages.preference.validity import wilson

    art, first = tiny
    make = subprocess.run(
        ["make", "-o", ".venv/.installed", "compare", f"ARGS=--dpo-betas 0.3 +experiment=tiny artifacts_dir={art}"],
        cwd=ROOT, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert make.returncode == 0, make.stdout[-3000:] + make.stderr[-3000:]
    report = json.loads((art / "compare" / "compare.json").read_text())
    assert [r["branch"].split(" ")[0] for r in report["rows"]] == [
        "rlhf", "ppo_async_k1", "dpo", "kto", "simpo", "orpo", "rlaif", "rlaif_direct", "grpo", "rloo", "dapo", "gspo",
        "dr_grpo", "reinforce_pp", "reinforce_pp_baseline", "best_of_n",
    ]  # fmt: skip
    by = {r["branch"].split(" ")[0]: r for r in report["rows"]}
    assert by["rlhf"]["value_model"] == 1.0 and by["grpo"]["value_model"] == by["rloo"]["value_model"] == 0.0
    # the tiny fixture ran rlhf first: its PPO is cached here and timed from the manifest it recorded
    ppo = first["stages"]["ppo"]["metrics"]
    assert by["rlhf"]["own_stage_cached"]
    assert by["rlhf"]["own_stage_s"] == ppo["ppo/seconds"]
    assert by["rlhf"]["own_stage_peak_rss_mb"] == ppo["ppo/peak_rss_mb"]
    assert not by["grpo"]["own_stage_cached"] and by["grpo"]["model_state_mb"] < by["rlhf"]["model_state_mb"]
    assert all(t["stage_time_ratio"] > 0 for t in report["targets"]["critic_free_vs_ppo"].values())
    assert set(report["targets"]["critic_free_vs_ppo"]) == {
        "grpo",
        "rloo",
        "dapo",
        "gspo",
        "dr_grpo",
        "reinforce_pp",
        "reinforce_pp_baseline",
    }
    lagged = report["targets"]["async_k1_vs_ppo"]  # the PPO row with asynchronous rollouts, against PPO's
    assert lagged["staleness_max"] == 1.0 and lagged["updates_per_s_ratio"] > 0
    assert by["ppo_async_k1"]["stages"]["sft"] == "cached" and not by["ppo_async_k1"]["own_stage_cached"]
    assert set(report["verifiable_variants"]) == {"dapo", "gspo"}  # DAPO's and GSPO's keys on the verifiable task
    for side in ("sft", "policy"):  # exact match: a whole number of right answers, and its Wilson interval
        block = report["verifiable"]["accuracy"][side]
        right = block["accuracy"] * block["n"]
        assert block["n"] > 0 and right == pytest.approx(round(right))
        assert block["ci95"] == pytest.approx(list(wilson(round(right), block["n"])))
    tools = report["tool_task"]  # GRPO with the calculator against GRPO without it, one SFT
    assert (
        tools["with_tool"]["n"] == tools["without_tool"]["n"] > 0 and tools["ppo_metrics"]["ppo/tools/calls_first"] > 0
    )
    assert tools["target"]["points"] == pytest.approx(
        100 * (tools["with_tool"]["accuracy"] - tools["without_tool"]["accuracy"])
    )
    assert "tool task (pipeline=rlvr_tools" in make.stdout and report["targets"]["tool_vs_no_tool"] == tools["target"]
    assert set(report["shared_stages"].values()) == {"cached"}  # the tiny run's prepare, sft and comparisons
    assert list(report["dpo_betas"]) == ["0.3"] and report["dpo_best_beta"] == 0.3
    assert (art / "compare" / "compare.txt").read_text().strip() in make.stdout


@pytest.mark.slow
def test_the_mlflow_ui_serves_the_artifacts_on_loopback_only(tiny):
    art, _ = tiny
    port = free_port()
    with Child([ALIGNFLOW, "ui", "--port", str(port), "--artifacts-dir", str(art)]) as ui:
        ui.wait_for_url(f"http://127.0.0.1:{port}/health", timeout=120)
        tree = [ui.proc.pid, *(c.pid for c in psutil.Process(ui.proc.pid).children(recursive=True))]
        listening = [c.laddr for c in psutil.net_connections("inet") if c.status == "LISTEN" and c.pid in tree]
        assert listening and {a.ip for a in listening} == {"127.0.0.1"}, listening
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as page:
            assert page.status == 200 and b"MLflow" in page.read()
