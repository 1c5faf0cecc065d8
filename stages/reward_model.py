"""Reward-model stage: a scalar head on the SFT model, trained on K-way rankings (InstructGPT step 2).

All C(K,2) pairs of one prompt form a single batch element (one forward pass per response):

    loss = -1/C(K,2) * sum_{(w, l)} log sigmoid(r(x, y_w) - r(x, y_l))

With `targets: soft` (RLAIF, Lee et al. 2023) the model is distilled on the AI labeler's soft
preferences p_ij = P(y_i > y_j) instead, by cross-entropy against the soft targets:

    loss = -1/C(K,2) * sum_{i<j} [p_ij log sigmoid(r_i - r_j) + (1 - p_ij) log sigmoid(r_j - r_i)]

The score is read at the last token (InstructGPT) or, with `pooling: mean`, averaged over the
response tokens. After training the scores are normalised: `normalization.json` stores the bias that
makes the mean reward over the SFT samples zero, so PPO receives normalised rewards (InstructGPT
section 3.5), and the pooling, so every consumer scores the way the model was trained.

Alone: `python -m flows.align pipeline.stop_after=reward_model`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from stages.data.tokens import (
    fit_rows,
    length_buckets,
    pack,
    resolve_budget,
    row_sources,
)
from stages.models.compute import autocast, grad_scaler, model_device
from stages.models.modeling import load_tokenizer, model_context, save_tokenizer, sequence_scores
from stages.models.optim import schedule
from stages.models.tuning import export, load, optimizer
from stages.preference.losses import ranking_loss, soft_preference_loss
from stages.preference.rankings import encode_rankings, ranking_pairs
from stages.preference.scorers import Normalization, pairwise_accuracy, pairwise_counts, score_encoded
from stages.preference.validity import wilson
from stages.runtime import process_group as dist
from stages.runtime.manifest import Manifest, folder_digest, read_jsonl
from stages.runtime.process_group import Engine
from stages.runtime.tracking import log_metrics
from stages.runtime.training import TrainingLoop
from stages.settings.distributed import DistributedConfig
from stages.settings.models import PeftConfig, Tuning
from stages.settings.recipe import RewardModelConfig, chosen_learning_rate


def _initial_model(cfg: RewardModelConfig, policy: Path, tokenizer, tuning: Tuning, partitioned: bool):
    """The SFT policy with a scalar head, or `cfg.name_or_path`'s model when its vocabulary agrees;
    the fine-tuning method applied. Returns (model, the folder it started from)."""
    source = policy if cfg.name_or_path is None else cfg.name_or_path
    if cfg.name_or_path is not None:
        own = load_tokenizer(cfg.name_or_path).get_vocab()
        ours = tokenizer.get_vocab()
        differ = [t for t, i in own.items() if ours.get(t, i) != i]
        if differ:
            raise ValueError(
                f"stage.reward_model.name_or_path: {cfg.name_or_path}'s tokenizer gives other ids than the policy's "
                f"(e.g. {differ[0]!r}); the reward model scores the policy's token ids, so it needs the same vocabulary"
            )

    def adjust(model) -> None:
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:  # the policy's added role markers
            model.resize_token_embeddings(len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id

    return load(source, tuning, "scalar", adjust, partitioned=partitioned), source


def run(
    cfg: RewardModelConfig,
    tuning: Tuning | None = None,
    *,
    policy: Path,
    comparisons: Path,
    heldout: Path,
    out_dir: Path,
    truncation: bool = True,
    max_dropped_fraction: float = 0.0,
    checkpoint_dir: Path | None = None,
    distributed: DistributedConfig | None = None,
) -> Manifest:
    """`policy`: the model the reward model starts from (the SFT policy, or `name_or_path`'s model
    prepared on the policy's tokenizer); `checkpoint_dir`: where a killed attempt left its checkpoint.
    `distributed`: this process is one rank of a group; each step's `batch_prompts` prompts are
    split across the ranks (the global batch is unchanged) and the gradients averaged (DDP or ZeRO).
    Evaluation and the bias run whole on every rank (under ZeRO-3 every forward is collective)."""
    out_dir = Path(out_dir)
    tuning = tuning or Tuning(peft=PeftConfig(method="full"))
    rows, held = read_jsonl(comparisons), read_jsonl(heldout)
    if cfg.targets == "soft":
        missing = next((n for n, r in enumerate(rows, 1) if "prefs" not in r), None)
        if missing is not None:
            raise ValueError(
                f"{comparisons}:{missing}: prefs: missing; stage.reward_model.targets=soft distils soft preferences, "
                "which the AI labeler writes (labeler=ai)"
            )
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(policy)
    context = min(model_context(policy), model_context(cfg.name_or_path) if cfg.name_or_path else math.inf)
    budget = resolve_budget("reward_model", cfg.max_prompt_length, cfg.max_length, int(context))
    fitted = fit_rows(
        encode_rankings(tokenizer, rows),
        budget,
        stage="reward_model",
        truncation=truncation,
        max_dropped_fraction=max_dropped_fraction,
        sources=row_sources(rows, comparisons),
    )
    rows = [rows[i] for i in fitted.kept]
    encoded = fitted.rows
    lengths = [sum(len(p) + len(r) for r in rs) for p, rs in encoded]
    log_metrics(fitted.metrics("rm/data"))
    partitioned = dist.partitioned(distributed)
    model, source = _initial_model(cfg, policy, tokenizer, tuning, partitioned)
    lr = chosen_learning_rate("reward_model", cfg.learning_rate, tuning.peft.method)
    opt = optimizer(model, tuning, lr=lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(rows) / cfg.batch_prompts)
    sched = schedule(opt, tuning.optim, cfg.epochs * steps_per_epoch)
    engine = Engine(
        _Scores(model, cfg.pooling),
        opt,
        distributed,
        micro_batch=max(1, cfg.batch_prompts // dist.world_size()),
        scaler=grad_scaler(tuning.compute),
        precision=tuning.compute.precision,
    )
    loop = TrainingLoop("reward_model", engine, steps=cfg.epochs * steps_per_epoch, seed=cfg.seed, sched=sched,
                        checkpoint_dir=checkpoint_dir, checkpoint_every=cfg.checkpoint_every,
                        hint=f" (now {lr}), or look for degenerate rows in {comparisons}")  # fmt: skip
    loop.extra = {"tokens": 0}
    loop.resume()  # a killed attempt's last checkpoint: carry on from its step
    model.train()
    t0 = time.perf_counter()
    tail = _train(cfg, loop, engine, tokenizer, rows, encoded, lengths, held, budget, tuning)
    train_seconds = time.perf_counter() - t0
    metrics = _measures(cfg, loop, model, tokenizer, rows, encoded, held, budget, tuning) | {
        "rm/train/loss_tail": sum(tail) / len(tail) if tail else loop.at["loss"],  # the last 10% of steps: less noisy
        "rm/train/seconds": train_seconds,  # the training loop alone (per-step time: over rm/steps - rm/resumed_from)
        **fitted.metrics("rm/data"),
    }
    adapter = out_dir / "adapter" if tuning.peft.adapters else None
    normalization = Normalization(
        bias=metrics["rm/bias"],
        pooling=cfg.pooling,
        max_prompt_length=budget.max_prompt_length,
        max_length=budget.max_length,
    )
    with dist.gathered(model, distributed):  # ZeRO-3: the full weights, on every rank
        if dist.is_main():
            export(
                model,
                tuning,
                out_dir / "model",
                base=Path(source),
                adapter=adapter,
                kind="scalar",
                partitioned=partitioned,
            )
            save_tokenizer(tokenizer, out_dir / "model")
            (out_dir / "normalization.json").write_text(json.dumps(dataclasses.asdict(normalization)))
    return Manifest(
        stage="reward_model",
        path=str(out_dir),
        digest=folder_digest(out_dir),
        metrics=metrics,
        files={"model": "model", "normalization": "normalization.json", **({"adapter": "adapter"} if adapter else {})},
    )


def _measures(cfg: RewardModelConfig, loop: TrainingLoop, model, tokenizer, rows, encoded, held, budget, tuning):
    """The trained model's figures: its bias (3. normalise: the SFT samples' mean reward becomes zero),
    train and held-out pairwise accuracy with the latter's 95% CI (the gate before PPO reads it)."""
    model.eval()
    pad = tokenizer.pad_token_id
    with torch.no_grad(), autocast(tuning.compute):
        bias = torch.cat(
            [s for i in range(0, len(encoded), 64) for s in score_encoded(model, encoded[i : i + 64], pad, cfg.pooling)]
        ).mean()
        held_counts = pairwise_counts(model, tokenizer, held, cfg.pooling, budget=budget)
        train_accuracy = pairwise_accuracy(model, tokenizer, rows, cfg.pooling, budget=budget)
    hits, pairs = held_counts.get("all", (0.0, 0))
    return {
        "rm/train/loss_last": loop.at["loss"],
        "rm/train/accuracy": train_accuracy,
        **{f"rm/eval/accuracy{'' if k == 'all' else '_' + k}": h / n for k, (h, n) in held_counts.items()},
        "rm/eval/pairs": float(pairs),
        "rm/eval/ci95_low": wilson(hits, pairs)[0],
        "rm/eval/ci95_high": wilson(hits, pairs)[1],
        "rm/bias": bias.item(),
        "rm/tokens": float(loop.extra["tokens"]),
        "rm/steps": float(loop.step_index),
        "rm/resumed_from": float(loop.resumed_from),
    }


class _Scores(torch.nn.Module):
    """The reward model as the module the engine trains: packed rows -> (rows,) pooled scores."""

    def __init__(self, model, pooling: str) -> None:
        super().__init__()
        self.model, self.pooling = model, pooling

    def forward(self, packed) -> torch.Tensor:
        return sequence_scores(self.model, packed, self.pooling)


def _train(cfg: RewardModelConfig, loop: TrainingLoop, engine: Engine, tokenizer, rows, encoded, lengths, held, budget,
           tuning: Tuning) -> collections.deque:  # fmt: skip
    """The epochs: each step's prompts split across the ranks, each prompt with all its K responses in one
    batch element (InstructGPT); the held-out accuracy after each epoch. Returns the last tenth of the
    steps' losses."""
    pad, device = tokenizer.pad_token_id, model_device(engine.base)  # DeepSpeed has placed the partitions
    tail: collections.deque = collections.deque(maxlen=max(1, loop.steps // 10))
    for batches in loop.passes(lambda gen: list(length_buckets(lengths, cfg.batch_prompts, gen))):
        for idx in batches:  # rows of similar length pad little
            mine = idx[dist.share(len(idx))] or idx[:1]  # a rank without a share still steps (weight 0)
            weight = 1.0 if idx[dist.share(len(idx))] else 0.0
            batch = [rows[i] for i in mine]
            with autocast(tuning.compute):
                flat = [(p, r) for i in mine for p, rs in [encoded[i]] for r in rs]
                scores = list(engine(pack(flat, pad, device)).float().split([len(encoded[i][1]) for i in mine]))
            loop.extra["tokens"] += sum(lengths[i] for i in idx)
            if cfg.targets == "soft":
                loss = soft_preference_loss(scores, [r["prefs"] for r in batch])
            else:
                loss = ranking_loss(scores, [ranking_pairs(r["ranks"]) for r in batch], cfg.margin)
            local = [loss.item() * weight * len(mine), weight * len(mine)]
            shared = dist.all_reduce_sum(torch.tensor(local, device="cpu"))
            tail.append(loop.step(loss, reported=(shared[0] / shared[1]).item(), weight=weight))  # the global mean
        with autocast(tuning.compute):  # every forward in the compute dtype, evaluation as training
            held_accuracy = pairwise_accuracy(engine.base.model, tokenizer, held, cfg.pooling, budget=budget)
        log_metrics({"rm/eval/accuracy": held_accuracy}, step=loop.step_index)
    return tail
