"""Every preference loss our own loops compute, behind one pairwise helper (`pairwise_logistic`): the
reward model's (InstructGPT's ranking loss, RLAIF's soft-target distillation) and DPO's own loop's
(`GROUP_LOSSES`, keyed by `stage.dpo.loss_type`: sigmoid DPO on image-text rows, Plackett-Luce, SimPO,
ORPO, KTO); trl's DPOTrainer computes its pairwise losses itself.

The group losses work on one prompt's group of K responses, with `ranks` (0 = best, ties equal) and per-response
summed log-probabilities `logps` (K,) and response lengths in tokens `lengths` (K,); a pair (w, l) is
every two responses with rank_w < rank_l.

- **Plackett-Luce** (DPO's appendix A.3): -sum_k log(exp r_k / sum_{j >= k} exp r_j) over the ranking.
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

from collections.abc import Callable

import torch
import torch.nn.functional as F

from stages.preference.rankings import ranking_pairs
from stages.runtime import process_group as dist
from stages.settings.recipe import DpoConfig


def pairwise_logistic(d: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """The one pairwise term: the mean over pairs of -log sigmoid(d), d a winner's margin over its loser
    (Bradley-Terry); with a soft `target` P(i > j), the cross-entropy against sigmoid(d)."""
    if target is None:
        return -F.logsigmoid(d).mean()
    return -(target * F.logsigmoid(d) + (1 - target) * F.logsigmoid(-d)).mean()


# ---- the reward model's ----------------------------------------------------------------------------
def ranking_loss(scores, pairs: list[list[tuple[int, int]]], margin: float = 0.0) -> torch.Tensor:
    """Mean over prompts of the per-prompt mean pairwise loss `-log sigmoid(r_w - r_l - margin)`.

    scores: per prompt a (K_b,) tensor of rewards (or one (num_prompts, K) tensor); pairs[b]: the
    (winner, loser) indices of prompt b. A prompt whose responses all tie has no pair and does not count.
    """
    per = []
    for b, prompt_pairs in enumerate(pairs):
        if not prompt_pairs:
            continue
        w, l = _indices(prompt_pairs, scores[b].device)
        per.append(pairwise_logistic(scores[b][w] - scores[b][l] - margin))
    return torch.stack(per).mean() if per else sum(s.sum() for s in scores) * 0.0


def soft_preference_loss(scores, prefs: list[list[list[float]]]) -> torch.Tensor:
    """Mean over prompts of the per-prompt mean over pairs i < j of the cross-entropy between the soft
    target p_ij and sigmoid(r_i - r_j). scores[b]: (K_b,) rewards; prefs[b]: (K_b, K_b) P(i > j)."""
    per = []
    for s, p in zip(scores, prefs):
        k = len(p)
        i, j = torch.triu_indices(k, k, offset=1, device=s.device)
        per.append(pairwise_logistic(s[i] - s[j], torch.tensor(p, dtype=s.dtype, device=s.device)[i, j]))
    return torch.stack(per).mean()


def _indices(pairs: list[tuple[int, int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.tensor([p[0] for p in pairs], dtype=torch.long, device=device)
    l = torch.tensor([p[1] for p in pairs], dtype=torch.long, device=device)
    return w, l


def _pairs(ranks: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = ranking_pairs(ranks)
    if not pairs:
        raise ValueError("a ranking with every response tied has no pair to learn from")
    return _indices(pairs, device)


# ---- one group's losses --------------------------------------------------------------------------
def plackett_luce_loss(rewards: torch.Tensor, ranks: list[int]) -> torch.Tensor:
    """Listwise DPO loss of one ranking: rewards (K,) implicit rewards, ranks (K,) with 0 = best."""
    order = sorted(range(len(ranks)), key=lambda i: (ranks[i], i))
    r = rewards[torch.tensor(order, device=rewards.device)]
    tail = torch.logcumsumexp(r.flip(0), dim=0).flip(0)  # log sum_{j >= k} exp r_j
    return -(r - tail)[:-1].sum()


def simpo_loss(logps: torch.Tensor, lengths: torch.Tensor, ranks: list[int], beta: float, gamma: float):
    """SimPO over one group's pairs (mean)."""
    w, l = _pairs(ranks, logps.device)
    r = beta * logps / lengths.clamp(min=1)
    return pairwise_logistic(r[w] - r[l] - gamma)


def orpo_loss(logps: torch.Tensor, lengths: torch.Tensor, ranks: list[int], lam: float):
    """ORPO over one group: the best response's NLL plus lambda times the mean odds-ratio term."""
    w, l = _pairs(ranks, logps.device)
    a = logps / lengths.clamp(min=1)  # mean token log-likelihood, < 0
    log_odds = a - torch.log1p(-torch.exp(a).clamp(max=1 - 1e-6))
    best = min(range(len(ranks)), key=lambda i: (ranks[i], i))
    return -a[best] + lam * pairwise_logistic(log_odds[w] - log_odds[l])


def kto_reference_point(rewards: torch.Tensor) -> torch.Tensor:
    """z: the batch's mean implicit reward, clamped at 0 and detached (see the module docstring); in a
    process group the global batch's mean, so every rank uses the same z."""
    if not dist.active():
        return rewards.detach().mean().clamp(min=0)
    shared = dist.all_reduce_sum(torch.stack([rewards.detach().sum(), rewards.new_tensor(float(rewards.numel()))]))
    return (shared[0] / shared[1].clamp(min=1)).clamp(min=0)


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


# ---- DPO's own loop: a batch of prompts' groups, by `stage.dpo.loss_type` --------------------------
def _sigmoid(cfg: DpoConfig, logps, ref_logps, lengths, batch: list[dict]) -> torch.Tensor:
    """DPO on every (winner, loser) pair, as trl's sigmoid loss (image-text rows train here)."""
    rewards = (cfg.beta * (logps - ref_logps)).split(_sizes(batch))
    margins = [r[w] - r[l] for r, row in zip(rewards, batch) for w, l in ranking_pairs(row["ranks"])]
    if not margins:  # every ranking of the batch tied: nothing to learn, no step direction
        return logps.sum() * 0.0
    return pairwise_logistic(torch.stack(margins))


def _plackett_luce(cfg: DpoConfig, logps, ref_logps, lengths, batch: list[dict]) -> torch.Tensor:
    rewards = (cfg.beta * (logps - ref_logps)).split(_sizes(batch))
    return torch.stack([plackett_luce_loss(r, row["ranks"]) for r, row in zip(rewards, batch)]).mean()


def _simpo(cfg: DpoConfig, logps, ref_logps, lengths, batch: list[dict]) -> torch.Tensor:
    groups = zip(logps.split(_sizes(batch)), lengths.split(_sizes(batch)), batch)
    return torch.stack(
        [simpo_loss(lp, n, row["ranks"], cfg.simpo_beta, cfg.simpo_gamma) for lp, n, row in groups]
    ).mean()


def _orpo(cfg: DpoConfig, logps, ref_logps, lengths, batch: list[dict]) -> torch.Tensor:
    groups = zip(logps.split(_sizes(batch)), lengths.split(_sizes(batch)), batch)
    return torch.stack([orpo_loss(lp, n, row["ranks"], cfg.orpo_lambda) for lp, n, row in groups]).mean()


def _kto(cfg: DpoConfig, logps, ref_logps, lengths, batch: list[dict]) -> torch.Tensor:
    """Unpaired: every labelled response on its own, z from the whole (global) batch."""
    rewards = logps - ref_logps
    thumbs = [t for r in batch for t in (r.get("thumbs") or thumbs_from_ranks(r["ranks"]))]
    keep = torch.tensor([t is not None for t in thumbs], device=logps.device)
    desirable = torch.tensor([bool(t) for t in thumbs], device=logps.device)
    z = kto_reference_point(rewards)
    return kto_loss(rewards[keep], desirable[keep], z, cfg.beta, cfg.kto_desirable_weight, cfg.kto_undesirable_weight)


def _sizes(batch: list[dict]) -> list[int]:
    return [len(r["responses"]) for r in batch]


GroupLoss = Callable[[DpoConfig, torch.Tensor, torch.Tensor | None, torch.Tensor, list[dict]], torch.Tensor]


GROUP_LOSSES: dict[str, GroupLoss] = {
    "sigmoid": _sigmoid, "plackett_luce": _plackett_luce, "simpo": _simpo, "orpo": _orpo, "kto": _kto,
}  # fmt: skip


def group_loss(cfg: DpoConfig, logps: torch.Tensor, ref_logps, lengths: torch.Tensor, batch: list[dict]):
    """The loss of a batch of prompts' groups: each row's summed response log-probs `logps` (and the
    reference's), its response `lengths`, by `cfg.loss_type`."""
    return GROUP_LOSSES[cfg.loss_type](cfg, logps, ref_logps, lengths, batch)
