"""Precision, attention and kernel choices: what this machine cannot run is refused before any model
loads with the requirement named, and S2-attention matches attention computed by hand."""

import pytest
import torch

from flows.config import Config
from stages.models import compute
from stages.settings.models import ComputeConfig, OptimConfig, PeftConfig

GPU_ONLY = [
    (ComputeConfig(precision="fp16"), r"fp16 needs CUDA"),
    (ComputeConfig(attention="flash_attention_2"), r"flash_attention_2 needs CUDA and the flash-attn package"),
    (ComputeConfig(kernels="liger"), r"liger needs CUDA and the liger-kernel package"),
    (ComputeConfig(kernels="unsloth"), r"unsloth needs CUDA and the unsloth package"),
]


@pytest.mark.parametrize(("cfg", "message"), GPU_ONLY, ids=["fp16", "flash_attention_2", "liger", "unsloth"])
def test_gpu_only_options_are_refused_without_cuda(cfg, message):
    with pytest.raises(ValueError, match=message):
        compute.check(cfg, cuda=False)


def test_unsloth_is_refused_even_with_cuda_rather_than_ignored():
    with pytest.raises(ValueError, match=r"unsloth"):
        compute.check(ComputeConfig(kernels="unsloth"), cuda=True)


def test_trl_bf16_default_is_overridden_both_ways():
    cpu = not torch.cuda.is_available()  # trainers train on the GPU where there is one
    off = {"gradient_checkpointing": False, "gradient_checkpointing_kwargs": None}
    assert compute.trainer_flags(ComputeConfig()) == {"bf16": False, "fp16": False, "use_cpu": cpu, **off}
    bf16 = compute.trainer_flags(ComputeConfig(precision="bf16"))
    assert bf16 == {"bf16": True, "fp16": False, "use_cpu": cpu, **off}


def test_cpu_options_pass():
    compute.check(ComputeConfig(), cuda=False)
    compute.check(ComputeConfig(attention="eager", s2_attention=False), cuda=False)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["compute.attention=flash_attention_2"], "compute.attention=flash_attention_2 needs CUDA and the flash-attn"),
        (["peft=qlora", "peft.quant_method=torchao", "peft.quant_bits=4"], "LoRA on torchao accepts int8 weights only"),
    ],
    ids=["flash-attention", "torchao-int4"],
)
def test_the_command_line_refuses_a_gpu_option_before_any_model_loads(tmp_path, overrides, message, monkeypatch):
    import subprocess
    import sys
    from pathlib import Path

    from conftest import refusal_in_process

    if "peft=qlora" in overrides:  # in this process: the same checks; the console is checked once below
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
        line = refusal_in_process(f"artifacts_dir={tmp_path}", *overrides)
        assert line.startswith("error: ") and message in line
        assert not any(tmp_path.iterdir())
        return
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "flows.align", f"artifacts_dir={tmp_path}", *overrides],
        cwd=root,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""},
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "error: " in proc.stderr and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("prepare/*/manifest.json"))  # nothing computed


def test_bad_values_and_combinations_name_their_key():
    with pytest.raises(ValueError, match=r"compute.precision: 'fp8' is not one of fp32, bf16, fp16"):
        ComputeConfig(precision="fp8")
    with pytest.raises(ValueError, match=r"optim.name: 'sgd' is not one of"):
        OptimConfig(name="sgd")
    with pytest.raises(ValueError, match=r"peft.method: 'ia3' is not one of"):
        PeftConfig(method="ia3")
    with pytest.raises(
        ValueError, match=r"optim.name=badam: .* needs peft.method=full, not lora \(peft.stages includes sft\)"
    ):
        Config(peft=PeftConfig(method="lora", stages=["sft"]), optim=OptimConfig(name="badam"))
    with pytest.raises(ValueError, match=r"optim.name=galore: .* needs peft.method=full or freeze, not dora"):
        Config(peft=PeftConfig(method="dora"), optim=OptimConfig(name="galore"))


class _Attn(torch.nn.Module):
    num_key_value_groups = 1
    is_causal = True


def _causal(q, k, v, mask):
    """Attention by hand: softmax(q k^T / sqrt(d) + mask) v, (b, h, n, d) -> (b, n, h, d)."""
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


def test_s2_attention_with_one_group_is_full_attention():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 8, 16) for _ in range(3))
    compute.register_s2(1.0)
    out, _ = compute.s2_attention_forward(_Attn().train(), q, k, v, None)
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    assert torch.allclose(out, _causal(q, k, v, causal), atol=1e-5)


def test_s2_attention_keeps_groups_and_shifts_half_the_heads():
    """n = 8, groups of 4: heads 0-1 attend within positions 0-3 and 4-7; heads 2-3 within groups
    shifted by 2 (2-5, and 6,7 with 0,1 wrapped), each token still only seeing its past."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 4, 8, 16) for _ in range(3))
    compute.register_s2(0.5)
    out, _ = compute.s2_attention_forward(_Attn().train(), q, k, v, None)
    pos = torch.arange(8)
    past = pos[:, None] >= pos[None, :]
    plain = past & ((pos[:, None] // 4) == (pos[None, :] // 4))
    shifted_group = ((pos - 2) % 8) // 4
    shifted = past & (shifted_group[:, None] == shifted_group[None, :])
    want = torch.cat([_causal(q[:, :2], k[:, :2], v[:, :2], plain), _causal(q[:, 2:], k[:, 2:], v[:, 2:], shifted)], 2)
    assert torch.allclose(out, want, atol=1e-5)
    assert torch.allclose(out[0, 2, 2:], v[0, 2:, 2])  # position 2 opens a shifted group: it sees only itself


def test_s2_attention_is_full_attention_outside_training():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    compute.register_s2(0.25)
    out, _ = compute.s2_attention_forward(_Attn().eval(), q, k, v, None, is_causal=True)
    ref, _ = sdpa_attention_forward(_Attn().eval(), q, k, v, None, is_causal=True)
    assert torch.allclose(out, ref, atol=1e-6)
