"""Parameter-efficient fine-tuning choices shared by the training stages (config group `peft/`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PeftConfig:
    """`method`: `full` trains every weight; `lora` trains low-rank adapters (Hu et al. 2021).

    `modules_to_save` trains those modules in full next to the adapters; the embedded default
    needs its embeddings and head trainable because its base model starts from random weights.
    """

    method: str = "lora"
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.method not in ("full", "lora"):
            raise ValueError(f"peft.method: {self.method!r} is not one of 'full', 'lora'")
        if self.method == "lora" and self.r <= 0:
            raise ValueError(f"peft.r: must be positive, got {self.r}")


def lora_config(cfg: PeftConfig, task_type: str):
    """The `peft.LoraConfig` for `cfg`, or None for full fine-tuning."""
    if cfg.method == "full":
        return None
    from peft import LoraConfig

    targets = cfg.target_modules[0] if cfg.target_modules == ["all-linear"] else list(cfg.target_modules)
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        modules_to_save=list(cfg.modules_to_save) or None,
        task_type=task_type,
    )
