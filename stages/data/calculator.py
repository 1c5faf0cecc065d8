"""The embedded tool task (`data=embedded_calculator`): sums of two-digit numbers, with a calculator to call.

Prompts ask for a sum as the arithmetic task's do ("what is 47 plus 85"), but of numbers 10-99, each
one word of the tokenizer: a tiny model cannot learn 8,100 sums from a few thousand examples, and can
copy numbers. The calculator (`stages.rl.tools:calculator`) adds them. Gold rule and reward: exact
match of the final answer, the last number after the last tool result, so a response that stops at
the tool's result has not answered.

Demonstrations are OpenAI-style conversations (`tool_calls` and `tool` turns, read by the data worker
as a user's file would be). A share `DEMO_TOOL_SHARE` of them calls the calculator and copies its
result; the rest answer at once, right with probability `DEMO_DIRECT_ACCURACY`, else off by a few.
SFT thus uses the tool about half the time, and RL has the rest to learn. Evaluation prompts come from
a held-out quarter of the (phrasing, a, b) combinations.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

from stages.data import arithmetic
from stages.data.arithmetic import ANSWER, TEMPLATES, solve  # its prompts and answers are the arithmetic task's
from stages.data.tool_calls import END_RESULT, TAGS

LOW, HIGH = 10, 99
TOOL = "calculator"
DEMO_TOOL_SHARE = 0.5
DEMO_DIRECT_ACCURACY = 0.3
_NUMBER = re.compile(r"-?\d+")
SCHEMA = {
    "type": "function",
    "function": {
        "name": TOOL,
        "description": "Evaluate a sum, difference or product of two integers, written as 'a + b'.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
    },
}


@dataclass(frozen=True)
class CalculatorExample:
    messages: list[dict]  # OpenAI's chat format, tool turns included
    uses_tool: bool
    correct: bool


def vocabulary() -> list[str]:
    """Every word of the task, the tags of `stages/data/tool_calls.py` and the tool's name included."""
    words = {str(n) for n in range(2 * HIGH + 1)} | {TOOL, "+", "error", *TAGS}
    for template in (*TEMPLATES, ANSWER):
        words |= set(template.replace("{}", "").split())
    return sorted(words)


def final_answer(response: str) -> int | None:
    """The last number after the last tool result (`</result>`); None without one."""
    return arithmetic.final_answer(response.rpartition(END_RESULT)[2])


def exact_match(prompt: str, response: str) -> float:
    return float(final_answer(response) == solve(prompt))


def split(seed: int) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts), every (phrasing, a, b) combination in exactly one."""
    prompts = [t.format(a, b) for t in TEMPLATES for a in range(LOW, HIGH + 1) for b in range(LOW, HIGH + 1)]
    return arithmetic.held_out_split(prompts, seed)


def demonstration(rng: random.Random, prompt: str) -> CalculatorExample:
    a, b = _NUMBER.findall(prompt)
    total = int(a) + int(b)
    user = {"role": "user", "content": prompt}
    if rng.random() < DEMO_TOOL_SHARE:
        call = {"id": "call_0", "type": "function",
                "function": {"name": TOOL, "arguments": json.dumps({"expression": f"{a} + {b}"})}}  # fmt: skip
        messages = [
            user,
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_0", "content": str(total)},
            {"role": "assistant", "content": ANSWER.format(total)},
        ]
        return CalculatorExample(messages, uses_tool=True, correct=True)
    correct = rng.random() < DEMO_DIRECT_ACCURACY
    answer = total if correct else total + rng.choice((-3, -2, -1, 1, 2, 3))
    return CalculatorExample([user, {"role": "assistant", "content": ANSWER.format(answer)}], False, correct)


def make_demonstrations(n: int, seed: int, pool: list[str]) -> list[CalculatorExample]:
    rng = random.Random(seed)
    return [demonstration(rng, rng.choice(pool)) for _ in range(n)]
