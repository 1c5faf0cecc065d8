"""One PPO update in three steps: `collect` (rollouts, scored, and one frozen pass over them),
`estimate_advantages` (the KL penalty and the estimator's advantages) and `optimise` (the clipped
epochs over minibatches, one host sync each); `one_update` chains them and `update_row` measures the
update over the global batch. The arithmetic is `stages/rl/ppo_math.py`."""

from __future__ import annotations

import itertools
import math
import time
import warnings

import torch

from stages.data.tokens import SamplingBudget
from stages.models.compute import autocast, model_device
from stages.models.modeling import Rollout, lm_loss
from stages.rl import dynamic_sampling
from stages.rl import ppo_math as pm
from stages.rl.async_rollouts import Behaviour, generation_rng, rollout_seed
from stages.rl.ppo_state import PpoState
from stages.rl.tools import tool_metrics
from stages.runtime import process_group as dist
from stages.runtime.errors import NonFiniteStop
from stages.settings.recipe import PpoConfig


def check_finite(name: str, x: torch.Tensor, update: int) -> None:
    if not torch.isfinite(x).all():
        raise NonFiniteStop(f"ppo: non-finite {name} at update {update}; lower stage.ppo.learning_rate")


class Scored:
    """One update's rollouts and what the frozen pass measured on them (steps 1-2)."""

    def __init__(self, rollout: Rollout, score, old_logp, ref_logp, old_values, first_order, prompts, dynamic) -> None:
        self.rollout, self.score, self.first_order = rollout, score, first_order
        self.old_logp, self.ref_logp, self.old_values = old_logp, ref_logp, old_values
        self.mask = rollout.loss_mask.float()  # the policy's tokens: never what a tool wrote (`stages/rl/tools.py`)
        self.prompts, self.dynamic = prompts, dynamic  # the prompts answered; dynamic sampling's figures
        self.behaviour_logp = None  # asynchronous rollouts sampled by older weights: their log-probs


def minibatches(order: torch.Tensor, cfg: PpoConfig, local: int) -> list[torch.Tensor]:
    return list(order.split(local * cfg.minibatch_size // cfg.rollouts_per_update))


def collect(cfg, state: PpoState, tokenizer, scorer, prompts, budget: SamplingBudget, update: int, next_prompts,
            behaviour: Behaviour | None = None):  # fmt: skip
    """1. Rollouts (KV-cached, batched generate: the seam where a faster engine plugs in), scored, with
    DAPO's dynamic sampling where asked (`stages/rl/dynamic_sampling.py`, prompts from `next_prompts`);
    or `behaviour`'s, sampled ahead by the rollout worker (`stages/rl/async_rollouts.py`);
    2. one pass each of policy, reference and value over them, under the update's autocast. The old
    log-probs are computed in the first epoch's minibatches, so that epoch's first minibatch sees
    exactly what was scored: its ratio is 1 (approx-KL and clipfrac 0) in any precision."""
    models = state.models
    draws = itertools.count(rollout_seed(cfg.seed, dist.rank(), update))  # a refill draws from the next seed
    sample = lambda batch: sample_scored(cfg, state, tokenizer, scorer, budget, next(draws), batch)  # noqa: E731
    if behaviour is not None:
        rollout = behaviour.rollout.to(model_device(models.policy))
        score, dynamic = score_rollout(cfg, state, tokenizer, scorer, budget, prompts, rollout), {}
    elif cfg.dynamic_sampling:
        pad = tokenizer.pad_token_id
        rollout, score, prompts, dynamic = dynamic_sampling.fill(
            sample, next_prompts, prompts, cfg.samples_per_prompt, cfg.max_refills, pad
        )
    else:
        (rollout, score), dynamic = sample(prompts), {}
    check_finite("reward", score, update)
    with torch.no_grad(), state.frozen_on_device(scorer), autocast(state.compute):
        first_order = torch.randperm(len(prompts), device="cpu").to(rollout.query.device)  # the host's RNG
        old_logp = torch.zeros(rollout.response.shape, device=rollout.query.device)
        for idx in minibatches(first_order, cfg, len(prompts)):
            old_logp[idx] = models.policy_logprobs(rollout.select(idx))[0].float()
        ref_logp = models.ref_logprobs(rollout).float()
        old_values = models.values(rollout).float() * rollout.response_mask
    scored = Scored(rollout, score, old_logp, ref_logp, old_values, first_order, prompts, dynamic)
    if behaviour is not None and behaviour.staleness() > 0:  # staleness 0: the behaviour policy is pi_old
        scored.behaviour_logp = behaviour.logp.to(rollout.query.device)
    return scored


def sample_scored(cfg, state: PpoState, tokenizer, scorer, budget: SamplingBudget, seed: int, prompts: list):
    """(rollout, score): responses to `prompts` on the policy's device, drawn from `seed` (the update's own:
    `async_rollouts.rollout_seed`, so the trainer's RNG stream never depends on sampling), and their rewards."""
    with generation_rng(seed):
        rollout = state.rollout.sample(
            tokenizer,
            prompts,
            max_new_tokens=budget.max_new_tokens,
            max_prompt_length=budget.max_prompt_length,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
        )
    rollout = rollout.to(model_device(state.models.policy))  # once: every model below reads it there
    return rollout, score_rollout(cfg, state, tokenizer, scorer, budget, prompts, rollout)


def score_rollout(cfg, state: PpoState, tokenizer, scorer, budget: SamplingBudget, prompts: list, rollout: Rollout):
    """Each response's reward: the scorer's, less the missing-EOS penalty and DAPO's overlong penalty
    where set."""
    with torch.no_grad(), state.frozen_on_device(scorer), autocast(state.compute):
        score = scorer(tokenizer, prompts, rollout).float()
    if cfg.missing_eos_penalty is not None:
        score = score - cfg.missing_eos_penalty * (~rollout.finished).float()
    if cfg.overlong_buffer:  # DAPO: a response near the length limit loses reward softly
        lengths = rollout.response_mask.sum(1)
        score = score + pm.overlong_penalty(lengths, budget.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty)
    return score


def estimate_advantages(cfg, state: PpoState, scored: Scored, budget: SamplingBudget):
    """3. Per-token KL penalty and advantages: GAE with the value model, or a critic-free estimator.
    Returns (kl, advantages, returns)."""
    mask = scored.mask
    kl = pm.kl_estimate(scored.old_logp, scored.ref_logp, cfg.kl_estimator) * mask
    total = dist.all_reduce_sum if dist.active() else None
    if cfg.critic_free:
        in_reward = state.kl.beta if cfg.kl_penalty == "reward" else 0.0
        kw = {"estimator": cfg.advantage, "n": cfg.samples_per_prompt, "beta": in_reward, "gamma": cfg.gamma}
        advantages = pm.critic_free_advantages(scored.score, kl, mask, **kw, total=total)
        return kl, advantages, advantages
    rewards = pm.kl_penalized_rewards(scored.score, kl, mask, state.kl.beta)
    advantages, returns = pm.gae(rewards, scored.old_values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:  # by the global batch's statistics: the same on every rank
        advantages = pm.masked_whiten(advantages, mask, total=total)
    return kl, advantages, returns


STATS = ("pg", "vf", "clipfrac", "approxkl", "entropy", "kl_loss", "ptx")


class Ptx:
    """PPO-ptx's pretraining texts; each minibatch's batch is drawn on the host before its step."""

    def __init__(self, tokenizer, docs: list[str], batch_size: int, budget: SamplingBudget) -> None:
        self.tokenizer, self.docs, self.batch_size = tokenizer, docs, batch_size
        self.max_length = budget.max_prompt_length + budget.max_new_tokens

    def draw(self) -> list[str]:
        return [self.docs[i] for i in torch.randint(len(self.docs), (self.batch_size,), device="cpu").tolist()]

    def loss(self, model, texts: list[str]) -> torch.Tensor:
        """Next-token loss on `texts`, cut to the sampling budget."""
        return lm_loss(model, self.tokenizer, texts, max_length=self.max_length)


class Targets:
    """What every minibatch of one update reads: the scored rollouts, advantages, returns and the
    loss normaliser (Dr. GRPO's constant `horizon`, else None)."""

    def __init__(self, scored: Scored, advantages, returns, horizon: int | None) -> None:
        self.scored, self.advantages, self.returns, self.horizon = scored, advantages, returns, horizon


def optimise(cfg, state: PpoState, targets: Targets, ptx: Ptx | None, update: int):
    """4. PPO epochs over shuffled minibatches of this rank's rollouts. Returns the statistics' lists
    and the first minibatch's (ratio 1 by construction: see `collect`)."""
    scored = targets.scored
    local = scored.rollout.response.shape[0]
    stats: dict[str, list[float]] = {k: [] for k in STATS}
    for epoch in range(cfg.ppo_epochs):
        order = scored.first_order if epoch == 0 else torch.randperm(local, device="cpu").to(scored.mask.device)
        for idx in minibatches(order, cfg, local):
            texts = ptx.draw() if ptx is not None else None
            for k, v in zip(STATS, train_minibatch(cfg, state, targets, idx, ptx, texts, update), strict=True):
                stats[k].append(v)
    used = {k: v for k, v in stats.items() if k in ("pg", "vf", "clipfrac", "approxkl", "entropy")}
    used |= {k: stats[k] for k in ("kl_loss", "ptx") if (cfg.kl_penalty == "loss" if k == "kl_loss" else ptx)}
    first = {"first_minibatch_clipfrac": stats["clipfrac"][0], "first_minibatch_approxkl": stats["approxkl"][0]}
    return used, first


def train_minibatch(cfg, state: PpoState, targets: Targets, idx, ptx: Ptx | None, texts, update: int) -> list[float]:
    """One optimiser step on one minibatch, with one host sync: the statistics come back in one
    `tolist`, which also checks the loss before it is applied. Returns the statistics (`STATS`)."""
    loss, values = minibatch_loss(cfg, state, targets, idx, ptx, texts)
    if not math.isfinite(values[0]):
        raise NonFiniteStop(f"ppo: non-finite loss at update {update}; lower stage.ppo.learning_rate")
    state.engine.backward(loss)
    state.engine.step()  # clips to max_grad_norm, steps, zeroes the gradients
    if state.ema is not None:
        state.ema_step(cfg.ema_decay)
    return values[1:]


def minibatch_loss(cfg, state: PpoState, targets: Targets, idx, ptx: Ptx | None, texts):
    """One minibatch's loss and its statistics as floats (the loss first): the one host sync."""
    scored, horizon = targets.scored, targets.horizon
    mb, m = scored.rollout.select(idx), scored.mask[idx]
    zero = torch.zeros((), device=m.device)
    with autocast(state.compute):  # mixed precision (`compute.precision`); the losses in fp32
        logp, entropy, values = state.engine(mb)
        lm = ptx.loss(state.models.policy, texts) if ptx is not None else zero
    logp, entropy, values = logp.float(), entropy.float(), values.float()
    pg, clipfrac, approxkl = pm.policy_loss(
        logp, scored.old_logp[idx], targets.advantages[idx], m, cfg.clip, horizon,
        clip_high=cfg.clip_high, aggregation=cfg.loss_aggregation, level=cfg.ratio_level,
        behaviour_logprobs=None if scored.behaviour_logp is None else scored.behaviour_logp[idx], tis_cap=cfg.tis_cap,
    )  # fmt: skip
    vf, loss = zero, pg
    if not cfg.critic_free:  # no value model: no value loss
        vf, _ = pm.value_loss(values, scored.old_values[idx], targets.returns[idx], m, cfg.value_clip)
        loss = pg + cfg.vf_coef * vf
    kl_term = zero
    if cfg.kl_penalty == "loss":  # GRPO: k3 KL to the reference as a loss term
        kl_term = pm.kl_loss(logp, scored.ref_logp[idx], m, horizon)
        loss = loss + state.kl.beta * kl_term
    if ptx is not None:
        loss = pm.ptx_mix(loss, lm.float(), cfg.ptx_coef)
    parts = (loss, pg, vf, clipfrac, approxkl, pm.masked_mean(entropy, m), kl_term, lm)
    return loss, torch.stack([t.detach().float() for t in parts]).tolist()


def one_update(cfg, state: PpoState, tokenizer, scorer, batch_prompts, ptx_docs, update, budget, next_prompts,
               behaviour: Behaviour | None = None):  # fmt: skip
    """One update (on `behaviour`'s rollouts where the rollout worker sampled them); returns its row of
    metrics, its rollouts and their prompts (dynamic sampling may have replaced some)."""
    scored = collect(cfg, state, tokenizer, scorer, batch_prompts, budget, update, next_prompts, behaviour)
    kl, advantages, returns = estimate_advantages(cfg, state, scored, budget)
    horizon = None if cfg.estimator.length_normalised else budget.max_new_tokens  # Dr. GRPO: a constant
    ptx = Ptx(tokenizer, ptx_docs, cfg.ptx_batch_size, budget) if ptx_docs else None
    stats, first = optimise(cfg, state, Targets(scored, advantages, returns, horizon), ptx, update)
    state.sync_rollout()
    row = update_row(cfg, state, scored, kl, returns, stats, first, update)
    row |= {f"ppo/dynamic/{k}": over_ranks(v) for k, v in scored.dynamic.items()}
    if behaviour is not None:
        row |= async_row(cfg, scored, behaviour)
    row |= {f"ppo/tools/{k}": over_ranks(v) for k, v in tool_metrics(scored.rollout, tokenizer).items()}
    return row, scored.rollout, scored.prompts


def async_row(cfg, scored: Scored, behaviour: Behaviour) -> dict[str, float]:
    """The policy lag of asynchronous rollouts: staleness (updates), the weights' age when training
    began (seconds), the trainer's wait for the batch, and the truncated importance weights."""
    row = {
        "ppo/async/staleness": float(behaviour.staleness()),
        "ppo/async/weights_age_s": time.time() - behaviour.published_at,
        "ppo/async/wait_s": behaviour.waited_s,
        "ppo/async/is_weight": 1.0,
        "ppo/async/is_truncated": 0.0,
    }
    if scored.behaviour_logp is not None:  # the loss's weights (`policy_loss`), token by token
        log_ratio, m = scored.old_logp - scored.behaviour_logp, scored.mask
        row["ppo/async/is_weight"] = pm.masked_mean(pm.truncated_is_weight(log_ratio, cfg.tis_cap), m).item()
        row["ppo/async/is_truncated"] = pm.masked_mean((log_ratio > math.log(cfg.tis_cap)).float(), m).item()
    return row


def update_row(cfg, state: PpoState, scored: Scored, kl, returns, stats, first, update: int) -> dict[str, float]:
    rollout, mask, score, old_values = scored.rollout, scored.mask, scored.score, scored.old_values
    # 5. KL controller and diagnostics, over the global batch (every rank's rollouts)
    kl_seq = dist.mean(kl.sum(1))
    tokens = dist.all_reduce_sum(rollout.query_mask.sum() + mask.sum()).item()
    row = {
        "ppo/objective/kl": kl_seq,
        "ppo/objective/scores": dist.mean(score),
        "ppo/objective/non_score_reward": dist.mean(-state.kl.beta * kl.sum(1)),
        "ppo/objective/rlhf_reward": dist.mean(score - state.kl.beta * kl.sum(1)),
        "ppo/objective/beta": state.kl.beta,
        "ppo/val/explained_variance": (
            math.nan if cfg.critic_free else over_ranks(explained_variance(old_values, returns, mask))
        ),
        "ppo/response_length": dist.mean(mask.sum(1)),
        # tokens through the model per update: rollout forward passes plus the PPO epochs' passes
        "ppo/tokens": float(tokens * (1 + cfg.ppo_epochs)),
        "ppo/finished": dist.mean(rollout.finished.float()),
        "ppo/learning_rate": state.opt.param_groups[0]["lr"],
        **{f"ppo/{name}": over_ranks(sum(v) / len(v)) for name, v in named_stats(stats).items() if v},
        **{f"ppo/policy/{name}": over_ranks(v) for name, v in first.items()},
    }
    state.kl.update(kl_seq, cfg.rollouts_per_update)
    if kl_seq > cfg.kl_warn and not state.warned_kl:
        warnings.warn(
            f"ppo: KL to the SFT policy reached {kl_seq:.2f} per response at update {update}, above "
            f"stage.ppo.kl_warn={cfg.kl_warn}; raise stage.ppo.beta or set stage.ppo.kl_target",
            stacklevel=2,
        )
        state.warned_kl = True
    return row


def over_ranks(value: float) -> float:
    """A per-rank statistic (a mean over equal shares) averaged over the ranks; itself in one process."""
    return dist.mean(torch.tensor([value], dtype=torch.float64, device="cpu"))


def named_stats(stats: dict[str, list[float]]) -> dict[str, list[float]]:
    names = {
        "pg": "loss/policy",
        "vf": "val/loss",
        "clipfrac": "policy/clipfrac",
        "approxkl": "policy/approxkl",
        "entropy": "policy/entropy",
        "ptx": "loss/ptx",
        "kl_loss": "loss/kl",
    }
    return {names[k]: v for k, v in stats.items()}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    var_returns = pm.masked_mean((returns - pm.masked_mean(returns, mask)) ** 2, mask)
    err = returns - values
    var_err = pm.masked_mean((err - pm.masked_mean(err, mask)) ** 2, mask)
    return 1.0 - (var_err / var_returns).item() if var_returns > 0 else math.nan
