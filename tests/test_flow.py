"""End to end: the real flow in a subprocess, as `make align` runs it, on tiny settings."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["+experiment=tiny"]  # conf/experiment/tiny.yaml: the whole recipe in seconds
STAGES = ["prepare", "sft", "comparisons", "reward_model", "ppo", "evaluate"]


# third-party noise the console must not show (silenced at the source: flows/__init__.py)
NOISE = ["Loading weights", "Writing model shards", "FutureWarning", "MLflow database", "ds_accelerator", "Traceback"]


def run_align(artifacts: Path, *overrides: str) -> tuple[dict, str]:
    """The summary and the console output (stdout + stderr) of one `python -m flows.align` run."""
    proc = subprocess.run(
        [sys.executable, "-m", "flows.align", f"artifacts_dir={artifacts}", *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,  # generous: a loaded 2-core machine runs the default recipe in minutes
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "summary: " in proc.stdout
    console = proc.stdout + proc.stderr
    assert not [n for n in NOISE if n in console], [
        line for line in console.splitlines() if any(n in line for n in NOISE)
    ]
    path = Path(proc.stdout.rsplit("summary: ", 1)[1].strip())
    return json.loads(path.read_text()), console


def align(artifacts: Path, *overrides: str) -> dict:
    return run_align(artifacts, *overrides)[0]


def statuses(summary: dict) -> dict[str, str]:
    return {name: s["status"] for name, s in summary["stages"].items()}


def reads_what_was_computed(rerun: dict, first: dict) -> None:
    """A cached rerun reads each stage from the folder the first run published, and that folder's files
    still hash to the digest recorded when it was computed (nothing altered them since)."""
    from stages.runtime.manifest import folder_digest

    for name, stage in first["stages"].items():
        assert rerun["stages"][name]["artifact"] == stage["artifact"], name
        assert folder_digest(Path(stage["artifact"])) == stage["digest"], name


@pytest.mark.slow
def test_flow_caches_and_reruns_exactly_what_changed(tmp_path):
    first, console = run_align(tmp_path, *TINY)
    assert statuses(first) == dict.fromkeys(STAGES, "ran")
    # progress of the long loops, one line each in a log (not a terminal), with the ETA and PPO's figures
    for bar in ("prepare: pretraining", "sft: training", "comparisons: sampling", "reward_model: training"):
        assert f"{bar}: 100%" in console
    assert "ppo: updates: 100%" in console and "reward=" in console and "kl=" in console
    assert Path(first["report_path"]).exists() and first["registry"]["version"] == "1"
    assert set(first["eval"]) >= {"gold_sft", "gold_policy", "win_rate", "kl_to_sft", "rm_accuracy", "labeler_ceiling"}
    for s in first["stages"].values():
        assert Path(s["artifact"], "manifest.json").exists()
        assert Path(s["artifact"]).name == s["digest"][:16]  # content-addressed

    again = align(tmp_path, *TINY)
    assert statuses(again) == dict.fromkeys(STAGES, "cached")
    reads_what_was_computed(again, first)

    ppo_only = align(tmp_path, *TINY, "stage.ppo.beta=0.05")
    assert statuses(ppo_only) == {**dict.fromkeys(STAGES[:4], "cached"), "ppo": "ran", "evaluate": "ran"}

    sft_changed = align(tmp_path, *TINY, "stage.sft.learning_rate=0.002")
    assert statuses(sft_changed) == {"prepare": "cached", **dict.fromkeys(STAGES[1:], "ran")}

    # MLflow: one parent run per flow run, one nested run per stage, tagged with the artifact digest
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("alignflow")
    assert exp.artifact_location == (tmp_path / "mlflow-artifacts").as_uri()  # nothing lands in ./mlruns
    assert any((tmp_path / "mlflow-artifacts").rglob("manifest.json"))
    runs = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{first['mlflow_run_id']}'"
    )
    assert sorted(r.data.tags["alignflow.stage"] for r in runs) == sorted(STAGES)
    assert all(
        r.data.tags["alignflow.digest"] == first["stages"][r.data.tags["alignflow.stage"]]["digest"] for r in runs
    )
    ppo_run = next(r for r in runs if r.data.tags["alignflow.stage"] == "ppo")
    assert len(client.get_metric_history(ppo_run.info.run_id, "ppo/objective/kl")) == 2
    parent = client.get_run(first["mlflow_run_id"])
    assert parent.data.params["stage.ppo.beta"] == "0.02"


@pytest.mark.slow
def test_deleted_artifact_is_recomputed_not_pointed_at(tmp_path):
    first = align(tmp_path, *TINY, "pipeline.stop_after=sft")
    assert statuses(first) == {"prepare": "ran", "sft": "ran"}
    import shutil

    shutil.rmtree(first["stages"]["sft"]["artifact"])
    second = align(tmp_path, *TINY, "pipeline.stop_after=sft")
    assert statuses(second) == {"prepare": "cached", "sft": "ran"}
    assert Path(second["stages"]["sft"]["artifact"], "manifest.json").exists()


@pytest.mark.slow
def test_default_recipe_beats_sft(tmp_path):
    """The embedded default as `make align` runs it: PPO must beat SFT on held-out prompts, and the
    reward model must come within 5 points of the simulated labelers' own agreement ceiling."""
    e = align(tmp_path)["eval"]
    margin = e["gold_policy"]["mean"] - e["gold_sft"]["mean"]
    assert margin > e["gold_policy"]["ci95"] + e["gold_sft"]["ci95"]
    assert e["win_rate"] >= 0.65
    assert e["labeler_ceiling"] - e["rm_accuracy"] <= 0.05, (e["rm_accuracy"], e["labeler_ceiling"])


@pytest.mark.slow
def test_every_branch_shares_cached_stages_and_keeps_device_discipline(tmp_path):
    """rlhf, dpo (and two rounds), rlaif, rlaif_direct, PPO's shared-base layout, DAPO and GSPO, each stage under the
    device guard (`ALIGNFLOW_DEVICE_GUARD=1`, set for the whole suite by conftest): a tensor made
    without `device=` in our code, or an op across devices, would fail its stage and this test."""
    rlhf = align(tmp_path, *TINY)
    dpo = align(tmp_path, *TINY, "pipeline=dpo")
    assert statuses(dpo) == {
        **dict.fromkeys(["prepare", "sft", "comparisons"], "cached"),
        "dpo": "ran",
        "evaluate": "ran",
    }
    rounds = align(tmp_path, *TINY, "pipeline=dpo", "pipeline.rounds=2")  # iterative DPO: round 1 is reused
    assert statuses(rounds) == {
        **dict.fromkeys(["prepare", "sft", "comparisons", "dpo"], "cached"),
        **dict.fromkeys(["comparisons_r2", "dpo_r2", "evaluate"], "ran"),
    }
    rlaif = align(tmp_path, *TINY, "pipeline=rlaif")
    assert statuses(rlaif) == {
        "prepare": "cached",
        "sft": "cached",
        **dict.fromkeys(["judge", "comparisons", "reward_model", "ppo", "evaluate"], "ran"),
    }
    direct = align(tmp_path, *TINY, "pipeline=rlaif_direct")
    assert statuses(direct) == {**dict.fromkeys(["prepare", "sft", "judge"], "cached"), "ppo": "ran", "evaluate": "ran"}
    shared = align(tmp_path, *TINY, "stage.ppo.layout=shared_base")  # LoRA policy and value on one base
    assert statuses(shared) == {**dict.fromkeys(STAGES[:4], "cached"), "ppo": "ran", "evaluate": "ran"}
    for preset in ("dapo", "gspo"):  # GRPO with DAPO's or GSPO's keys: rlhf's cached stages, its own ppo
        variant = align(tmp_path, *TINY, f"pipeline={preset}")
        assert statuses(variant) == {**dict.fromkeys(STAGES[:4], "cached"), "ppo": "ran", "evaluate": "ran"}
        ppo = variant["stages"]["ppo"]["metrics"]
        assert ppo["ppo/value_model"] == 0.0 and ppo["ppo/samples_per_prompt"] == 4.0
    for summary in (dpo, rounds, rlaif, direct):
        assert set(summary) == set(rlhf) and set(summary["eval"]) == set(rlhf["eval"])
    for summary in (rlhf, dpo, rounds, rlaif, direct, shared):  # beside the raw rate, every branch
        assert 0 <= summary["eval"]["win_rate_lc"] <= 1 and summary["eval"]["win"]["judge"]["pairs"] > 0
    assert dpo["eval"]["proxy_rm"] is None and 0 <= dpo["eval"]["rm_accuracy"] <= 1  # DPO's implicit reward
    assert direct["eval"]["rm_accuracy"] is None and direct["eval"]["labeler_ceiling"] is None
    assert rlhf["eval"]["judge"] is None
    assert set(rlaif["eval"]["judge"]) == {"agreement_gold", "agreement_human"}
    assert 0 <= rlaif["stages"]["comparisons"]["metrics"]["comparisons/labeler/position_consistency"] <= 1
    assert {"judge/position_consistency", "judge/agreement_gold"} <= set(rlaif["stages"]["judge"]["metrics"])
    assert "dpo/train/rewards/margins" in dpo["stages"]["dpo"]["metrics"]


@pytest.mark.slow
def test_new_data_in_the_same_file_reruns_exactly_what_reads_it(tmp_path):
    """A data file's content, not its path, keys prepare; each stage is keyed on the files it reads,
    so new comparisons rerun prepare but not SFT, and new demonstrations rerun both."""
    art = tmp_path / "artifacts"
    base = Path(align(art, *TINY, "pipeline.stop_after=prepare")["stages"]["prepare"]["artifact"], "base")
    demos, pairs = tmp_path / "demos.jsonl", tmp_path / "pairs.jsonl"
    demo = {"instruction": "describe the garden", "input": "", "output": "lovely rose tree"}
    pair = {"prompt": "describe the ocean", "chosen": "lovely fish", "rejected": "sad bus"}
    demos.write_text("".join(json.dumps(demo) + "\n" for _ in range(30)))
    pairs.write_text("".join(json.dumps(pair) + "\n" for _ in range(20)))
    args = [
        *TINY,
        f"model.name_or_path={base}",  # a model folder, so the base does not depend on the data
        "data=files",
        f"data.demonstrations.path={demos}",
        f"data.comparisons.path={pairs}",
        "pipeline.stop_after=sft",
    ]
    assert statuses(align(art, *args)) == {"prepare": "ran", "sft": "ran"}
    assert statuses(align(art, *args)) == {"prepare": "cached", "sft": "cached"}
    with pairs.open("a") as f:  # new comparisons in the same file
        f.write(json.dumps({**pair, "chosen": "wonderful wave"}) + "\n")
    assert statuses(align(art, *args)) == {"prepare": "ran", "sft": "cached"}
    with demos.open("a") as f:  # new demonstrations in the same file
        f.write(json.dumps({**demo, "output": "happy seed"}) + "\n")
    assert statuses(align(art, *args)) == {"prepare": "ran", "sft": "ran"}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "adapters"),
    [(["peft=dora"], True), (["optim=badam"], False)],
    ids=["dora", "badam"],
)
def test_the_pipeline_runs_under_another_method(tmp_path, overrides, adapters):
    """`make methods` runs the embedded default under each method and reports whether PPO beats SFT;
    here two of them run the whole RLHF pipeline small, and each training stage trains as configured."""
    import mlflow

    summary = align(tmp_path, *TINY, *overrides)
    assert statuses(summary) == dict.fromkeys(STAGES, "ran")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    for stage in ("sft", "reward_model", "ppo"):
        folder = Path(summary["stages"][stage]["artifact"])
        params = client.get_run(summary["stages"][stage]["run_id"]).data.params
        if adapters:  # DoRA in every stage: the adapter beside the plain folder
            assert params[f"{stage}.peft.method"] == "dora"
            if stage != "ppo":
                config = json.loads((folder / "adapter" / "adapter_config.json").read_text())
                assert config["use_dora"] is True
        else:  # optim=badam brings peft=full with it
            assert params[f"{stage}.optim.name"] == "badam" and params[f"{stage}.peft.method"] == "full"
            assert not (folder / "adapter").exists()


@pytest.mark.slow
def test_every_estimator_loss_and_baseline_shares_the_cached_stages(tmp_path):
    """Issue 23: each advantage estimator, each new preference loss, best-of-n and verifiable rewards
    through the flow; prepare, sft, comparisons and reward_model computed once, and the critic-free
    runs load no value model (the ppo manifest's `ppo/value_model`)."""
    upstream = ["prepare", "sft", "comparisons", "reward_model"]
    rlhf = align(tmp_path, *TINY)
    assert rlhf["stages"]["ppo"]["metrics"]["ppo/value_model"] == 1.0
    for estimator, n, kl in (
        ("grpo", 4, "loss"),
        ("dr_grpo", 4, "loss"),
        ("rloo", 4, "reward"),
        ("reinforce_pp", 1, "reward"),
        ("reinforce_pp_baseline", 4, "reward"),
    ):
        run = align(
            tmp_path,
            *TINY,
            f"stage.ppo.advantage={estimator}",
            f"stage.ppo.samples_per_prompt={n}",
            f"stage.ppo.kl_penalty={kl}",
        )
        assert statuses(run) == {**dict.fromkeys(upstream, "cached"), "ppo": "ran", "evaluate": "ran"}, estimator
        metrics = run["stages"]["ppo"]["metrics"]
        assert metrics["ppo/value_model"] == 0.0 and metrics["ppo/samples_per_prompt"] == n
    # the branch names stand for the same ppo config: even the ppo stage is cached
    for branch in ("grpo", "rloo"):
        assert statuses(align(tmp_path, *TINY, f"pipeline={branch}")) == dict.fromkeys(STAGES, "cached")
    for loss in ("simpo", "orpo", "kto"):
        run = align(tmp_path, *TINY, "pipeline=dpo", f"stage.dpo.loss_type={loss}")
        assert statuses(run) == {**dict.fromkeys(upstream[:3], "cached"), "dpo": "ran", "evaluate": "ran"}, loss
    bon = align(tmp_path, *TINY, "pipeline=best_of_n", "stage.best_of_n.rounds=2")
    assert statuses(bon) == {
        **dict.fromkeys(upstream, "cached"),
        **dict.fromkeys(["best_of_n", "best_of_n_sft", "best_of_n_r2", "best_of_n_sft_r2", "evaluate"], "ran"),
    }
    kept = bon["stages"]["best_of_n"]["metrics"]
    assert kept["best_of_n/score_best"] >= kept["best_of_n/score_all"]  # the reward model's best of each n
    rlvr = align(tmp_path, *TINY, "pipeline=rlvr")  # the arithmetic task: its own data, no reward model
    assert statuses(rlvr) == dict.fromkeys(["prepare", "sft", "ppo", "evaluate"], "ran")
    accuracy = rlvr["eval"]["accuracy"]
    assert 0 <= accuracy["sft"]["accuracy"] <= 1 and accuracy["sft"]["n"] == 32
    assert rlvr["eval"]["gold_sft"]["mean"] == accuracy["sft"]["accuracy"]  # exact match: the mean is the accuracy
    assert rlhf["eval"]["accuracy"] is None  # not an exact-match task


def test_the_tool_task_runs_with_and_without_its_tool(tmp_path):
    """pipeline=rlvr_tools at tiny size: rollouts that call the calculator, evaluation with and without it."""
    tools = align(tmp_path, *TINY, "pipeline=rlvr_tools")
    assert statuses(tools) == dict.fromkeys(["prepare", "sft", "ppo", "evaluate"], "ran")
    ppo = tools["stages"]["ppo"]["metrics"]
    assert ppo["ppo/tools/calls_first"] > 0 and 0 < ppo["ppo/tools/share_using_first"] <= 1
    block = tools["eval"]["tools"]
    assert block["tools"] == ["calculator"] and 0 < block["sft"]["share_using_tool"] <= 1
    for side in ("sft", "policy"):  # the accuracy block reads the samples made with the tool
        assert block[side]["with_tool"]["accuracy"] == tools["eval"]["accuracy"][side]["accuracy"]
        assert block[side]["without_tool"]["n"] == 32
    without = align(tmp_path, *TINY, "pipeline=rlvr_tools", "stage.ppo.tools=[]")  # the same SFT, no tool
    assert statuses(without) == {"prepare": "cached", "sft": "cached", "ppo": "ran", "evaluate": "ran"}
    assert without["eval"]["tools"] is None and "ppo/tools/calls_first" not in without["stages"]["ppo"]["metrics"]
