"""PPO's resumable state (`PpoState`): the models, the optimizer through the training `Engine`, the KL
coefficient (`KLController`, beta's one home), the EMA, the RNG and the position; saved every
`checkpoint_every` updates and loaded by a resumed run. Built for `stages/ppo.py`."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from stages.models import peft_setup
from stages.models.compute import grad_scaler
from stages.models.modeling import Rollout, load_causal_lm
from stages.models.tuning import device, optimizer
from stages.rl import ppo_math as pm
from stages.rl.async_rollouts import Behaviour
from stages.rl.ppo_models import FullCopies, SharedBase
from stages.rl.rollout import HfRollout, VllmRollout
from stages.rl.tools import Toolbox, ToolRollout
from stages.rl.watch import Watch
from stages.runtime import process_group as dist
from stages.runtime.process_group import Engine
from stages.runtime.training import TrainingLoop
from stages.settings.distributed import DistributedConfig
from stages.settings.models import Tuning
from stages.settings.recipe import PpoConfig, chosen_learning_rate


class PpoState:
    """Everything a resumed run needs: models, optimizer, KL controller, EMA, RNG, position."""

    def __init__(
        self,
        cfg: PpoConfig,
        tuning: Tuning,
        policy: Path,
        critic_init: Path,
        distributed: DistributedConfig | None,
        checkpoint_dir: Path | None = None,
        toolbox: Toolbox | None = None,
    ) -> None:
        """`toolbox`: the tools the policy's rollouts may call (`stages/rl/tools.py`), None: single-turn."""
        torch.manual_seed(cfg.seed)
        # ZeRO-3 partitions the policy: rollouts come from a whole copy, synced after each update
        self.zero3 = dist.partitioned(distributed)
        self.device = device(tuning)
        critic_init = None if cfg.critic_free else critic_init  # no value model to load
        self.models = (
            FullCopies(policy, critic_init, cfg.temperature, tuning, partitioned=self.zero3)
            if cfg.layout == "full_copies"
            else SharedBase(policy, critic_init, cfg.temperature, tuning)
        )
        self.compute = tuning.compute
        self.kl = pm.KLController(cfg.beta, cfg.kl_target, cfg.kl_horizon)  # beta's one home
        self.ema = {k: v.detach().clone() for k, v in self.models.policy_state().items()} if cfg.ema_decay else None
        self.history: list[dict[str, float]] = []
        self.warned_kl = False
        self.watch: Watch | None = None
        self.stopped: str | None = None  # why training stopped before `updates` (degenerate rollouts)
        self.async_pending: dict[int, Behaviour] = {}  # batches sampled ahead by older weights, checkpointed
        self.rollout_policy = whole_copy(policy, tuning, self.device) if self.zero3 else None
        self.engine = _engine(cfg, tuning, self.models, distributed)
        self.opt = self.engine.opt
        self.loop = TrainingLoop("ppo", self.engine, steps=cfg.updates, seed=cfg.seed, checkpoint_dir=checkpoint_dir,
                                 checkpoint_every=cfg.checkpoint_every, unit="update")  # fmt: skip
        self.offload = cfg.offload_frozen
        if dist.world_size() > 1:  # each rank samples its own rollouts
            torch.manual_seed(cfg.seed + dist.rank())
        self.rollout = _rollout_engine(cfg, policy, self.models.policy, self.rollout_policy, tuning)
        if toolbox is not None:
            self.rollout = ToolRollout(self.rollout, toolbox, cfg.max_tool_calls)
        if self.offload:
            self.frozen_to("cpu")

    def frozen_to(self, where) -> None:
        for module in self.models.frozen:
            module.to(where)

    @contextlib.contextmanager
    def frozen_on_device(self, scorer):
        """With `offload_frozen`: the reference and reward models on the device while inside, in host
        memory otherwise."""
        if not self.offload:
            yield
            return
        modules = self.models.frozen + scorer.frozen
        for m in modules:
            m.to(self.device)
        try:
            yield
        finally:
            for m in modules:
                m.to("cpu")

    def sync_rollout(self) -> None:
        """After an update: the rollout engine takes the policy's weights (gathered under ZeRO-3)."""
        self.rollout.sync(lambda: self.engine.gathered([self.models.policy]))

    def ema_step(self, decay: float) -> None:
        with self.engine.gathered([self.models.policy]):  # a no-op but under ZeRO-3
            pm.ema_update(self.ema, self.models.policy_state(), decay)

    @property
    def update(self) -> int:
        """The updates done: the training loop's position."""
        return self.loop.step_index

    def save(self) -> None:
        """Collective: a checkpoint (`TrainingLoop.save`) with PPO's own state beside the position."""
        watch = {"points": self.watch.points, "best": self.watch.best} if self.watch else None
        self.loop.extra = {"beta": self.kl.beta, "ema": self.ema, "history": self.history,
                           "warned_kl": self.warned_kl, "watch": watch,
                           "async_pending": [b.to_blob() for b in self.async_pending.values()]}  # fmt: skip
        self.loop.save()

    def load(self) -> bool:
        """The last complete checkpoint restored; False where there is none."""
        extra = self.loop.resume()
        if extra is None:
            return False
        if self.engine.cfg is not None:
            self.sync_rollout()
        self.kl.beta, self.ema = extra["beta"], extra["ema"]
        self.history, self.warned_kl = extra["history"], extra["warned_kl"]
        self.async_pending = {b["update"]: Behaviour.from_blob(b) for b in extra.get("async_pending", [])}
        if self.watch is not None and extra.get("watch"):
            self.watch.points, self.watch.best = extra["watch"]["points"], extra["watch"]["best"]
        return True


def _engine(cfg: PpoConfig, tuning: Tuning, models, distributed: DistributedConfig | None) -> Engine:
    """The trained policy and value behind one optimizer (AdamW, eps 1e-5) in one process, DDP or ZeRO."""
    opt = optimizer(models.module, tuning, lr=chosen_learning_rate("ppo", cfg.learning_rate, tuning.peft.method),
                    eps=1e-5, weight_decay=0.01)  # fmt: skip
    micro = dist.per_rank(cfg.minibatch_size, "stage.ppo.minibatch_size")
    if dist.per_rank(cfg.rollouts_per_update, "stage.ppo.rollouts_per_update") % cfg.samples_per_prompt:
        raise ValueError(
            "stage.ppo.samples_per_prompt must divide each process's share of stage.ppo.rollouts_per_update "
            "(a prompt's group of responses stays on one rank)"
        )
    return Engine(Trained(models), opt, distributed, micro_batch=micro, clip=cfg.max_grad_norm,
                  scaler=grad_scaler(tuning.compute), precision=tuning.compute.precision)  # fmt: skip


def _rollout_engine(cfg: PpoConfig, policy: Path, trained, whole, tuning: Tuning):
    """Where rollouts come from: vLLM (weights synced per update), or transformers' generate on the trained
    policy (under ZeRO-3 on `whole`, a whole copy synced from the gathered policy)."""
    if cfg.generation == "vllm":
        return VllmRollout(policy, trained, seed=cfg.seed + dist.rank())
    hf = {"batch_size": cfg.generation_batch_size, "static_cache": cfg.static_cache,
          "precision": tuning.compute.precision}  # fmt: skip
    return HfRollout(whole, trained, **hf) if whole is not None else HfRollout(trained, **hf)


class Trained(torch.nn.Module):
    """What the engine trains: policy and value in one module whose forward gives a minibatch's
    log-probs, entropies and values (DDP and DeepSpeed see every trained parameter in one forward)."""

    def __init__(self, models) -> None:
        super().__init__()
        self.trained = models.module
        self.models = [models]  # in a list: not a second registration of the same parameters

    def forward(self, mb: Rollout):
        logp, entropy = self.models[0].policy_logprobs(mb)
        return logp, entropy, self.models[0].values(mb)


def whole_copy(policy: Path, tuning: Tuning, where):
    """Under ZeRO-3: a whole copy of the trained policy's structure (the method's adapters too), for
    sampling and export; its weights come from the gathered policy (`HfRollout.sync`)."""
    copy = peft_setup.prepare(load_causal_lm(policy, device=where), tuning.peft, "causal_lm")
    return copy.eval().requires_grad_(False)


def model_state_mb(state: PpoState, scorer) -> float:
    """The models' weights (trained, reference, scorer, each tensor once) and the optimizer's state, in MB:
    what a critic-free estimator saves shows here whatever the process's baseline RSS."""
    seen: dict[int, int] = {}
    modules = [state.models.module, *state.models.frozen, *scorer.frozen]
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            seen[t.data_ptr()] = t.numel() * t.element_size()
    for per_param in state.opt.state.values():
        for v in per_param.values():
            if torch.is_tensor(v):
                seen[v.data_ptr()] = v.numel() * v.element_size()
    return sum(seen.values()) / 2**20
