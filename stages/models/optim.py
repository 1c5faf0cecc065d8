"""The optimizer and learning-rate schedule of every training stage (config group `optim/`). The
trl-based stages (SFT, DPO) hand the same optimizer to their trainer as the stages with loops of our
own (reward model, PPO, listwise DPO) build for themselves.

- `adamw`: torch's AdamW.
- `adamw_8bit`: bitsandbytes' 8-bit AdamW (Dettmers et al. 2022): the two moments in 8 bits.
- `galore` (Zhao et al. 2024, galore-torch): AdamW whose moments live in a rank-`galore_rank`
  projection of each 2-D decoder weight's gradient, the projection refreshed every
  `galore_update_proj_gap` steps; other weights take plain AdamW.
- `badam` (Luo et al. 2024, the `badam` package): block coordinate descent, Adam on one decoder
  layer at a time, the block switched every `badam_switch_every` steps (`badam_switch_mode`); a
  scalar head stays active throughout. A full-parameter method: it refuses adapters.

`peft.method=loraplus` builds its optimizer through peft's `create_loraplus_optimizer` on top of
`adamw` or `adamw_8bit`.
"""

from __future__ import annotations

import math
import warnings

import torch

from stages.settings.models import OptimConfig
from stages.settings.models import check_optim as check


def _adam_class(optim: OptimConfig):
    if optim.name == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit
    return torch.optim.AdamW


def galore_targets(model) -> list[str]:
    """The 2-D weights of the decoder layers' linear maps: what GaLore projects."""
    return [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and p.dim() == 2 and ".layers." in n and ("self_attn" in n or "mlp" in n)
    ]


def build(model, optim: OptimConfig, peft, *, lr: float, weight_decay: float = 0.0, eps: float = 1e-8, extra=()):
    """The optimizer over `model`'s trainable weights (and `extra` parameters, e.g. a separate value
    head), as `optim` and the fine-tuning method `peft` (a `PeftConfig`) say."""
    method = peft.method
    check(optim, method)
    extra = [p for p in extra if p.requires_grad]
    if method == "loraplus":
        from peft.optimizers import create_loraplus_optimizer

        opt = create_loraplus_optimizer(
            model, _adam_class(optim), lr=lr, loraplus_lr_ratio=peft.loraplus_ratio, weight_decay=weight_decay, eps=eps
        )
        if extra:
            opt.add_param_group({"params": extra, "lr": lr, "weight_decay": weight_decay})
        return opt
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if optim.name == "galore":
        from galore_torch import GaLoreAdamW

        targets = set(galore_targets(model))
        projected = [p for n, p in named if n in targets]
        rest = [p for n, p in named if n not in targets] + extra
        groups = [
            {"params": rest},
            {
                "params": projected,
                "rank": optim.galore_rank,
                "update_proj_gap": optim.galore_update_proj_gap,
                "scale": optim.galore_scale,
                "proj_type": optim.galore_proj_type,
            },
        ]
        return GaLoreAdamW(groups, lr=lr, weight_decay=weight_decay, eps=eps)
    if optim.name == "badam":
        from badam import BlockOptimizer

        base = torch.optim.AdamW([p for _, p in named] + extra, lr=lr, weight_decay=weight_decay, eps=eps)
        heads = ["score"] if any(n.startswith("score.") for n, _ in named) else []
        with warnings.catch_warnings():  # "BAdam expects fp16/bf16 weights": fp32 is this machine's choice
            warnings.simplefilter("ignore")
            return BlockOptimizer(
                base_optimizer=base,
                named_parameters_list=named,
                switch_block_every=optim.badam_switch_every,
                switch_mode=optim.badam_switch_mode,
                active_modules=heads,
                verbose=0,
            )
    return _adam_class(optim)([p for _, p in named] + extra, lr=lr, weight_decay=weight_decay, eps=eps)


def schedule(opt, optim: OptimConfig, total_steps: int, warmup_steps: int = 0):
    """Linear warmup, then `optim.scheduler` down to zero over `total_steps`: torch's
    CosineAnnealingLR for cosine without warmup (what the loops used before `optim/`, to the last
    float), else a LambdaLR."""
    total = max(1, total_steps)
    if optim.scheduler == "cosine" and warmup_steps == 0:
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
        if optim.scheduler == "constant":
            return 1.0
        if optim.scheduler == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def state_bytes(opt) -> int:
    """Bytes the optimizer's state tensors hold (Adam's moments, GaLore's projections, 8-bit codes)."""
    inner = getattr(opt, "base_optimizer", opt)
    total = 0
    for state in inner.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
            elif hasattr(v, "ortho_matrix") and torch.is_tensor(v.ortho_matrix):  # GaLore's projector
                total += v.ortho_matrix.numel() * v.ortho_matrix.element_size()
    return total
