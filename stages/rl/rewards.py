"""Rewards from code ("verifiable rewards"): a Python callable named in config scores PPO's rollouts,
alone (`pipeline=rlvr`) or summed with the reward model (`stage.ppo.reward_function_weight`,
`stage.ppo.reward_model_weight`).

`stage.ppo.reward_function: package.module:name` names a callable

    name(prompts: list[str], responses: list[str]) -> list[float]

called once per update with the whole batch of decoded rollouts (a prompt repeats once per sample of
its group); it returns one finite float per response, higher is better. It must be importable from
the run's working directory (the repository root, or an installed package); its source file joins
the PPO stage's cache key, so an edited function retrains. A wrong name, a non-callable, a wrong
number of scores or a non-finite score stops the stage naming the key.

Shipped: `stages.rl.rewards:arithmetic_exact_match`, the embedded arithmetic task's exact match of
the final answer (`data=embedded_arithmetic`), and `calculator_exact_match`, the tool task's
(`data=embedded_calculator`).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from stages.data import arithmetic, calculator

if TYPE_CHECKING:
    import torch

KEY = "stage.ppo.reward_function"


def arithmetic_exact_match(prompts: list[str], responses: list[str]) -> list[float]:
    """1.0 where the response's final number is the prompt's sum, else 0.0."""
    return [arithmetic.exact_match(p, r) for p, r in zip(prompts, responses)]


def calculator_exact_match(prompts: list[str], responses: list[str]) -> list[float]:
    """1.0 where the last number after the last tool result is the prompt's sum, else 0.0."""
    return [calculator.exact_match(p, r) for p, r in zip(prompts, responses)]


def parts(spec: str, key: str = KEY) -> tuple[str, str]:
    """(module, name) of `package.module:name`; a clear error naming `key` when it is not of that form."""
    module, sep, name = spec.partition(":")
    if not sep or not module.strip() or not name.strip():
        raise ValueError(f"{key}: {spec!r} is not of the form package.module:name")
    return module.strip(), name.strip()


def source_file(spec: str, key: str = KEY) -> Path | None:
    """The file that defines `spec`'s module (for the cache key); None where there is none (a builtin)."""
    module, _ = parts(spec, key)
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError) as e:
        raise ValueError(f"{key}: cannot find module {module!r} of {spec!r}: {e}") from None
    if found is None:
        raise ValueError(f"{key}: no module named {module!r} (from {spec!r}) on the path")
    return Path(found.origin) if found.origin and Path(found.origin).is_file() else None


def load(spec: str, key: str = KEY) -> Callable:
    """The callable `spec` names (a reward function, or a tool: `stages/rl/tools.py`); a clear error naming
    `key` when it is not one."""
    module, name = parts(spec, key)
    source_file(spec, key)
    try:
        fn = getattr(importlib.import_module(module), name)
    except AttributeError:
        raise ValueError(f"{key}: module {module!r} has no attribute {name!r}") from None
    if not callable(fn):
        raise ValueError(f"{key}: {spec!r} is a {type(fn).__name__}, not a callable")
    return fn


class FunctionScore:
    """The reward function's scores of decoded rollouts, (batch,) on `device`."""

    frozen: list = []  # no model to move

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.fn = load(spec)

    def scores(self, prompts: list[str], responses: list[str], device) -> torch.Tensor:
        got = self.fn(list(prompts), list(responses))
        try:
            values = [float(v) for v in got]
        except (TypeError, ValueError):
            raise ValueError(f"{KEY}: {self.spec} must return a list of floats, got {type(got).__name__}") from None
        if len(values) != len(responses):
            raise ValueError(f"{KEY}: {self.spec} returned {len(values)} scores for {len(responses)} responses")
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        if bad:
            raise ValueError(f"{KEY}: {self.spec} returned a non-finite score for response {bad[0]}: {values[bad[0]]}")
        import torch  # here, not at the top: resolving a function's source for a cache key needs no torch

        return torch.tensor(values, dtype=torch.float32, device=device)
