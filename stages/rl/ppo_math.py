"""The arithmetic of PPO for RLHF, pure functions over tensors (unit-tested by hand).

Shapes: (batch, response_len) unless stated; `mask` is 1 on response tokens, 0 on padding.
References: Ziegler et al. 2019 (KL-penalised reward), Schulman et al. 2016 (GAE),
Schulman et al. 2017 (clipped objectives), Ouyang et al. 2022 (InstructGPT).
"""

from __future__ import annotations

import torch

from stages.settings.recipe import CRITIC_FREE, ESTIMATOR_RECORDS


def masked_mean(x: torch.Tensor, mask: torch.Tensor, total=None) -> torch.Tensor:
    """Mean over the unmasked entries. `total(t)`: `t` summed over the ranks of a process group, so the
    mean is the whole global batch's (`stages.runtime.process_group.all_reduce_sum`)."""
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
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
    horizon: int | None = None,
    *,
    clip_high: float | None = None,
    aggregation: str = "token-mean",
    level: str = "token",
    behaviour_logprobs: torch.Tensor | None = None,
    tis_cap: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate `-min(r A, clip(r, 1-clip, 1+clip_high) A)`; returns (loss, clipfrac, approxkl).

    - `clip_high` (DAPO, Yu et al. 2025: "clip-higher"): a wider upper bound than the lower `clip`, so
      unlikely tokens can gain probability; None: symmetric.
    - `level="token"`: one ratio per token, the loss aggregated by `aggregate` (`aggregation`, or
      Dr. GRPO's `horizon`). `level="sequence"` (GSPO, Zheng et al. 2025): one ratio per response,
      exp of the mean token log-ratio, clipped per response against the response's mean advantage;
      the loss is the mean over responses and clipfrac the share of responses clipped.
    - `behaviour_logprobs` (asynchronous rollouts sampled by older weights): each token's loss weighed by
      the truncated importance weight `min(pi_old / pi_behaviour, tis_cap)` (`truncated_is_weight`);
      at the sequence level one weight per response, from the mean token log-ratio (GSPO's form).
    """
    high = clip if clip_high is None else clip_high
    log_ratio = logprobs - old_logprobs
    approxkl = 0.5 * masked_mean(log_ratio**2, mask)
    behind = None if behaviour_logprobs is None else old_logprobs - behaviour_logprobs
    if level == "sequence":
        per_response = mask.sum(1).clamp(min=1)
        ratio = torch.exp((log_ratio * mask).sum(1) / per_response)
        advantage = (advantages * mask).sum(1) / per_response
        unclipped, clipped = -advantage * ratio, -advantage * torch.clamp(ratio, 1.0 - clip, 1.0 + high)
        per = torch.max(unclipped, clipped)
        if behind is not None:
            per = per * truncated_is_weight((behind * mask).sum(1) / per_response, tis_cap)
        return per.mean(), (clipped > unclipped).float().mean(), approxkl
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + high)
    per_token = torch.max(unclipped, clipped)
    if behind is not None:
        per_token = per_token * truncated_is_weight(behind, tis_cap)
    loss = aggregate(per_token, mask, horizon, aggregation)
    return loss, masked_mean((clipped > unclipped).float(), mask), approxkl


def truncated_is_weight(log_ratio: torch.Tensor, cap: float) -> torch.Tensor:
    """`min(exp(log_ratio), cap)`, no gradient: the importance weight of the policy that starts the update
    over the behaviour policy that sampled (truncated importance sampling, Yao et al. 2025)."""
    return torch.exp(log_ratio.detach()).clamp(max=cap)


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment, (batch,) <= 0: nothing up to `max_new_tokens - buffer` tokens,
    then falling linearly to `-penalty` at the limit (a response cut there scores -penalty)."""
    start = max_new_tokens - buffer
    return torch.clamp((start - lengths.float()) / buffer, min=-1.0, max=0.0) * penalty


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


class KLController:
    """The KL coefficient `beta`, its one home: fixed (`target` None, InstructGPT) or Ziegler et al. 2019's
    adaptive controller, beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon)."""

    def __init__(self, beta: float, target: float | None = None, horizon: int = 10000) -> None:
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n_steps: int) -> float:
        if self.target is None:
            return self.beta
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n_steps / self.horizon
        return self.beta


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], params: dict[str, torch.Tensor], decay: float) -> None:
    """In place: ema <- decay * ema + (1 - decay) * params, for every floating-point tensor, in one fused
    `torch._foreach_lerp_` (a few kernels for the whole model, not two per parameter)."""
    floats = [name for name, value in params.items() if value.is_floating_point()]
    if floats:
        torch._foreach_lerp_([ema[n] for n in floats], [params[n].detach() for n in floats], 1.0 - decay)
    for name, value in params.items():
        if not value.is_floating_point():
            ema[name].copy_(value)


def ptx_mix(ppo_loss: torch.Tensor, lm_loss: torch.Tensor, coef: float) -> torch.Tensor:
    """PPO-ptx (InstructGPT eq. 2): the PPO loss plus `coef` times the pretraining LM loss."""
    return ppo_loss + coef * lm_loss


def group_relative(score: torch.Tensor, n: int, estimator: str) -> torch.Tensor:
    """Each response's score against its prompt's group of `n` responses, (batch,) -> (batch,).

    The batch holds the groups one after another (`n` consecutive responses share a prompt).
    grpo: (r - mean) / (std + 1e-6), std unbiased as torch's; dr_grpo and reinforce_pp_baseline:
    r - mean; rloo: r - mean of the other n - 1 responses."""
    if not ESTIMATOR_RECORDS[estimator].grouped:
        grouped = ", ".join(name for name, e in ESTIMATOR_RECORDS.items() if e.grouped)
        raise ValueError(f"stage.ppo.advantage: {estimator!r} is not a group estimator ({grouped})")
    if n < 2 or score.shape[0] % n:
        raise ValueError(f"stage.ppo.samples_per_prompt: a group needs n >= 2 dividing the batch, got n={n}")
    g = score.view(-1, n)
    mean = g.mean(dim=1, keepdim=True)
    if estimator == "grpo":
        out = (g - mean) / (g.std(dim=1, keepdim=True) + 1e-6)
    elif estimator == "rloo":
        out = g - (g.sum(dim=1, keepdim=True) - g) / (n - 1)
    else:
        out = g - mean
    return out.reshape(-1)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = sum_{s >= t} gamma^(s - t) r_s over the policy's tokens of the response (the REINFORCE
    return), 0 off them. Tokens a tool wrote inside a response (`mask` 0 between ones) are not steps:
    the return passes over them undiscounted, so a tool call is credited with the score that follows."""
    returns = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], device=rewards.device, dtype=rewards.dtype)
    for t in reversed(range(rewards.shape[1])):
        step = mask[:, t] > 0
        running = torch.where(step, rewards[:, t] + gamma * running, running)
        returns[:, t] = running * mask[:, t]
    return returns


def critic_free_advantages(
    score: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    *,
    estimator: str,
    n: int,
    beta: float,
    gamma: float = 1.0,
    total=None,
) -> torch.Tensor:
    """Per-token advantages without a value model, (batch, response_len).

    1. the score, relative to its group for the group estimators;
    2. the per-token KL penalty `-beta * kl` (pass beta=0 when the KL is a loss term, GRPO's way);
    3. the discounted return of each token;
    4. REINFORCE++: whitened over the global batch (`total` sums over ranks)."""
    if estimator not in CRITIC_FREE:
        raise ValueError(f"stage.ppo.advantage: {estimator!r} is not critic-free ({', '.join(CRITIC_FREE)})")
    record = ESTIMATOR_RECORDS[estimator]
    seq = group_relative(score, n, estimator) if record.grouped else score
    advantages = discounted_returns(kl_penalized_rewards(seq, kl, mask, beta), mask, gamma)
    if record.batch_whitened:
        advantages = masked_whiten(advantages, mask, total=total)
    return advantages * mask


def aggregate(x: torch.Tensor, mask: torch.Tensor, horizon: int | None = None, mode: str = "token-mean"):
    """A per-token loss to a scalar, as verl names the modes: `token-mean` (every response token
    weighs the same), `seq-mean-token-mean` (each response's mean, then the mean over responses: a
    short response's tokens weigh more), `seq-mean-token-sum` (each response's sum, averaged over
    responses). With `horizon` (Dr. GRPO) the sum over each response's tokens divided by a constant
    `horizon`, averaged over responses: no length bias either way."""
    if horizon is not None:
        return (x * mask).sum() / (mask.shape[0] * horizon)
    if mode == "token-mean":
        return masked_mean(x, mask)
    sums = (x * mask).sum(1)
    if mode == "seq-mean-token-sum":
        return sums.mean()
    return (sums / mask.sum(1).clamp(min=1)).mean()


def kl_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, horizon: int | None = None):
    """GRPO's KL term: the k3 estimate of KL(pi || pi_ref) on the sampled tokens, differentiable in pi."""
    return aggregate(kl_estimate(logprobs, ref_logprobs, "k3"), mask, horizon)
