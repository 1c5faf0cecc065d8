"""SFT stage: supervised fine-tuning on demonstrations with TRL's SFTTrainer (InstructGPT step 1).

Demonstrations are `{"messages": [...]}` rows (the data worker's schema); the loss is on the final
assistant turn only, earlier turns are context rendered with the chat template, and the response
ends with EOS. A demonstration of tool use trains on every assistant turn after the last user turn,
its tool calls included, and on none of the tool results between them (`stages/data/tool_calls.py`).
Rows are tokenized here, by `stages/data/tokens.py` (the ids every later stage samples and scores),
cut to `max_prompt_length` / `max_length` (the counts go to the metrics), and handed to trl
pre-tokenized. With an adapter method (`peft/`) the adapter is saved as `adapter/` and merged
into the base, so the SFT policy is a plain model folder (safetensors) plus the tokenizer and chat
template that every later stage reuses.

Image-text demonstrations (a VLM, `stages/data/images.py`): each row's image tensors go into the
dataset as columns of their own and a collator around trl's stacks them beside the padded ids.

Alone: `python -m flows.align pipeline.stop_after=sft`.
"""

from __future__ import annotations

from pathlib import Path

from stages.data.images import row_vision
from stages.data.tokens import fit_rows, prompt_ids, resolve_budget, response_ids, row_sources
from stages.data.tool_calls import has_tool_turns, split_conversation, tool_format
from stages.models.modeling import load_tokenizer, model_context, save_tokenizer
from stages.models.tuning import export, load, trainer_setup
from stages.runtime import checkpoints
from stages.runtime import process_group as dist
from stages.runtime.manifest import Manifest, folder_digest, read_jsonl
from stages.runtime.tracking import TRAINER_ARGS, log_metrics, trainer_callback
from stages.settings.distributed import DistributedConfig
from stages.settings.models import Tuning
from stages.settings.recipe import SftConfig, chosen_learning_rate


def encode_demonstration(tokenizer, messages: list[dict]) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, response ids + EOS, trained): the context and the final assistant turn, all trained;
    with tool use, the context up to the last user turn and the tool-using turns as one response whose
    tool results are not trained (`trained` 0 there: `stages/data/tool_calls.py`)."""
    if not has_tool_turns(messages):
        response = response_ids(tokenizer, messages[-1]["content"])
        return prompt_ids(tokenizer, messages[:-1]), response, [1] * len(response)
    context, rest = split_conversation(messages)
    response, trained = [], []
    for ids, is_trained in tool_format(tokenizer).segments(context, rest):
        response += ids
        trained += [int(is_trained)] * len(ids)
    return prompt_ids(tokenizer, context), [*response, tokenizer.eos_token_id], [*trained, 1]


def encode_demonstrations(tokenizer, rows: list[dict]) -> list[tuple[list[int], list[list[int]]]]:
    """(prompt ids, [response ids + EOS]) per demonstration (`encode_demonstration`)."""
    return [(p, [r]) for p, r, _ in (encode_demonstration(tokenizer, row["messages"]) for row in rows)]


def token_columns(encoded: list[tuple[list[int], list[int], list[int]]], fitted) -> dict[str, list[list[int]]]:
    """trl's columns for the rows `fitted` kept of `encoded` (`encode_demonstration`'s): the ids, and the
    completion mask, 1 where the loss is (trl makes the other labels -100)."""
    return {
        "input_ids": [list(p) + r[0] for p, r in fitted.rows],
        "completion_mask": [[0] * len(p) + encoded[i][2][: len(r[0])] for i, (p, r) in zip(fitted.kept, fitted.rows)],
    }


class _VisionCollator:
    """trl's padding collator, plus each row's image tensors concatenated along dim 0."""

    def __init__(self, pad_token_id: int, keys: list[str]) -> None:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        self.text, self.keys = DataCollatorForLanguageModeling(pad_token_id=pad_token_id), keys

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        batch = self.text([{k: v for k, v in e.items() if k not in self.keys} for e in examples])
        for k in self.keys:
            batch[k] = torch.cat([torch.as_tensor(e[k], device="cpu") for e in examples], dim=0)  # the trainer moves it
        return batch


def run(
    cfg: SftConfig,
    tuning: Tuning,
    *,
    base: Path,
    demonstrations: Path,
    out_dir: Path,
    truncation: bool = True,
    max_dropped_fraction: float = 0.0,
    checkpoint_dir: Path | None = None,
    distributed: DistributedConfig | None = None,
) -> Manifest:
    """`checkpoint_dir`: trl's checkpoints go there, and a killed attempt's last complete one is resumed.
    `distributed`: this process is one rank of a group (`stages/runtime/process_group.py`); the global batch
    stays `batch_size`, and trl runs under DDP or DeepSpeed ZeRO (its checkpoints in DeepSpeed's format)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    out_dir = Path(out_dir)
    tokenizer = load_tokenizer(base)
    budget = resolve_budget("sft", cfg.max_prompt_length, cfg.max_length, model_context(base))
    rows = read_jsonl(demonstrations)
    encoded = [encode_demonstration(tokenizer, row["messages"]) for row in rows]
    fitted = fit_rows(
        [(p, [r]) for p, r, _ in encoded],
        budget,
        stage="sft",
        truncation=truncation,
        max_dropped_fraction=max_dropped_fraction,
        sources=row_sources(rows, demonstrations),
    )
    counts = fitted.metrics("sft/data")
    log_metrics(counts)
    from transformers import set_seed

    set_seed(cfg.seed)  # what trl does before it creates adapters: the same initial LoRA weights
    model = load(base, tuning, "causal_lm")
    columns = token_columns(encoded, fitted)
    vision = [row_vision(p) for p, _ in fitted.rows]
    keys = sorted(vision[0]) if vision and vision[0] else []
    if keys and not all(vision):
        raise ValueError(f"{demonstrations}: SFT rows with and without images in one run; keep one kind per file")
    for k in keys:
        columns[k] = [v[k].tolist() for v in vision]
    dataset = Dataset.from_dict(columns)
    tokens = sum(len(ids) for ids in dataset["input_ids"])
    saving = checkpoints.trainer_saving(checkpoint_dir, cfg.checkpoint_every)
    lr = chosen_learning_rate("sft", cfg.learning_rate, tuning.peft.method)
    train_args, trainer_kwargs = trainer_setup(model, tuning, lr=lr)
    args = SFTConfig(
        num_train_epochs=cfg.epochs,
        learning_rate=lr,
        max_length=budget.max_length,
        warmup_steps=cfg.warmup_ratio,
        completion_only_loss=True,
        train_sampling_strategy=cfg.sampling,  # rows of similar length batched together: less padding
        seed=cfg.seed,
        **dist.trainer_args(distributed, cfg.batch_size, "stage.sft.batch_size", tuning.compute.device),
        **{**TRAINER_ARGS, "output_dir": str(out_dir / "trainer"), **saving, **train_args},
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[trainer_callback("sft/train")],
        **({"data_collator": _VisionCollator(tokenizer.pad_token_id, keys)} if keys else {}),
        **trainer_kwargs,
    )
    if keys:  # trl keeps only the text columns by default
        trainer._signature_columns = ["input_ids", "labels", "seq_lengths", *keys]
    resume = checkpoints.last_trainer_checkpoint(checkpoint_dir)
    result = trainer.train(resume_from_checkpoint=resume)
    checkpoints.check_finite("sft", result.training_loss, trainer.state.global_step)
    policy = out_dir / "policy"
    adapter = out_dir / "adapter" if tuning.peft.adapters else None
    with dist.gathered(trainer.model, distributed):  # ZeRO-3: the full weights, on every rank
        if dist.is_main():
            export(trainer.model, tuning, policy, base=base, adapter=adapter)
            save_tokenizer(tokenizer, policy)
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
            "sft/tokens": float(tokens * cfg.epochs),
            "sft/rows": float(len(fitted.rows)),
            "sft/steps": float(trainer.state.global_step),
            "sft/resumed_from": float(checkpoints.trainer_step(resume)),
            **counts,
        },
        files={"policy": "policy", **({"adapter": "adapter"} if adapter else {})},
    )
