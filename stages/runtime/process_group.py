"""Data-parallel training across processes (config group `distributed/`): torch DDP, or DeepSpeed ZeRO.

A launched stage runs as a process group (`flows/launch/launch.py` starts it with torchrun, or DeepSpeed's
launcher across nodes); each rank calls the stage's `run` with `distributed=` this config. Rank 0
writes the artifact, the other ranks write nothing.

- `single`: one process, no launcher (the default).
- `ddp`: torch's DistributedDataParallel; every rank holds the whole model and optimizer.
- `zero2`: DeepSpeed ZeRO stage 2; optimizer state and gradients partitioned across ranks.
- `zero3`: ZeRO stage 3; the parameters too. Each forward gathers a layer's parameters on the fly.
- `zero3_offload`: ZeRO-3 with parameters and optimizer state in host memory (GPU memory saved).

Trainer stages (SFT, DPO) hand the DeepSpeed dict to transformers' integration (`trainer_args`);
our own loops (reward model, PPO) go through `Engine`: torch DDP or `deepspeed.initialize`.
On CPU the backend is gloo; each rank caps its torch threads (the launcher sets them). On GPUs the
backend is NCCL: each rank takes its `LOCAL_RANK` GPU (`init`), DDP wraps the module on it, and the
collectives here run on it.

LoRA-family adapters train under ZeRO-3 (the base partitioned, the adapters and heads trained on
every rank); at publish the adapter is saved from the gathered weights and merged into a fresh load of
the base (`partitioned`), since a partitioned model cannot be copied to merge.
"""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # annotations only: the config schema sits above runtime (stages/settings)
    from stages.settings.distributed import DistributedConfig


# ---- ranks ---------------------------------------------------------------------------------------
def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def partitioned(cfg: DistributedConfig | None) -> bool:
    """Whether this process is a rank of a ZeRO-3 group: its models' parameters are partitioned."""
    return cfg is not None and cfg.mode != "single" and cfg.zero == 3 and world_size() > 1


def comm_device() -> torch.device:
    """Where collectives run: this rank's GPU under NCCL, else the host."""
    import torch.distributed as dist

    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init(cfg: DistributedConfig, device: str = "auto") -> None:
    """Join the process group the launcher set up (its env: RANK, WORLD_SIZE, MASTER_ADDR/PORT);
    `device`: the stage's `compute.device` (NCCL only for ranks on CUDA devices)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = cfg.resolved_backend(device)
    if backend == "nccl":  # each rank its own GPU, before any CUDA tensor is made
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if cfg.zero:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)
    else:
        dist.init_process_group(backend=backend)


def active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """`x` summed over ranks (a copy); `x` itself in one process."""
    if not active():
        return x
    import torch.distributed as dist

    out = x.detach().to(comm_device(), copy=True)
    dist.all_reduce(out)
    return out.to(x.device)


def mean(x: torch.Tensor) -> float:
    """The mean of `x`'s entries over all ranks' `x` together (equal or unequal sizes)."""
    if not active():
        return x.mean().item()
    local = [x.detach().double().sum().item(), float(x.numel())]
    sums = all_reduce_sum(torch.tensor(local, dtype=torch.float64, device="cpu"))
    return (sums[0] / sums[1]).item()


def gather(items: list) -> list:
    """Every rank's `items`, concatenated in rank order, on every rank (`items` in one process)."""
    if not active():
        return items
    import torch.distributed as dist

    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


def barrier() -> None:
    if active():
        import torch.distributed as dist

        dist.barrier()


def share(n: int) -> slice:
    """This rank's contiguous share of `n` items (the first ranks take one more when it does not divide)."""
    w, r = world_size(), rank()
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return slice(start, start + base + (r < extra))


def per_rank(batch: int, what: str) -> int:
    """A global batch split evenly across the ranks; refuses one that does not divide."""
    w = world_size()
    if batch % w:
        raise ValueError(f"{what} ({batch}) must be a multiple of the {w} processes (distributed.nproc_per_node)")
    return batch // w


# ---- trainer stages (transformers' integration) -------------------------------------------------
def trainer_args(cfg: DistributedConfig | None, batch_size: int, what: str, device: str = "auto") -> dict[str, Any]:
    """TrainingArguments fields of a launched trainer stage: the per-rank batch of the same global batch,
    the backend, and for the zero modes the DeepSpeed dict (its "auto" fields filled by transformers:
    `bf16` from the trainer's flag, which is `compute.precision`'s); `device`: `compute.device`."""
    if cfg is None or cfg.mode == "single":
        return {"per_device_train_batch_size": batch_size}
    args: dict[str, Any] = {
        "per_device_train_batch_size": per_rank(batch_size, what),
        "ddp_backend": cfg.resolved_backend(device),
    }
    if cfg.zero:  # the trainer runs DeepSpeed's bf16 mode itself: no torch_autocast section beside it
        args["deepspeed"] = {k: v for k, v in copy.deepcopy(cfg.deepspeed).items() if k != "torch_autocast"}
    return args


def engine_precision(ds: dict[str, Any], precision: str) -> dict[str, Any]:
    """DeepSpeed's precision sections for our own loops (`Engine`), which keep fp32 master weights and
    compute under autocast: `torch_autocast` on in the compute dtype (without it DeepSpeed 0.19 turns an
    outer `torch.autocast` off inside its forward), its `bf16`/`fp16` modes off."""
    lower = {"bf16": "bfloat16", "fp16": "float16"}.get(precision)
    ds = {**ds, "bf16": {"enabled": False}, "fp16": {"enabled": False}}
    ds["torch_autocast"] = {"enabled": lower is not None, **({"dtype": lower} if lower else {})}
    return ds


def leave_trainer_zero3() -> None:
    """After a trainer under ZeRO-3: models loaded from here on are whole and local (transformers
    otherwise partitions every `from_pretrained` while the trainer's DeepSpeed config lives: a
    collective that rank 0 alone would wait on forever)."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


# ---- our loops (reward model, PPO) --------------------------------------------------------------
class Engine:
    """One training module and its optimizer, as one process (`cfg` None or single), torch DDP, or a
    DeepSpeed engine. Forward through `engine(...)`, then `backward(loss)` and `step()`.

    `clip`: the gradient-norm clip (DeepSpeed clips inside its step; DDP and one process here).
    `scaler`: fp16's gradient scaler (`compute.grad_scaler`) for one process and DDP; DeepSpeed
    scales with its own config's `fp16` section.
    """

    def __init__(
        self,
        module,
        opt,
        cfg: DistributedConfig | None,
        *,
        micro_batch: int,
        clip: float = 0.0,
        scaler=None,
        precision: str = "fp32",
    ) -> None:
        self.cfg = cfg if cfg is not None and cfg.mode != "single" else None
        self.opt, self.clip, self.base, self.scaler = opt, clip, module, scaler
        self.params = [p for p in module.parameters() if p.requires_grad]
        if self.cfg is None or not self.cfg.zero:
            self.module = module
            if self.cfg is not None and active():
                device = next(module.parameters()).device
                ids = [device.index] if device.type == "cuda" else None  # NCCL: the module's own GPU
                self.module = torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)
            return
        import deepspeed

        ds = {
            **engine_precision(copy.deepcopy(self.cfg.deepspeed), precision),
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": clip,
        }
        ds.pop("train_batch_size", None)
        self.module, self.opt, _, _ = deepspeed.initialize(model=module, optimizer=opt, config=ds)
        self.base = self.module.module

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        if self.cfg is not None and self.cfg.zero:
            self.module.backward(loss)
        elif self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def step(self) -> None:
        if self.cfg is not None and self.cfg.zero:
            self.module.step()  # clips (gradient_clipping), steps, zeroes the gradients
            return
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)  # clip the true gradients
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.opt.zero_grad()

    @contextlib.contextmanager
    def gathered(self, modules=None):
        """Under ZeRO-3 the full parameters of `modules` (default: all) on every rank while inside:
        for generation, export and the EMA. Collective: every rank enters it."""
        with gathered(self.base if modules is None else modules, self.cfg):
            yield

    # checkpoints: DeepSpeed's own format under ZeRO (each rank writes its partition), else one file
    def save(self, folder: Path, step: int, client: dict[str, Any]) -> None:
        """Collective. ZeRO: DeepSpeed's `save_checkpoint` (each rank its partitions, `latest` written
        last, so a kill mid-save resumes from the one before); else rank 0 writes one file."""
        from stages.runtime import checkpoints

        if self.cfg is not None and self.cfg.zero:
            self.module.save_checkpoint(str(folder), tag=f"step-{step}", client_state=client)
            barrier()
            return
        if is_main():
            checkpoints.save(folder, {"module": self.base.state_dict(), "opt": self.opt.state_dict(), **client})
        barrier()

    def load(self, folder: Path | None) -> dict[str, Any] | None:
        """The client state of the last complete checkpoint (its module and optimizer restored), or None."""
        from stages.runtime import checkpoints

        if folder is None:
            return None
        if self.cfg is not None and self.cfg.zero:
            if not (Path(folder) / "latest").exists():
                return None
            path, client = self.module.load_checkpoint(str(folder))
            return client if path is not None else None
        blob = checkpoints.load(folder)
        if blob is None:
            return None
        self.base.load_state_dict(blob.pop("module"))
        self.opt.load_state_dict(blob.pop("opt"))
        return blob


@contextlib.contextmanager
def gathered(modules, cfg: DistributedConfig | None):
    """ZeRO-3: the full parameters of `modules` materialised on every rank inside (DeepSpeed's
    `GatheredParameters`, read-only); a no-op otherwise."""
    if cfg is None or cfg.zero != 3:
        yield
        return
    import deepspeed

    modules = modules if isinstance(modules, (list, tuple)) else [modules]
    params = [p for m in modules for p in m.parameters()]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def state_bytes(module, opt) -> dict[str, int]:
    """Bytes this rank holds of the parameters and of the optimizer state: ZeRO-3's partitions count
    their local shard (`ds_tensor`), ZeRO-2's optimizer its flat partition."""
    params = sum(
        (p.ds_tensor.numel() * p.ds_tensor.element_size()) if hasattr(p, "ds_tensor") else p.numel() * p.element_size()
        for p in module.parameters()
    )
    inner = getattr(opt, "optimizer", opt)  # DeepSpeed wraps the torch optimizer
    state = sum(
        v.numel() * v.element_size() for s in inner.state.values() for v in s.values() if isinstance(v, torch.Tensor)
    )
    extra = 0
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):  # ZeRO's fp32 master copy
        for t in getattr(opt, name, []) or []:
            extra += t.numel() * t.element_size()
    return {"parameters": int(params), "optimizer": int(state + extra)}
