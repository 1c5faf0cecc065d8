"""Over-optimisation watched during PPO, as Gao et al. 2022 measured it.

Every `watch_every` updates (and before the first and after the last) the policy samples one
response to each of a fixed set of held-out prompts, and three figures are recorded against the
update: the proxy reward model's mean score (what PPO optimises), the independent judge's mean score
(the gold rule on the embedded task, else the evaluation reward model, which the proxy never saw
the data of) and the mean per-token KL to the reference on those samples. A proxy that keeps rising
while the judge falls is reward over-optimisation; `select=judge_peak` publishes the policy as it
was at the judge's best point instead of the last iterate.

Sampling here uses its own seed and puts the RNG back, so watching does not change training.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from stages.models.compute import amp
from stages.models.modeling import decode_responses, sample


class Watch:
    """`proxy(prompts, rollout)` and `judge(prompts, texts, rollout)` give (batch,) scores."""

    def __init__(
        self,
        prompts: list,
        proxy,
        judge,
        *,
        every: int,
        seed: int,
        budget,
        temperature: float,
        precision: str = "fp32",
    ) -> None:
        self.prompts, self.proxy, self.judge = prompts, proxy, judge
        self.every, self.seed, self.budget, self.temperature = every, seed, budget, temperature
        self.precision = precision  # the stage's compute dtype: the watch's forwards run as the update's
        self.points: list[dict[str, float]] = []
        self.best: dict | None = None  # {"update", "judge", "state"}: the policy at the judge's peak

    def due(self, updates_done: int, last: bool) -> bool:
        return self.every > 0 and (updates_done % self.every == 0 or last)

    @torch.no_grad()
    def look(self, models, tokenizer, updates_done: int) -> dict[str, float]:
        """Score the held-out prompts now; keep the policy's weights if the judge is at its best."""
        rng = torch.get_rng_state()
        rollout = sample(
            models.policy,
            tokenizer,
            self.prompts,
            max_new_tokens=self.budget.max_new_tokens,
            max_prompt_length=self.budget.max_prompt_length,
            temperature=self.temperature,
            generator_seed=self.seed,
            precision=self.precision,
        )
        torch.set_rng_state(rng)
        texts = decode_responses(tokenizer, rollout)
        mask = rollout.response_mask.float()
        with amp(rollout.query.device, self.precision):
            logp, ref = models.policy_logprobs(rollout)[0].float(), models.ref_logprobs(rollout).float()
        kl = ((logp - ref) * mask).sum() / mask.sum().clamp(min=1.0)
        point = {
            "update": float(updates_done),
            "proxy": self.proxy(self.prompts, rollout).float().mean().item(),
            "judge": float(torch.as_tensor(self.judge(self.prompts, texts, rollout), device="cpu").float().mean()),
            "kl_per_token": kl.item(),
        }
        self.points.append(point)
        if self.best is None or point["judge"] > self.best["judge"]:
            state = {k: v.detach().clone() for k, v in models.policy_state().items()}
            self.best = {"update": updates_done, "judge": point["judge"], "state": state}
        return point

    def overoptimised(self) -> dict | None:
        """Where the proxy kept rising past the judge's peak while the judge fell, or None."""
        if self.best is None:
            return None
        peak = next(p for p in self.points if p["update"] == self.best["update"])
        later = [p for p in self.points if p["update"] > peak["update"]]
        for p in later:
            if p["proxy"] > peak["proxy"] and p["judge"] < peak["judge"]:
                return {
                    "from_update": int(peak["update"]),
                    "to_update": int(later[-1]["update"]),
                    "proxy": [peak["proxy"], later[-1]["proxy"]],
                    "judge": [peak["judge"], later[-1]["judge"]],
                    "note": (
                        f"after update {int(peak['update'])} the proxy rose {peak['proxy']:.3f} -> "
                        f"{later[-1]['proxy']:.3f} while the judge fell {peak['judge']:.3f} -> "
                        f"{later[-1]['judge']:.3f}: reward over-optimisation"
                    ),
                }
        return None

    def write(self, path: Path, published: int) -> None:
        blob = {"points": self.points, "published_update": published, "overoptimised": self.overoptimised()}
        Path(path).write_text(json.dumps(blob, indent=2))
