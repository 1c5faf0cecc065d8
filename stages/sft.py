"""SFT stage: supervised fine-tuning on demonstrations with TRL's SFTTrainer (InstructGPT step 1).

Demonstrations are `{"messages": [...]}` rows (the data worker's schema); the loss is on the final
assistant turn only (prompt-completion data), earlier turns are context rendered with the chat
template, and the response ends with EOS. With LoRA the adapters are merged before saving, so the SFT
artifact is a plain model folder (safetensors) plus the tokenizer and chat template that every later
stage reuses.

Alone: `python -m flows.align pipeline.stop_after=sft`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stages.manifest import Manifest, folder_digest, read_jsonl
from stages.modeling import load_causal_lm, load_tokenizer
from stages.peft_setup import PeftConfig, lora_config
from stages.tracking import TRAINER_ARGS, trainer_callback


@dataclass(frozen=True)
class SftConfig:
    epochs: float = 8.0  # a tiny random-init model needs several passes to tie response to prompt
    learning_rate: float = 3e-3
    batch_size: int = 32
    max_length: int = 64
    warmup_ratio: float = 0.03  # a float below 1 is a fraction of the steps (transformers 5)
    seed: int = 0


def run(cfg: SftConfig, peft: PeftConfig, *, base: Path, demonstrations: Path, out_dir: Path) -> Manifest:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    out_dir = Path(out_dir)
    tokenizer = load_tokenizer(base)
    model = load_causal_lm(base)
    rows = read_jsonl(demonstrations)
    prompts = [
        tokenizer.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True) for r in rows
    ]
    completions = [" " + r["messages"][-1]["content"] for r in rows]
    dataset = Dataset.from_dict({"prompt": prompts, "completion": completions})
    args = SFTConfig(
        output_dir=str(out_dir / "trainer"),
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        warmup_steps=cfg.warmup_ratio,
        lr_scheduler_type="cosine",
        completion_only_loss=True,
        seed=cfg.seed,
        **TRAINER_ARGS,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(peft, "CAUSAL_LM"),
        callbacks=[trainer_callback("sft/train")],
    )
    result = trainer.train()
    trained = trainer.model
    if peft.method != "full":
        trained = trained.merge_and_unload()
    policy = out_dir / "policy"
    trained.save_pretrained(policy, safe_serialization=True)
    tokenizer.save_pretrained(policy)
    # fewer steps than logging_steps log no loss: the run's mean loss stands in for both ends
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h] or [result.training_loss]
    return Manifest(
        stage="sft",
        path=str(out_dir),
        digest=folder_digest(out_dir),
        metrics={
            "sft/train/loss_first": losses[0],
            "sft/train/loss_last": losses[-1],
            "sft/train/runtime": result.metrics["train_runtime"],
        },
        files={"policy": "policy"},
    )
