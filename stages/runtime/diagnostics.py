"""Signs of reward hacking in sampled responses, reported next to every score (PPO and evaluate).

- `eos_rate`: share of responses that ended with EOS (a policy that stops ending its answers is
  padding them for reward);
- `distinct_1`, `distinct_2`: distinct word unigrams / bigrams over all of them (Li et al. 2016);
- `repetition`: per response, the share of its words that repeat an earlier word of it, averaged
  ("great great great great" is 0.75);
- `length`: mean response length in tokens (EOS included).

`flag` turns values and their configured bounds into the status a stage ends with; `verdict` is
the evaluation's (KL to SFT per token and repetition).
"""

from __future__ import annotations

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
