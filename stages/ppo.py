"""PPO stage: optimise the SFT policy against the reward model with a per-token KL penalty to SFT.

InstructGPT step 3 (Ouyang et al. 2022), our own implementation (TRL removed PPO in 1.13):
rollouts from the policy, reward = normalised RM score at the last token minus
`beta * (log pi - log pi_sft)` on every token, a value model initialised from the reward model,
GAE, clipped policy and value losses. The maths lives in `stages/ppo_math.py`.

Alone: `python -m flows.align pipeline.stop_after=ppo`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from stages import ppo_math as pm
from stages.manifest import Manifest, folder_digest, read_jsonl, write_jsonl
from stages.modeling import (
    Rollout,
    decode_responses,
    load_causal_lm,
    load_scalar_model,
    load_tokenizer,
    response_logprobs,
    sample,
    sequence_scores,
    token_values,
)
from stages.reward_model import load_bias
from stages.tracking import log_metrics


@dataclass(frozen=True)
class PpoConfig:
    updates: int = 40
    rollouts_per_update: int = 64
    ppo_epochs: int = 4
    minibatch_size: int = 16
    learning_rate: float = 1e-4
    beta: float = 0.02  # per-token KL coefficient to the SFT policy (InstructGPT)
    gamma: float = 1.0  # InstructGPT / Ziegler et al.: no discount within a response
    lam: float = 0.95  # GAE lambda
    clip: float = 0.2  # clipped surrogate epsilon (Schulman et al. 2017)
    value_clip: float = 0.2
    vf_coef: float = 0.1
    max_grad_norm: float = 1.0
    whiten_advantages: bool = True
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rollouts_per_update % self.minibatch_size:
            raise ValueError(
                f"stage.ppo.rollouts_per_update ({self.rollouts_per_update}) must be a multiple of "
                f"stage.ppo.minibatch_size ({self.minibatch_size})"
            )
        if self.beta < 0:
            raise ValueError(f"stage.ppo.beta: must be >= 0, got {self.beta}")


def _subset(r: Rollout, idx: torch.Tensor) -> Rollout:
    return Rollout(r.query[idx], r.query_mask[idx], r.response[idx], r.response_mask[idx], r.finished[idx])


def _check_finite(name: str, x: torch.Tensor, update: int) -> None:
    if not torch.isfinite(x).all():
        raise FloatingPointError(f"ppo: non-finite {name} at update {update}; lower stage.ppo.learning_rate")


def run(
    cfg: PpoConfig, *, policy: Path, reward_model: Path, normalization: Path, prompts: Path, out_dir: Path
) -> Manifest:
    out_dir = Path(out_dir)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(policy)
    actor, ref = load_causal_lm(policy), load_causal_lm(policy)
    critic, rm = load_scalar_model(reward_model), load_scalar_model(reward_model)  # value from the RM
    for frozen in (ref, rm):
        frozen.eval().requires_grad_(False)
    bias = load_bias(normalization)
    params = [p for m in (actor, critic) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, eps=1e-5)
    texts = [r["prompt"] for r in read_jsonl(prompts)]
    history: list[dict[str, float]] = []
    for update in range(cfg.updates):
        # 1. rollouts
        start = (update * cfg.rollouts_per_update) % len(texts)
        batch_prompts = [texts[(start + i) % len(texts)] for i in range(cfg.rollouts_per_update)]
        rollout = sample(
            actor,
            tokenizer,
            batch_prompts,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
        )
        mask = rollout.response_mask.float()
        # 2. one pass each of policy, reference, value and reward over the rollout tokens
        with torch.no_grad():
            old_logp, _ = response_logprobs(actor, rollout, temperature=cfg.temperature)
            ref_logp, _ = response_logprobs(ref, rollout, temperature=cfg.temperature)
            old_values = token_values(critic, rollout) * mask
            score = sequence_scores(rm, rollout) - bias
        _check_finite("reward", score, update)
        # 3. per-token KL penalty, GAE
        rewards, kl = pm.kl_penalized_rewards(score, old_logp, ref_logp, mask, cfg.beta)
        advantages, returns = pm.gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = pm.masked_whiten(advantages, mask)
        # 4. PPO epochs over shuffled minibatches
        stats: dict[str, list[float]] = {"pg": [], "vf": [], "clipfrac": [], "approxkl": [], "entropy": []}
        for _ in range(cfg.ppo_epochs):
            for idx in torch.randperm(cfg.rollouts_per_update).split(cfg.minibatch_size):
                mb, m = _subset(rollout, idx), mask[idx]
                logp, entropy = response_logprobs(actor, mb, temperature=cfg.temperature)
                values = token_values(critic, mb)
                pg, clipfrac, approxkl = pm.policy_loss(logp, old_logp[idx], advantages[idx], m, cfg.clip)
                vf, _ = pm.value_loss(values, old_values[idx], returns[idx], m, cfg.value_clip)
                loss = pg + cfg.vf_coef * vf
                _check_finite("loss", loss, update)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                for k, v in (
                    ("pg", pg),
                    ("vf", vf),
                    ("clipfrac", clipfrac),
                    ("approxkl", approxkl),
                    ("entropy", pm.masked_mean(entropy, m)),
                ):
                    stats[k].append(v.item())
        # 5. diagnostics
        row = {
            "ppo/objective/kl": (kl.sum(1)).mean().item(),
            "ppo/objective/scores": score.mean().item(),
            "ppo/objective/non_score_reward": (-cfg.beta * kl.sum(1)).mean().item(),
            "ppo/objective/rlhf_reward": (score - cfg.beta * kl.sum(1)).mean().item(),
            "ppo/policy/entropy": sum(stats["entropy"]) / len(stats["entropy"]),
            "ppo/policy/approxkl": sum(stats["approxkl"]) / len(stats["approxkl"]),
            "ppo/policy/clipfrac": sum(stats["clipfrac"]) / len(stats["clipfrac"]),
            "ppo/loss/policy": sum(stats["pg"]) / len(stats["pg"]),
            "ppo/val/loss": sum(stats["vf"]) / len(stats["vf"]),
            "ppo/val/explained_variance": _explained_variance(old_values, returns, mask),
            "ppo/response_length": mask.sum(1).mean().item(),
        }
        history.append(row)
        log_metrics(row, step=update)
    actor.save_pretrained(out_dir / "policy", safe_serialization=True)
    tokenizer.save_pretrained(out_dir / "policy")
    write_jsonl(
        out_dir / "samples.jsonl",
        [{"prompt": p, "response": r} for p, r in zip(batch_prompts, decode_responses(tokenizer, rollout))],
    )
    first, last = history[0], history[-1]
    metrics = {
        "ppo/objective/scores_first": first["ppo/objective/scores"],
        "ppo/objective/scores_last": last["ppo/objective/scores"],
        "ppo/objective/kl_last": last["ppo/objective/kl"],
        "ppo/updates": float(cfg.updates),
    }
    return Manifest(
        stage="ppo",
        path=str(out_dir),
        digest=folder_digest(out_dir),
        metrics=metrics,
        files={"policy": "policy", "samples": "samples.jsonl"},
    )


def _explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    var_returns = pm.masked_mean((returns - pm.masked_mean(returns, mask)) ** 2, mask)
    err = returns - values
    var_err = pm.masked_mean((err - pm.masked_mean(err, mask)) ** 2, mask)
    return 1.0 - (var_err / var_returns).item() if var_returns > 0 else math.nan
