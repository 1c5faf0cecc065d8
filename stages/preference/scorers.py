"""Scorers of responses: a trained reward model read the way it was trained (`TrainedRewardModel`,
`normalization.json`), its pairwise accuracy on ranking rows, and DPO's implicit reward
beta * (log pi(y|x) - log pi_ref(y|x)) with its held-out pairwise accuracy."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from stages.data.tokens import Budget, pack
from stages.models.compute import amp, compute_dtype, model_device
from stages.models.modeling import load_scalar_model, sequence_logprobs, sequence_scores
from stages.preference.rankings import encode_rankings, pair_agreement
from stages.settings.models import POOLINGS


@dataclass(frozen=True)
class Normalization:
    """How PPO reads a trained reward model: `score(x, y) = pooled head - bias`."""

    bias: float
    pooling: str = "last"
    max_prompt_length: int | None = None  # the limits it was trained with: consumers cut rows the same way
    max_length: int | None = None

    def budget(self) -> Budget | None:
        if self.max_prompt_length is None or self.max_length is None:
            return None
        return Budget(self.max_prompt_length, self.max_length)


def score_encoded(
    model, encoded: list[tuple[list[int], list[list[int]]]], pad_id: int, pooling: str
) -> list[torch.Tensor]:
    """Per row a (K,) tensor of scores; every response of the batch in one jointly padded pass, on the
    model's device."""
    flat = [(p, r) for p, responses in encoded for r in responses]
    scores = sequence_scores(model, pack(flat, pad_id, model_device(model)), pooling)
    return list(scores.split([len(responses) for _, responses in encoded]))


def score_rows(
    model, tokenizer, rows: list[dict], pooling: str = "last", budget: Budget | None = None
) -> list[torch.Tensor]:
    """Per row a (K,) tensor of reward scores, one forward pass per response; K may vary by row.
    With `budget`, long rows are cut as in training (prompt keeps its end)."""
    encoded = encode_rankings(tokenizer, rows)
    if budget is not None:
        encoded = [budget.fit_row(p, rs) for p, rs in encoded]
    return score_encoded(model, encoded, tokenizer.pad_token_id, pooling)


@torch.no_grad()
def pairwise_accuracy(
    model, tokenizer, rows: list[dict], pooling: str = "last", batch: int = 64, budget: Budget | None = None
) -> float:
    return pairwise_accuracy_by_k(model, tokenizer, rows, pooling, batch, budget)["all"]


@torch.no_grad()
def pairwise_accuracy_by_k(
    model, tokenizer, rows: list[dict], pooling: str = "last", batch: int = 64, budget: Budget | None = None
) -> dict[str, float]:
    """Fraction of (winner, loser) pairs scored in the right order (ties half), overall and by K."""
    counts = pairwise_counts(model, tokenizer, rows, pooling, batch, budget)
    return {key: hits / pairs for key, (hits, pairs) in counts.items()}


@torch.no_grad()
def pairwise_counts(
    model, tokenizer, rows: list[dict], pooling: str = "last", batch: int = 64, budget: Budget | None = None
) -> dict[str, tuple[float, int]]:
    """(hits, pairs) of (winner, loser) pairs scored in the right order (ties half), overall ("all")
    and by K ("k2", "k4", ...): what an accuracy's confidence interval needs."""
    correct: dict[str, float] = {}
    total: dict[str, int] = {}
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        scores = score_rows(model, tokenizer, chunk, pooling, budget)
        for s, row in zip(scores, chunk):
            hits, pairs = pair_agreement(s, row["ranks"])
            for key in ("all", f"k{len(row['responses'])}"):
                correct[key] = correct.get(key, 0.0) + hits
                total[key] = total.get(key, 0) + pairs
    return {key: (correct[key], total[key]) for key in total if total[key]}


class TrainedRewardModel:
    """A trained reward model read the way it was trained: its pooling and token limits, less the bias
    that centres the SFT samples' scores (`normalization.json`). PPO and evaluate both score with it."""

    def __init__(self, model_dir: Path, normalization: Path, device=None, precision: str = "fp32") -> None:
        dtype = compute_dtype(precision)
        self.model = load_scalar_model(model_dir, device=device, dtype=dtype).eval().requires_grad_(False)
        self.norm = load_normalization(normalization)
        self.precision = precision

    @torch.no_grad()
    def score(self, batch) -> torch.Tensor:
        """(batch,) normalised scores of sampled rollouts or packed rows, in fp32 (the head's island)."""
        with amp(model_device(self.model), self.precision):
            return sequence_scores(self.model, batch, self.norm.pooling).float() - self.norm.bias

    def accuracy(self, tokenizer, rows: list[dict]) -> float:
        """Pairwise accuracy on ranking rows, cut to the limits it was trained with."""
        return pairwise_accuracy(self.model, tokenizer, rows, self.norm.pooling, budget=self.norm.budget())

    def counts(self, tokenizer, rows: list[dict]) -> tuple[float, int]:
        """(hits, pairs) on ranking rows, cut to the limits it was trained with; (0, 0) without rows."""
        if not rows:
            return 0.0, 0
        counts = pairwise_counts(self.model, tokenizer, rows, self.norm.pooling, budget=self.norm.budget())
        return counts.get("all", (0.0, 0))


def load_normalization(path: Path) -> Normalization:
    """Reads `normalization.json`; a file from before pooling was recorded means last-token pooling."""
    raw = json.loads(Path(path).read_text())
    if not isinstance(raw, dict) or "bias" not in raw:
        raise ValueError(f'{path}: bias: missing (expected {{"bias": float, "pooling": str}})')
    pooling = raw.get("pooling", "last")
    if pooling not in POOLINGS:
        raise ValueError(f"{path}: pooling: {pooling!r} is not one of {', '.join(POOLINGS)}")
    return Normalization(
        bias=float(raw["bias"]),
        pooling=pooling,
        max_prompt_length=raw.get("max_prompt_length"),
        max_length=raw.get("max_length"),
    )


@torch.no_grad()
def implicit_reward_accuracy(model, ref, pad_id: int, pairs: list[dict], batch: int = 128) -> float:
    """How often the implicit reward ranks the held-out chosen response above the rejected one."""
    hits = []
    for start in range(0, len(pairs), batch):
        chunk = pairs[start : start + batch]
        rows = [(p["prompt_ids"], p["chosen_ids"]) for p in chunk] + [
            (p["prompt_ids"], p["rejected_ids"]) for p in chunk
        ]
        packed = pack(rows, pad_id, model_device(model))
        margin = sequence_logprobs(model, packed) - sequence_logprobs(ref, packed).to(packed.ids.device)
        c, r = margin.split(len(chunk))
        hits += ((c > r).float() + 0.5 * (c == r).float()).tolist()
    return sum(hits) / max(1, len(hits))
