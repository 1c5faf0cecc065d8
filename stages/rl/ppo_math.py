"""The arithmetic of PPO for RLHF, pure functions over tensors (unit-tested by hand).

Shapes: (batch, response_len) unless stated; `mask` is 1 on response tokens, 0 on padding.
References: Ziegler et al. 2019 (KL-penalised reward), Schulman et al. 2016 (GAE),
Schulman et al. 2017 (clipped objectives), Ouyang et al. 2022 (InstructGPT).
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, total=None) -> torch.Tensor:
    """Mean over the unmasked entries. `total(t)`: `t` summed over the ranks of a process group, so the
    mean is the whole global batch's (`stages.runtime.distributed.all_reduce_sum`)."""
    if total is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    sums = total(torch.stack([(x * mask).sum(), mask.sum().to(x.dtype)]))
    return sums[0] / sums[1].clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, total=None) -> torch.Tensor:
    """Normalise to unit variance (and zero mean if `shift_mean`) over the unmasked entries; with
    `total`, by the mean and variance of the global batch over all ranks."""
    mean = masked_mean(x, mask, total)
    var = masked_mean((x - mean) ** 2, mask, total)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_penalized_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token rewards: `-beta * kl` on every token (kl: a per-token estimate of
    KL(pi || pi_ref), see `kl_estimate`), plus `score` (batch,) on the last response token."""
    rewards = -beta * kl * mask
    last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(dim=1)
    rewards[torch.arange(mask.shape[0], device=mask.device), last] += score
    return rewards * mask


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response; the value past the last token is 0.

    Returns (advantages, returns) with returns = advantages + values.
    """
    values = values * mask
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros(rewards.shape[0], device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = (delta + gamma * lam * last_gae) * mask[:, t]
        advantages[:, t] = last_gae
    return advantages, (advantages + values) * mask


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate `-min(r A, clip(r, 1-e, 1+e) A)`; returns (loss, clipfrac, approxkl)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    approxkl = 0.5 * masked_mean((logprobs - old_logprobs) ** 2, mask)
    return loss, clipfrac, approxkl


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss `0.5 * max((v - R)^2, (clip(v, v_old +- e) - R)^2)`; returns (loss, clipfrac)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman 2020, "Approximating KL").

    k1 = log pi - log pi_ref (unbiased, can be negative); k3 = (r - 1) - log r with
    r = pi_ref / pi (unbiased, always >= 0, lower variance).
    """
    if kind == "k1":
        return logprobs - ref_logprobs
    if kind == "k3":
        log_r = ref_logprobs - logprobs
        return torch.expm1(log_r) - log_r
    raise ValueError(f"stage.ppo.kl_estimator: {kind!r} is not 'k1' or 'k3'")


class AdaptiveKLController:
    """Ziegler et al. 2019: beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon)."""

    def __init__(self, beta: float, target: float, horizon: int) -> None:
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n_steps: int) -> float:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n_steps / self.horizon
        return self.beta


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], params: dict[str, torch.Tensor], decay: float) -> None:
    """In place: ema <- decay * ema + (1 - decay) * params, for every floating-point tensor."""
    for name, value in params.items():
        if value.is_floating_point():
            ema[name].mul_(decay).add_(value.detach(), alpha=1.0 - decay)
        else:
            ema[name].copy_(value)


def ptx_mix(ppo_loss: torch.Tensor, lm_loss: torch.Tensor, coef: float) -> torch.Tensor:
    """PPO-ptx (InstructGPT eq. 2): the PPO loss plus `coef` times the pretraining LM loss."""
    return ppo_loss + coef * lm_loss
