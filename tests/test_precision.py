"""One compute dtype for every forward: PPO's first minibatch sees exactly what was scored (ratio 1 under
bf16 autocast), one host sync per PPO minibatch in our code, the fused EMA, DeepSpeed's precision."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from stages import ppo
from stages.rl import ppo_math as pm
from stages.rl import ppo_update
from stages.runtime import tracking
from stages.runtime.process_group import engine_precision, trainer_args
from stages.settings.distributed import DistributedConfig
from stages.settings.models import ComputeConfig, PeftConfig, Tuning

BF16 = ComputeConfig(device="cpu", precision="bf16")
CASES = {
    "gae-full": ({"advantage": "gae"}, PeftConfig("full")),
    "gae-shared-base-lora": ({"advantage": "gae", "layout": "shared_base"}, PeftConfig(r=4, alpha=8)),
    "grpo-kl-loss-ptx-ema": (
        {"advantage": "grpo", "samples_per_prompt": 4, "kl_penalty": "loss", "ptx_coef": 0.5, "ema_decay": 0.9},
        PeftConfig("full"),
    ),
}


def run_ppo(prepared, rm_dir, out, keys: dict, peft: PeftConfig, compute: ComputeConfig = BF16) -> list[dict]:
    """PPO's per-update rows (what the flow's MLflow run would get), through the stages' metrics sink."""
    rows: list[dict] = []
    cfg = ppo.PpoConfig(**{"updates": 2, "rollouts_per_update": 16, "minibatch_size": 4, "ppo_epochs": 2, **keys})
    with tracking.metrics_sink(lambda m, step: rows.append(m) if "ppo/objective/kl" in m else None):
        ppo.run(
            cfg,
            Tuning(peft, compute=compute),
            policy=prepared.file("base"),
            reward_model=f"{rm_dir}/model",
            normalization=f"{rm_dir}/normalization.json",
            prompts=prepared.file("ppo_prompts"),
            pretrain=prepared.file("pretrain"),
            out_dir=out,
        )
    return rows


@pytest.mark.parametrize("case", list(CASES))
def test_ppo_first_minibatch_has_ratio_exactly_one_under_bf16_autocast(tiny_prepare, tiny_reward_model, tmp_path, case):
    """Old log-probs are scored under the update's autocast, in the first epoch's minibatches: the first
    minibatch's ratio is 1 to the bit, so its clipfrac and approx-KL are 0 (fp32 scoring against a bf16
    update gave neither)."""
    keys, peft = CASES[case]
    rows = run_ppo(tiny_prepare, tiny_reward_model, tmp_path, keys, peft)
    assert len(rows) == 2
    for row in rows:
        assert row["ppo/policy/first_minibatch_approxkl"] == 0.0
        assert row["ppo/policy/first_minibatch_clipfrac"] == 0.0
    assert all(row["ppo/policy/approxkl"] > 0 for row in rows)  # the later minibatches did move the policy


class HostSyncs(TorchFunctionMode):
    """Counts calls that bring a tensor's value to the host (a device sync on a GPU) made directly by our
    code (`stages/`): library internals, such as the optimizer's host-side step counter, are not ours."""

    NAMES = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "nonzero"}

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        to_host = name == "to" and any(str(a) == "cpu" for a in (*args[1:], *(kwargs or {}).values()))
        if name in self.NAMES or to_host:
            import sys

            caller = sys._getframe(1)
            if "/stages/" in caller.f_code.co_filename:
                self.calls.append(f"{name} at {caller.f_code.co_filename.split('/stages/')[1]}:{caller.f_lineno}")
        return func(*args, **(kwargs or {}))


def count_syncs_per_minibatch(monkeypatch) -> list[list[str]]:
    """Each PPO minibatch's host syncs (`HostSyncs`), one list per `train_minibatch` call, filled as PPO runs."""
    per_minibatch: list[list[str]] = []
    original = ppo_update.train_minibatch

    def counted(*args, **kwargs):
        with HostSyncs() as syncs:
            values = original(*args, **kwargs)
        per_minibatch.append(syncs.calls)
        return values

    monkeypatch.setattr(ppo_update, "train_minibatch", counted)
    return per_minibatch


@pytest.mark.parametrize("case", list(CASES))
def test_a_ppo_minibatch_makes_at_most_one_host_sync(tiny_prepare, tiny_reward_model, tmp_path, monkeypatch, case):
    per_minibatch = count_syncs_per_minibatch(monkeypatch)
    keys, peft = CASES[case]
    run_ppo(tiny_prepare, tiny_reward_model, tmp_path, keys, peft)
    assert len(per_minibatch) == 2 * 2 * 4  # updates x epochs x minibatches
    assert max(len(calls) for calls in per_minibatch) == 1, per_minibatch[0]


def test_the_host_sync_guard_sees_a_stray_item(tiny_prepare, tiny_reward_model, tmp_path, monkeypatch):
    """The guard can fail: a statistic read with `.item()` from code under stages/ is a second sync."""
    per_minibatch = count_syncs_per_minibatch(monkeypatch)
    monkeypatch.setattr(pm, "masked_mean", _stray_item_masked_mean(pm.masked_mean))
    run_ppo(tiny_prepare, tiny_reward_model, tmp_path, {"updates": 1}, PeftConfig("full"))
    assert min(len(calls) for calls in per_minibatch) >= 2


STRAY = """
def wrap(f):
    def g(*a, **k):
        out = f(*a, **k)
        out.item()  # a second sync
        return out
    return g
"""


def _stray_item_masked_mean(original):
    """masked_mean, reading its value on the host from a module under stages/ (as a careless edit would)."""
    import importlib.util
    import pathlib
    import tempfile

    folder = pathlib.Path(tempfile.mkdtemp()) / "stages"
    folder.mkdir()
    source = folder / "stray.py"
    source.write_text(STRAY)
    spec = importlib.util.spec_from_file_location("stray_stage_code", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.wrap(original)


def test_fused_ema_matches_the_per_parameter_update():
    ema = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([4.0]), "step": torch.tensor(3)}
    params = {"w": torch.tensor([3.0, 0.0]), "b": torch.tensor([0.0]), "step": torch.tensor(4)}
    pm.ema_update(ema, params, decay=0.75)
    assert torch.allclose(ema["w"], torch.tensor([1.5, 1.5]))  # 0.75 * 1 + 0.25 * 3; 0.75 * 2 + 0
    assert torch.allclose(ema["b"], torch.tensor([3.0]))
    assert ema["step"].item() == 4  # not floating: copied


@pytest.mark.parametrize("mode", ["zero2", "zero3", "zero3_offload"])
def test_deepspeed_configs_have_bf16_and_torch_autocast_sections(mode):
    import yaml
    from conftest import ROOT

    ds = yaml.safe_load((ROOT / "conf" / "distributed" / f"{mode}.yaml").read_text())["deepspeed"]
    assert ds["bf16"] == {"enabled": "auto"} and ds["torch_autocast"] == {"enabled": "auto"}


def test_engine_precision_turns_torch_autocast_on_in_the_compute_dtype():
    ds = {"zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"}, "torch_autocast": {"enabled": "auto"}}
    bf16 = engine_precision(ds, "bf16")
    assert bf16["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert bf16["bf16"] == {"enabled": False}  # fp32 master weights: autocast computes, as outside DeepSpeed
    assert engine_precision(ds, "fp32")["torch_autocast"] == {"enabled": False}
    cfg = DistributedConfig(mode="zero3", nproc_per_node=2, deepspeed=ds)
    trainer = trainer_args(cfg, 8, "stage.sft.batch_size", "cpu")["deepspeed"]
    assert "torch_autocast" not in trainer and trainer["bf16"] == {"enabled": "auto"}  # the trainer fills it


def test_nccl_only_for_ranks_on_cuda(monkeypatch):
    cfg = DistributedConfig(mode="ddp", nproc_per_node=2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cfg.resolved_backend("cpu") == "gloo"  # a GPU machine, ranks on the CPU
    assert cfg.resolved_backend("auto") == "nccl"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cfg.resolved_backend("auto") == "gloo"


def test_more_ranks_than_gpus_is_refused_naming_the_key():
    from stages.models.compute import check_ranks

    with pytest.raises(ValueError, match=r"distributed.nproc_per_node=4: this machine has 2 CUDA device"):
        check_ranks("auto", 4, gpus=2)
    check_ranks("auto", 2, gpus=2)
    check_ranks("cpu", 4, gpus=2)  # ranks on the CPU: no GPU each
    check_ranks("auto", 4, gpus=0)  # no GPU: auto is the CPU


def test_a_cuda_device_turns_tf32_on_for_what_stays_in_fp32():
    from stages.models.compute import pick_device

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        assert pick_device("cpu", gpus=1).type == "cpu" and not torch.backends.cuda.matmul.allow_tf32
        assert pick_device("auto", gpus=1).type == "cuda"  # no CUDA call is made: the device is named only
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_vllm_runs_in_process_with_the_rendezvous_a_launcher_would_give():
    """vLLM's V1 engine keeps `llm_engine.model_executor` (what the weight sync writes into) only with
    `external_launcher`, which reads a launcher's env: one rank gets it here, a launched rank keeps its own.
    (On a copy: a rendezvous left in this process's environment would make later runs join a group.)"""
    from stages.rl.rollout import _launcher_env

    env = {"RANK": "3"}
    _launcher_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"], env["LOCAL_RANK"]) == ("3", "1", "127.0.0.1", "0")
    assert 0 < int(env["MASTER_PORT"]) < 65536


def test_dynamic_sampling_refills_tied_groups_up_to_its_bound_in_the_stage(tiny_prepare, tmp_path):
    """An exact-match reward the tiny policy never earns: every group ties at 0, so each update spends
    its whole bound of refills and says so; training still runs on a full batch."""
    import json

    from stages.data import arithmetic

    train, _ = arithmetic.split(0)
    prompts = tmp_path / "arithmetic.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in arithmetic.make_prompts(64, 0, train)))
    rows: list[dict] = []
    cfg = ppo.PpoConfig(updates=2, rollouts_per_update=16, minibatch_size=8, advantage="grpo", samples_per_prompt=4,
                        kl_penalty="loss", dynamic_sampling=True, max_refills=2,
                        reward_function="stages.rl.rewards:arithmetic_exact_match")  # fmt: skip
    with tracking.metrics_sink(lambda m, step: rows.append(m) if "ppo/objective/kl" in m else None):
        m = ppo.run(cfg, Tuning(PeftConfig("full"), compute=ComputeConfig(device="cpu")),
                    policy=tiny_prepare.file("base"), prompts=prompts, out_dir=tmp_path / "out")  # fmt: skip
    assert [r["ppo/dynamic/refills"] for r in rows] == [2.0, 2.0]
    assert all(r["ppo/dynamic/uninformative_share"] == 1.0 for r in rows)
    assert m.metrics["ppo/updates"] == 2.0
