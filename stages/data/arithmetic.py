"""The embedded verifiable task (`data=embedded_arithmetic`): sums of two small numbers, scored by
exact match of the final answer.

Prompts ask for a sum in one of a few phrasings ("what is 3 plus 4"); a response ends in its answer
("the answer is 7"). The gold rule is verifiable, as in DeepSeek-R1's and Tülu 3's RLVR: 1.0 when the
response's last number is the sum, else 0.0; no labeler, no reward model needed.

Demonstrations are noisy on purpose: a share `DEMO_ACCURACY` of them is right, the rest are off by a
few, so SFT imitates a mostly wrong distribution (sampling at temperature 1 it is right about as
often as its data) and leaves headroom for RL on the exact-match reward.

Held-out prompts: the (phrasing, a, b) combinations are split once, seeded; the evaluation prompts
come from a quarter of them that no demonstration, comparison or PPO prompt uses. Each sum is seen
during training under other phrasings, so held-out accuracy measures the policy answering prompts it
never saw, not a new skill of addition.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

MAX_OPERAND = 9
TEMPLATES = ("what is {} plus {}", "add {} and {}", "compute {} plus {}", "what do {} and {} make")
ANSWER = "the answer is {}"
DEMO_ACCURACY = 0.3  # share of demonstrations with the right answer
HELDOUT_SHARE = 0.25  # of the (phrasing, a, b) combinations, kept for evaluation
_NUMBER = re.compile(r"-?\d+")


@dataclass(frozen=True)
class ArithmeticExample:
    prompt: str
    response: str
    correct: bool


def vocabulary() -> list[str]:
    """Every word the task can produce (the word-level tokenizer is trained on these)."""
    words = {str(n) for n in range(2 * MAX_OPERAND + 4)}
    for template in (*TEMPLATES, ANSWER):
        words |= set(template.replace("{}", "").split())
    return sorted(words)


def solve(prompt: str) -> int:
    """The sum a task prompt asks for; raises on a prompt the task did not make."""
    numbers = _NUMBER.findall(prompt)
    if len(numbers) != 2:
        raise ValueError(f"prompt {prompt!r} is not an arithmetic task prompt (two numbers)")
    return int(numbers[0]) + int(numbers[1])


def final_answer(response: str) -> int | None:
    """The response's last number; None without one."""
    numbers = _NUMBER.findall(response)
    return int(numbers[-1]) if numbers else None


def exact_match(prompt: str, response: str) -> float:
    """The gold rule: 1.0 when the response's final answer is the sum, else 0.0."""
    return float(final_answer(response) == solve(prompt))


def _combinations() -> list[str]:
    return [t.format(a, b) for t in TEMPLATES for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]


def split(seed: int) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts): every combination in exactly one, seeded."""
    return held_out_split(_combinations(), seed)


def held_out_split(prompts: list[str], seed: int) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts): a seeded share `HELDOUT_SHARE` of `prompts` held out."""
    prompts = list(prompts)
    random.Random(seed).shuffle(prompts)
    cut = round(len(prompts) * HELDOUT_SHARE)
    return sorted(prompts[cut:]), sorted(prompts[:cut])


def response(rng: random.Random, prompt: str, correct: bool) -> str:
    total = solve(prompt)
    if correct:
        return ANSWER.format(total)
    wrong = [total + d for d in (-3, -2, -1, 1, 2, 3) if total + d >= 0]
    return ANSWER.format(rng.choice(wrong))


def make_demonstrations(n: int, seed: int, pool: list[str]) -> list[ArithmeticExample]:
    """`n` demonstrations on prompts from `pool`, a share `DEMO_ACCURACY` of them right."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = rng.choice(pool)
        correct = rng.random() < DEMO_ACCURACY
        out.append(ArithmeticExample(prompt, response(rng, prompt, correct), correct))
    return out


def make_prompts(n: int, seed: int, pool: list[str]) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(pool) for _ in range(n)]
