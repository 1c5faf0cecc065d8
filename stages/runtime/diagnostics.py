"""Signs of reward hacking in sampled responses, reported next to every score (PPO and evaluate).

- `eos_rate`: share of responses that ended with EOS (a policy that stops ending its answers is
  padding them for reward);
- `distinct_1`, `distinct_2`: distinct word unigrams / bigrams over all of them (Li et al. 2016);
- `repetition`: per response, the share of its words that repeat an earlier word of it, averaged
  ("great great great great" is 0.75);
- `length`: mean response length in tokens (EOS included).

Degenerate outputs (`degenerate`), each a share of the responses: `empty_share` (nothing but EOS),
`prompt_copy_share` (the response is the prompt, or a prefix of it, repeated back) and
`top_response_share` (the most frequent non-empty response: a policy that found one answer its reward
model likes gives it to every prompt). `degenerate_reasons` turns them, and the length relative to SFT's,
into one-line reasons against their bounds ("68% of responses are empty; bound 5% (...)").

`flag` turns values and their configured bounds into the status a stage ends with; `verdict` is
the evaluation's (KL to SFT per token and repetition).
"""

from __future__ import annotations

import collections
import statistics


def distinct_n(texts: list[str], n: int) -> float:
    grams = [tuple(w[i : i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition(texts: list[str]) -> float:
    per = [1.0 - len(set(w)) / len(w) for w in (t.split() for t in texts) if w]
    return statistics.fmean(per) if per else 0.0


def describe(texts: list[str], lengths: list[int], finished: list[bool]) -> dict[str, float]:
    return {
        "length": statistics.fmean(lengths) if lengths else 0.0,
        "eos_rate": sum(finished) / len(finished) if finished else 0.0,
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "repetition": repetition(texts),
    }


def flag(checks: list[tuple[str, float | None, float, str]]) -> dict:
    """{"status": "ok" | "flagged", "reasons": [...]}: checks are (what, value, bound, config key); a
    value above its bound is a reason."""
    reasons = [
        f"{what} {value:.3f} is above {key}={bound}"
        for what, value, bound, key in checks
        if value is not None and value > bound
    ]
    return {"status": "flagged" if reasons else "ok", "reasons": reasons}


def verdict(kl_per_token: float | None, rep: float, *, max_kl_per_token: float, max_repetition: float) -> dict:
    """The evaluation's verdict: KL to SFT per token and repetition against their bounds."""
    return flag(
        [
            ("KL to SFT per token", kl_per_token, max_kl_per_token, "max_kl_per_token"),
            ("repetition", rep, max_repetition, "max_repetition"),
        ]
    )


def _words(text) -> str:
    if not isinstance(text, str):  # a conversation: the last user turn is what a copy repeats
        text = next((m["content"] for m in reversed(text) if m.get("role") == "user"), "")
    return " ".join(text.split()).lower()


def degenerate(prompts: list, texts: list[str]) -> dict[str, float]:
    """Shares of empty responses, of responses that repeat the prompt (or its start), and of the
    most frequent response, over `texts` (one per prompt)."""
    if not texts:
        return {"empty_share": 0.0, "prompt_copy_share": 0.0, "top_response_share": 0.0}
    norm = [_words(t) for t in texts]
    copies = sum(1 for p, t in zip(prompts, norm) if t and _words(p).startswith(t))
    return {
        "empty_share": sum(1 for t in norm if not t) / len(norm),
        "prompt_copy_share": copies / len(norm),
        # the most frequent non-empty response (empty ones have their own share)
        "top_response_share": max(collections.Counter(t for t in norm if t).values(), default=0) / len(norm),
    }


DEGENERATE_BOUNDS = ("max_empty_share", "max_prompt_copy_share", "max_top_response_share", "min_length_ratio")


def degenerate_bounds(cfg) -> dict[str, float]:
    """The degenerate-output bounds of a stage config that has them (evaluate's, PPO's)."""
    return {key: getattr(cfg, key) for key in DEGENERATE_BOUNDS}


def degenerate_reasons(policy: dict, sft: dict | None, bounds: dict[str, float], prefix: str) -> list[str]:
    """One line per bound a policy's degenerate figures cross. `policy`/`sft`: `describe` plus
    `degenerate` figures; `bounds`: max_empty_share, max_prompt_copy_share, max_top_response_share,
    min_length_ratio (against SFT's mean length); `prefix`: the config section that holds them."""
    reasons = []
    for key, what in (
        ("empty_share", "responses are empty"),
        ("prompt_copy_share", "responses repeat the prompt"),
        ("top_response_share", "responses are one and the same answer"),
    ):
        bound = bounds.get(f"max_{key}")
        if bound is not None and policy[key] > bound:
            reasons.append(f"{policy[key]:.0%} of {what}; bound {bound:.0%} ({prefix}.max_{key})")
    ratio = bounds.get("min_length_ratio")
    if ratio is not None and sft is not None and sft["length"] > 0 and policy["length"] < ratio * sft["length"]:
        reasons.append(
            f"mean response length fell to {policy['length'] / sft['length']:.2f}x SFT's ({policy['length']:.1f} vs "
            f"{sft['length']:.1f} tokens); bound {ratio}x ({prefix}.min_length_ratio)"
        )
    return reasons
