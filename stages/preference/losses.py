"""Preference losses our own DPO-stage loop computes (`stages/dpo.py`), beside trl's pairwise DPO losses.

All work on one prompt's group of K responses, with `ranks` (0 = best, ties equal) and per-response
summed log-probabilities `logps` (K,) and response lengths in tokens `lengths` (K,); a pair (w, l) is
every two responses with rank_w < rank_l.

- **Plackett-Luce** (DPO's appendix A.3): see `stages/dpo.py`.
- **SimPO** (Meng et al. 2024), reference-free: the reward is the length-normalised log-likelihood
  r = beta * logp / |y|, and the loss over pairs is -log sigmoid(r_w - r_l - gamma), gamma a target
  margin.
- **ORPO** (Hong et al. 2024), reference-free: with the mean token log-likelihood a = logp / |y| and
  the odds log(p / (1 - p)) = a - log(1 - exp(a)), the loss is the best response's NLL (-a_best) plus
  lambda times the mean over pairs of -log sigmoid(logodds_w - logodds_l).
- **KTO** (Ethayarajh et al. 2024), on unpaired thumbs: with r = logp - logp_ref and a reference
  point z (an estimate of KL(pi || pi_ref), detached, >= 0), a desirable response costs
  w_d * (1 - sigmoid(beta * (r - z))) and an undesirable one w_u * (1 - sigmoid(beta * (z - r))).
  `kto_reference_point` estimates z as the batch's mean r clamped at 0: the paper's estimator pairs
  each prompt with another prompt's response (mismatched pairs); on the same prompts' responses
  the mean is the same kind of estimate of the policy's drift, cheaper, and biased towards the
  responses' own reward. Thumbs come from labelled data (`data.kto`), or from a ranking split in
  two (`thumbs_from_ranks`: the better half up, the worse half down, a middle response of an odd K
  dropped, ties broken by response order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def better_pairs(ranks: list[int]) -> list[tuple[int, int]]:
    """(w, l) index pairs with rank_w < rank_l (0 = best), in a fixed order."""
    return [(i, j) for i in range(len(ranks)) for j in range(len(ranks)) if ranks[i] < ranks[j]]


def _pairs(ranks: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = better_pairs(ranks)
    if not pairs:
        raise ValueError("a ranking with every response tied has no pair to learn from")
    w, l = zip(*pairs)
    return torch.tensor(w, device=device), torch.tensor(l, device=device)


def simpo_loss(logps: torch.Tensor, lengths: torch.Tensor, ranks: list[int], beta: float, gamma: float):
    """SimPO over one group's pairs (mean)."""
    w, l = _pairs(ranks, logps.device)
    r = beta * logps / lengths.clamp(min=1)
    return -F.logsigmoid(r[w] - r[l] - gamma).mean()


def orpo_loss(logps: torch.Tensor, lengths: torch.Tensor, ranks: list[int], lam: float):
    """ORPO over one group: the best response's NLL plus lambda times the mean odds-ratio term."""
    w, l = _pairs(ranks, logps.device)
    a = logps / lengths.clamp(min=1)  # mean token log-likelihood, < 0
    log_odds = a - torch.log1p(-torch.exp(a).clamp(max=1 - 1e-6))
    best = min(range(len(ranks)), key=lambda i: (ranks[i], i))
    return -a[best] + lam * -F.logsigmoid(log_odds[w] - log_odds[l]).mean()


def kto_reference_point(rewards: torch.Tensor) -> torch.Tensor:
    """z: the batch's mean implicit reward, clamped at 0 and detached (see the module docstring)."""
    return rewards.detach().mean().clamp(min=0)


def kto_loss(
    rewards: torch.Tensor, desirable: torch.Tensor, z: torch.Tensor, beta: float, w_d: float = 1.0, w_u: float = 1.0
):
    """KTO: mean over responses; rewards (n,) = logp - logp_ref, desirable (n,) bool, z a scalar."""
    up = w_d * (1 - torch.sigmoid(beta * (rewards - z)))
    down = w_u * (1 - torch.sigmoid(beta * (z - rewards)))
    return torch.where(desirable, up, down).mean()


def thumbs_from_ranks(ranks: list[int]) -> list[bool | None]:
    """Each response's thumb from a ranking: the better half up (True), the worse half down (False), the
    middle of an odd K None (no label). Position by rank, ties broken by response order."""
    order = sorted(range(len(ranks)), key=lambda i: (ranks[i], i))
    half = len(ranks) // 2
    out: list[bool | None] = [None] * len(ranks)
    for place, i in enumerate(order):
        if place < half:
            out[i] = True
        elif place >= len(ranks) - half:
            out[i] = False
    return out
