"""How a training stage trains: its fine-tuning method (`peft/`), optimizer (`optim/`) and compute
(`compute/`), one value every training stage takes (SFT, reward model, PPO, DPO).

`load` is the one door a training stage's model comes through: quantised (QLoRA), with its attention
implementation and kernels, and the method applied; `optimizer` builds what trains it.
"""

from __future__ import annotations

from pathlib import Path

from stages.models import compute as compute_lib
from stages.models import optim as optim_lib
from stages.models import peft_setup
from stages.settings.models import Tuning, check_optim


def check(tuning: Tuning) -> None:
    """Refuse, before any model loads, what this machine or this combination cannot run."""
    compute_lib.check(tuning.compute)
    check_optim(tuning.optim, tuning.peft.method)


def device(tuning: Tuning, *, partitioned: bool = False):
    """Where a stage's models go (`compute.device`). `partitioned` (ZeRO-3): the host, from where
    DeepSpeed moves each rank's partition to its device."""
    import torch

    return torch.device("cpu") if partitioned else compute_lib.resolve_device(tuning.compute)


def load_kwargs(tuning: Tuning, device=None) -> dict:
    """`from_pretrained` arguments of a model that trains: attention implementation, quantisation
    (a quantised base is placed by bitsandbytes, on `device` when that is a GPU)."""
    kwargs = compute_lib.load_kwargs(tuning.compute, training=True)
    quantization = peft_setup.quantization_config(tuning.peft)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        if tuning.peft.quant_method != "quanto":  # a frozen base: its other weights in the compute dtype
            kwargs["dtype"] = compute_lib.compute_dtype(tuning.compute.precision)
        if device is not None and device.type == "cuda":
            kwargs["device_map"] = {"": device.index or 0}
    return kwargs


def load(path: str | Path, tuning: Tuning, kind: str, adjust=None, *, partitioned: bool = False):
    """A model to train from `path` (a causal LM, or with `kind="scalar"` a one-output scalar head),
    on the stage's device (`device`), the method applied: only its weights require grad, and with
    `compute.gradient_checkpointing` its activations recomputed. `adjust(model)` runs on the loaded
    model before the method (e.g. resizing embeddings)."""
    from stages.models.modeling import load_causal_lm, load_scalar_model

    where = device(tuning, partitioned=partitioned)
    kwargs = load_kwargs(tuning, where)
    model = load_causal_lm(path, **kwargs) if kind == "causal_lm" else load_scalar_model(path, **kwargs)
    if "quantization_config" not in kwargs:
        model = model.to(where)
    model = compute_lib.apply_kernels(model, tuning.compute)
    if adjust is not None:
        adjust(model)
    compute_lib.checkpointing(model, tuning.compute)
    return peft_setup.prepare(model, tuning.peft, kind)


def optimizer(model, tuning: Tuning, *, lr: float, weight_decay: float = 0.0, eps: float = 1e-8, extra=()):
    return optim_lib.build(model, tuning.optim, tuning.peft, lr=lr, weight_decay=weight_decay, eps=eps, extra=extra)


def trainer_setup(model, tuning: Tuning, *, lr: float, weight_decay: float = 0.0) -> tuple[dict, dict]:
    """For a transformers/trl trainer: (training-argument fields, trainer keyword arguments). The
    trainer gets the optimizer our own loops build, and makes its schedule (`optim.scheduler`).
    Plain AdamW is the trainer's own (`adamw_torch_fused`, the same hyperparameters), which keeps
    the SFT and DPO figures of before `optim/` to the last float."""
    args = {**compute_lib.trainer_flags(tuning.compute), "lr_scheduler_type": tuning.optim.scheduler}
    if tuning.optim.name == "adamw" and tuning.peft.method != "loraplus":
        return args | {"weight_decay": weight_decay}, {}
    return args, {"optimizers": (optimizer(model, tuning, lr=lr, weight_decay=weight_decay), None)}


def export(
    model,
    tuning: Tuning,
    folder: Path,
    *,
    base: Path,
    adapter: Path | None = None,
    kind: str = "causal_lm",
    partitioned: bool = False,
):
    """The trained model as a plain folder, and for adapter methods its adapter (`peft_setup.export`).
    `partitioned` (ZeRO-3, inside a gather): the adapter is merged into a fresh load of `base`."""
    peft_setup.export(model, tuning.peft, folder, base=Path(base), adapter=adapter, kind=kind, fresh_base=partitioned)
