"""The models PPO needs, in two memory layouts with one interface.

- `FullCopies`: policy, reference, value and reward are four models; policy and value train in full
  (the value model starts as a copy of the reward model, as in InstructGPT; d-RLAIF has no reward
  model, so it starts from the policy with a fresh scalar head).
- `SharedBase`: one SFT base carries two LoRA adapters. The policy is the base with the `policy`
  adapter, the reference is the same base with adapters disabled (no second copy), the value model
  is the base with a `value` adapter and a scalar head initialised from the reward model's head.
  Only the adapters and the head train. The reward model stays a separate frozen model.

Both expose: `policy` (for sampling), `policy_logprobs`, `ref_logprobs`, `values`,
`trainable`, `policy_state` / `load_policy_state`, `state_dict` / `load_state_dict` (checkpoints)
and `export(folder)`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from stages.modeling import (
    Rollout,
    load_causal_lm,
    load_scalar_model,
    response_logprobs,
    token_values,
)
from stages.peft_setup import PeftConfig, lora_config


class FullCopies:
    def __init__(self, policy: Path, critic_init: Path, temperature: float) -> None:
        self.policy = load_causal_lm(policy)
        self.ref = load_causal_lm(policy).eval().requires_grad_(False)
        self.critic = load_scalar_model(critic_init)
        self.temperature = temperature
        self.trainable = [p for m in (self.policy, self.critic) for p in m.parameters()]

    def policy_logprobs(self, rollout: Rollout):
        return response_logprobs(self.policy, rollout, temperature=self.temperature)

    @torch.no_grad()
    def ref_logprobs(self, rollout: Rollout) -> torch.Tensor:
        return response_logprobs(self.ref, rollout, temperature=self.temperature)[0]

    def values(self, rollout: Rollout) -> torch.Tensor:
        return token_values(self.critic, rollout)

    def policy_state(self) -> dict[str, torch.Tensor]:
        return self.policy.state_dict()

    def load_policy_state(self, state: dict[str, torch.Tensor]) -> None:
        self.policy.load_state_dict(state)

    def state_dict(self) -> dict:
        return {"policy": self.policy.state_dict(), "critic": self.critic.state_dict()}

    def load_state_dict(self, blob: dict) -> None:
        self.policy.load_state_dict(blob["policy"])
        self.critic.load_state_dict(blob["critic"])

    def export(self, folder: Path) -> None:
        self.policy.save_pretrained(folder, safe_serialization=True)


class SharedBase:
    def __init__(self, policy: Path, critic_init: Path, temperature: float, peft: PeftConfig) -> None:
        from peft import get_peft_model

        if peft.method != "lora":
            raise ValueError("stage.ppo.layout=shared_base needs peft.method=lora (adapters on one shared base)")
        lora = lora_config(peft, "CAUSAL_LM")
        self.model = get_peft_model(load_causal_lm(policy), lora, adapter_name="policy")
        self.model.add_adapter("value", lora)
        rm_head = load_scalar_model(critic_init).score.weight.detach()
        self.value_head = torch.nn.Linear(rm_head.shape[1], 1, bias=False)
        with torch.no_grad():
            self.value_head.weight.copy_(rm_head)
        self.temperature = temperature
        self.trainable = [p for n, p in self.model.named_parameters() if "lora_" in n] + list(
            self.value_head.parameters()
        )
        self._use("policy")

    def _use(self, adapter: str) -> None:
        self.model.set_adapter(adapter)
        for p in self.trainable:  # set_adapter freezes the inactive adapter; both keep training
            p.requires_grad_(True)

    @property
    def policy(self):
        self._use("policy")
        return self.model

    def policy_logprobs(self, rollout: Rollout):
        self._use("policy")
        return response_logprobs(self.model, rollout, temperature=self.temperature)

    @torch.no_grad()
    def ref_logprobs(self, rollout: Rollout) -> torch.Tensor:
        with self.model.disable_adapter():  # the reference is the base itself: no second copy
            return response_logprobs(self.model, rollout, temperature=self.temperature)[0]

    def values(self, rollout: Rollout) -> torch.Tensor:
        self._use("value")
        backbone = self.model.get_base_model().model  # the decoder stack, LoRA layers included
        return token_values(self.model, rollout, backbone=backbone, head=self.value_head)

    def policy_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.model.state_dict().items() if "lora_" in k and ".policy." in k}

    def load_policy_state(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state, strict=False)

    def state_dict(self) -> dict:
        lora = {k: v for k, v in self.model.state_dict().items() if "lora_" in k}
        return {"lora": lora, "value_head": self.value_head.state_dict()}

    def load_state_dict(self, blob: dict) -> None:
        self.model.load_state_dict(blob["lora"], strict=False)
        self.value_head.load_state_dict(blob["value_head"])

    def export(self, folder: Path) -> None:
        """A plain model folder: the policy adapter merged into a copy of the base."""
        model = copy.deepcopy(self.model)
        model.set_adapter("policy")
        model.delete_adapter("value")
        model.merge_and_unload().save_pretrained(folder, safe_serialization=True)
