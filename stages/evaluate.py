"""Evaluate stage: does the aligned policy (PPO, DPO or RLAIF) beat the SFT policy on held-out prompts?

Both policies sample at temperature 1, one response per prompt. `eval.json` has one shape in every
branch and on every data source; a block is null where it does not apply:

- `win`: the policy's win rate over SFT with a 95% CI, the length-controlled rate beside it
  (`lc_rate`, `stages/preference/validity.py`), and who judged it:
  - data with a gold rule (the embedded task): the simulated human labeler (`win_labeler_noise`),
    whichever labeler trained the branch, so branches compare on one scale;
  - otherwise the AI labeler (`labeler=ai`, position-debiased) when the branch has a judge;
  - otherwise an independent **evaluation reward model**, trained on a split of the comparisons
    that the policy's reward model never saw (Gao et al. 2022's gold-RM protocol);
  `win_rate` repeats `win.rate`, `win_rate_lc` `win.lc_rate`. `win.judge` is the judge's own
  held-out agreement with human preferences, with a 95% CI (`stages/labeling/judges.py`): when the
  CI's lower end does not reach `min_judge_accuracy`, the win rate is not evidence and the verdict
  is "inconclusive" (the registry promotes nothing inconclusive).
- `gold_sft`, `gold_policy`: the gold rule's mean score with a 95% CI (null without a gold rule);
- `accuracy`: on an exact-match task (`data.task=arithmetic`), SFT's and the policy's share of right
  answers with 95% Wilson intervals, their difference with its 95% CI and their ratio (null elsewhere);
- `tools`: where the policy was trained with tools (`stage.ppo.tools`, `stages/rl/tools.py`) on an
  exact-match task, every response above is sampled with them; this block gives each model's accuracy
  with the tools and without them (sampled again, single-turn), and the share of answers that read a
  tool result (null elsewhere);
- `proxy_rm`: the policy's own reward model's scores, labelled as the proxy that was optimised;
  `eval_rm`: the evaluation reward model's scores;
- `kl_to_sft`: mean per-token KL of the policy to SFT on its own samples;
- `sft`, `policy`: response length, EOS rate, distinct-1/2, repetition, and the degenerate shares:
  empty responses, copies of the prompt, the most frequent answer (`stages/runtime/diagnostics.py`);
- `rm_accuracy`: the reward model's (or, without one, DPO's implicit reward's) pairwise accuracy on
  held-out comparisons, `labeler_ceiling` the gold rule's agreement with their labels, and `judge`
  the AI labeler's agreement with the gold rule and the simulated human labeler;
- `verdict`: "flagged" with reasons when the KL, the repetition or a degenerate share passes its
  bound, or the length collapses against SFT's; else "inconclusive" when the judge is not shown
  valid; else "ok".

Alone: `python -m flows.align` (it is the last stage).
"""

from __future__ import annotations

import json
import math
import statistics
from itertools import combinations
from pathlib import Path
from typing import Any

import torch

from stages.data import sources
from stages.data.tokens import Budget, fit_prompt_file, resolve_budget, resolve_sampling
from stages.labeling import judges
from stages.labeling.labelers import SimulatedLabeler, make_labeler
from stages.models.compute import compute_dtype, pick_device
from stages.models.modeling import (
    decode_responses,
    load_causal_lm,
    load_tokenizer,
    mean_token_kl,
    model_context,
    sample,
)
from stages.preference.rankings import encode_rankings, preference_pairs
from stages.preference.scorers import TrainedRewardModel, implicit_reward_accuracy
from stages.preference.validity import length_controlled, validity, wilson
from stages.rl.tools import Toolbox, sample_with_tools, tool_use
from stages.runtime import diagnostics
from stages.runtime.manifest import Manifest, folder_digest, read_jsonl, write_jsonl
from stages.runtime.progress import progress
from stages.settings.data import EXACT_MATCH
from stages.settings.labeling import LabelerConfig
from stages.settings.recipe import EvaluateConfig


def accuracy_block(sft: list[float], policy: list[float]) -> dict[str, Any]:
    """Exact-match accuracies (scores 0 or 1) with Wilson intervals; the difference's 95% CI by the
    normal approximation of two proportions."""

    a, b = _accuracy(sft), _accuracy(policy)
    n = len(sft)
    p, q = a["accuracy"], b["accuracy"]
    half = 1.96 * math.sqrt((p * (1 - p) + q * (1 - q)) / n)
    return {
        "sft": a,
        "policy": b,
        "difference": q - p,
        "difference_ci95": [q - p - half, q - p + half],
        "ratio": q / p if p else None,
    }


def mean_ci95(xs: list[float]) -> dict[str, float]:
    ci = 1.96 * statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else math.nan
    return {"mean": statistics.fmean(xs), "ci95": ci}


def _generate(model, tokenizer, prompts, cfg, budget, precision: str, tools: tuple | None = None):
    """Each prompt's response, single-turn, or with `tools` = (toolbox, max_calls) calling them."""
    texts, rollouts = [], []
    bar = progress(len(prompts), "evaluate: sampling", unit="response")
    for start in range(0, len(prompts), cfg.batch_size):
        batch = prompts[start : start + cfg.batch_size]
        kw = {"max_new_tokens": budget.max_new_tokens, "max_prompt_length": budget.max_prompt_length,
              "temperature": cfg.temperature, "precision": precision}  # fmt: skip
        if tools is None:
            r = sample(model, tokenizer, batch, generator_seed=cfg.seed + start, **kw)
        else:
            torch.manual_seed(cfg.seed + start)
            r = sample_with_tools(model, tokenizer, batch, tools[0], max_calls=tools[1], **kw)
        texts += decode_responses(tokenizer, r)
        rollouts.append(r)
        bar.update(r.response.shape[0])
    bar.close()
    return texts, rollouts


def tools_block(models: dict, tokenizer, prompts, cfg, budget, precision, gold_fn, tools: tuple, with_tool: dict):
    """Per model: exact-match accuracy with the tools (the samples evaluated everywhere else) and without
    them (sampled again, single-turn), each with its Wilson interval, and the share of answers that
    read a tool result."""
    out = {}
    for side, model in models.items():
        texts, rollouts = with_tool[side]
        single, _ = _generate(model, tokenizer, prompts, cfg, budget, precision)
        used, calls = (torch.cat(x).float() for x in zip(*(tool_use(r, tokenizer) for r in rollouts)))
        out[side] = {
            "with_tool": _accuracy([gold_fn(p, y) for p, y in zip(prompts, texts)]),
            "without_tool": _accuracy([gold_fn(p, y) for p, y in zip(prompts, single)]),
            "share_using_tool": used.mean().item(),
            "calls_per_answer": calls.mean().item(),
        }
    out["tools"] = sorted(tools[0].functions)
    return out


def _accuracy(xs: list[float]) -> dict[str, Any]:
    return {"accuracy": sum(xs) / len(xs), "ci95": list(wilson(sum(xs), len(xs))), "n": len(xs)}


def _win(ranks: list[int]) -> float:
    """1 if the first response ranks better, 0.5 on a tie."""
    return 0.5 if ranks[0] == ranks[1] else float(ranks[0] < ranks[1])


def _lengths(rollouts) -> list[int]:
    return [int(n) for r in rollouts for n in r.response_mask.sum(1).tolist()]


def _described(prompts: list, texts: list[str], rollouts) -> dict[str, float]:
    finished = [bool(f) for r in rollouts for f in r.finished.tolist()]
    return diagnostics.describe(texts, _lengths(rollouts), finished) | diagnostics.degenerate(prompts, texts)


def _scores(rm: TrainedRewardModel, rollouts) -> list[float]:
    return [s for r in rollouts for s in rm.score(r).tolist()]


def _win_block(by: str, wins: list[float], lengths: tuple[list[int], list[int]], judge: dict) -> dict[str, Any]:
    """The win rate with its CI, the length-controlled rate, and the judge's own held-out validity."""
    ci = mean_ci95(wins)
    lc = length_controlled(wins, *lengths)
    return {"by": by, "rate": ci["mean"], "ci95": ci["ci95"], "n": len(wins), "lc_rate": lc, "judge": judge}


def _verdict(cfg: EvaluateConfig, result: dict[str, Any]) -> dict[str, Any]:
    """flagged (the policy crossed a bound) > inconclusive (its judge is not shown valid) > ok."""
    flagged = diagnostics.verdict(
        result["kl_to_sft"],
        result["policy"]["repetition"],
        max_kl_per_token=cfg.max_kl_per_token,
        max_repetition=cfg.max_repetition,
    )["reasons"]
    bounds = diagnostics.degenerate_bounds(cfg)
    flagged += diagnostics.degenerate_reasons(result["policy"], result["sft"], bounds, "evaluate")
    judge = (result["win"] or {}).get("judge")
    unproven = [f"the win rate is not evidence: {judge['reason']}"] if judge and not judge["valid"] else []
    status = "flagged" if flagged else "inconclusive" if unproven else "ok"
    return {"status": status, "reasons": flagged + unproven}


def _dpo_accuracy(pol, sft, tokenizer, held: list[dict], budget: Budget) -> float | None:
    """DPO's implicit reward (log pi - log pi_sft) ranking held-out pairs, each cut to `budget` (the DPO
    stage's limits: never past the model's context); the scale beta does not matter."""
    encoded = [budget.fit_row(p, rs) for p, rs in encode_rankings(tokenizer, held)]
    pairs = preference_pairs(encoded, held)
    return implicit_reward_accuracy(pol, sft, tokenizer.pad_token_id, pairs) if pairs else None


def _training_budget(path: Path | None, context: int) -> Budget:
    """The limits the policy trained with (DPO's `budget.json`), else DPO's defaults for the context."""
    if path is not None:
        raw = json.loads(Path(path).read_text())
        return Budget(int(raw["max_prompt_length"]), int(raw["max_length"]))
    return resolve_budget("dpo", None, None, context)


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
    policy_budget: Path | None = None,
    truncation: bool = True,
    max_dropped_fraction: float = 0.0,
    device: str = "auto",
    precision: str = "fp32",
    tools: list[str] | None = None,
    max_tool_calls: int = 2,
) -> Manifest:
    """`gold`: the data's gold rule (null for real data); `judge` with `labeler` (the AI labeler) or
    `eval_reward_model` judges wins where there is no gold rule; `data_sources`: prepare's sources.json;
    `policy_budget`: the token limits the policy trained with (DPO's), which its held-out scoring keeps;
    `device`: where every model samples and scores (`compute.device`), computing in `precision`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(sft_policy)
    budget = resolve_sampling("evaluate", cfg.max_prompt_length, cfg.max_new_tokens, model_context(sft_policy))
    texts, fitted = fit_prompt_file(
        tokenizer, prompts, budget, stage="evaluate", truncation=truncation, max_dropped_fraction=max_dropped_fraction
    )
    gold_fn = sources.gold_scorer(gold, target_len)
    where = pick_device(device)
    frozen = {"device": where, "dtype": compute_dtype(precision)}
    sft, pol = load_causal_lm(sft_policy, **frozen), load_causal_lm(policy, **frozen)
    toolbox = (Toolbox.load(tools), max_tool_calls) if tools else None
    sft_texts, sft_rollouts = _generate(sft, tokenizer, texts, cfg, budget, precision, toolbox)
    pol_texts, rollouts = _generate(pol, tokenizer, texts, cfg, budget, precision, toolbox)
    held = read_jsonl(heldout_comparisons) if heldout_comparisons is not None else []
    result: dict[str, Any] = {
        "gold_sft": None,
        "gold_policy": None,
        "accuracy": None,
        "tools": None,
        "win": None,
        "proxy_rm": None,
        "eval_rm": None,
        "rm_accuracy": None,
        "labeler_ceiling": judges.labeler_ceiling(held, gold_fn) if held else None,
        "judge": judges.judge_agreement(held, target_len, cfg.win_labeler_noise, gold_fn),
    }
    rows = [{"prompt": p, "sft": a, "policy": b} for p, a, b in zip(texts, sft_texts, pol_texts)]
    triples = list(zip(texts, pol_texts, sft_texts))
    human_held = judges.human_labelled(held)
    win: tuple | None = None  # (who judged, wins, held-out hits, held-out pairs)
    if gold_fn is not None:
        gold_sft = [gold_fn(p, y) for p, y in zip(texts, sft_texts)]
        gold_pol = [gold_fn(p, y) for p, y in zip(texts, pol_texts)]
        result["gold_sft"], result["gold_policy"] = mean_ci95(gold_sft), mean_ci95(gold_pol)
        if gold in EXACT_MATCH:
            result["accuracy"] = accuracy_block(gold_sft, gold_pol)
        if gold in EXACT_MATCH and toolbox is not None:
            sampled = {"sft": (sft_texts, sft_rollouts), "policy": (pol_texts, rollouts)}
            result["tools"] = tools_block({"sft": sft, "policy": pol}, tokenizer, texts, cfg, budget, precision,
                                          gold_fn, toolbox, sampled)  # fmt: skip
        human = SimulatedLabeler(LabelerConfig(noise=cfg.win_labeler_noise), target_len, gold)  # one scale
        wins = [_win(human.rank(p, [a, b])) for p, a, b in triples]
        items = [(r["prompt"], r["responses"]) for r in held] or [(p, [a, b]) for p, a, b in triples]
        if gold in EXACT_MATCH:  # a verifier ties most pairs: measure its labeler where it prefers one
            items = [(p, [a, b]) for p, rs in items for a, b in combinations(rs, 2) if gold_fn(p, a) != gold_fn(p, b)]
        humans = judges.independent_human(cfg.win_labeler_noise, target_len, gold)
        win = ("simulated human labeler", wins, *judges.simulated_agreement(human, humans, items))
        for row, ga, gb in zip(rows, gold_sft, gold_pol):
            row |= {"gold_sft": ga, "gold_policy": gb}
    elif judge is not None and labeler is not None:
        ai = make_labeler(labeler, target_len, judge, gold, where, precision)
        ranks = [label["ranks"] for label in ai.label_all([(p, [a, b]) for p, a, b in triples])]
        truth = [r["ranks"] for r in human_held]
        judged = [label["ranks"] for label in ai.label_all([(r["prompt"], r["responses"]) for r in human_held])]
        win = ("AI labeler", [_win(r) for r in ranks], *judges.ranks_agreement(judged, truth))
    if eval_reward_model is not None and eval_normalization is not None:
        scorer = TrainedRewardModel(eval_reward_model, eval_normalization, device=where, precision=precision)
        s_sft, s_pol = _scores(scorer, sft_rollouts), _scores(scorer, rollouts)
        result["eval_rm"] = {"sft": mean_ci95(s_sft), "policy": mean_ci95(s_pol)}
        for row, a, b in zip(rows, s_sft, s_pol):
            row |= {"eval_rm_sft": a, "eval_rm_policy": b}
        if win is None:
            wins = [0.5 if a == b else float(b > a) for a, b in zip(s_sft, s_pol)]
            win = ("evaluation reward model", wins, *scorer.counts(tokenizer, human_held))
    if win is not None:
        by, wins, hits, pairs = win
        valid = validity(by, hits, pairs, bound=cfg.min_judge_accuracy, key="evaluate.min_judge_accuracy")
        result["win"] = _win_block(by, wins, (_lengths(rollouts), _lengths(sft_rollouts)), valid)
    if reward_model is not None and normalization is not None:
        proxy = TrainedRewardModel(reward_model, normalization, device=where, precision=precision)
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
        train_budget = _training_budget(policy_budget, model_context(policy))
        result["rm_accuracy"] = _dpo_accuracy(pol, sft, tokenizer, held, train_budget)
    result["win_rate"] = result["win"]["rate"] if result["win"] else None
    result["win_rate_lc"] = result["win"]["lc_rate"] if result["win"] else None
    result["kl_to_sft"] = mean_token_kl(pol, sft, rollouts, temperature=cfg.temperature)  # on the policy's samples
    result["sft"] = _described(texts, sft_texts, sft_rollouts)
    result["policy"] = _described(texts, pol_texts, rollouts)
    result["verdict"] = _verdict(cfg, result)
    result["n_prompts"] = len(texts)
    result["prompts"] = fitted.metrics("prompts") | {"source": _prompt_source(data_sources)}
    write_jsonl(out_dir / "generations.jsonl", rows)
    status = result["verdict"]["status"]
    metrics = {
        "eval/kl_to_sft": result["kl_to_sft"],
        "eval/flagged": float(status == "flagged"),
        "eval/inconclusive": float(status == "inconclusive"),
    }
    if result["win"] is not None and result["win"]["judge"]["accuracy"] is not None:
        metrics["eval/judge_accuracy"] = result["win"]["judge"]["accuracy"]
        metrics["eval/judge_ci95_low"] = result["win"]["judge"]["ci95"][0]
    metrics["eval/tokens"] = float(
        sum((r.query_mask.sum() + r.response_mask.sum()).item() for r in sft_rollouts + rollouts)
    )
    for key in ("gold_sft", "gold_policy"):
        if result[key] is not None:
            metrics[f"eval/{key}"] = result[key]["mean"]
    if result["accuracy"] is not None:
        metrics["eval/accuracy/sft"] = result["accuracy"]["sft"]["accuracy"]
        metrics["eval/accuracy/policy"] = result["accuracy"]["policy"]["accuracy"]
    for side in ("sft", "policy") if result["tools"] is not None else ():
        block = result["tools"][side]
        metrics[f"eval/tools/{side}/with_tool"] = block["with_tool"]["accuracy"]
        metrics[f"eval/tools/{side}/without_tool"] = block["without_tool"]["accuracy"]
        metrics[f"eval/tools/{side}/share_using_tool"] = block["share_using_tool"]
    for key in ("win_rate", "win_rate_lc", "rm_accuracy", "labeler_ceiling"):
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
