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

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from stages.manifest import Manifest, folder_digest, read_jsonl
from stages.modeling import POOLINGS, encode_rollout, load_scalar_model, load_tokenizer, sequence_scores
from stages.tracking import log_metrics


@dataclass(frozen=True)
class RewardModelConfig:
    epochs: int = 1  # InstructGPT trains its RM for a single epoch (overfits beyond)
    learning_rate: float = 9e-6  # InstructGPT's 6B RM
    batch_prompts: int = 16  # prompts per step; each carries its K responses
    weight_decay: float = 0.0
    margin: float = 0.0  # optional margin in the pairwise loss (Llama 2); 0 is InstructGPT's loss
    pooling: str = "last"  # where the score is read: last token (InstructGPT) | mean over the response
    targets: str = "hard"  # hard: ranks (InstructGPT) | soft: the AI labeler's P(i > j) (RLAIF distillation)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"stage.reward_model.pooling: {self.pooling!r} is not one of {', '.join(POOLINGS)}")
        if self.targets not in ("hard", "soft"):
            raise ValueError(f"stage.reward_model.targets: {self.targets!r} is not 'hard' or 'soft'")
        if self.epochs < 1 or self.batch_prompts < 1:
            raise ValueError("stage.reward_model: epochs and batch_prompts must be >= 1")


@dataclass(frozen=True)
class Normalization:
    """How PPO reads a trained reward model: `score(x, y) = pooled head - bias`."""

    bias: float
    pooling: str = "last"


def ranking_pairs(ranks: list[int]) -> list[tuple[int, int]]:
    """All (winner, loser) index pairs implied by ranks (0 = best); tied responses give no pair."""
    k = len(ranks)
    return [(i, j) for i in range(k) for j in range(k) if ranks[i] < ranks[j]]


def ranking_loss(scores, pairs: list[list[tuple[int, int]]], margin: float = 0.0) -> torch.Tensor:
    """Mean over prompts of the per-prompt mean pairwise loss `-log sigmoid(r_w - r_l - margin)`.

    scores: per prompt a (K_b,) tensor of rewards (or one (num_prompts, K) tensor); pairs[b]: the
    (winner, loser) indices of prompt b. A prompt whose responses all tie has no pair and does not count.
    """
    losses = []
    for b, prompt_pairs in enumerate(pairs):
        if not prompt_pairs:
            continue
        w = torch.tensor([p[0] for p in prompt_pairs])
        l = torch.tensor([p[1] for p in prompt_pairs])
        losses.append(-F.logsigmoid(scores[b][w] - scores[b][l] - margin).mean())
    return torch.stack(losses).mean() if losses else sum(s.sum() for s in scores) * 0.0


def soft_preference_loss(scores, prefs: list[list[list[float]]]) -> torch.Tensor:
    """Mean over prompts of the per-prompt mean over pairs i < j of the cross-entropy between the soft
    target p_ij and sigmoid(r_i - r_j). scores[b]: (K_b,) rewards; prefs[b]: (K_b, K_b) P(i > j)."""
    losses = []
    for s, p in zip(scores, prefs):
        k = len(p)
        i, j = torch.triu_indices(k, k, offset=1)
        target = torch.tensor(p, dtype=s.dtype)[i, j]
        d = s[i] - s[j]
        losses.append(-(target * F.logsigmoid(d) + (1 - target) * F.logsigmoid(-d)).mean())
    return torch.stack(losses).mean()


def score_rows(model, tokenizer, rows: list[dict], pooling: str = "last") -> list[torch.Tensor]:
    """Per row a (K,) tensor of reward scores, one forward pass per response; K may vary by row."""
    rollout = encode_rollout(
        tokenizer,
        [r["prompt"] for r in rows for _ in r["responses"]],
        [y for r in rows for y in r["responses"]],
        [f for r in rows for f in r["finished"]],
    )
    return list(sequence_scores(model, rollout, pooling).split([len(r["responses"]) for r in rows]))


@torch.no_grad()
def pairwise_accuracy(model, tokenizer, rows: list[dict], pooling: str = "last", batch: int = 64) -> float:
    return pairwise_accuracy_by_k(model, tokenizer, rows, pooling, batch)["all"]


def pair_agreement(scores, ranks: list[int]) -> tuple[float, int]:
    """(hits, pairs): how many (winner, loser) pairs of `ranks` the scores order right, ties half."""
    hits = [float(scores[w] > scores[l]) + 0.5 * float(scores[w] == scores[l]) for w, l in ranking_pairs(ranks)]
    return sum(hits), len(hits)


@torch.no_grad()
def pairwise_accuracy_by_k(
    model, tokenizer, rows: list[dict], pooling: str = "last", batch: int = 64
) -> dict[str, float]:
    """Fraction of (winner, loser) pairs scored in the right order (ties half), overall and by K."""
    correct: dict[str, float] = {}
    total: dict[str, int] = {}
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        scores = score_rows(model, tokenizer, chunk, pooling)
        for s, row in zip(scores, chunk):
            hits, pairs = pair_agreement(s, row["ranks"])
            for key in ("all", f"k{len(row['responses'])}"):
                correct[key] = correct.get(key, 0.0) + hits
                total[key] = total.get(key, 0) + pairs
    return {key: correct[key] / total[key] for key in total}


def run(cfg: RewardModelConfig, *, policy: Path, comparisons: Path, heldout: Path, out_dir: Path) -> Manifest:
    out_dir = Path(out_dir)
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
    model = load_scalar_model(policy)
    model.config.pad_token_id = tokenizer.pad_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(rows) / cfg.batch_prompts)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    model.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(rows), generator=gen).tolist()
        for start in range(0, len(order), cfg.batch_prompts):
            batch = [rows[i] for i in order[start : start + cfg.batch_prompts]]
            scores = score_rows(model, tokenizer, batch, cfg.pooling)
            if cfg.targets == "soft":
                loss = soft_preference_loss(scores, [r["prefs"] for r in batch])
            else:
                loss = ranking_loss(scores, [ranking_pairs(r["ranks"]) for r in batch], cfg.margin)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 10 == 0:
                log_metrics({"rm/train/loss": loss.item(), "rm/train/lr": sched.get_last_lr()[0]}, step=step)
        log_metrics({"rm/eval/accuracy": pairwise_accuracy(model, tokenizer, held, cfg.pooling)}, step=step)
    model.eval()
    with torch.no_grad():  # 3. normalise: the SFT samples' mean reward becomes zero
        bias = torch.cat(
            [s for i in range(0, len(rows), 64) for s in score_rows(model, tokenizer, rows[i : i + 64], cfg.pooling)]
        ).mean()
    metrics = {
        "rm/train/loss_last": loss.item(),
        "rm/train/accuracy": pairwise_accuracy(model, tokenizer, rows, cfg.pooling),
        **{
            f"rm/eval/accuracy{'' if k == 'all' else '_' + k}": v
            for k, v in pairwise_accuracy_by_k(model, tokenizer, held, cfg.pooling).items()
        },
        "rm/bias": bias.item(),
    }
    model.save_pretrained(out_dir / "model", safe_serialization=True)
    tokenizer.save_pretrained(out_dir / "model")
    normalization = Normalization(bias=bias.item(), pooling=cfg.pooling)
    (out_dir / "normalization.json").write_text(json.dumps(dataclasses.asdict(normalization)))
    return Manifest(
        stage="reward_model",
        path=str(out_dir),
        digest=folder_digest(out_dir),
        metrics=metrics,
        files={"model": "model", "normalization": "normalization.json"},
    )


def load_normalization(path: Path) -> Normalization:
    """Reads `normalization.json`; a file from before pooling was recorded means last-token pooling."""
    raw = json.loads(Path(path).read_text())
    if not isinstance(raw, dict) or "bias" not in raw:
        raise ValueError(f'{path}: bias: missing (expected {{"bias": float, "pooling": str}})')
    pooling = raw.get("pooling", "last")
    if pooling not in POOLINGS:
        raise ValueError(f"{path}: pooling: {pooling!r} is not one of {', '.join(POOLINGS)}")
    return Normalization(bias=float(raw["bias"]), pooling=pooling)
