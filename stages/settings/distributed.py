"""How a training stage spreads over processes (`distributed.*`): torch DDP or DeepSpeed ZeRO.

Configs are data: this module imports no torch, so composing and checking a config stays fast."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from stages.runtime.rules import (
    COUNT,
    Rule,
    between,
    check_fields,
)

MODES = ("single", "ddp", "zero2", "zero3", "zero3_offload")


ZERO_STAGE = {"zero2": 2, "zero3": 3, "zero3_offload": 3}


LAUNCHABLE = ("sft", "reward_model", "ppo", "dpo")  # the training stages; the others run in the flow's process


LAUNCHERS = ("torchrun", "deepspeed")


@dataclass(frozen=True)
class DistributedConfig:
    mode: str = "single"
    nproc_per_node: int = 1  # processes per node (one per GPU; on CPU, each gets the cores divided)
    nnodes: int = 1
    # torchrun: one node, the flow's; deepspeed: DeepSpeed's launcher reaches the nodes of `hostfile` (ssh/pdsh)
    launcher: str = "torchrun"
    hostfile: str | None = None
    master_addr: str = "127.0.0.1"
    master_port: int | None = None  # null: a free port
    backend: str = "auto"  # auto: nccl with CUDA, else gloo
    deepspeed: dict[str, Any] = field(default_factory=dict)  # the DeepSpeed config of the zero modes
    stages: list[str] = field(default_factory=lambda: list(LAUNCHABLE))  # which training stages launch

    RULES: ClassVar[dict[str, Rule]] = {
        "nproc_per_node": COUNT, "nnodes": COUNT, "master_port": between(1, 65535),
    }  # fmt: skip

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"distributed.mode: {self.mode!r} is not one of {', '.join(MODES)}")
        check_fields(self, "distributed.")
        if self.mode == "single" and self.world_size > 1:
            raise ValueError(
                f"distributed.mode=single runs one process; {self.world_size} asked: use distributed=ddp or zero2/zero3"
            )
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"distributed.launcher: {self.launcher!r} is not one of {', '.join(LAUNCHERS)}")
        if self.nnodes > 1 and (self.launcher != "deepspeed" or not self.hostfile):
            raise ValueError(
                "distributed.nnodes > 1: the flow reaches other nodes through DeepSpeed's launcher; set "
                "distributed.launcher=deepspeed and distributed.hostfile (see README, Scaling out)"
            )
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"distributed.backend: {self.backend!r} is not auto, gloo or nccl")
        unknown = sorted(set(self.stages) - set(LAUNCHABLE))
        if unknown:
            raise ValueError(f"distributed.stages: {unknown} are not training stages ({', '.join(LAUNCHABLE)})")
        if self.mode in ZERO_STAGE:
            stage = self.deepspeed.get("zero_optimization", {}).get("stage")
            if stage != ZERO_STAGE[self.mode]:
                raise ValueError(
                    f"distributed.deepspeed.zero_optimization.stage: {stage} does not match "
                    f"distributed.mode={self.mode} (ZeRO stage {ZERO_STAGE[self.mode]})"
                )
        elif self.deepspeed:
            raise ValueError(f"distributed.deepspeed: only the zero modes use it, not mode={self.mode}")

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def zero(self) -> int:
        """The ZeRO stage, 0 without DeepSpeed."""
        return ZERO_STAGE.get(self.mode, 0)

    def launches(self, stage: str) -> bool:
        """Whether `stage` runs as a process group under this config."""
        return self.mode != "single" and stage in self.stages

    def resolved_backend(self, device: str = "auto") -> str:
        """`backend`, or for auto: NCCL where the ranks run on CUDA devices (`compute.device` auto or
        cuda on a machine with GPUs), gloo on the CPU (even on a GPU machine with `compute.device=cpu`)."""
        if self.backend != "auto":
            return self.backend
        import torch

        return "nccl" if device != "cpu" and torch.cuda.is_available() else "gloo"


def refusal(cfg: DistributedConfig, stage: str, *, method: str, layout: str | None = None) -> str | None:
    """Why `stage` cannot run under `cfg` with fine-tuning `method`, or None."""
    if not cfg.launches(stage):
        return None
    if method == "qlora" and cfg.zero == 3:
        return (
            f"distributed.mode={cfg.mode}: {stage} with peft=qlora: bitsandbytes' 4-bit weights cannot be "
            "partitioned by ZeRO-3; use peft=lora (LoRA on a partitioned bf16 base), or zero2/ddp"
        )
    if method == "qlora":
        return f"distributed.mode={cfg.mode}: {stage} with peft=qlora (a 4-bit base) runs in one process; use peft=lora"
    if cfg.zero == 3 and method == "pissa":
        return (
            f"distributed.mode={cfg.mode}: {stage} with peft=pissa: its adapters start from an SVD of each whole "
            "weight, which ZeRO-3 holds partitioned across ranks; use peft=lora or dora, or zero2"
        )
    if stage == "ppo" and layout == "shared_base":
        return "distributed: stage.ppo.layout=shared_base runs in one process; use layout=full_copies"
    return None
