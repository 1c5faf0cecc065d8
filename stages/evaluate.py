"""Evaluate stage: does the PPO policy beat the SFT policy on held-out prompts?

Both policies sample at temperature 1 (greedy SFT output can already sit near the gold maximum),
one response per prompt. Reports the gold (simulated-labeler, noise-free) score of each with a 95%
confidence interval, the win rate of the policy over SFT as judged by the (noisy) labeler, the
mean per-token KL of the policy to SFT on its own samples, and the reward model's pairwise
accuracy on held-out comparisons next to the labeler-noise ceiling (how often the noise-free gold
rule agrees with the noisy labels: the best any reward model can do).

Alone: `python -m flows.align` (it is the last stage).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from stages import task
from stages.labelers import LabelerConfig, SimulatedLabeler
from stages.manifest import Manifest, folder_digest, read_jsonl, write_jsonl
from stages.modeling import (
    decode_responses,
    load_causal_lm,
    load_scalar_model,
    load_tokenizer,
    response_logprobs,
    sample,
)
from stages.reward_model import load_normalization, pair_agreement, pairwise_accuracy


@dataclass(frozen=True)
class EvaluateConfig:
    max_new_tokens: int = 16
    temperature: float = 1.0
    batch_size: int = 200
    seed: int = 1234


def mean_ci95(xs: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(xs), "ci95": 1.96 * statistics.stdev(xs) / math.sqrt(len(xs))}


def labeler_ceiling(rows: list[dict], target_len: int) -> float | None:
    """Agreement of the noise-free gold rule with the labeler's rankings (ties count half); None
    when the comparisons are not the embedded task's (a dataset's), which has no gold rule."""
    if not all(isinstance(r["prompt"], str) and task.is_task_prompt(r["prompt"]) for r in rows):
        return None
    agree, total = 0.0, 0
    for row in rows:
        gold = [task.gold_score(row["prompt"], y, target_len=target_len) for y in row["responses"]]
        hits, pairs = pair_agreement(gold, row["ranks"])
        agree, total = agree + hits, total + pairs
    return agree / total


def _generate(model, tokenizer, prompts, cfg):
    texts, rollouts = [], []
    for start in range(0, len(prompts), cfg.batch_size):
        r = sample(
            model,
            tokenizer,
            prompts[start : start + cfg.batch_size],
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            generator_seed=cfg.seed + start,
        )
        texts += decode_responses(tokenizer, r)
        rollouts.append(r)
    return texts, rollouts


def _win(ranks: list[int]) -> float:
    """1 if the first response ranks better, 0.5 on a tie."""
    return 0.5 if ranks[0] == ranks[1] else float(ranks[0] < ranks[1])


@torch.no_grad()
def run(
    cfg: EvaluateConfig,
    labeler_cfg: LabelerConfig,
    *,
    sft_policy: Path,
    policy: Path,
    reward_model: Path,
    normalization: Path,
    heldout_comparisons: Path,
    prompts: Path,
    target_len: int,
    out_dir: Path,
) -> Manifest:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(sft_policy)
    sft, pol = load_causal_lm(sft_policy), load_causal_lm(policy)
    texts = [r["prompt"] for r in read_jsonl(prompts)]
    sft_texts, _ = _generate(sft, tokenizer, texts, cfg)
    pol_texts, rollouts = _generate(pol, tokenizer, texts, cfg)
    # per-token KL(pi || pi_sft), estimated on the policy's own samples
    kl_sum, tokens = 0.0, 0.0
    for r in rollouts:
        lp, _ = response_logprobs(pol, r, temperature=cfg.temperature)
        lq, _ = response_logprobs(sft, r, temperature=cfg.temperature)
        kl_sum += ((lp - lq) * r.response_mask).sum().item()
        tokens += r.response_mask.sum().item()
    gold_sft = [task.gold_score(p, y, target_len=target_len) for p, y in zip(texts, sft_texts)]
    gold_pol = [task.gold_score(p, y, target_len=target_len) for p, y in zip(texts, pol_texts)]
    labeler = SimulatedLabeler(labeler_cfg, target_len)  # the embedded task's judge, whoever ranked
    wins = [_win(labeler.rank(p, [a, b])) for p, a, b in zip(texts, pol_texts, sft_texts)]
    held = read_jsonl(heldout_comparisons)
    rm = load_scalar_model(reward_model).eval()
    pooling = load_normalization(normalization).pooling
    result = {
        "gold_sft": mean_ci95(gold_sft),
        "gold_policy": mean_ci95(gold_pol),
        "win_rate": statistics.fmean(wins),
        "kl_to_sft": kl_sum / tokens,
        "rm_accuracy": pairwise_accuracy(rm, load_tokenizer(reward_model), held, pooling),
        "labeler_ceiling": labeler_ceiling(held, target_len),
        "n_prompts": len(texts),
    }
    write_jsonl(
        out_dir / "generations.jsonl",
        [
            {"prompt": p, "sft": a, "policy": b, "gold_sft": ga, "gold_policy": gb}
            for p, a, b, ga, gb in zip(texts, sft_texts, pol_texts, gold_sft, gold_pol)
        ],
    )
    metrics = {
        "eval/gold_sft": result["gold_sft"]["mean"],
        "eval/gold_policy": result["gold_policy"]["mean"],
        "eval/win_rate": result["win_rate"],
        "eval/kl_to_sft": result["kl_to_sft"],
        "eval/rm_accuracy": result["rm_accuracy"],
    }
    if result["labeler_ceiling"] is not None:
        metrics["eval/labeler_ceiling"] = result["labeler_ceiling"]
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2))
    return Manifest(
        stage="evaluate",
        path=str(out_dir),
        digest=folder_digest(out_dir),
        metrics=metrics,
        files={"eval": "eval.json", "generations": "generations.jsonl"},
    )
