"""Labelers rank K responses to a prompt, best first. They all share one interface:

    labeler.rank(prompt, responses) -> list[int]   # rank of each response, 0 = best, ties share a rank

`SimulatedLabeler` stands in for InstructGPT's human rankers on the embedded default: it scores
with the hidden gold rule plus Gaussian noise, so, as with real labelers, its agreement with the
gold ordering is below 100%. The noise is seeded by the content, so asking twice about the same
prompt and responses gives the same answer (labels are cached by content).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Protocol

from stages import task


@dataclass(frozen=True)
class LabelerConfig:
    kind: str = "simulated"
    noise: float = 0.3  # std of the Gaussian added to gold scores (gold spans [-2, 2])
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind != "simulated":
            raise ValueError(f"labeler.kind: {self.kind!r} is not supported yet; use 'simulated'")
        if self.noise < 0:
            raise ValueError(f"labeler.noise: must be >= 0, got {self.noise}")


class Labeler(Protocol):
    def rank(self, prompt: str, responses: list[str]) -> list[int]: ...


class SimulatedLabeler:
    def __init__(self, cfg: LabelerConfig, target_len: int = 6) -> None:
        self.cfg = cfg
        self.target_len = target_len

    def noisy_scores(self, prompt: str, responses: list[str]) -> list[float]:
        content = "\x1f".join([str(self.cfg.seed), prompt, *responses]).encode()
        rng = random.Random(hashlib.sha256(content).hexdigest())
        return [
            task.gold_score(prompt, r, target_len=self.target_len) + rng.gauss(0.0, self.cfg.noise) for r in responses
        ]

    def rank(self, prompt: str, responses: list[str]) -> list[int]:
        return ranks_from_scores(self.noisy_scores(prompt, responses))


def ranks_from_scores(scores: list[float]) -> list[int]:
    """0 for the highest score; equal scores share a rank."""
    distinct = sorted(set(scores), reverse=True)
    return [distinct.index(s) for s in scores]


def make_labeler(cfg: LabelerConfig, target_len: int) -> Labeler:
    return SimulatedLabeler(cfg, target_len)
