"""Evaluate stage: does the aligned policy (PPO, DPO or RLAIF) beat the SFT policy on held-out prompts?

Both policies sample at temperature 1, one response per prompt. `eval.json` has one shape in every
branch and on every data source; a block is null where it does not apply:

- `win`: the policy's win rate over SFT with a 95% CI, and who judged it:
  - data with a gold rule (the embedded task): the simulated human labeler (`win_labeler_noise`),
    whichever labeler trained the branch, so branches compare on one scale;
  - otherwise the AI labeler (`labeler=ai`, position-debiased) when the branch has a judge;
  - otherwise an independent **evaluation reward model**, trained on a split of the comparisons
    that the policy's reward model never saw (Gao et al. 2022's gold-RM protocol);
  `win_rate` repeats `win.rate`.
- `gold_sft`, `gold_policy`: the gold rule's mean score with a 95% CI (null without a gold rule);
- `proxy_rm`: the policy's own reward model's scores, labelled as the proxy that was optimised;
  `eval_rm`: the evaluation reward model's scores;
- `kl_to_sft`: mean per-token KL of the policy to SFT on its own samples;
- `sft`, `policy`: response length, EOS rate, distinct-1/2 and repetition (`stages/runtime/diagnostics.py`);
- `rm_accuracy`: the reward model's (or, without one, DPO's implicit reward's) pairwise accuracy on
  held-out comparisons, `labeler_ceiling` the gold rule's agreement with their labels, and `judge`
  the AI labeler's agreement with the gold rule and the simulated human labeler;
- `verdict`: "flagged" with reasons when the KL or the repetition passes its bound.

Alone: `python -m flows.align` (it is the last stage).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stages.data import sources
from stages.data.tokens import fit_prompt_file, resolve_sampling
from stages.labeling.labelers import LabelerConfig, SimulatedLabeler, make_labeler
from stages.models.compute import pick_device
from stages.models.modeling import (
    decode_responses,
    load_causal_lm,
    load_tokenizer,
    mean_token_kl,
    model_context,
    sample,
)
from stages.preference.rankings import encode_rankings, pair_agreement, preference_pairs
from stages.preference.scorers import TrainedRewardModel, implicit_reward_accuracy
from stages.runtime import diagnostics
from stages.runtime.manifest import Manifest, folder_digest, read_jsonl, write_jsonl
from stages.runtime.progress import progress


@dataclass(frozen=True)
class EvaluateConfig:
    max_new_tokens: int | None = None  # null: a quarter of the model's context window
    max_prompt_length: int | None = None  # tokens; longer prompts keep their end; null: the rest of the context
    temperature: float = 1.0
    batch_size: int = 200
    seed: int = 1234
    win_labeler_noise: float = 0.3  # the simulated human labeler that judges wins (conf/labeler/simulated.yaml)
    max_kl_per_token: float = 1.0  # above: the verdict is "flagged" (policy far from SFT: likely reward hacking)
    max_repetition: float = 0.5  # above: "flagged" (see stages/runtime/diagnostics.py)


def mean_ci95(xs: list[float]) -> dict[str, float]:
    ci = 1.96 * statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else math.nan
    return {"mean": statistics.fmean(xs), "ci95": ci}


def labeler_ceiling(rows: list[dict], gold) -> float | None:
    """Agreement of the noise-free gold rule with the labels (ties count half); None without a gold
    rule or for rows it cannot score (a dataset's conversations)."""
    if gold is None or not all(isinstance(r["prompt"], str) for r in rows):
        return None
    agree, total = 0.0, 0
    try:
        for row in rows:
            hits, pairs = pair_agreement([gold(row["prompt"], y) for y in row["responses"]], row["ranks"])
            agree, total = agree + hits, total + pairs
    except ValueError:  # a prompt the gold rule does not know (comparisons from a file)
        return None
    return agree / total if total else None


def judge_agreement(rows: list[dict], target_len: int, noise: float, gold) -> dict[str, float] | None:
    """Pairwise agreement of AI-labelled rankings with the gold rule and the simulated human labeler;
    None without a gold rule or unless the rows carry the AI labeler's soft preferences."""
    if gold is None or not rows or not all("prefs" in r and isinstance(r["prompt"], str) for r in rows):
        return None
    human = SimulatedLabeler(LabelerConfig(noise=noise), target_len)
    agree = {"gold": [0.0, 0], "human": [0.0, 0]}
    for row in rows:
        scores = {"gold": [gold(row["prompt"], y) for y in row["responses"]]}
        scores["human"] = human.noisy_scores(row["prompt"], row["responses"])
        for name, values in scores.items():
            hits, pairs = pair_agreement(values, row["ranks"])
            agree[name][0] += hits
            agree[name][1] += pairs
    return {f"agreement_{k}": h / max(1, n) for k, (h, n) in agree.items()}


def _generate(model, tokenizer, prompts, cfg, budget):
    texts, rollouts = [], []
    bar = progress(len(prompts), "evaluate: sampling", unit="response")
    for start in range(0, len(prompts), cfg.batch_size):
        r = sample(
            model,
            tokenizer,
            prompts[start : start + cfg.batch_size],
            max_new_tokens=budget.max_new_tokens,
            max_prompt_length=budget.max_prompt_length,
            temperature=cfg.temperature,
            generator_seed=cfg.seed + start,
        )
        texts += decode_responses(tokenizer, r)
        rollouts.append(r)
        bar.update(r.response.shape[0])
    bar.close()
    return texts, rollouts


def _win(ranks: list[int]) -> float:
    """1 if the first response ranks better, 0.5 on a tie."""
    return 0.5 if ranks[0] == ranks[1] else float(ranks[0] < ranks[1])


def _described(texts: list[str], rollouts) -> dict[str, float]:
    lengths = [int(n) for r in rollouts for n in r.response_mask.sum(1).tolist()]
    finished = [bool(f) for r in rollouts for f in r.finished.tolist()]
    return diagnostics.describe(texts, lengths, finished)


def _scores(rm: TrainedRewardModel, rollouts) -> list[float]:
    return [s for r in rollouts for s in rm.score(r).tolist()]


def _win_block(by: str, wins: list[float]) -> dict[str, Any]:
    ci = mean_ci95(wins)
    return {"by": by, "rate": ci["mean"], "ci95": ci["ci95"], "n": len(wins)}


def _dpo_accuracy(pol, sft, tokenizer, held: list[dict]) -> float | None:
    """DPO's implicit reward (log pi - log pi_sft) ranking held-out pairs; the scale beta does not matter."""
    pairs = preference_pairs(encode_rankings(tokenizer, held), held)
    return implicit_reward_accuracy(pol, sft, tokenizer.pad_token_id, pairs) if pairs else None


@torch.no_grad()
def run(
    cfg: EvaluateConfig,
    labeler: LabelerConfig | None = None,
    *,
    sft_policy: Path,
    policy: Path,
    prompts: Path,
    target_len: int,
    out_dir: Path,
    gold: str | None = "embedded",
    reward_model: Path | None = None,
    normalization: Path | None = None,
    heldout_comparisons: Path | None = None,
    eval_reward_model: Path | None = None,
    eval_normalization: Path | None = None,
    judge: Path | None = None,
    data_sources: Path | None = None,
    truncation: bool = True,
    max_dropped_fraction: float = 0.0,
    device: str = "auto",
) -> Manifest:
    """`gold`: the data's gold rule (null for real data); `judge` with `labeler` (the AI labeler) or
    `eval_reward_model` judges wins where there is no gold rule; `data_sources`: prepare's sources.json;
    `device`: where every model samples and scores (`compute.device`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(sft_policy)
    budget = resolve_sampling("evaluate", cfg.max_prompt_length, cfg.max_new_tokens, model_context(sft_policy))
    texts, fitted = fit_prompt_file(
        tokenizer, prompts, budget, stage="evaluate", truncation=truncation, max_dropped_fraction=max_dropped_fraction
    )
    gold_fn = sources.gold_scorer(gold, target_len)
    where = pick_device(device)
    sft, pol = load_causal_lm(sft_policy, device=where), load_causal_lm(policy, device=where)
    sft_texts, sft_rollouts = _generate(sft, tokenizer, texts, cfg, budget)
    pol_texts, rollouts = _generate(pol, tokenizer, texts, cfg, budget)
    held = read_jsonl(heldout_comparisons) if heldout_comparisons is not None else []
    result: dict[str, Any] = {
        "gold_sft": None,
        "gold_policy": None,
        "win": None,
        "proxy_rm": None,
        "eval_rm": None,
        "rm_accuracy": None,
        "labeler_ceiling": labeler_ceiling(held, gold_fn) if held else None,
        "judge": judge_agreement(held, target_len, cfg.win_labeler_noise, gold_fn),
    }
    rows = [{"prompt": p, "sft": a, "policy": b} for p, a, b in zip(texts, sft_texts, pol_texts)]
    if gold_fn is not None:
        gold_sft = [gold_fn(p, y) for p, y in zip(texts, sft_texts)]
        gold_pol = [gold_fn(p, y) for p, y in zip(texts, pol_texts)]
        result["gold_sft"], result["gold_policy"] = mean_ci95(gold_sft), mean_ci95(gold_pol)
        human = SimulatedLabeler(LabelerConfig(noise=cfg.win_labeler_noise), target_len, gold)  # one scale
        wins = [_win(human.rank(p, [a, b])) for p, a, b in zip(texts, pol_texts, sft_texts)]
        result["win"] = _win_block("simulated human labeler", wins)
        for row, ga, gb in zip(rows, gold_sft, gold_pol):
            row |= {"gold_sft": ga, "gold_policy": gb}
    elif judge is not None and labeler is not None:
        ai = make_labeler(labeler, target_len, judge, gold, where)
        wins = [_win(label["ranks"]) for label in ai.label_all([(r["prompt"], [r["policy"], r["sft"]]) for r in rows])]
        result["win"] = _win_block("AI labeler", wins)
    if eval_reward_model is not None and eval_normalization is not None:
        scorer = TrainedRewardModel(eval_reward_model, eval_normalization, device=where)
        s_sft, s_pol = _scores(scorer, sft_rollouts), _scores(scorer, rollouts)
        result["eval_rm"] = {"sft": mean_ci95(s_sft), "policy": mean_ci95(s_pol)}
        for row, a, b in zip(rows, s_sft, s_pol):
            row |= {"eval_rm_sft": a, "eval_rm_policy": b}
        if result["win"] is None:
            wins = [0.5 if a == b else float(b > a) for a, b in zip(s_sft, s_pol)]
            result["win"] = _win_block("evaluation reward model", wins)
    if reward_model is not None and normalization is not None:
        proxy = TrainedRewardModel(reward_model, normalization, device=where)
        p_sft, p_pol = _scores(proxy, sft_rollouts), _scores(proxy, rollouts)
        result["proxy_rm"] = {
            "note": "the reward model the policy was optimised against: a proxy, not an independent judge",
            "sft": mean_ci95(p_sft),
            "policy": mean_ci95(p_pol),
        }
        for row, a, b in zip(rows, p_sft, p_pol):
            row |= {"proxy_rm_sft": a, "proxy_rm_policy": b}
        result["rm_accuracy"] = proxy.accuracy(tokenizer, held) if held else None
    elif held:
        result["rm_accuracy"] = _dpo_accuracy(pol, sft, tokenizer, held)
    result["win_rate"] = result["win"]["rate"] if result["win"] else None
    result["kl_to_sft"] = mean_token_kl(pol, sft, rollouts, temperature=cfg.temperature)  # on the policy's samples
    result["sft"], result["policy"] = _described(sft_texts, sft_rollouts), _described(pol_texts, rollouts)
    result["verdict"] = diagnostics.verdict(
        result["kl_to_sft"],
        result["policy"]["repetition"],
        max_kl_per_token=cfg.max_kl_per_token,
        max_repetition=cfg.max_repetition,
    )
    result["n_prompts"] = len(texts)
    result["prompts"] = fitted.metrics("prompts") | {"source": _prompt_source(data_sources)}
    write_jsonl(out_dir / "generations.jsonl", rows)
    metrics = {"eval/kl_to_sft": result["kl_to_sft"], "eval/flagged": float(result["verdict"]["status"] != "ok")}
    metrics["eval/tokens"] = float(
        sum((r.query_mask.sum() + r.response_mask.sum()).item() for r in sft_rollouts + rollouts)
    )
    for key in ("gold_sft", "gold_policy"):
        if result[key] is not None:
            metrics[f"eval/{key}"] = result[key]["mean"]
    for key in ("win_rate", "rm_accuracy", "labeler_ceiling"):
        if result[key] is not None:
            metrics[f"eval/{key}"] = result[key]
    for block in ("proxy_rm", "eval_rm"):
        if result[block] is not None:
            metrics[f"eval/{block}/policy"] = result[block]["policy"]["mean"]
            metrics[f"eval/{block}/sft"] = result[block]["sft"]["mean"]
    for side in ("sft", "policy"):
        metrics |= {f"eval/{side}/{k}": v for k, v in result[side].items()}
    for key, value in (result["judge"] or {}).items():
        metrics[f"eval/judge/{key}"] = value
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2))
    (out_dir / "verdict.json").write_text(json.dumps(result["verdict"]))
    return Manifest(
        stage="evaluate",
        path=str(out_dir),
        digest=folder_digest(out_dir),
        metrics=metrics,
        files={"eval": "eval.json", "generations": "generations.jsonl", "verdict": "verdict.json"},
    )


def _prompt_source(path: Path | None) -> str | None:
    if path is None:
        return None
    return json.loads(Path(path).read_text()).get("prompt_source", {}).get("eval_prompts")
