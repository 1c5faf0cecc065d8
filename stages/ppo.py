"""PPO stage: optimise the SFT policy against a reward with a per-token KL penalty to SFT. It runs every
on-policy RL algorithm of the recipe and its successors, one loop with keys:

- **PPO** (InstructGPT step 3, Ouyang et al. 2022; our own, TRL removed PPO in 1.13): rollouts from the
  policy, reward = normalised RM score at the last token minus `beta * KL(pi || pi_sft)` on every token
  (fixed beta or Ziegler et al.'s adaptive controller), a value model initialised from the reward
  model, GAE, clipped policy and value losses, optional PPO-ptx and an EMA of the policy for export.
- **GRPO, Dr. GRPO, RLOO, REINFORCE++** (with or without a group baseline): critic-free advantage
  estimators (`advantage`, one record each in `stages/settings/recipe.py: ESTIMATOR_RECORDS`) over
  `samples_per_prompt` responses per prompt, no value model loaded; the KL in the reward or, GRPO's
  way, as a k3 loss term (`kl_penalty`).
- **DAPO** (clip-higher, dynamic sampling, overlong shaping, token-level aggregation) and **GSPO** (the
  sequence-level ratio): keys of the same loop (`clip_high`, `dynamic_sampling`, `overlong_buffer`,
  `loss_aggregation`, `ratio_level`).
- **RLVR**: a reward from code (`reward_function`, `stages/rl/rewards.py`), alone or beside the RM.
- **d-RLAIF** (Lee et al. 2023, `pipeline=rlaif_direct`): with `judge` instead of `reward_model` the AI
  labeler scores every rollout (its expected 1-10 score in [-1, 1]); the value model starts from SFT.

The pieces: `stages/rl/scoring.py` (what is optimised), `stages/rl/ppo_state.py` (the resumable state),
`stages/rl/ppo_update.py` (one update: collect, advantages, optimise) and `stages/rl/ppo_math.py`.
Checkpoints every `checkpoint_every` updates; a killed run resumes from the last complete one.
Degenerate rollouts are measured every update (`stages/runtime/diagnostics.py`); crossing a bound flags
the stage, and `stop_on_degenerate` stops there. `watch_every` scores held-out prompts with the proxy
and an independent judge against KL (`stages/rl/watch.py`, Gao et al. 2022); `select=judge_peak`
publishes the policy at the judge's best point.

Alone: `python -m flows.align pipeline.stop_after=ppo`.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from stages.data import sources
from stages.data.tokens import SamplingBudget, fit_prompt_file, resolve_sampling
from stages.data.tool_calls import tool_format
from stages.labeling.labelers import make_labeler
from stages.models.modeling import decode_responses, load_tokenizer, model_context, save_tokenizer
from stages.models.tuning import device
from stages.preference.scorers import TrainedRewardModel
from stages.rl.async_rollouts import RolloutWorker
from stages.rl.ppo_state import PpoState, model_state_mb
from stages.rl.ppo_update import one_update
from stages.rl.rollout import check
from stages.rl.scoring import Scores, make_scorer
from stages.rl.tools import Toolbox
from stages.rl.watch import Watch
from stages.runtime import checkpoints, diagnostics
from stages.runtime import process_group as dist
from stages.runtime.manifest import Manifest, folder_digest, read_jsonl, write_jsonl
from stages.runtime.progress import progress
from stages.runtime.tracking import log_metrics
from stages.settings.distributed import DistributedConfig
from stages.settings.labeling import LabelerConfig
from stages.settings.models import Tuning
from stages.settings.recipe import PpoConfig


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
    """Scores rollouts with `reward_model` (and its `normalization`), or, d-RLAIF, with the AI `labeler`
    over `judge`; with `cfg.reward_function`, a reward from code alone or beside the reward model.
    `gold` (the embedded task's rule): the hidden gold score is logged too. `watch_prompts` (with
    `watch_every`): what the proxy and the independent judge (`gold`, else `judge_reward_model`) score.

    `distributed`: this process is one rank of a group, data-parallel over rollouts: each rank samples
    and scores its share of each update and trains on its share of each minibatch; whitening, the KL,
    the controller and the diagnostics use the global batch, so two processes compute what one does."""
    check(cfg.generation)
    toolbox = Toolbox.load(cfg.tools) if cfg.tools else None  # a wrong name stops here, before any model loads
    if cfg.async_rollouts and dist.world_size() > 1:
        raise ValueError("stage.ppo.async_rollouts: one rollout worker per run; it does not run in a process group")
    where, precision = device(tuning), tuning.compute.precision
    tokenizer = load_tokenizer(policy)
    if toolbox is not None:
        tool_format(tokenizer).check()  # one error line before any model loads, where the format cannot run
    budget = _budget(cfg, policy)
    texts, fitted = fit_prompt_file(
        tokenizer, prompts, budget, stage="ppo", truncation=truncation, max_dropped_fraction=max_dropped_fraction
    )
    with rollout_worker(cfg, tuning, policy, texts, budget) as worker:  # None: synchronous
        scorer = _scorer(cfg, labeler, reward_model, normalization, judge, where, precision)
        gold_fn = sources.gold_scorer(gold, target_len)
        state = PpoState(cfg, tuning, policy, reward_model or policy, distributed, checkpoint_dir, toolbox)
        if cfg.watch_every:
            judged = (judge_reward_model, judge_normalization)
            state.watch = _watch(cfg, tokenizer, scorer, gold_fn, watch_prompts, *judged, budget, where, precision)
        resumed_from = state.update if state.load() else 0
        ptx_docs = [r["text"] for r in read_jsonl(pretrain)] if pretrain and cfg.ptx_coef > 0 else []
        began, first = time.perf_counter(), state.update
        last = _train(cfg, state, tokenizer, scorer, texts, ptx_docs, budget, gold_fn, worker)
        seconds = time.perf_counter() - began  # the updates this process ran, any wait for the worker in it
    manifest = _finish(cfg, state, tokenizer, Path(out_dir), *last, resumed_from, checkpoint_dir)
    manifest.metrics.update(fitted.metrics("ppo/data"))
    manifest.metrics["ppo/model_state_mb"] = model_state_mb(state, scorer)
    manifest.metrics["ppo/updates_per_s"] = (state.update - first) / seconds
    return manifest


def _scorer(cfg: PpoConfig, labeler, reward_model, normalization, judge, where, precision: str) -> Scores:
    if judge is not None and labeler is None:
        raise ValueError("ppo: the judge scores through the AI labeler: pass its labeler config")
    build_judge = None
    if judge is not None:
        build_judge = lambda: make_labeler(labeler, 0, judge, device=where, precision=precision)  # noqa: E731
    return make_scorer(cfg, reward_model, normalization, build_judge, where, precision)


def _budget(cfg: PpoConfig, policy: Path) -> SamplingBudget:
    budget = resolve_sampling("ppo", cfg.max_prompt_length, cfg.max_new_tokens, model_context(policy))
    if cfg.overlong_buffer >= budget.max_new_tokens:  # max_new_tokens null: resolved from the context only now
        raise ValueError(
            f"stage.ppo.overlong_buffer ({cfg.overlong_buffer}) must be below the {budget.max_new_tokens} new tokens"
        )
    return budget


def _train(cfg, state: PpoState, tokenizer, scorer, texts, ptx_docs, budget, gold_fn, worker: RolloutWorker | None):
    """The updates from where `state` stands to `cfg.updates` (or a degenerate stop), on the rollout
    `worker`'s batches where there is one. Returns the last update's prompts and responses (the global
    batch's)."""
    if state.watch is not None and not state.watch.points:  # the SFT policy's point: where KL is 0
        log_metrics(_named_point(state.watch.look(state.models, tokenizer, 0)), step=0)
    if worker is not None:
        worker.attach(state.models.policy, start=state.update, pending=state.async_pending)
    bar = progress(cfg.updates, "ppo: updates", unit="update")
    bar.update(state.update)
    while state.update < cfg.updates:
        mine, refills = _update_prompts(cfg, texts, state.update)
        behaviour = worker.take(state.update) if worker is not None else None
        row, rollout, mine = one_update(
            cfg, state, tokenizer, scorer, mine, ptx_docs, state.update, budget, refills, behaviour
        )
        if worker is not None:
            worker.publish(state.update + 1)
        batch_prompts = dist.gather(mine)  # the prompts answered (dynamic sampling may have replaced some)
        responses = dist.gather(decode_responses(tokenizer, rollout))  # the global batch's, on every rank
        degenerate = _record(cfg, state, row, batch_prompts, responses, gold_fn)
        bar.set_postfix(reward=f"{row['ppo/objective/scores']:.3f}", kl=f"{row['ppo/objective/kl']:.3f}", refresh=False)
        bar.update(1)
        state.loop.advance(row["ppo/objective/scores"])
        if cfg.stop_on_degenerate and degenerate:  # no use training on: say why, publish what there is
            state.stopped = f"stopped early after update {state.update} of {cfg.updates}: {degenerate[0]}"
        if state.watch is not None and state.watch.due(state.update, last=state.update == cfg.updates or state.stopped):
            log_metrics(_named_point(state.watch.look(state.models, tokenizer, state.update)), step=state.update)
        if state.loop.due():
            state.async_pending = worker.pending(state.update) if worker is not None else {}
            state.save()
        if state.stopped:
            break
    bar.close()
    return batch_prompts, responses


@contextlib.contextmanager
def rollout_worker(cfg: PpoConfig, tuning: Tuning, policy: Path, texts: list, budget: SamplingBudget,
                   *, lag: int | None = None):  # fmt: skip
    """With `async_rollouts`: the worker process that samples ahead (`stages/rl/async_rollouts.py`), its
    weights at most `lag` updates old (default `async_rollouts`; 0 given here: the worker on the
    synchronous loop's schedule, what the tests compare with the loop itself); else None. Started before
    the trainer loads its models, so the two load at once; stopped on the way out."""
    if lag is None and not cfg.async_rollouts:
        yield None
        return
    prompts_for = lambda update: _update_prompts(cfg, texts, update)[0]  # noqa: E731
    lag = cfg.async_rollouts if lag is None else lag
    worker = RolloutWorker(cfg, tuning, policy, budget, prompts_for, lag=lag)
    try:
        yield worker
    finally:
        worker.close()


def _update_prompts(cfg: PpoConfig, texts: list, update: int):
    """This rank's prompts for `update` (each `samples_per_prompt` times in a row: one group of responses;
    the data position follows the update index) and the stream dynamic sampling refills from."""
    n = cfg.samples_per_prompt
    per_update = cfg.rollouts_per_update // n
    start = (update * per_update) % len(texts)
    batch_prompts = [texts[(start + i // n) % len(texts)] for i in range(cfg.rollouts_per_update)]
    refills = _prompt_stream(texts, start + per_update + dist.rank() * cfg.max_refills * per_update)
    return batch_prompts[dist.share(len(batch_prompts))], refills


def _record(cfg: PpoConfig, state: PpoState, row: dict, batch_prompts: list, responses: list, gold_fn) -> list[str]:
    """The update's diagnostics and gold score into its row, the row into the history and the tracker.
    Returns the degenerate bounds crossed."""
    row["ppo/distinct_2"] = diagnostics.distinct_n(responses, 2)
    row["ppo/repetition"] = diagnostics.repetition(responses)
    row |= {f"ppo/{k}": v for k, v in diagnostics.degenerate(batch_prompts, responses).items()}
    degenerate = _degenerate_reasons(cfg, row, state.history)
    if gold_fn is not None:
        row["ppo/objective/gold"] = sum(gold_fn(p, r) for p, r in zip(batch_prompts, responses)) / len(responses)
    state.history.append(row)
    log_metrics(row, step=state.update)
    return degenerate


def _prompt_stream(texts: list, at: int):
    """`next_prompts(k)`: the next k prompts of the data stream from position `at`, for dynamic sampling."""
    position = [at]

    def next_prompts(k: int) -> list:
        chosen = [texts[(position[0] + i) % len(texts)] for i in range(k)]
        position[0] += k
        return chosen

    return next_prompts


def _export(state: PpoState, tokenizer, out_dir: Path, published: dict | None) -> None:
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


def _finish(
    cfg, state: PpoState, tokenizer, out_dir, batch_prompts, responses, resumed_from, checkpoint_dir
) -> Manifest:
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
    metrics |= _async_metrics(state.history)
    for key in ("share_using", "calls") if "ppo/tools/calls" in last else ():  # multi-turn tool use
        metrics |= {
            f"ppo/tools/{key}_first": first[f"ppo/tools/{key}"],
            f"ppo/tools/{key}_last": last[f"ppo/tools/{key}"],
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


def _async_metrics(history: list[dict[str, float]]) -> dict[str, float]:
    """Asynchronous rollouts over the run: the most and mean staleness, the trainer's total wait for
    batches (and the first update's), the mean share of tokens whose importance weight was truncated.
    Nothing when synchronous."""
    rows = [h for h in history if "ppo/async/staleness" in h]
    if not rows:
        return {}
    staleness = [h["ppo/async/staleness"] for h in rows]
    return {
        "ppo/async/staleness_max": max(staleness),
        "ppo/async/staleness_mean": sum(staleness) / len(rows),
        "ppo/async/wait_s_total": sum(h["ppo/async/wait_s"] for h in rows),
        "ppo/async/first_wait_s": rows[0]["ppo/async/wait_s"],  # the worker's start-up the loading did not hide
        "ppo/async/is_truncated_mean": sum(h["ppo/async/is_truncated"] for h in rows) / len(rows),
    }


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
