"""Whether a judge's verdict counts, and a win rate controlled for length.

A win rate is evidence only if its judge (the gold rule's simulated labeler, an evaluation reward
model, the AI labeler) agrees with held-out human preferences it never trained on more often than a
coin. `validity` reports that agreement with a 95% Wilson interval and whether the interval's lower
end clears the configured bound; the same rule gates a reward model before PPO spends compute
optimising it.

`length_controlled` is AlpacaEval 2's length-controlled win rate (Dubois et al. 2024), reduced to
one comparison: a logistic regression of each win (ties 0.5) on the normalised length difference,
`P(win) = sigmoid(a + b * tanh(dlen / sd(dlen)))`, read at a length difference of zero: `sigmoid(a)`.
A judge that prefers longer answers raises the raw win rate of a policy that writes longer; the
controlled rate does not move with length.
"""

from __future__ import annotations

import math
import statistics


def wilson(hits: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of a proportion (`hits` may hold halves: ties)."""
    if n <= 0:
        return (0.0, 1.0)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def validity(judge: str, hits: float, pairs: int, *, bound: float, key: str) -> dict:
    """The judge's held-out agreement with human preferences: accuracy, its 95% CI, and whether the
    CI's lower end clears `bound` (`key`: the config key that sets it). No held-out pair: not shown valid."""
    lo, hi = wilson(hits, pairs)
    accuracy = hits / pairs if pairs else None
    valid = pairs > 0 and lo >= bound
    if pairs == 0:
        why = f"{judge}: no held-out human preferences to measure it on"
    elif valid:
        why = f"{judge}: held-out accuracy {accuracy:.3f} (95% CI {lo:.3f}-{hi:.3f}) clears {key}={bound}"
    else:
        why = (
            f"{judge}: held-out accuracy {accuracy:.3f} (95% CI {lo:.3f}-{hi:.3f}, {pairs} pairs) does not "
            f"clear {key}={bound}"
        )
    return {
        "judge": judge,
        "accuracy": accuracy,
        "ci95": [lo, hi],
        "pairs": pairs,
        "bound": bound,
        "key": key,
        "valid": valid,
        "reason": why,
    }


def length_controlled(wins: list[float], policy_lengths: list[float], sft_lengths: list[float]) -> float | None:
    """The win rate at equal length (see the module docstring); None without wins. Ties count 0.5."""
    if not wins:
        return None
    diffs = [p - s for p, s in zip(policy_lengths, sft_lengths)]
    sd = statistics.pstdev(diffs) if len(diffs) > 1 else 0.0
    x = [math.tanh(d / sd) if sd > 0 else 0.0 for d in diffs]
    a, b = _logistic(x, wins)
    return 1.0 / (1.0 + math.exp(-a))


def _logistic(x: list[float], y: list[float], ridge: float = 1e-3, steps: int = 50) -> tuple[float, float]:
    """(intercept, slope) of a logistic regression with soft targets, by Newton's method; a small
    ridge on both keeps it finite when the wins separate perfectly."""
    a = b = 0.0
    for _ in range(steps):
        ga = gb = haa = hab = hbb = 0.0
        for xi, yi in zip(x, y):
            p = 1.0 / (1.0 + math.exp(-(a + b * xi)))
            w = p * (1 - p)
            ga += p - yi
            gb += (p - yi) * xi
            haa += w
            hab += w * xi
            hbb += w * xi * xi
        ga, gb = ga + ridge * a, gb + ridge * b
        haa, hbb = haa + ridge, hbb + ridge
        det = haa * hbb - hab * hab
        if det <= 0:
            break
        da = (hbb * ga - hab * gb) / det
        db = (haa * gb - hab * ga) / det
        a, b = a - da, b - db
        if abs(da) + abs(db) < 1e-10:
            break
    return a, b
