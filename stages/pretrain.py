"""Stage 0 (optional): continued pretraining on raw text (`data.pretrain`), before SFT.

Every document of the text file (plain text, JSONL or Parquet with a `text` column; the data
worker reads and validates it) is tokenised with the base's tokenizer, followed by EOS, and the
stream is packed into blocks of `max_length` tokens (the model's context window by default), the
tail shorter than a block dropped: causal-LM loss on every token, as LLaMA-Factory's `pt` stage
and GPT-style pretraining do. Trains through the same door as every stage (`stages/models/tuning.py`:
`peft/`, `optim/`, `compute/`), and writes `policy/`, the base SFT starts from.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch

from stages.data.reader import load as load_rows
from stages.models.compute import autocast, grad_scaler
from stages.models.modeling import load_tokenizer, model_context, save_tokenizer
from stages.models.tuning import export, load, optimizer
from stages.runtime.errors import NonFiniteStop
from stages.runtime.manifest import Manifest, folder_digest
from stages.runtime.progress import progress
from stages.runtime.tracking import log_metrics
from stages.settings.data import DatasetConfig
from stages.settings.models import Tuning
from stages.settings.recipe import PretrainConfig, chosen_learning_rate


def pack(documents: list[list[int]], eos: int, block: int) -> list[list[int]]:
    """Documents joined with EOS after each, cut into blocks of `block` tokens; a shorter tail is dropped."""
    stream = [t for doc in documents for t in (*doc, eos)]
    return [stream[i : i + block] for i in range(0, len(stream) - block + 1, block)]


def run(cfg: PretrainConfig, tuning: Tuning, *, base: Path, text: Path, out_dir: Path) -> Manifest:
    out_dir = Path(out_dir)
    tokenizer = load_tokenizer(base)
    block = cfg.max_length or model_context(base)
    rows = load_rows(DatasetConfig(path=str(text), kind="text")).rows[: cfg.max_documents]
    ids = tokenizer([r["text"] for r in rows], add_special_tokens=False)["input_ids"]
    blocks = pack(ids, tokenizer.eos_token_id, block)
    if not blocks:
        raise ValueError(
            f"data.pretrain: {text}: {sum(map(len, ids))} tokens do not fill one block of "
            f"stage.pretrain.max_length={block}"
        )
    torch.manual_seed(cfg.seed)
    model = load(base, tuning, "causal_lm")
    opt = optimizer(
        model, tuning, lr=chosen_learning_rate("pretrain", cfg.learning_rate, tuning.peft.method), weight_decay=0.0
    )
    steps = max(1, math.ceil(cfg.epochs * len(blocks) / cfg.batch_size))
    warmup = int(cfg.warmup_ratio * steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (warmup + 1)))
    order = random.Random(cfg.seed)
    device = next(model.parameters()).device
    scaler = grad_scaler(tuning.compute)
    losses: list[float] = []
    model.train()
    bar = progress(steps, "pretrain: training", unit="step")
    queue: list[list[int]] = []
    for _ in range(steps):
        if len(queue) < cfg.batch_size:
            refill = list(blocks)
            order.shuffle(refill)
            queue += refill
        batch = torch.tensor(queue[: cfg.batch_size], device=device)
        del queue[: cfg.batch_size]
        with autocast(tuning.compute):  # mixed precision (`compute.precision`); fp32 master weights
            loss = model(input_ids=batch, labels=batch).loss.float()
        losses.append(loss.item())  # the step's one host sync: the loss is checked before it is applied
        if not math.isfinite(losses[-1]):
            raise NonFiniteStop(
                f"pretrain: non-finite loss at step {len(losses) - 1}; lower stage.pretrain.learning_rate"
            )
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)  # clip the true gradients (fp16's scaler; a pass-through otherwise)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        schedule.step()
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    bar.close()
    model.eval()
    policy = out_dir / "policy"
    export(model, tuning, policy, base=base)
    save_tokenizer(tokenizer, policy)
    metrics = {
        "pretrain/documents": float(len(rows)),
        "pretrain/tokens": float(len(blocks) * block),
        "pretrain/blocks": float(len(blocks)),
        "pretrain/steps": float(steps),
        "pretrain/loss_first": losses[0],
        "pretrain/loss_last": losses[-1],
    }
    log_metrics(metrics)
    return Manifest(stage="pretrain", path=str(out_dir), digest=folder_digest(out_dir), metrics=metrics,
                    files={"policy": "policy"})  # fmt: skip
