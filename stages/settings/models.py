"""How a model is built and trained: `model.*`, `compute.*`, `optim.*`, `peft.*` and the `Tuning` that bundles
the last three for a training stage.

Configs are data: this module imports no torch, so composing and checking a config stays fast."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import ClassVar

from stages.runtime.rules import (
    COUNT,
    OFF_OR_COUNT,
    POSITIVE,
    Rule,
    at_least,
    between,
    check_fields,
    one_of,
)


@dataclass(frozen=True)
class ModelConfig:
    """`name_or_path` null builds the embedded tiny Llama from the sizes below."""

    name_or_path: str | None = None
    trust_remote_code: bool = False
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    max_position_embeddings: int = 64
    # The embedded base is pretrained briefly on unformatted task text (a stand-in for web text), so
    # that SFT, like SFT of a real LLM, adapts a model that already knows the language; LoRA on a
    # random-init base cannot learn the task.
    # 8,000 documents (about 25 s) rather than 3,000 (11 s): the better-read base lifts the RM from
    # 0.847 to 0.858 held-out accuracy (ceiling 0.887-0.889) and PPO from 1.38 to 1.43 gold.
    pretrain_documents: int = 8000
    pretrain_epochs: int = 4
    pretrain_learning_rate: float = 3e-3
    bpe_vocab_size: int = 4096  # own data without a model: the byte-level BPE tokenizer trained on it
    vision_hidden_size: int = 32  # data=embedded_vision: the tiny LLaVA's vision tower (stages/models/vision.py)

    RULES: ClassVar[dict[str, Rule]] = {
        "hidden_size": COUNT, "intermediate_size": COUNT, "num_hidden_layers": COUNT, "num_attention_heads": COUNT,
        "max_position_embeddings": at_least(8), "pretrain_documents": COUNT, "pretrain_epochs": OFF_OR_COUNT,
        "pretrain_learning_rate": POSITIVE, "bpe_vocab_size": at_least(64),
        "vision_hidden_size": COUNT,
    }  # fmt: skip


POOLINGS = ("last", "mean")


PRECISIONS = ("fp32", "bf16", "fp16")


ATTENTIONS = ("eager", "sdpa", "flash_attention_2")


KERNELS = ("none", "liger", "unsloth")


DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass(frozen=True)
class ComputeConfig:
    precision: str = "fp32"  # fp32 | bf16 | fp16 (CUDA)
    attention: str = "sdpa"  # eager | sdpa | flash_attention_2 (CUDA + flash-attn)
    s2_attention: bool = False  # LongLoRA's shifted sparse attention while training (Llama family)
    s2_group_ratio: float = 0.25  # LongLoRA's group: a quarter of the sequence
    kernels: str = "none"  # none | liger | unsloth (CUDA)
    device: str = "auto"  # auto (the GPU where there is one; under torchrun each rank its own) | cpu | cuda | cuda:N
    # recompute activations in backward: less memory, more compute (README: bench-peft)
    gradient_checkpointing: bool = False

    RULES: ClassVar[dict[str, Rule]] = {
        "s2_group_ratio": between(0, 1, low_open=True),
    }  # fmt: skip

    def __post_init__(self) -> None:
        check_fields(self, "compute.")
        if not DEVICE.fullmatch(self.device):
            raise ValueError(f"compute.device: {self.device!r} is not auto, cpu, cuda or cuda:N")
        for key, value, allowed in (
            ("precision", self.precision, PRECISIONS),
            ("attention", self.attention, ATTENTIONS),
            ("kernels", self.kernels, KERNELS),
        ):
            if value not in allowed:
                raise ValueError(f"compute.{key}: {value!r} is not one of {', '.join(allowed)}")
        if self.s2_attention and self.attention != "sdpa":
            raise ValueError("compute.s2_attention: replaces sdpa while training; set compute.attention=sdpa")


NAMES = ("adamw", "adamw_8bit", "galore", "badam")


SCHEDULES = ("cosine", "linear", "constant")


SWITCH_MODES = ("ascending", "descending", "random", "fixed")


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"
    scheduler: str = "cosine"  # after warmup, where the stage has one
    galore_rank: int = 16
    galore_update_proj_gap: int = 200
    galore_scale: float = 0.25
    galore_proj_type: str = "std"
    badam_switch_every: int = 50
    badam_switch_mode: str = "ascending"  # ascending | descending | random | fixed

    RULES: ClassVar[dict[str, Rule]] = {
        "galore_rank": COUNT, "galore_update_proj_gap": COUNT, "galore_scale": POSITIVE, "badam_switch_every": COUNT,
    }  # fmt: skip

    def __post_init__(self) -> None:
        if self.name not in NAMES:
            raise ValueError(f"optim.name: {self.name!r} is not one of {', '.join(NAMES)}")
        if self.scheduler not in SCHEDULES:
            raise ValueError(f"optim.scheduler: {self.scheduler!r} is not one of {', '.join(SCHEDULES)}")
        if self.badam_switch_mode not in SWITCH_MODES:
            raise ValueError(
                f"optim.badam_switch_mode: {self.badam_switch_mode!r} is not one of {', '.join(SWITCH_MODES)}"
            )
        check_fields(self, "optim.")


def check_optim(optim: OptimConfig, method: str) -> None:
    """Combinations refused before any model loads."""
    if optim.name == "badam" and method != "full":
        raise ValueError(
            f"optim.name=badam: block coordinate descent over full weights needs peft.method=full, not {method}"
        )
    if optim.name == "galore" and method not in ("full", "freeze"):
        raise ValueError(
            f"optim.name=galore: projects full weight gradients; needs peft.method=full or freeze, not {method}"
        )


# Houlsby adapters: where they sit and their nonlinearity (stages/models/houlsby.py builds them)
ADAPTER_PLACEMENTS = ("both", "attention", "mlp")
ADAPTER_ACTIVATIONS = ("gelu", "relu", "tanh", "silu")
METHODS = ("full", "freeze", "houlsby", "lora", "dora", "pissa", "loraplus", "qlora")


ADAPTERS = ("lora", "dora", "pissa", "loraplus", "qlora")  # peft LoRA-family adapters on a frozen base


QUANT_METHODS = ("bitsandbytes", "torchao", "quanto")  # qlora's quantised base


TRAINING_STAGES = ("sft", "reward_model", "ppo", "dpo")


@dataclass(frozen=True)
class PeftConfig:
    """`modules_to_save` trains those modules in full next to the adapters (the embedded default's
    random-init base needs its embeddings and head trainable in some experiments)."""

    method: str = "lora"
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    modules_to_save: list[str] = field(default_factory=list)
    rslora: bool = False  # rsLoRA: scale by alpha / sqrt(r) (Kalajdzievski 2023)
    freeze_layers: int = 1  # freeze: how many of the last decoder layers train
    freeze_modules: list[str] = field(default_factory=list)  # freeze: modules that also train, e.g. lm_head
    loraplus_ratio: float = 16.0  # loraplus: lr(B) / lr(A) (the paper's default)
    pissa_niter: int = 4  # pissa: fast-SVD iterations; 0: exact SVD
    quant_bits: int = 4  # qlora: 4 (NF4, double quantisation) or 8
    quant_method: str = "bitsandbytes"  # qlora: bitsandbytes | torchao | quanto
    adapter_size: int = 16  # houlsby: the bottleneck's width
    adapter_placement: str = "both"  # houlsby: after attention, mlp, or both (the paper)
    adapter_activation: str = "gelu"  # houlsby: gelu | relu | tanh | silu
    adapter_train_norms: bool = False  # houlsby: the layer norms train too (the paper does)
    stages: list[str] = field(default_factory=lambda: list(TRAINING_STAGES))

    RULES: ClassVar[dict[str, Rule]] = {
        "r": COUNT, "alpha": POSITIVE, "dropout": between(0, 1, high_open=True), "freeze_layers": OFF_OR_COUNT,
        "loraplus_ratio": POSITIVE, "pissa_niter": OFF_OR_COUNT, "quant_bits": one_of(4, 8),
        "adapter_size": COUNT,
    }  # fmt: skip

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"peft.method: {self.method!r} is not one of {', '.join(METHODS)}")
        check_fields(self, "peft.")
        if self.quant_method not in QUANT_METHODS:
            raise ValueError(f"peft.quant_method: {self.quant_method!r} is not one of {', '.join(QUANT_METHODS)}")
        if self.adapter_placement not in ADAPTER_PLACEMENTS:
            raise ValueError(f"peft.adapter_placement: {self.adapter_placement!r} is not one of {ADAPTER_PLACEMENTS}")
        if self.adapter_activation not in ADAPTER_ACTIVATIONS:
            raise ValueError(
                f"peft.adapter_activation: {self.adapter_activation!r} is not one of {', '.join(ADAPTER_ACTIVATIONS)}"
            )
        unknown = [s for s in self.stages if s not in TRAINING_STAGES]
        if unknown:
            raise ValueError(f"peft.stages: {unknown[0]!r} is not one of {', '.join(TRAINING_STAGES)}")

    def for_stage(self, stage: str) -> PeftConfig:
        """The method `stage` trains with: this one, or `full` where `stages` leaves it out."""
        if stage in self.stages or self.method == "full":
            return self
        return PeftConfig(method="full")  # canonical: the stage's cache key is full fine-tuning's

    @property
    def adapters(self) -> bool:
        return self.method in ADAPTERS


@dataclass(frozen=True)
class Tuning:
    peft: PeftConfig = field(default_factory=PeftConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)

    def for_stage(self, stage: str) -> Tuning:
        """What `stage` trains with: the method where `peft.stages` names it, else full fine-tuning;
        the optimizer and compute as configured."""
        peft = self.peft.for_stage(stage)
        return dataclasses.replace(self, peft=peft)


def shared_base_refusal(method: str) -> str:
    return (
        "stage.ppo.layout=shared_base: the reference is the base with the adapters off, so it needs an adapter "
        f"method that leaves the base as it was (peft=lora, dora, loraplus, qlora), not {method}"
    )


def shares_base(tuning: Tuning) -> bool:
    """Whether the model with its adapters disabled is the model it started from: a free reference.
    Not for PiSSA, whose base keeps only the residual of the principal directions."""
    return tuning.peft.adapters and tuning.peft.method != "pissa"
