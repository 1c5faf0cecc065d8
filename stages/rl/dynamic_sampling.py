"""DAPO's dynamic sampling (Yu et al. 2025, `stage.ppo.dynamic_sampling`): a group of responses to one
prompt that all scored the same has zero advantage under every group estimator, so it carries no
signal. Such groups are dropped and replaced by groups sampled for the next prompts of the data
stream, for at most `max_refills` rounds; what is still uninformative then stays (a bound on the
extra sampling). The batch keeps its size, so minibatches and the loop are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from stages.models.modeling import Rollout
from stages.rl.rollout import merge


def informative(score: torch.Tensor, n: int, tol: float = 1e-6) -> list[bool]:
    """Per group of `n` consecutive responses: whether their scores differ (one host read)."""
    groups = score.view(-1, n)
    return ((groups.max(1).values - groups.min(1).values) > tol).tolist()


def fill(
    sample_scored: Callable[[list], tuple[Rollout, torch.Tensor]],
    next_prompts: Callable[[int], list],
    prompts: list,
    n: int,
    max_refills: int,
    pad: int,
) -> tuple[Rollout, torch.Tensor, list, dict[str, float]]:
    """Sample and score `prompts` (each prompt `n` times in a row), then replace uninformative groups
    up to `max_refills` times. Returns the rollout, its scores, its prompts and what it took."""
    rollout, score = sample_scored(prompts)
    first = informative(score, n)
    keep, refills = first, 0
    while refills < max_refills and not all(keep):
        missing = keep.count(False)
        fresh = [p for p in next_prompts(missing) for _ in range(n)]
        new_rollout, new_score = sample_scored(fresh)
        rows = [g * n + j for g, ok in enumerate(keep) if ok for j in range(n)]
        kept = rollout.select(torch.tensor(rows, dtype=torch.long, device=rollout.query.device)) if rows else None
        parts = [kept, new_rollout] if kept is not None else [new_rollout]
        rollout = merge(parts, list(range(len(rows) + len(fresh))), pad)
        score = torch.cat([score[rows], new_score]) if rows else new_score
        prompts = [prompts[i] for i in rows] + fresh
        keep, refills = informative(score, n), refills + 1
    stats = {"uninformative_share": first.count(False) / len(first), "refills": float(refills),
             "uninformative_share_final": keep.count(False) / len(keep)}  # fmt: skip
    return rollout, score, prompts, stats
