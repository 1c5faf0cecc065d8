"""Evaluate stage: does the aligned policy (PPO, DPO or RLAIF) beat the SFT policy on held-out prompts?

Both policies sample at temperature 1 (greedy SFT output can already sit near the gold maximum),
one response per prompt. Reports the gold (simulated-labeler, noise-free) score of each with a 95%
confidence interval, the win rate of the policy over SFT as judged by the (noisy) labeler, the
mean per-token KL of the policy to SFT on its own samples, and the reward model's pairwise
accuracy on held-out comparisons next to the labeler-noise ceiling (how often the noise-free gold
rule agrees with the noisy labels: the best any reward model can do). Every branch writes the same
keys: without a reward model (DPO, d-RLAIF) `rm_accuracy` is null, without comparisons
`labeler_ceiling` too. When the held-out comparisons were labelled by the AI labeler, `judge` holds
its agreement with the gold rule and with the simulated human labeler on those SFT samples.

The win rate is always judged by the simulated human labeler (`win_labeler_noise`), whichever
labeler trained the branch, so that branches compare on one scale.

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
    mean_token_kl,
    sample,
)
from stages.reward_model import load_normalization, pair_agreement, pairwise_accuracy


@dataclass(frozen=True)
class EvaluateConfig:
    max_new_tokens: int = 16
    temperature: float = 1.0
    batch_size: int = 200
    seed: int = 1234
    win_labeler_noise: float = 0.3  # the simulated human labeler that judges wins (conf/labeler/simulated.yaml)


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


def judge_agreement(rows: list[dict], target_len: int, noise: float) -> dict[str, float] | None:
    """Pairwise agreement of AI-labelled rankings with the gold rule and the simulated human labeler;
    None unless the rows carry the AI labeler's soft preferences on the embedded task's prompts."""
    if not rows or not all(
        "prefs" in r and isinstance(r["prompt"], str) and task.is_task_prompt(r["prompt"]) for r in rows
    ):
        return None
    human = SimulatedLabeler(LabelerConfig(noise=noise), target_len)
    agree = {"gold": [0.0, 0], "human": [0.0, 0]}
    for row in rows:
        gold = [task.gold_score(row["prompt"], y, target_len=target_len) for y in row["responses"]]
        for name, scores in (("gold", gold), ("human", human.noisy_scores(row["prompt"], row["responses"]))):
            hits, pairs = pair_agreement(scores, row["ranks"])
            agree[name][0] += hits
            agree[name][1] += pairs
    return {f"agreement_{k}": h / max(1, n) for k, (h, n) in agree.items()}


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
    *,
    sft_policy: Path,
    policy: Path,
    prompts: Path,
    target_len: int,
    out_dir: Path,
    reward_model: Path | None = None,
    normalization: Path | None = None,
    heldout_comparisons: Path | None = None,
) -> Manifest:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(sft_policy)
    sft, pol = load_causal_lm(sft_policy), load_causal_lm(policy)
    texts = [r["prompt"] for r in read_jsonl(prompts)]
    sft_texts, _ = _generate(sft, tokenizer, texts, cfg)
    pol_texts, rollouts = _generate(pol, tokenizer, texts, cfg)
    gold_sft = [task.gold_score(p, y, target_len=target_len) for p, y in zip(texts, sft_texts)]
    gold_pol = [task.gold_score(p, y, target_len=target_len) for p, y in zip(texts, pol_texts)]
    labeler = SimulatedLabeler(LabelerConfig(noise=cfg.win_labeler_noise), target_len)  # one judge for every branch
    wins = [_win(labeler.rank(p, [a, b])) for p, a, b in zip(texts, pol_texts, sft_texts)]
    held = read_jsonl(heldout_comparisons) if heldout_comparisons is not None else []
    rm_accuracy = None
    if reward_model is not None and normalization is not None:
        rm = load_scalar_model(reward_model).eval()
        pooling = load_normalization(normalization).pooling
        rm_accuracy = pairwise_accuracy(rm, load_tokenizer(reward_model), held, pooling)
    result = {
        "gold_sft": mean_ci95(gold_sft),
        "gold_policy": mean_ci95(gold_pol),
        "win_rate": statistics.fmean(wins),
        "kl_to_sft": mean_token_kl(pol, sft, rollouts, temperature=cfg.temperature),  # on the policy's samples
        "rm_accuracy": rm_accuracy,
        "labeler_ceiling": labeler_ceiling(held, target_len) if held else None,
        "judge": judge_agreement(held, target_len, cfg.win_labeler_noise),
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
    }
    for key in ("rm_accuracy", "labeler_ceiling"):
        if result[key] is not None:
            metrics[f"eval/{key}"] = result[key]
    for key, value in (result["judge"] or {}).items():
        metrics[f"eval/judge/{key}"] = value
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2))
    return Manifest(
        stage="evaluate",
        path=str(out_dir),
        digest=folder_digest(out_dir),
        metrics=metrics,
        files={"eval": "eval.json", "generations": "generations.jsonl"},
    )
