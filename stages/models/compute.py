"""Precision, attention and kernels of the training stages (config group `compute/`).

- `precision`: `fp32` (the default), `bf16` (autocast; CPUs with bf16 support and GPUs), `fp16`
  (CUDA only). TRL's configs default to `bf16=True` even on CPU: `trainer_flags` sets both flags.
- `attention`: `eager`, `sdpa` (the default) or `flash_attention_2` (CUDA and the flash-attn package).
- `s2_attention`: LongLoRA's shifted sparse attention (Chen et al. 2024) while training a
  Llama-family model: the sequence splits into groups of `s2_group_ratio` of its length, attention
  stays inside a group, and half the heads see groups shifted by half a group so information flows
  between neighbours. Evaluation and sampling use full attention, as in LongLoRA.
- `kernels`: `liger` (Liger's fused Triton kernels, patched into the loaded model), a CUDA-only
  accelerator. `unsloth` is refused: it loads models through its own `FastLanguageModel`, which
  alignflow does not wire yet.
- `device`: the one device decision, `auto | cpu | cuda | cuda:N`. `auto` is the accelerator where
  there is one (under torchrun each rank its own `LOCAL_RANK` GPU), else the CPU. Every stage loads
  its models onto `resolve_device(compute)` and makes its tensors on the device of the model they feed.
- `gradient_checkpointing`: recompute activations in the backward pass instead of keeping them
  (every training stage; the KV cache is off while training and on while sampling).

What this machine cannot run is refused by `check` before any model loads, naming the requirement.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

from stages.settings.models import ComputeConfig

S2 = "s2_attention"  # the name it is registered under in transformers' AttentionInterface


def _have(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def check(compute: ComputeConfig, *, cuda: bool | None = None) -> None:
    """Refuse, before any model loads, what this machine cannot run."""
    check_device(compute.device, gpus=None if cuda is None else int(cuda))
    cuda = resolve_device(compute, gpus=None if cuda is None else int(cuda)).type == "cuda"
    if compute.precision == "fp16" and not cuda:
        raise ValueError("compute.precision=fp16 needs CUDA (no CUDA device here); use fp32 or bf16")
    if compute.precision == "bf16" and not cuda and not _cpu_bf16():
        raise ValueError("compute.precision=bf16 needs a GPU or a CPU with bf16 support; use fp32")
    if compute.attention == "flash_attention_2" and not (cuda and _have("flash_attn")):
        raise ValueError("compute.attention=flash_attention_2 needs CUDA and the flash-attn package; use sdpa")
    if compute.kernels == "liger" and not (cuda and _have("liger_kernel")):
        raise ValueError("compute.kernels=liger needs CUDA and the liger-kernel package (Triton kernels)")
    if compute.kernels == "unsloth":
        if not (cuda and _have("unsloth")):
            raise ValueError("compute.kernels=unsloth needs CUDA and the unsloth package")
        raise ValueError(  # its FastLanguageModel replaces from_pretrained: not wired, and no silent no-op
            "compute.kernels=unsloth: alignflow does not load models through unsloth yet; use kernels=liger"
        )


def check_ranks(device: str, nproc_per_node: int, *, gpus: int | None = None) -> None:
    """One rank per GPU: a group on CUDA cannot have more ranks on a node than the node has GPUs."""
    gpus = torch.cuda.device_count() if gpus is None else gpus
    if pick_device(device, gpus=gpus).type == "cuda" and nproc_per_node > gpus:
        raise ValueError(
            f"distributed.nproc_per_node={nproc_per_node}: this machine has {gpus} CUDA device(s) and each rank "
            f"takes one; set distributed.nproc_per_node<={gpus}, or compute.device=cpu for ranks on the CPU"
        )


def check_device(device: str, *, gpus: int | None = None) -> None:
    """Refuse a device this machine does not have, naming the key."""
    gpus = torch.cuda.device_count() if gpus is None else gpus
    if device.startswith("cuda") and gpus == 0:
        raise ValueError(f"compute.device={device}: this machine has no CUDA device; use compute.device=cpu or auto")
    if device.startswith("cuda:") and int(device.split(":")[1]) >= gpus:
        raise ValueError(
            f"compute.device={device}: this machine has {gpus} CUDA device(s) (cuda:0..cuda:{gpus - 1}); "
            "set compute.device to one of them, or auto"
        )


def resolve_device(compute: ComputeConfig, *, gpus: int | None = None) -> torch.device:
    """The device a stage runs on: `compute.device` (`pick_device`)."""
    return pick_device(compute.device, gpus=gpus)


def pick_device(name: str, *, gpus: int | None = None) -> torch.device:
    """`auto` is the GPU where there is one (under a launcher each rank its own, `LOCAL_RANK`), else
    the CPU; `cuda` is this rank's GPU; `cpu` and `cuda:N` are themselves."""
    gpus = torch.cuda.device_count() if gpus is None else gpus
    if name == "cpu" or (name == "auto" and gpus == 0):
        return torch.device("cpu")
    allow_tf32()
    if name in ("cuda", "auto"):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def allow_tf32() -> None:
    """On a GPU, what is left in fp32 (the fp32 islands, `compute.precision=fp32` runs) multiplies in TF32
    (Ampere and later: 10-bit mantissa products, fp32 accumulation), as PyTorch's own guidance advises."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def model_device(model) -> torch.device:
    """Where a model's weights are: the device its inputs must be on."""
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def _cpu_bf16() -> bool:
    try:
        torch.ones(2, dtype=torch.bfloat16, device="cpu") @ torch.ones(2, dtype=torch.bfloat16, device="cpu")
        return True
    except RuntimeError:
        return False


def load_kwargs(compute: ComputeConfig, *, training: bool) -> dict:
    """`from_pretrained` arguments: the attention implementation (S2 only for a model that trains)."""
    if training and compute.s2_attention:
        register_s2(compute.s2_group_ratio)
        return {"attn_implementation": S2}
    return {"attn_implementation": compute.attention}


def trainer_flags(compute: ComputeConfig) -> dict:
    """transformers' precision flags, both explicit (TRL turns bf16 on by default), the device (the
    trainer places the model: on the CPU, or the GPU of `resolve_device`, under torchrun each rank's
    own) and gradient checkpointing (non-reentrant: adapters on a frozen base need no input grads)."""
    device = resolve_device(compute)
    if device.type == "cuda" and device.index:
        torch.cuda.set_device(device)  # the trainer's "cuda" is the current device
    return {
        "bf16": compute.precision == "bf16",
        "fp16": compute.precision == "fp16",
        "use_cpu": device.type == "cpu",
        "gradient_checkpointing": compute.gradient_checkpointing,
        "gradient_checkpointing_kwargs": {"use_reentrant": False} if compute.gradient_checkpointing else None,
    }


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype every forward on the device computes in (`compute.precision`); frozen models (reference,
    reward model, judge, samplers) are loaded in it, trained ones keep fp32 master weights."""
    return DTYPES[precision]


def autocast(compute: ComputeConfig):
    """Mixed precision for the loops of our own (reward model, PPO, listwise DPO, the judge): autocast on
    the stage's device, fp32 master weights (fp16 needs `grad_scaler` too)."""
    return amp(resolve_device(compute), compute.precision)


def amp(device, precision: str):
    """Autocast to `precision` on `device` (a no-op for fp32): every forward of a stage runs under it,
    sampling and scoring as well as training, so old and new log-probs are computed alike. The fp32
    islands are named where they are: losses, log-softmax statistics and the value and reward heads."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=compute_dtype(precision))


def grad_scaler(compute: ComputeConfig) -> torch.amp.GradScaler:
    """fp16's loss scaling (bf16 and fp32 need none: the scaler is then a pass-through)."""
    return torch.amp.GradScaler(resolve_device(compute).type, enabled=compute.precision == "fp16")


def checkpointing(model, compute: ComputeConfig):
    """Gradient checkpointing on a model our loops train (`compute.gradient_checkpointing`): activations
    recomputed in backward, the KV cache off while training (sampling turns it on per call)."""
    if compute.gradient_checkpointing and getattr(model, "supports_gradient_checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def apply_kernels(model, compute: ComputeConfig):
    """Liger's fused kernels patched into a loaded model (CUDA; `check` refused them elsewhere)."""
    if compute.kernels == "liger":
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model)
    return model


_ratio = {"value": 0.25}


def register_s2(ratio: float) -> None:
    from transformers import AttentionInterface

    _ratio["value"] = ratio
    AttentionInterface.register(S2, s2_attention_forward)


def _block_mask(mask: torch.Tensor, group: int) -> torch.Tensor:
    """(b, 1, n, n) bool -> (b, n/group, group, group): the blocks on the diagonal."""
    b, _, n, _ = mask.shape
    g = n // group
    blocks = mask.reshape(b, g, group, g, group)
    idx = torch.arange(g, device=mask.device)
    return blocks[:, idx, :, idx, :].permute(1, 0, 2, 3)


def s2_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Shifted sparse attention while training; full (sdpa) attention otherwise.

    query: (b, h, n, d); key, value: (b, h_kv, n, d); attention_mask: None (causal) or (b, 1, n, n),
    bool (True: attend) or additive. Returns (b, n, h, d) and no weights, as transformers expects."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not module.training:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    b, h, n, d = query.shape
    if key.shape[1] != h:  # grouped-query attention: one key/value head per group of query heads
        key = key.repeat_interleave(h // key.shape[1], dim=1)
        value = value.repeat_interleave(h // value.shape[1], dim=1)
    group = max(1, int(n * _ratio["value"]))
    pad = (-n) % group
    if attention_mask is None:
        mask = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()[None, None].expand(b, 1, n, n)
    elif attention_mask.dtype == torch.bool:
        mask = attention_mask[:, :, :, :n].expand(b, 1, n, n)
    else:
        mask = attention_mask[:, :, :, :n].expand(b, 1, n, n) == 0
    if pad:
        query, key, value = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (query, key, value))
        mask = torch.nn.functional.pad(mask, (0, pad, 0, pad), value=False)
    m = n + pad
    mask = mask | torch.eye(m, dtype=torch.bool, device=mask.device)  # no row masked out entirely
    half, shift = h // 2, group // 2
    masks = [_block_mask(mask, group), _block_mask(mask.roll((-shift, -shift), dims=(2, 3)), group)]
    outs = []
    for heads, (lo, hi, s) in enumerate(((0, h - half, 0), (h - half, h, shift))):
        if hi == lo:  # one head: nothing shifted
            continue
        q, k, v = (t[:, lo:hi].roll(-s, dims=2) for t in (query, key, value))
        q, k, v = (t.reshape(b, hi - lo, m // group, group, d).transpose(1, 2) for t in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=masks[heads][:, :, None], dropout_p=dropout if module.training else 0.0, scale=scaling
        )
        outs.append(o.transpose(1, 2).reshape(b, hi - lo, m, d).roll(s, dims=2))
    out = torch.cat(outs, dim=1)[:, :, :n]
    return out.transpose(1, 2).contiguous(), None
