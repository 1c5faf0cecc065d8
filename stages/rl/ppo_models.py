"""The models PPO needs, in two memory layouts with one interface.

- `FullCopies`: policy, reference, value and reward are four models; policy and value train with
  the fine-tuning method (`peft/`: in full, frozen but for the last layers, or with adapters; the
  value model starts as a copy of the reward model, as in InstructGPT; d-RLAIF has no reward
  model, so it starts from the policy with a fresh scalar head).
- `SharedBase`: one SFT base (4-bit under QLoRA) carries two adapters of the method. The policy is
  the base with the `policy` adapter, the reference is the same base with adapters disabled (no
  second copy), the value model is the base with a `value` adapter and a scalar head initialised
  from the reward model's head. Only the adapters and the head train. The reward model stays a separate frozen model.

Both load onto the stage's device (`compute.device`; under ZeRO-3 the trained models stay on the
host until DeepSpeed places their partitions) and expose: `policy` (for sampling), `policy_logprobs`,
`ref_logprobs`, `values`, `frozen` (the models that never train: what `offload_frozen` moves),
`trainable` and `module` (what the optimizer trains), `policy_state` / `load_policy_state`,
`state_dict` / `load_state_dict` (checkpoints)
and `export(folder)`.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

from stages.models.compute import checkpointing, compute_dtype
from stages.models.modeling import (
    Rollout,
    load_causal_lm,
    load_scalar_model,
    response_logprobs,
    token_values,
)
from stages.models.peft_setup import load_adapter, lora_config
from stages.models.tuning import device, export, load, load_kwargs
from stages.settings.models import Tuning, shared_base_refusal, shares_base


class FullCopies:
    def __init__(
        self,
        policy: Path,
        critic_init: Path | None,
        temperature: float,
        tuning: Tuning | None = None,
        *,
        partitioned: bool = False,
    ) -> None:
        tuning = tuning or Tuning()
        self.tuning, self.base = tuning, Path(policy)
        self.policy = load(policy, tuning, "causal_lm", partitioned=partitioned)
        frozen_dtype = compute_dtype(tuning.compute.precision)  # the reference computes in the update's dtype
        self.ref = load_causal_lm(policy, device=device(tuning), dtype=frozen_dtype).eval().requires_grad_(False)
        self.frozen = [self.ref]
        # no critic_init: a critic-free estimator, no value model at all
        self.critic = None if critic_init is None else load(critic_init, tuning, "scalar", partitioned=partitioned)
        self.temperature = temperature
        trained = {"policy": self.policy} | ({"critic": self.critic} if self.critic is not None else {})
        self.module = torch.nn.ModuleDict(trained)
        self.trainable = [p for p in self.module.parameters() if p.requires_grad]
        self._policy_keys = [n for n, p in self.policy.named_parameters() if p.requires_grad]

    def policy_logprobs(self, rollout: Rollout):
        return response_logprobs(self.policy, rollout, temperature=self.temperature)

    @torch.no_grad()
    def ref_logprobs(self, rollout: Rollout) -> torch.Tensor:
        return response_logprobs(self.ref, rollout, temperature=self.temperature)[0]

    def values(self, rollout: Rollout) -> torch.Tensor:
        if self.critic is None:  # critic-free: zeros, never trained
            return torch.zeros(rollout.response.shape, device=rollout.response.device)
        return token_values(self.critic, rollout)

    def policy_state(self) -> dict[str, torch.Tensor]:
        """The policy's trainable weights (what PPO's EMA averages): all of them in full fine-tuning."""
        params = dict(self.policy.named_parameters())
        return {n: params[n] for n in self._policy_keys}

    def load_policy_state(self, state: dict[str, torch.Tensor]) -> None:
        unexpected = self.policy.load_state_dict(state, strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"ppo: the policy state has weights the policy lacks: {unexpected[:3]}")

    def state_dict(self) -> dict:
        critic = {"critic": self.critic.state_dict()} if self.critic is not None else {}
        return {"policy": self.policy.state_dict(), **critic}

    def load_state_dict(self, blob: dict) -> None:
        self.policy.load_state_dict(blob["policy"])
        if self.critic is not None:
            self.critic.load_state_dict(blob["critic"])

    def export(self, folder: Path) -> None:
        export(self.policy, self.tuning, folder, base=self.base)


class SharedBase:
    def __init__(self, policy: Path, critic_init: Path | None, temperature: float, tuning: Tuning) -> None:
        from peft import get_peft_model, prepare_model_for_kbit_training

        if not shares_base(tuning):
            raise ValueError(shared_base_refusal(tuning.peft.method))
        self.tuning, self.base = tuning, Path(policy)
        where = device(tuning)
        lora = lora_config(tuning.peft, "CAUSAL_LM")
        kwargs = load_kwargs(tuning, where)
        base = load_causal_lm(policy, device=None if "quantization_config" in kwargs else where, **kwargs)
        checkpointing(base, tuning.compute)
        if tuning.peft.method == "qlora":
            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        self.model = get_peft_model(base, lora, adapter_name="policy")
        self.frozen: list = []  # the reference is the base itself
        self.value_head = None  # critic-free (no critic_init): no value adapter, no head
        if critic_init is not None:
            self.model.add_adapter("value", lora)
            rm_head = load_scalar_model(critic_init).score.weight.detach()
            self.value_head = torch.nn.Linear(rm_head.shape[1], 1, bias=False, device=where)
            with torch.no_grad():
                self.value_head.weight.copy_(rm_head)
        self.temperature = temperature
        head = list(self.value_head.parameters()) if self.value_head is not None else []
        self.trainable = [p for n, p in self.model.named_parameters() if "lora_" in n] + head
        modules = {"model": self.model} | ({"value_head": self.value_head} if self.value_head is not None else {})
        self.module = torch.nn.ModuleDict(modules)
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
        if self.value_head is None:  # critic-free: zeros, never trained
            return torch.zeros(rollout.response.shape, device=rollout.response.device)
        self._use("value")
        backbone = self.model.get_base_model().model  # the decoder stack, LoRA layers included
        return token_values(self.model, rollout, backbone=backbone, head=self.value_head)

    def policy_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.model.state_dict().items() if "lora_" in k and ".policy." in k}

    def load_policy_state(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state, strict=False)

    def state_dict(self) -> dict:
        lora = {k: v for k, v in self.model.state_dict().items() if "lora_" in k}
        head = {"value_head": self.value_head.state_dict()} if self.value_head is not None else {}
        return {"lora": lora, **head}

    def load_state_dict(self, blob: dict) -> None:
        self.model.load_state_dict(blob["lora"], strict=False)
        if self.value_head is not None:
            self.value_head.load_state_dict(blob["value_head"])

    def export(self, folder: Path) -> None:
        """A plain model folder: the policy adapter merged into the base (a full-precision one under QLoRA)."""
        if self.tuning.peft.method == "qlora":
            with tempfile.TemporaryDirectory(prefix="alignflow-policy-") as scratch:
                self.model.save_pretrained(scratch, selected_adapters=["policy"], safe_serialization=True)
                merged = load_adapter(Path(scratch) / "policy", self.base).merge_and_unload()
            merged.save_pretrained(folder, safe_serialization=True)
            return
        model = copy.deepcopy(self.model)
        model.set_adapter("policy")
        if self.value_head is not None:
            model.delete_adapter("value")
        model.merge_and_unload().save_pretrained(folder, safe_serialization=True)
