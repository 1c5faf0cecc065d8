"""Best-of-n stage: sample n responses per prompt from a policy, keep the reward model's best of each.

Rejection-sampling fine-tuning (Llama 2's RLHF before PPO; RAFT, Dong et al. 2023): the kept
responses become demonstrations, and the flow fine-tunes the policy on them with the SFT stage
(`pipeline=best_of_n`, one or more `rounds`, each from the policy the round before). A strong, cheap
baseline beside PPO: no value model, no RL, only sampling, scoring and supervised steps.

Writes `demonstrations.jsonl` (the SFT stage's `{"messages"}` rows: the prompt, then the best
response) and `samples.jsonl` (every response with its score). Metrics: the mean score of all
samples, of the kept best (the selection's gain on the proxy), and with a gold rule (the embedded
task) the gold score of both, which shows whether the proxy's choice is a real one.

Alone: `python -m flows.align pipeline=best_of_n pipeline.stop_after=best_of_n`.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from stages.data import sources
from stages.data.tokens import fit_prompt_file, resolve_sampling
from stages.models.compute import compute_dtype, pick_device
from stages.models.modeling import decode_responses, load_causal_lm, load_tokenizer, model_context, sample
from stages.preference.scorers import TrainedRewardModel
from stages.runtime.manifest import Manifest, folder_digest, write_jsonl
from stages.runtime.progress import progress
from stages.runtime.tracking import log_metrics
from stages.settings.recipe import BestOfNConfig


def _as_messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def best_indices(scores: list[float], n: int) -> list[int]:
    """The index of each group of `n` consecutive scores' highest (the first on a tie), as a flat index."""
    return [g * n + max(range(n), key=lambda i: (scores[g * n + i], -i)) for g in range(len(scores) // n)]


def run(
    cfg: BestOfNConfig,
    *,
    policy: Path,
    prompts: Path,
    reward_model: Path,
    normalization: Path,
    out_dir: Path,
    round: int = 1,
    gold: str | None = None,
    target_len: int = 6,
    truncation: bool = True,
    max_dropped_fraction: float = 0.0,
    device: str = "auto",
    precision: str = "fp32",
) -> Manifest:
    """`round`: which round this is (it picks the slice of `prompts` and the sampling seed); `device` and
    `precision`: where the policy and reward model run, and in what dtype (`compute.*`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    where = pick_device(device)
    tokenizer = load_tokenizer(policy)
    budget = resolve_sampling("best_of_n", cfg.max_prompt_length, cfg.max_new_tokens, model_context(policy))
    texts, fitted = fit_prompt_file(
        tokenizer, prompts, budget, stage="best_of_n", truncation=truncation, max_dropped_fraction=max_dropped_fraction
    )
    if not texts:
        raise ValueError(f"{prompts}: no prompt to sample")
    start = ((round - 1) * cfg.prompts) % len(texts)
    chosen = [texts[(start + i) % len(texts)] for i in range(min(cfg.prompts, len(texts)))]
    rm = TrainedRewardModel(reward_model, normalization, device=where, precision=precision)
    model = load_causal_lm(policy, device=where, dtype=compute_dtype(precision))
    flat = [p for p in chosen for _ in range(cfg.n)]
    responses: list[str] = []
    scores: list[float] = []
    bar = progress(len(flat), "best_of_n: sampling", unit="response")
    for at in range(0, len(flat), cfg.batch_size):
        batch = flat[at : at + cfg.batch_size]
        with torch.no_grad():
            rollout = sample(
                model,
                tokenizer,
                batch,
                max_new_tokens=budget.max_new_tokens,
                max_prompt_length=budget.max_prompt_length,
                temperature=cfg.temperature,
                generator_seed=cfg.seed + 100_003 * round + at,
                precision=precision,
            )
            scores += rm.score(rollout).float().tolist()
        responses += decode_responses(tokenizer, rollout)
        bar.update(len(batch))
    bar.close()
    best = best_indices(scores, cfg.n)
    demos = [{"messages": [*_as_messages(flat[i]), {"role": "assistant", "content": responses[i]}]} for i in best]
    write_jsonl(out_dir / "demonstrations.jsonl", demos)
    kept = set(best)
    rows = [
        {"prompt": p, "response": r, "score": s, "kept": i in kept}
        for i, (p, r, s) in enumerate(zip(flat, responses, scores))
    ]
    write_jsonl(out_dir / "samples.jsonl", rows)
    metrics = {
        "best_of_n/prompts": float(len(chosen)),
        "best_of_n/score_all": statistics.fmean(scores),
        "best_of_n/score_best": statistics.fmean(scores[i] for i in best),
        **fitted.metrics("best_of_n/data"),
    }
    gold_fn = sources.gold_scorer(gold, target_len)
    if gold_fn is not None:
        golds = [gold_fn(p, r) for p, r in zip(flat, responses)]
        metrics["best_of_n/gold_all"] = statistics.fmean(golds)
        metrics["best_of_n/gold_best"] = statistics.fmean(golds[i] for i in best)
    log_metrics(metrics)
    files = {"demonstrations": "demonstrations.jsonl", "samples": "samples.jsonl"}
    return Manifest("best_of_n", str(out_dir), folder_digest(out_dir), metrics=metrics, files=files)
