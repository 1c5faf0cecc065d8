"""PPO stage: optimise the SFT policy against the reward model with a per-token KL penalty to SFT.

InstructGPT step 3 (Ouyang et al. 2022), our own implementation (TRL removed PPO in 1.13):
rollouts from the policy, reward = normalised RM score at the last token minus
`beta * KL(pi || pi_sft)` on every token (fixed beta or Ziegler et al.'s adaptive controller), a
value model initialised from the reward model, GAE, clipped policy and value losses, optional
PPO-ptx (a language-modelling loss on pretraining text) and an EMA of the policy for export.
Checkpoints every `checkpoint_every` updates; a killed run resumes from the last complete one.
The maths lives in `stages/rl/ppo_math.py`.

Degenerate rollouts (empty answers, copies of the prompt, one answer for every prompt, a length
collapse against the first update's) are measured every update (`stages/runtime/diagnostics.py`);
crossing a bound flags the stage, and with `stop_on_degenerate` stops training there with the
reason. `watch_every` scores fixed held-out prompts with the proxy and an independent judge against
KL as training goes (`stages/rl/watch.py`, Gao et al. 2022); `select=judge_peak` publishes the
policy at the judge's best point.

d-RLAIF (Lee et al. 2023, `pipeline=rlaif_direct`): with `judge` instead of `reward_model`, the AI
labeler scores every rollout directly (its expected 1-10 score mapped to [-1, 1]) and there is no
reward model; the value model then starts from the SFT policy with a fresh head.

The advantage estimator (`advantage`): InstructGPT's GAE with its value model, or a critic-free one
(GRPO, Dr. GRPO, RLOO, REINFORCE++ with or without a group baseline: `stages/rl/ppo_math.py`) over
`samples_per_prompt` responses per prompt, with no value model loaded; the KL to SFT in the reward
or, GRPO's way, as a k3 loss term (`kl_penalty`). The same rollout, scoring and clipped-update loop
serves every estimator. Rewards from code (`reward_function`, `stages/rl/rewards.py`) score alone
(`pipeline=rlvr`) or beside the reward model.

Alone: `python -m flows.align pipeline.stop_after=ppo`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import warnings
from pathlib import Path

import torch

from stages.data import sources
from stages.data.tokens import SamplingBudget, fit_prompt_file, resolve_sampling
from stages.labeling.labelers import make_labeler
from stages.models import peft_setup
from stages.models.compute import autocast, grad_scaler, model_device
from stages.models.modeling import (
    Rollout,
    decode_responses,
    lm_loss,
    load_causal_lm,
    load_tokenizer,
    model_context,
    save_tokenizer,
)
from stages.models.tuning import device, optimizer
from stages.preference.scorers import TrainedRewardModel
from stages.rl import dynamic_sampling, rewards
from stages.rl import ppo_math as pm
from stages.rl.ppo_models import FullCopies, SharedBase
from stages.rl.rollout import HfRollout, VllmRollout, check
from stages.rl.watch import Watch
from stages.runtime import checkpoints, diagnostics
from stages.runtime import distributed as dist
from stages.runtime.distributed import Engine
from stages.runtime.errors import NonFiniteStop
from stages.runtime.manifest import Manifest, folder_digest, read_jsonl, write_jsonl
from stages.runtime.progress import progress
from stages.runtime.tracking import log_metrics
from stages.settings.distributed import DistributedConfig
from stages.settings.labeling import LabelerConfig
from stages.settings.models import Tuning
from stages.settings.recipe import PpoConfig


def _subset(r: Rollout, idx: torch.Tensor) -> Rollout:
    return r.select(idx)


def _check_finite(name: str, x: torch.Tensor, update: int) -> None:
    if not torch.isfinite(x).all():
        raise NonFiniteStop(f"ppo: non-finite {name} at update {update}; lower stage.ppo.learning_rate")


class _State:
    """Everything a resumed run needs: models, optimizer, KL controller, EMA, RNG, position."""

    def __init__(
        self, cfg: PpoConfig, tuning: Tuning, policy: Path, critic_init: Path, distributed: DistributedConfig | None
    ) -> None:
        torch.manual_seed(cfg.seed)
        # ZeRO-3 partitions the policy: rollouts come from a whole copy, synced after each update
        self.zero3 = dist.partitioned(distributed)
        self.device = device(tuning)
        critic_init = None if cfg.critic_free else critic_init  # no value model to load
        self.models = (
            FullCopies(policy, critic_init, cfg.temperature, tuning, partitioned=self.zero3)
            if cfg.layout == "full_copies"
            else SharedBase(policy, critic_init, cfg.temperature, tuning)
        )
        self.compute = tuning.compute
        self.opt = optimizer(
            self.models.module, tuning, lr=cfg.learning_rate, eps=1e-5, weight_decay=0.01
        )  # torch AdamW default
        self.kl_ctl = pm.AdaptiveKLController(cfg.beta, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target else None
        self.beta = cfg.beta
        self.ema = {k: v.detach().clone() for k, v in self.models.policy_state().items()} if cfg.ema_decay else None
        self.update = 0
        self.history: list[dict[str, float]] = []
        self.warned_kl = False
        self.watch: Watch | None = None
        self.stopped: str | None = None  # why training stopped before `updates` (degenerate rollouts)
        self.rollout_policy = _whole_copy(policy, tuning, self.device) if self.zero3 else None
        micro = dist.per_rank(cfg.minibatch_size, "stage.ppo.minibatch_size")
        if dist.per_rank(cfg.rollouts_per_update, "stage.ppo.rollouts_per_update") % cfg.samples_per_prompt:
            raise ValueError(
                "stage.ppo.samples_per_prompt must divide each process's share of stage.ppo.rollouts_per_update "
                "(a prompt's group of responses stays on one rank)"
            )
        scaler = grad_scaler(tuning.compute)
        self.engine = Engine(
            _Trained(self.models),
            self.opt,
            distributed,
            micro_batch=micro,
            clip=cfg.max_grad_norm,
            scaler=scaler,
            precision=tuning.compute.precision,
        )
        self.opt = self.engine.opt
        self.offload = cfg.offload_frozen
        if dist.world_size() > 1:  # each rank samples its own rollouts
            torch.manual_seed(cfg.seed + dist.rank())
        trained = self.models.policy
        if cfg.generation == "vllm":
            self.rollout = VllmRollout(policy, trained, seed=cfg.seed + dist.rank())
        else:
            hf = {"batch_size": cfg.generation_batch_size, "static_cache": cfg.static_cache,
                  "precision": tuning.compute.precision}  # fmt: skip
            self.rollout = HfRollout(self.rollout_policy, trained, **hf) if self.zero3 else HfRollout(trained, **hf)
        if self.offload:
            self.frozen_to("cpu")

    def frozen_to(self, where) -> None:
        for module in self.models.frozen:
            module.to(where)

    @contextlib.contextmanager
    def frozen_on_device(self, scorer):
        """With `offload_frozen`: the reference and reward models on the device while inside, in host
        memory otherwise."""
        if not self.offload:
            yield
            return
        modules = self.models.frozen + scorer.frozen
        for m in modules:
            m.to(self.device)
        try:
            yield
        finally:
            for m in modules:
                m.to("cpu")

    def sync_rollout(self) -> None:
        """After an update: the rollout engine takes the policy's weights (gathered under ZeRO-3)."""
        self.rollout.sync(lambda: self.engine.gathered([self.models.policy]))

    def ema_step(self, decay: float) -> None:
        with self.engine.gathered([self.models.policy]):  # a no-op but under ZeRO-3
            pm.ema_update(self.ema, self.models.policy_state(), decay)

    def save(self, folder: Path) -> None:
        if self.engine.cfg is not None:  # a process group: DeepSpeed's checkpoint under ZeRO, else rank 0's file
            client = {
                "beta": self.beta,
                "ema": self.ema,
                "update": self.update,
                "history": self.history,
                "rngs": dist.gather([torch.get_rng_state()]),  # each rank's own sampling stream
                "warned_kl": self.warned_kl,
            }
            self.engine.save(folder, self.update, client)
            return
        blob = {
            "models": self.models.state_dict(),
            "opt": self.opt.state_dict(),
            "beta": self.beta,
            "ema": self.ema,
            "update": self.update,
            "history": self.history,
            "rng": torch.get_rng_state(),
            "warned_kl": self.warned_kl,
            "watch": {"points": self.watch.points, "best": self.watch.best} if self.watch else None,
        }
        checkpoints.save(folder, blob)  # temp-then-rename: a half-written checkpoint is never picked up

    def load(self, folder: Path) -> bool:
        if self.engine.cfg is not None:
            blob = self.engine.load(folder)
            if blob is None:
                return False
            blob["rng"] = blob["rngs"][dist.rank()]
            self.sync_rollout()
        else:
            blob = checkpoints.load(folder)
            if blob is None:
                return False
            self.models.load_state_dict(blob["models"])
            self.opt.load_state_dict(blob["opt"])
        self.beta, self.ema, self.update = blob["beta"], blob["ema"], blob["update"]
        self.history, self.warned_kl = blob["history"], blob["warned_kl"]
        if self.watch is not None and blob.get("watch"):
            self.watch.points, self.watch.best = blob["watch"]["points"], blob["watch"]["best"]
        if self.kl_ctl is not None:
            self.kl_ctl.beta = self.beta
        torch.set_rng_state(blob["rng"])
        return True


class _Trained(torch.nn.Module):
    """What the engine trains: policy and value in one module whose forward gives a minibatch's
    log-probs, entropies and values (DDP and DeepSpeed see every trained parameter in one forward)."""

    def __init__(self, models) -> None:
        super().__init__()
        self.trained = models.module
        self.models = [models]  # in a list: not a second registration of the same parameters

    def forward(self, mb: Rollout):
        logp, entropy = self.models[0].policy_logprobs(mb)
        return logp, entropy, self.models[0].values(mb)


class RewardModelScore:
    """InstructGPT: the normalised reward-model score of each rollout, (batch,), on the rollout's device."""

    def __init__(self, reward_model: Path, normalization: Path, device, precision: str) -> None:
        self.rm = TrainedRewardModel(reward_model, normalization, device=device, precision=precision)
        self.frozen = [self.rm.model]

    def __call__(self, tokenizer, prompts: list[str], rollout: Rollout) -> torch.Tensor:
        return self.rm.score(rollout).to(rollout.query.device)


class JudgeScore:
    """d-RLAIF: the AI labeler's expected 1-10 score of each decoded response, in [-1, 1], (batch,)."""

    def __init__(self, labeler: LabelerConfig, judge: Path, device, precision: str) -> None:
        self.labeler = make_labeler(labeler, 0, judge, device=device, precision=precision)
        self.frozen = self.labeler.frozen

    def __call__(self, tokenizer, prompts: list[str], rollout: Rollout) -> torch.Tensor:
        scores = self.labeler.score_all(prompts, decode_responses(tokenizer, rollout))
        return torch.tensor(scores, dtype=torch.float32, device=rollout.query.device)


class Scores:
    """Each rollout's score, (batch,): the reward model's or the judge's (`model`), the reward
    function's (`function`), or their weighted sum (`stage.ppo.reward_model_weight`, `reward_function_weight`)."""

    def __init__(self, model, function: rewards.FunctionScore | None, cfg: PpoConfig) -> None:
        self.model, self.function = model, function
        self.weights = (cfg.reward_model_weight, cfg.reward_function_weight)
        self.frozen = model.frozen if model is not None else []

    def __call__(self, tokenizer, prompts: list, rollout: Rollout) -> torch.Tensor:
        if self.function is None:
            return self.model(tokenizer, prompts, rollout)
        responses = decode_responses(tokenizer, rollout)
        score = self.weights[1] * self.function.scores(prompts, responses, rollout.query.device)
        if self.model is not None:
            score = score + self.weights[0] * self.model(tokenizer, prompts, rollout)
        return score


def _scorer(cfg: PpoConfig, labeler, reward_model, normalization, judge, where, precision: str) -> Scores:
    if reward_model is not None and judge is not None:
        raise ValueError("ppo: score rollouts with either a reward model or an AI labeler and its judge, not both")
    if judge is not None and labeler is None:
        raise ValueError("ppo: the judge scores through the AI labeler: pass its labeler config")
    function = rewards.FunctionScore(cfg.reward_function) if cfg.reward_function else None
    if reward_model is None and judge is None and function is None:
        raise ValueError("ppo: nothing scores the rollouts: give a reward model, a judge or stage.ppo.reward_function")
    model = None
    if reward_model is not None:
        model = RewardModelScore(reward_model, normalization, where, precision)
    elif judge is not None:
        model = JudgeScore(labeler, judge, where, precision)
    return Scores(model, function, cfg)


def _whole_copy(policy: Path, tuning: Tuning, where):
    """Under ZeRO-3: a whole copy of the trained policy's structure (the method's adapters too), for
    sampling and export; its weights come from the gathered policy (`HfRollout.sync`)."""
    copy = peft_setup.prepare(load_causal_lm(policy, device=where), tuning.peft, "causal_lm")
    return copy.eval().requires_grad_(False)


def run(
    cfg: PpoConfig,
    tuning: Tuning,
    labeler: LabelerConfig | None = None,
    *,
    policy: Path,
    prompts: Path,
    out_dir: Path,
    reward_model: Path | None = None,
    normalization: Path | None = None,
    judge: Path | None = None,
    pretrain: Path | None = None,
    checkpoint_dir: Path | None = None,
    gold: str | None = None,
    target_len: int = 6,
    truncation: bool = True,
    max_dropped_fraction: float = 0.0,
    distributed: DistributedConfig | None = None,
    watch_prompts: Path | None = None,
    judge_reward_model: Path | None = None,
    judge_normalization: Path | None = None,
) -> Manifest:
    """Scores rollouts with `reward_model` (and its `normalization`), or, d-RLAIF, with the AI
    `labeler` over `judge`; with `cfg.reward_function`, a reward from code alone or summed with the
    reward model (`stages/rl/rewards.py`). `gold` set (the embedded task's rule): log the hidden gold score too.
    `watch_prompts` (with `watch_every`): the held-out prompts the proxy and the independent judge
    (`gold`, else `judge_reward_model`) score as training goes.

    `distributed`: this process is one rank of a group, data-parallel over rollouts. Each rank samples
    and scores its share of the update's `rollouts_per_update` prompts and trains on minibatches of
    its share of `minibatch_size`; gradients are averaged (DDP or ZeRO). Advantage whitening, the KL
    and score statistics, the adaptive KL controller and the diagnostics use the whole global batch
    (all-reduced), so two processes compute what one does with the same global batch. Reference
    and reward models are whole frozen copies on every rank."""
    out_dir = Path(out_dir)
    check(cfg.generation)
    where = device(tuning)
    scorer = _scorer(cfg, labeler, reward_model, normalization, judge, where, tuning.compute.precision)
    tokenizer = load_tokenizer(policy)
    budget = resolve_sampling("ppo", cfg.max_prompt_length, cfg.max_new_tokens, model_context(policy))
    if cfg.overlong_buffer >= budget.max_new_tokens:  # max_new_tokens null: resolved from the context only now
        raise ValueError(
            f"stage.ppo.overlong_buffer ({cfg.overlong_buffer}) must be below the {budget.max_new_tokens} new tokens"
        )
    texts, fitted = fit_prompt_file(
        tokenizer, prompts, budget, stage="ppo", truncation=truncation, max_dropped_fraction=max_dropped_fraction
    )
    gold_fn = sources.gold_scorer(gold, target_len)
    state = _State(cfg, tuning, policy, reward_model or policy, distributed)
    if cfg.watch_every:
        judged = (judge_reward_model, judge_normalization)
        state.watch = _watch(cfg, tokenizer, scorer, gold_fn, watch_prompts, *judged, budget, where,
                             tuning.compute.precision)  # fmt: skip
    resumed_from = state.update if checkpoint_dir and state.load(Path(checkpoint_dir)) else 0
    if state.watch is not None and not state.watch.points:  # the SFT policy's point: where KL is 0
        log_metrics(_named_point(state.watch.look(state.models, tokenizer, 0)), step=0)
    ptx_docs = [r["text"] for r in read_jsonl(pretrain)] if pretrain and cfg.ptx_coef > 0 else []
    bar = progress(cfg.updates, "ppo: updates", unit="update")
    bar.update(state.update)
    while state.update < cfg.updates:
        update = state.update
        n = cfg.samples_per_prompt  # each prompt n times in a row: one group of responses
        per_update = cfg.rollouts_per_update // n
        start = (update * per_update) % len(texts)  # data position follows the update index
        batch_prompts = [texts[(start + i // n) % len(texts)] for i in range(cfg.rollouts_per_update)]
        mine = batch_prompts[dist.share(len(batch_prompts))]  # this rank's rollouts
        refills = _prompt_stream(texts, start + per_update + dist.rank() * cfg.max_refills * per_update)
        row, rollout, mine = _one_update(cfg, state, tokenizer, scorer, mine, ptx_docs, update, budget, refills)
        batch_prompts = dist.gather(mine)  # the prompts answered (dynamic sampling may have replaced some)
        responses = dist.gather(decode_responses(tokenizer, rollout))  # the global batch's, on every rank
        row["ppo/distinct_2"] = diagnostics.distinct_n(responses, 2)
        row["ppo/repetition"] = diagnostics.repetition(responses)
        row |= {f"ppo/{k}": v for k, v in diagnostics.degenerate(batch_prompts, responses).items()}
        degenerate = _degenerate_reasons(cfg, row, state.history)
        if gold_fn is not None:
            row["ppo/objective/gold"] = sum(gold_fn(p, r) for p, r in zip(batch_prompts, responses)) / len(responses)
        state.history.append(row)
        log_metrics(row, step=update)
        bar.set_postfix(reward=f"{row['ppo/objective/scores']:.3f}", kl=f"{row['ppo/objective/kl']:.3f}", refresh=False)
        bar.update(1)
        state.update += 1
        if cfg.stop_on_degenerate and degenerate:  # no use training on: say why, publish what there is
            state.stopped = f"stopped early after update {state.update} of {cfg.updates}: {degenerate[0]}"
        if state.watch is not None and state.watch.due(state.update, last=state.update == cfg.updates or state.stopped):
            log_metrics(_named_point(state.watch.look(state.models, tokenizer, state.update)), step=state.update)
        if checkpoint_dir and cfg.checkpoint_every and state.update % cfg.checkpoint_every == 0:
            state.save(Path(checkpoint_dir))
        if state.stopped:
            break
    bar.close()
    manifest = _finish(cfg, state, tokenizer, out_dir, batch_prompts, responses, resumed_from, checkpoint_dir)
    manifest.metrics.update(fitted.metrics("ppo/data"))
    manifest.metrics["ppo/model_state_mb"] = _model_state_mb(state, scorer)
    return manifest


def _model_state_mb(state: _State, scorer) -> float:
    """The models' weights (trained, reference, scorer, each tensor once) and the optimizer's state, in MB:
    what a critic-free estimator saves shows here whatever the process's baseline RSS."""
    seen: dict[int, int] = {}
    modules = [state.models.module, *state.models.frozen, *scorer.frozen]
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            seen[t.data_ptr()] = t.numel() * t.element_size()
    for per_param in state.opt.state.values():
        for v in per_param.values():
            if torch.is_tensor(v):
                seen[v.data_ptr()] = v.numel() * v.element_size()
    return sum(seen.values()) / 2**20


class _Scored:
    """One update's rollouts and what the frozen pass measured on them (steps 1-2)."""

    def __init__(self, rollout: Rollout, score, old_logp, ref_logp, old_values, first_order, prompts, dynamic) -> None:
        self.rollout, self.score, self.first_order = rollout, score, first_order
        self.old_logp, self.ref_logp, self.old_values = old_logp, ref_logp, old_values
        self.mask = rollout.response_mask.float()
        self.prompts, self.dynamic = prompts, dynamic  # the prompts answered; dynamic sampling's figures


def _minibatches(order: torch.Tensor, cfg: PpoConfig, local: int) -> list[torch.Tensor]:
    return list(order.split(local * cfg.minibatch_size // cfg.rollouts_per_update))


def _collect(cfg, state: _State, tokenizer, scorer, prompts, budget: SamplingBudget, update: int, next_prompts):
    """1. Rollouts (KV-cached, batched generate: the seam where a faster engine plugs in), scored, with
    DAPO's dynamic sampling where asked (`stages/rl/dynamic_sampling.py`, prompts from `next_prompts`);
    2. one pass each of policy, reference and value over them, under the update's autocast. The old
    log-probs are computed in the first epoch's minibatches, so that epoch's first minibatch sees
    exactly what was scored: its ratio is 1 (approx-KL and clipfrac 0) in any precision."""
    models = state.models
    sample_scored = functools.partial(_sample_scored, cfg, state, tokenizer, scorer, budget)
    if cfg.dynamic_sampling:
        pad = tokenizer.pad_token_id
        rollout, score, prompts, dynamic = dynamic_sampling.fill(
            sample_scored, next_prompts, prompts, cfg.samples_per_prompt, cfg.max_refills, pad
        )
    else:
        (rollout, score), dynamic = sample_scored(prompts), {}
    _check_finite("reward", score, update)
    with torch.no_grad(), state.frozen_on_device(scorer), autocast(state.compute):
        first_order = torch.randperm(len(prompts), device="cpu").to(rollout.query.device)  # the host's RNG
        old_logp = torch.zeros(rollout.response.shape, device=rollout.query.device)
        for idx in _minibatches(first_order, cfg, len(prompts)):
            old_logp[idx] = models.policy_logprobs(_subset(rollout, idx))[0].float()
        ref_logp = models.ref_logprobs(rollout).float()
        old_values = models.values(rollout).float() * rollout.response_mask
    return _Scored(rollout, score, old_logp, ref_logp, old_values, first_order, prompts, dynamic)


def _sample_scored(cfg, state: _State, tokenizer, scorer, budget: SamplingBudget, prompts: list):
    """(rollout, score): responses to `prompts` on the policy's device, and each one's reward (the
    scorer's, less the missing-EOS penalty and DAPO's overlong penalty where set)."""
    rollout = state.rollout.sample(
        tokenizer,
        prompts,
        max_new_tokens=budget.max_new_tokens,
        max_prompt_length=budget.max_prompt_length,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
    )
    rollout = rollout.to(model_device(state.models.policy))  # once: every model below reads it there
    with torch.no_grad(), state.frozen_on_device(scorer), autocast(state.compute):
        score = scorer(tokenizer, prompts, rollout).float()
    if cfg.missing_eos_penalty is not None:
        score = score - cfg.missing_eos_penalty * (~rollout.finished).float()
    if cfg.overlong_buffer:  # DAPO: a response near the length limit loses reward softly
        lengths = rollout.response_mask.sum(1)
        score = score + pm.overlong_penalty(lengths, budget.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty)
    return rollout, score


def _advantages(cfg, state: _State, scored: _Scored, budget: SamplingBudget):
    """3. Per-token KL penalty and advantages: GAE with the value model, or a critic-free estimator.
    Returns (kl, advantages, returns)."""
    mask = scored.mask
    kl = pm.kl_estimate(scored.old_logp, scored.ref_logp, cfg.kl_estimator) * mask
    total = dist.all_reduce_sum if dist.active() else None
    if cfg.critic_free:
        in_reward = state.beta if cfg.kl_penalty == "reward" else 0.0
        kw = {"estimator": cfg.advantage, "n": cfg.samples_per_prompt, "beta": in_reward, "gamma": cfg.gamma}
        advantages = pm.critic_free_advantages(scored.score, kl, mask, **kw, total=total)
        return kl, advantages, advantages
    rewards = pm.kl_penalized_rewards(scored.score, kl, mask, state.beta)
    advantages, returns = pm.gae(rewards, scored.old_values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:  # by the global batch's statistics: the same on every rank
        advantages = pm.masked_whiten(advantages, mask, total=total)
    return kl, advantages, returns


STATS = ("pg", "vf", "clipfrac", "approxkl", "entropy", "kl_loss", "ptx")


class _Ptx:
    """PPO-ptx's pretraining texts; each minibatch's batch is drawn on the host before its step."""

    def __init__(self, tokenizer, docs: list[str], batch_size: int, budget: SamplingBudget) -> None:
        self.tokenizer, self.docs, self.batch_size = tokenizer, docs, batch_size
        self.max_length = budget.max_prompt_length + budget.max_new_tokens

    def draw(self) -> list[str]:
        return [self.docs[i] for i in torch.randint(len(self.docs), (self.batch_size,), device="cpu").tolist()]

    def loss(self, model, texts: list[str]) -> torch.Tensor:
        """Next-token loss on `texts`, cut to the sampling budget."""
        return lm_loss(model, self.tokenizer, texts, max_length=self.max_length)


class _Targets:
    """What every minibatch of one update reads: the scored rollouts, advantages, returns and the
    loss normaliser (Dr. GRPO's constant `horizon`, else None)."""

    def __init__(self, scored: _Scored, advantages, returns, horizon: int | None) -> None:
        self.scored, self.advantages, self.returns, self.horizon = scored, advantages, returns, horizon


def _optimise(cfg, state: _State, targets: _Targets, ptx: _Ptx | None, update: int):
    """4. PPO epochs over shuffled minibatches of this rank's rollouts. Returns the statistics' lists
    and the first minibatch's (ratio 1 by construction: see `_collect`)."""
    scored = targets.scored
    local = scored.rollout.response.shape[0]
    stats: dict[str, list[float]] = {k: [] for k in STATS}
    for epoch in range(cfg.ppo_epochs):
        order = scored.first_order if epoch == 0 else torch.randperm(local, device="cpu").to(scored.mask.device)
        for idx in _minibatches(order, cfg, local):
            texts = ptx.draw() if ptx is not None else None
            for k, v in zip(STATS, _train_minibatch(cfg, state, targets, idx, ptx, texts, update), strict=True):
                stats[k].append(v)
    used = {k: v for k, v in stats.items() if k in ("pg", "vf", "clipfrac", "approxkl", "entropy")}
    used |= {k: stats[k] for k in ("kl_loss", "ptx") if (cfg.kl_penalty == "loss" if k == "kl_loss" else ptx)}
    first = {"first_minibatch_clipfrac": stats["clipfrac"][0], "first_minibatch_approxkl": stats["approxkl"][0]}
    return used, first


def _train_minibatch(cfg, state: _State, targets: _Targets, idx, ptx: _Ptx | None, texts, update: int) -> list[float]:
    """One optimiser step on one minibatch, with one host sync: the statistics come back in one
    `tolist`, which also checks the loss before it is applied. Returns the statistics (`STATS`)."""
    loss, values = _minibatch_loss(cfg, state, targets, idx, ptx, texts)
    if not math.isfinite(values[0]):
        raise NonFiniteStop(f"ppo: non-finite loss at update {update}; lower stage.ppo.learning_rate")
    state.engine.backward(loss)
    state.engine.step()  # clips to max_grad_norm, steps, zeroes the gradients
    if state.ema is not None:
        state.ema_step(cfg.ema_decay)
    return values[1:]


def _minibatch_loss(cfg, state: _State, targets: _Targets, idx, ptx: _Ptx | None, texts):
    """One minibatch's loss and its statistics as floats (the loss first): the one host sync."""
    scored, horizon = targets.scored, targets.horizon
    mb, m = _subset(scored.rollout, idx), scored.mask[idx]
    zero = torch.zeros((), device=m.device)
    with autocast(state.compute):  # mixed precision (`compute.precision`); the losses in fp32
        logp, entropy, values = state.engine(mb)
        lm = ptx.loss(state.models.policy, texts) if ptx is not None else zero
    logp, entropy, values = logp.float(), entropy.float(), values.float()
    pg, clipfrac, approxkl = pm.policy_loss(
        logp, scored.old_logp[idx], targets.advantages[idx], m, cfg.clip, horizon,
        clip_high=cfg.clip_high, aggregation=cfg.loss_aggregation, level=cfg.ratio_level,
    )  # fmt: skip
    vf, loss = zero, pg
    if not cfg.critic_free:  # no value model: no value loss
        vf, _ = pm.value_loss(values, scored.old_values[idx], targets.returns[idx], m, cfg.value_clip)
        loss = pg + cfg.vf_coef * vf
    kl_term = zero
    if cfg.kl_penalty == "loss":  # GRPO: k3 KL to the reference as a loss term
        kl_term = pm.kl_loss(logp, scored.ref_logp[idx], m, horizon)
        loss = loss + state.beta * kl_term
    if ptx is not None:
        loss = pm.ptx_mix(loss, lm.float(), cfg.ptx_coef)
    parts = (loss, pg, vf, clipfrac, approxkl, pm.masked_mean(entropy, m), kl_term, lm)
    return loss, torch.stack([t.detach().float() for t in parts]).tolist()


def _one_update(cfg, state: _State, tokenizer, scorer, batch_prompts, ptx_docs, update, budget, next_prompts):
    """One update; returns its row of metrics, its rollouts and their prompts (dynamic sampling may
    have replaced some)."""
    scored = _collect(cfg, state, tokenizer, scorer, batch_prompts, budget, update, next_prompts)
    kl, advantages, returns = _advantages(cfg, state, scored, budget)
    horizon = budget.max_new_tokens if cfg.advantage == "dr_grpo" else None  # Dr. GRPO: no length normalisation
    ptx = _Ptx(tokenizer, ptx_docs, cfg.ptx_batch_size, budget) if ptx_docs else None
    stats, first = _optimise(cfg, state, _Targets(scored, advantages, returns, horizon), ptx, update)
    state.sync_rollout()
    row = _update_row(cfg, state, scored, kl, returns, stats, first, update)
    row |= {f"ppo/dynamic/{k}": _over_ranks(v) for k, v in scored.dynamic.items()}
    return row, scored.rollout, scored.prompts


def _update_row(cfg, state: _State, scored: _Scored, kl, returns, stats, first, update: int) -> dict[str, float]:
    rollout, mask, score, old_values = scored.rollout, scored.mask, scored.score, scored.old_values
    # 5. KL controller and diagnostics, over the global batch (every rank's rollouts)
    kl_seq = dist.mean(kl.sum(1))
    tokens = dist.all_reduce_sum(rollout.query_mask.sum() + mask.sum()).item()
    row = {
        "ppo/objective/kl": kl_seq,
        "ppo/objective/scores": dist.mean(score),
        "ppo/objective/non_score_reward": dist.mean(-state.beta * kl.sum(1)),
        "ppo/objective/rlhf_reward": dist.mean(score - state.beta * kl.sum(1)),
        "ppo/objective/beta": state.beta,
        "ppo/val/explained_variance": (
            math.nan if cfg.critic_free else _over_ranks(_explained_variance(old_values, returns, mask))
        ),
        "ppo/response_length": dist.mean(mask.sum(1)),
        # tokens through the model per update: rollout forward passes plus the PPO epochs' passes
        "ppo/tokens": float(tokens * (1 + cfg.ppo_epochs)),
        "ppo/finished": dist.mean(rollout.finished.float()),
        "ppo/learning_rate": state.opt.param_groups[0]["lr"],
        **{f"ppo/{name}": _over_ranks(sum(v) / len(v)) for name, v in _named(stats).items() if v},
        **{f"ppo/policy/{name}": _over_ranks(v) for name, v in first.items()},
    }
    if state.kl_ctl is not None:
        state.beta = state.kl_ctl.update(kl_seq, cfg.rollouts_per_update)
    if kl_seq > cfg.kl_warn and not state.warned_kl:
        warnings.warn(
            f"ppo: KL to the SFT policy reached {kl_seq:.2f} per response at update {update}, above "
            f"stage.ppo.kl_warn={cfg.kl_warn}; raise stage.ppo.beta or set stage.ppo.kl_target",
            stacklevel=2,
        )
        state.warned_kl = True
    return row


def _prompt_stream(texts: list, at: int):
    """`next_prompts(k)`: the next k prompts of the data stream from position `at`, for dynamic sampling."""
    position = [at]

    def next_prompts(k: int) -> list:
        chosen = [texts[(position[0] + i) % len(texts)] for i in range(k)]
        position[0] += k
        return chosen

    return next_prompts


def _over_ranks(value: float) -> float:
    """A per-rank statistic (a mean over equal shares) averaged over the ranks; itself in one process."""
    return dist.mean(torch.tensor([value], dtype=torch.float64, device="cpu"))


def _named(stats: dict[str, list[float]]) -> dict[str, list[float]]:
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


def _export(state: _State, tokenizer, out_dir: Path, published: dict | None) -> None:
    """`published` (the EMA weights, InstructGPT; or the policy at the judge's peak) as `policy`, the
    last iterate beside them as `policy_last`; without `published` the last iterate as `policy`.
    In a process group rank 0 writes; under ZeRO-3 through the rollout copy (whole weights)."""
    if state.zero3:  # the rollout copy holds the last iterate (synced after the last update)
        from stages.models.tuning import export

        models = state.models
        targets = [("policy_last", None), ("policy", published)] if published is not None else [("policy", None)]
        for name, weights in targets:
            if weights is not None:
                state.rollout_policy.load_state_dict(weights, strict=False)
            if dist.is_main():
                export(state.rollout_policy, models.tuning, out_dir / name, base=models.base)
                save_tokenizer(tokenizer, out_dir / name)
        return
    if published is not None:
        if dist.is_main():
            state.models.export(out_dir / "policy_last")
            save_tokenizer(tokenizer, out_dir / "policy_last")
        state.models.load_policy_state(published)
    if dist.is_main():
        state.models.export(out_dir / "policy")
        save_tokenizer(tokenizer, out_dir / "policy")


def _finish(cfg, state: _State, tokenizer, out_dir, batch_prompts, responses, resumed_from, checkpoint_dir) -> Manifest:
    watch = state.watch
    peak = cfg.select == "judge_peak" and watch is not None and watch.best is not None
    published_update = watch.best["update"] if peak else state.update
    _export(state, tokenizer, out_dir, watch.best["state"] if peak else state.ema)
    write_jsonl(out_dir / "samples.jsonl", [{"prompt": p, "response": r} for p, r in zip(batch_prompts, responses)])
    first, last = state.history[0], state.history[-1]
    verdict = diagnostics.flag(
        [
            ("KL to SFT per response", last["ppo/objective/kl"], cfg.kl_warn, "stage.ppo.kl_warn"),
            ("repetition", last["ppo/repetition"], cfg.max_repetition, "stage.ppo.max_repetition"),
        ]
    )
    verdict["reasons"] += [state.stopped] if state.stopped else _degenerate_reasons(cfg, last, state.history)
    verdict["status"] = "flagged" if verdict["reasons"] else "ok"
    (out_dir / "verdict.json").write_text(json.dumps(verdict))
    metrics = {
        "ppo/objective/scores_first": first["ppo/objective/scores"],
        "ppo/objective/scores_last": last["ppo/objective/scores"],
        "ppo/objective/kl_last": last["ppo/objective/kl"],
        "ppo/updates": float(cfg.updates),
        "ppo/resumed_from": float(resumed_from),
        "ppo/history_length": float(len(state.history)),
        "ppo/finished_last": last["ppo/finished"],
        "ppo/repetition_last": last["ppo/repetition"],
        "ppo/flagged": float(verdict["status"] != "ok"),
        "ppo/tokens": float(sum(h["ppo/tokens"] for h in state.history)),
        "ppo/stopped_early": float(state.stopped is not None),
        "ppo/published_update": float(published_update),
        "ppo/value_model": float(not cfg.critic_free),  # 0: the estimator loaded no value model
        "ppo/samples_per_prompt": float(cfg.samples_per_prompt),
        **{f"ppo/{k}_last": last[f"ppo/{k}"] for k in ("empty_share", "prompt_copy_share", "top_response_share")},
    }
    files = {"policy": "policy", "samples": "samples.jsonl", "verdict": "verdict.json"}
    if watch is not None:
        watch.write(out_dir / "watch.json", published_update)
        files["watch"] = "watch.json"
        metrics["ppo/watch/best_update"] = float(watch.best["update"])
        metrics["ppo/watch/judge_best"] = watch.best["judge"]
        over = watch.overoptimised()
        if over is not None:
            metrics["ppo/watch/overoptimised_from"] = float(over["from_update"])
    if state.engine.cfg is None:  # a process group's are removed by the flow, once it published
        checkpoints.spent(checkpoint_dir)  # the finished stage is cached as an artifact
    files |= {"policy_last": "policy_last"} if state.ema or peak else {}
    return Manifest(stage="ppo", path=str(out_dir), digest=folder_digest(out_dir), metrics=metrics, files=files)


def _degenerate_reasons(cfg: PpoConfig, row: dict[str, float], history: list[dict[str, float]]) -> list[str]:
    """The bounds an update's rollouts cross; the length against the first update's."""
    figures = {k: row[f"ppo/{k}"] for k in ("empty_share", "prompt_copy_share", "top_response_share")}
    figures["length"] = row["ppo/response_length"]
    first = {"length": history[0]["ppo/response_length"]} if history else None
    return diagnostics.degenerate_reasons(figures, first, diagnostics.degenerate_bounds(cfg), "stage.ppo")


def _named_point(point: dict[str, float]) -> dict[str, float]:
    return {f"ppo/watch/{k}": v for k, v in point.items() if k != "update"}


def _watch(
    cfg: PpoConfig, tokenizer, scorer, gold_fn, prompts: Path | None, judge_rm, judge_norm, budget, where, precision
) -> Watch:
    """The over-optimisation watch: the proxy (the scorer PPO optimises) and an independent judge."""
    if prompts is None:
        raise ValueError("stage.ppo.watch_every: the watch needs held-out prompts (watch_prompts)")
    texts = [r["prompt"] for r in read_jsonl(prompts)][: cfg.watch_prompts]
    if gold_fn is not None:
        judge = lambda ps, ts, rollout: [gold_fn(p, t) for p, t in zip(ps, ts)]  # noqa: E731
    elif judge_rm is not None:
        rm = TrainedRewardModel(judge_rm, judge_norm, device=where, precision=precision)  # as the proxy's
        judge = lambda ps, ts, rollout: rm.score(rollout)  # noqa: E731
    else:
        raise ValueError(
            "stage.ppo.watch_every: the watch needs a judge independent of the proxy: the embedded task's gold "
            "rule, or an evaluation reward model (data with comparisons); set stage.ppo.watch_every=0"
        )
    proxy = lambda ps, rollout: scorer(tokenizer, ps, rollout)  # noqa: E731
    every, seed = cfg.watch_every, cfg.seed + 7919  # its own sampling seed: the same prompts, comparable points
    return Watch(texts, proxy, judge, every=every, seed=seed, budget=budget, temperature=cfg.temperature,
                 precision=precision)  # fmt: skip


def _explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    var_returns = pm.masked_mean((returns - pm.masked_mean(returns, mask)) ** 2, mask)
    err = returns - values
    var_err = pm.masked_mean((err - pm.masked_mean(err, mask)) ** 2, mask)
    return 1.0 - (var_err / var_returns).item() if var_returns > 0 else math.nan
