"""What PPO optimises: each rollout's score from the reward model (InstructGPT), the AI labeler's judge
(d-RLAIF), a reward from code (`stages/rl/rewards.py`), or the weighted sum of a model and a function."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from stages.models.modeling import Rollout, decode_responses
from stages.preference.scorers import TrainedRewardModel
from stages.rl import rewards
from stages.settings.recipe import PpoConfig


class RewardModelScore:
    """InstructGPT: the normalised reward-model score of each rollout, (batch,), on the rollout's device."""

    def __init__(self, reward_model: Path, normalization: Path, device, precision: str) -> None:
        self.rm = TrainedRewardModel(reward_model, normalization, device=device, precision=precision)
        self.frozen = [self.rm.model]

    def __call__(self, tokenizer, prompts: list[str], rollout: Rollout) -> torch.Tensor:
        return self.rm.score(rollout).to(rollout.query.device)


class JudgeScore:
    """d-RLAIF: the AI labeler's expected 1-10 score of each decoded response, in [-1, 1], (batch,)."""

    def __init__(self, labeler) -> None:
        self.labeler = labeler
        self.frozen = labeler.frozen

    def __call__(self, tokenizer, prompts: list[str], rollout: Rollout) -> torch.Tensor:
        scores = self.labeler.score_all(prompts, decode_responses(tokenizer, rollout))
        return torch.tensor(scores, dtype=torch.float32, device=rollout.query.device)


class Scores:
    """Each rollout's score, (batch,): the reward model's or the judge's (`model`), the reward
    function's (`function`), or their weighted sum (`stage.ppo.reward_model_weight`, `reward_function_weight`)."""

    def __init__(self, model, function: rewards.FunctionScore | None, cfg: PpoConfig) -> None:
        self.model, self.function = model, function
        self.weights = (cfg.reward_model_weight, cfg.reward_function_weight)
        self.frozen = model.frozen if model is not None else []

    def __call__(self, tokenizer, prompts: list, rollout: Rollout) -> torch.Tensor:
        if self.function is None:
            return self.model(tokenizer, prompts, rollout)
        responses = decode_responses(tokenizer, rollout)
        score = self.weights[1] * self.function.scores(prompts, responses, rollout.query.device)
        if self.model is not None:
            score = score + self.weights[0] * self.model(tokenizer, prompts, rollout)
        return score


def make_scorer(
    cfg: PpoConfig, reward_model: Path | None, normalization, judge: Callable[[], object] | None, where, precision: str
) -> Scores:
    """`judge`: builds the AI labeler that scores (d-RLAIF); called only once the inputs are known to fit."""
    if reward_model is not None and judge is not None:
        raise ValueError("ppo: score rollouts with either a reward model or an AI labeler and its judge, not both")
    function = rewards.FunctionScore(cfg.reward_function) if cfg.reward_function else None
    if reward_model is None and judge is None and function is None:
        raise ValueError("ppo: nothing scores the rollouts: give a reward model, a judge or stage.ppo.reward_function")
    model = None
    if reward_model is not None:
        model = RewardModelScore(reward_model, normalization, where, precision)
    elif judge is not None:
        model = JudgeScore(judge())
    return Scores(model, function, cfg)
