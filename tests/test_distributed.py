"""Process groups (`distributed/`): the config's refusals, the global statistics of data-parallel PPO
on two real gloo processes, and (slow) the flow under ZeRO-3 and a killed rank."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flows.launch import launch
from stages.rl import ppo_math as pm
from stages.runtime import process_group as dist
from stages.settings.distributed import DistributedConfig, refusal

ROOT = Path(__file__).resolve().parents[1]
ZERO3 = {"zero_optimization": {"stage": 3}}


def test_the_config_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match="distributed.mode=single runs one process"):
        DistributedConfig(mode="single", nproc_per_node=2)
    with pytest.raises(ValueError, match="zero_optimization.stage: 2 does not match distributed.mode=zero3"):
        DistributedConfig(mode="zero3", nproc_per_node=2, deepspeed={"zero_optimization": {"stage": 2}})
    with pytest.raises(ValueError, match="launcher=deepspeed and distributed.hostfile"):
        DistributedConfig(mode="ddp", nproc_per_node=2, nnodes=2)
    with pytest.raises(ValueError, match=r"distributed.stages: \['evaluate'\]"):
        DistributedConfig(mode="ddp", nproc_per_node=2, stages=["evaluate"])
    zero3 = DistributedConfig(mode="zero3", nproc_per_node=2, deepspeed=ZERO3)
    for method in ("lora", "dora", "loraplus", "full", "freeze"):  # LoRA on a partitioned base, and in full
        assert refusal(zero3, "sft", method=method) is None
    assert "bitsandbytes' 4-bit weights cannot be partitioned by ZeRO-3" in refusal(
        zero3, "reward_model", method="qlora"
    )
    assert "an SVD of each whole weight" in refusal(zero3, "dpo", method="pissa")
    ddp = DistributedConfig(mode="ddp", nproc_per_node=2)
    assert "a 4-bit base) runs in one process" in refusal(ddp, "sft", method="qlora")
    assert "layout=shared_base" in refusal(DistributedConfig(mode="ddp", nproc_per_node=2), "ppo", method="lora",
                                           layout="shared_base")  # fmt: skip
    assert refusal(zero3, "ppo", method="full", layout="full_copies") is None
    assert not zero3.launches("evaluate") and zero3.launches("ppo")


def test_a_typo_in_a_distributed_key_is_named(tmp_path):
    from hydra import compose, initialize_config_dir

    from flows.config import register, to_config

    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = to_config(compose("config", overrides=["distributed=zero3", "peft=full"]))
        assert cfg.distributed.zero == 3 and cfg.distributed.world_size == 2
        with pytest.raises(Exception, match="nprocs"):
            compose("config", overrides=["distributed=ddp", "distributed.nprocs=2"])
        with pytest.raises(ValueError, match=r"stage.ppo.minibatch_size \(5\) must be a multiple of the 2 processes"):
            to_config(
                compose(
                    "config",
                    overrides=["distributed=ddp", "stage.ppo.minibatch_size=5", "stage.ppo.rollouts_per_update=10"],
                )
            )
        lora = to_config(compose("config", overrides=["distributed=zero3"]))  # the default peft=lora: wired
        assert lora.tuning("sft").peft.method == "lora" and lora.distributed.zero == 3
        with pytest.raises(ValueError, match="peft=pissa: its adapters start from an SVD"):
            to_config(compose("config", overrides=["distributed=zero3", "peft=pissa"]))


def test_shares_split_a_batch_across_ranks(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    got = []
    for r in range(3):
        monkeypatch.setenv("RANK", str(r))
        got.append(list(range(10))[dist.share(10)])
    assert got == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    with pytest.raises(ValueError, match=r"stage.ppo.minibatch_size \(8\) must be a multiple of the 3 processes"):
        dist.per_rank(8, "stage.ppo.minibatch_size")


def test_the_failed_rank_is_read_from_torchruns_summary():
    log = """...
Failures:
[1]:
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 11)
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-01_23:29:43
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 12)
  error_file: <N/A>
"""
    assert launch.root_cause(log) == (1, "was killed by SIGKILL")
    assert launch.root_cause("Root Cause\n  rank      : 0 (local_rank: 0)\n  exitcode  : 1 (pid: 3)") == (
        0,
        "exited with code 1",
    )


def test_the_launch_command_is_torchrun_on_one_node_and_deepspeeds_across_nodes(tmp_path):
    one = launch.command(DistributedConfig(mode="ddp", nproc_per_node=2, master_port=29555), tmp_path / "spec.pkl")
    assert one[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node" in one and "29555" in one
    many = DistributedConfig(
        mode="zero3", nproc_per_node=8, nnodes=2, launcher="deepspeed", hostfile="/etc/hosts.ds", deepspeed=ZERO3
    )
    cmd = launch.command(many, tmp_path / "spec.pkl")
    assert cmd[1:3] == ["-m", "deepspeed.launcher.runner"] and cmd[cmd.index("--num_nodes") + 1] == "2"
    assert cmd[-2:] == ["flows.launch.rank", str(tmp_path / "spec.pkl")]


def _global_statistics(rank: int, world: int, port: int, out: str) -> None:
    """One rank of a real 2-process gloo group: its half of the rows."""
    import torch.distributed as tdist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    adv, mask, kl = _rows()
    mine = slice(rank * 3, rank * 3 + 3)
    whitened = pm.masked_whiten(adv[mine], mask[mine], total=dist.all_reduce_sum)
    stats = {"kl": dist.mean(kl[mine].sum(1)), "whitened": whitened.tolist(), "gathered": dist.gather([rank] * 2)}
    Path(out, f"{rank}.json").write_text(json.dumps(stats))
    tdist.destroy_process_group()


def _rows():
    g = torch.Generator().manual_seed(0)
    adv = torch.randn(6, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1] * 5])
    return adv, mask.float(), torch.randn(6, 5, generator=g).abs() * mask


def test_two_processes_whiten_and_average_as_one_process_over_the_global_batch(tmp_path):
    """Data-parallel PPO's statistics: rank r holds rows 3r..3r+2 of one global batch of 6."""
    import torch.multiprocessing as mp

    mp.spawn(_global_statistics, args=(2, launch.free_port(), str(tmp_path)), nprocs=2)
    adv, mask, kl = _rows()
    whole = pm.masked_whiten(adv, mask)
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    torch.testing.assert_close(torch.tensor(ranks[0]["whitened"] + ranks[1]["whitened"]), whole)
    # by hand: the global mean of the summed per-row KL, not the mean of the two ranks' means
    assert ranks[0]["kl"] == ranks[1]["kl"] == pytest.approx(kl.sum(1).mean().item())
    assert ranks[0]["gathered"] == [0, 0, 1, 1]
    # a rank's own whitening would differ: the statistics really are the global batch's
    assert not torch.allclose(pm.masked_whiten(adv[:3], mask[:3]), whole[:3])


def _flow(args: list[str], artifacts: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "flows.align", "+experiment=tiny", f"artifacts_dir={artifacts}", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _summary(stdout: str) -> dict:
    return json.loads(Path(stdout.split("summary: ")[-1].strip()).read_text())


@pytest.mark.slow
def test_sft_and_the_reward_model_train_under_zero3_with_lora_as_one_process_does(tmp_path):
    """The default `peft=lora` (SFT with adapters on a partitioned base, the reward model in full) on
    two ZeRO-3 ranks, against the same recipe in one process: the published models agree."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    args = ["distributed=zero3", "pipeline.stop_after=reward_model"]
    out, err = _flow(args, tmp_path / "zero3").communicate(timeout=900)
    assert "DeepSpeed" in err, err[-3000:]  # the stages ran in DeepSpeed's process group
    stages = _summary(out)["stages"]
    assert stages["sft"]["status"] == stages["reward_model"]["status"] == "ran", err[-3000:]
    one, err_one = _flow(["pipeline.stop_after=reward_model"], tmp_path / "single").communicate(timeout=900)
    single = _summary(one)["stages"]
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    for stage, cls, folder in (
        ("sft", AutoModelForCausalLM, "policy"),
        ("reward_model", AutoModelForSequenceClassification, "model"),
    ):
        group = cls.from_pretrained(Path(stages[stage]["artifact"], folder)).eval()
        alone = cls.from_pretrained(Path(single[stage]["artifact"], folder)).eval()
        assert group.model.embed_tokens.weight.shape[1] == 32  # whole weights, not rank 0's partition
        with torch.no_grad():
            torch.testing.assert_close(group(input_ids=ids).logits, alone(input_ids=ids).logits, atol=5e-3, rtol=5e-3)
    assert (Path(stages["sft"]["artifact"]) / "adapter" / "adapter_config.json").exists()  # LoRA trained it
    assert stages["reward_model"]["metrics"]["rm/eval/accuracy"] > 0.5
    assert not list((tmp_path / "zero3").glob("*/.launch/*"))  # a finished group leaves no working folder
    out, err = _flow(args, tmp_path / "zero3").communicate(timeout=900)
    again = _summary(out)["stages"]
    assert {again[s]["status"] for s in ("prepare", "sft", "comparisons", "reward_model")} == {"cached"}, err[-2000:]
    assert again["reward_model"]["artifact"] == stages["reward_model"]["artifact"]


@pytest.mark.slow
def test_a_killed_rank_fails_the_ppo_stage_and_the_rerun_resumes(tmp_path):
    # SFT and the reward model in the flow's process; PPO as two ZeRO-2 ranks, checkpointing each update
    args = ["distributed=zero2", "distributed.stages=[ppo]", "peft=full", "pipeline.stop_after=ppo"]
    args += ["stage.ppo.updates=16", "stage.ppo.checkpoint_every=1"]
    proc = _flow(args, tmp_path)
    deadline = time.monotonic() + 600
    latest = None
    while latest is None or int(latest.read_text().split("-")[-1]) < 2:  # DeepSpeed's tag, step-<update>
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
        latest = next(iter(tmp_path.glob("ppo/.checkpoints/*/latest")), None)
    pid = int(next(tmp_path.glob("ppo/.launch/*/rank1.pid")).read_text())
    os.kill(pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "ppo: rank 1 of 2 was killed by SIGKILL" in err and "nothing was published" in err, err[-3000:]
    assert [p.name for p in (tmp_path / "ppo").iterdir() if not p.name.startswith(".")] == []  # nothing published
    saved = int(latest.read_text().split("-")[-1])
    out, err = _flow(args, tmp_path).communicate(timeout=900)
    ppo = _summary(out)["stages"]["ppo"]
    assert ppo["status"] == "ran", err[-3000:]
    assert ppo["metrics"]["ppo/resumed_from"] >= saved >= 2  # from the last checkpoint, not from scratch
    assert ppo["metrics"]["ppo/history_length"] == 16


def test_vllm_rollouts_are_refused_without_a_gpu_before_any_compute(tmp_path):
    from stages.rl import rollout

    with pytest.raises(ValueError, match="stage.ppo.generation=vllm needs a CUDA GPU and the vllm package"):
        rollout.check("vllm", cuda=False)
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the command-line refusal is for CPU machines")
    cmd = [sys.executable, "-m", "flows.align", "+experiment=tiny", f"artifacts_dir={tmp_path}"]
    done = subprocess.run(
        [*cmd, "stage.ppo.generation=vllm"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1 and "stage.ppo.generation=vllm needs a CUDA GPU" in done.stderr
    assert not (tmp_path / "prepare").exists()  # refused before any stage ran


@pytest.mark.gpu
def test_vllm_rollouts_follow_the_policy_after_a_weight_sync(tmp_path):
    """On a GPU: vLLM samples the tiny policy's rollouts, and after the weights change and are pushed,
    greedy samples follow the new weights (the per-update sync PPO relies on)."""
    pytest.importorskip("vllm", reason="needs the vllm package (GPU machines)")
    from conftest import build_tiny_model

    from stages.models.modeling import load_causal_lm, load_tokenizer
    from stages.rl.rollout import HfRollout, VllmRollout

    folder = build_tiny_model(tmp_path / "policy", "llama")
    tokenizer, policy = load_tokenizer(folder), load_causal_lm(folder)
    engine = VllmRollout(folder, policy, seed=0, gpu_memory_utilization=0.2)
    kw = {"max_new_tokens": 8, "temperature": 1e-4}
    before = engine.sample(tokenizer, ["hello there"], **kw)
    assert before.response.shape[0] == 1 and before.response_mask.sum() > 0
    with torch.no_grad():
        policy.lm_head.weight.mul_(-1.0)  # a different greedy continuation
    engine.sync()
    after = engine.sample(tokenizer, ["hello there"], **kw)
    hf = HfRollout(policy).sample(tokenizer, ["hello there"], **kw)
    assert after.response[0, :3].tolist() == hf.response[0, :3].tolist() != before.response[0, :3].tolist()


def _own_loss_rank(rank: int, world: int, port: int, loss: str, mode: str, prepared: str, compared: str, out: str):
    """One rank of a real 2-process gloo group training DPO's own loop (`stage.dpo.loss_type=loss`)."""
    import torch.distributed as tdist

    import flows  # noqa: F401  (telemetry off)
    from stages.settings.distributed import DistributedConfig

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    group = DistributedConfig(mode=mode, nproc_per_node=world, deepspeed=ZERO3 if mode == "zero3" else {})
    _own_loss_dpo(loss, Path(prepared), Path(compared), Path(out), group)
    tdist.destroy_process_group()


def _own_loss_dpo(loss: str, prepared: Path, compared: Path, out: Path, group=None):
    from stages import dpo
    from stages.settings.models import PeftConfig, Tuning

    cfg = dpo.DpoConfig(epochs=1, batch_size=16, loss_type=loss, kl_prompts=4, learning_rate=1e-3)
    return dpo.run(cfg, Tuning(PeftConfig("full")), policy=prepared / "base", reference=prepared / "base",
                   comparisons=compared / "comparisons.jsonl", heldout=compared / "heldout_comparisons.jsonl",
                   out_dir=out, distributed=group)  # fmt: skip


@pytest.mark.parametrize(("loss", "mode"), [("plackett_luce", "ddp"), ("simpo", "ddp"), ("orpo", "ddp"),
                                            ("kto", "ddp"), ("simpo", "zero3")])  # fmt: skip
def test_every_own_preference_loss_trains_on_two_processes_as_one_process_does(
    tiny_prepare, tiny_comparisons, tmp_path, loss, mode
):
    """DPO's own loop (Plackett-Luce, SimPO, ORPO, KTO) through the `Engine`: two ranks, each with half of
    every step's prompts, publish the policy one process trains on the same global batches."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    args = (
        2,
        launch.free_port(),
        loss,
        mode,
        str(tiny_prepare.path),
        str(tiny_comparisons.path),
        str(tmp_path / "two"),
    )
    mp.spawn(_own_loss_rank, args=args, nprocs=2)
    _own_loss_dpo(loss, Path(tiny_prepare.path), Path(tiny_comparisons.path), tmp_path / "one")
    two, one = (load_file(tmp_path / run / "policy" / "model.safetensors") for run in ("two", "one"))
    base = load_file(Path(tiny_prepare.path) / "base" / "model.safetensors")
    assert two.keys() == one.keys()
    moved = max((one[k] - base[k]).abs().max().item() for k in one)
    assert moved > 1e-3  # training moved the weights: the comparison below is not of two untouched copies
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-3, atol=1e-4, msg=name)
