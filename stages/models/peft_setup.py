"""The fine-tuning method of the training stages (config group `peft/`): which weights train, and the
standard folders a trained model is written as.

Methods (one config line switches them, as in LLaMA-Factory):

- `full`: every weight trains.
- `freeze`: only the last `freeze_layers` decoder layers and the modules named in `freeze_modules`
  train (freeze-tuning); a scalar head always trains.
- `houlsby` (Houlsby et al. 2019): bottleneck adapters (`adapter_size`) after the attention and/or
  feed-forward block of every layer (`adapter_placement`), `adapter_activation` between the
  projections, trained alone or with the layer norms (`adapter_train_norms`); written beside the
  unchanged base weights, since a bottleneck does not merge (`stages/models/houlsby.py`).
- `lora` (Hu et al. 2021), with `rslora` (Kalajdzievski 2023: alpha / sqrt(r) scaling) as an option.
- `dora` (Liu et al. 2024): LoRA on the direction, a trained magnitude per output feature.
- `pissa` (Meng et al. 2024): adapters initialised from the principal singular vectors (fast SVD,
  `pissa_niter` iterations); the base keeps the residual.
- `loraplus` (Hayou et al. 2024): LoRA with B's learning rate `loraplus_ratio` times A's
  (peft's `create_loraplus_optimizer`).
- `qlora` (Dettmers et al. 2023): LoRA on a quantised base. `quant_method: bitsandbytes` (default):
  4-bit NF4 with double quantisation (`quant_bits: 4`) or 8-bit (`quant_bits: 8`), CPU and GPU;
  `quant_method: torchao`: int8 weight-only (`quant_bits: 8`, CPU and GPU; int4 is refused before the
  model loads: peft's LoRA on torchao takes int8 weights only); `quant_method: quanto`
  (optimum-quanto): int8 or int4 weights (`quant_bits`), CPU and GPU. A model folder that is already
  quantised (GPTQ, AWQ, AQLM, ...: its config.json says so) loads with its own quantisation on a GPU
  and is refused on CPU with the requirement named (`stages/models/folders.py`).

A LoRA-family scalar model (reward or value) keeps its head trainable in full (peft's SEQ_CLS task
saves `score`). `stages` names the training stages the method applies to; the others train in full
(the embedded default's LoRA covers SFT and DPO, its reward model and PPO train in full). PPO's
`layout: shared_base` is an adapter layout: it needs an adapter method whatever `stages` says.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import weakref
from pathlib import Path

from stages.models import houlsby
from stages.models.houlsby import decoder_layers
from stages.runtime.errors import ConfigError
from stages.settings.models import PeftConfig

KINDS = ("causal_lm", "scalar")  # SFT, DPO, the PPO policy | the reward model, the PPO value model
SCALAR_HEAD = "score"  # transformers' *ForSequenceClassification head


def lora_config(cfg: PeftConfig, task_type: str):
    """The `peft.LoraConfig` for an adapter method, or None for `full` and `freeze`."""
    if not cfg.adapters:
        return None
    from peft import LoraConfig

    targets = cfg.target_modules[0] if cfg.target_modules == ["all-linear"] else list(cfg.target_modules)
    init = True
    if cfg.method == "pissa":
        init = f"pissa_niter_{cfg.pissa_niter}" if cfg.pissa_niter else "pissa"
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        modules_to_save=list(cfg.modules_to_save) or None,
        task_type=task_type,
        use_rslora=cfg.rslora,
        use_dora=cfg.method == "dora",
        init_lora_weights=init,
    )


def quantization_config(cfg: PeftConfig):
    """The `from_pretrained` quantisation config of a QLoRA base, else None: bitsandbytes' (4-bit NF4
    with double quantisation, or 8-bit) or torchao's (int8 or int4 weight-only)."""
    if cfg.method != "qlora":
        return None
    import torch

    if cfg.quant_method == "quanto":
        from transformers import QuantoConfig

        check_quantization(cfg)
        return QuantoConfig(weights=f"int{cfg.quant_bits}")
    if cfg.quant_method == "torchao":
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        check_quantization(cfg)
        return TorchAoConfig(Int8WeightOnlyConfig() if cfg.quant_bits == 8 else Int4WeightOnlyConfig())
    from transformers import BitsAndBytesConfig

    if cfg.quant_bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )


def check_quantization(cfg: PeftConfig, precision: str = "fp32") -> None:
    """What this machine cannot quantise, refused before any model loads (preflight), the requirement named;
    `precision`: `compute.precision`."""
    if cfg.method != "qlora" or cfg.quant_method == "bitsandbytes":
        return
    import importlib.util

    if cfg.quant_method == "quanto":
        if importlib.util.find_spec("optimum.quanto") is None:
            raise ConfigError(
                "peft.quant_method=quanto needs the optimum-quanto package (pip install optimum-quanto==0.2.7)"
            )
        if precision != "fp32":  # its kernels take fp32 activations; peft cannot cast a bf16 quanto base
            raise ConfigError(
                f"peft.quant_method=quanto with compute.precision={precision}: quanto's int weights run with fp32 "
                "activations only (its matmul refuses autocast's); use compute.precision=fp32, or "
                "peft.quant_method=torchao (int8) or bitsandbytes"
            )
        return

    if importlib.util.find_spec("torchao") is None:
        raise ConfigError("peft.quant_method=torchao needs the torchao package (pip install torchao==0.18.0)")
    if cfg.quant_bits == 4:  # on any device: peft's own check refuses it after the base has loaded
        raise ConfigError(
            "peft.quant_method=torchao with peft.quant_bits=4: peft's LoRA on torchao accepts int8 weights only "
            "(torchao's int4 layout also needs the mslk package and bf16 activations); use peft.quant_bits=8, "
            "or a 4-bit base from peft.quant_method=bitsandbytes (NF4) or quanto (int4)"
        )


def prepare(model, cfg: PeftConfig, kind: str):
    """`model` made ready to train with `cfg.method`: a PeftModel for adapter methods, the model itself
    with only the method's weights requiring grad for `full` and `freeze`."""
    if kind not in KINDS:
        raise ValueError(f"kind: {kind!r} is not one of {', '.join(KINDS)}")
    if cfg.method == "full":
        return model.requires_grad_(True)
    if cfg.method == "houlsby":
        model.requires_grad_(False)
        for adapter in houlsby.insert(model, cfg.adapter_size, cfg.adapter_placement, cfg.adapter_activation):
            adapter.requires_grad_(True)
        for name, module in model.named_modules():
            norm = "norm" in type(module).__name__.lower() or "LayerNorm" in type(module).__name__
            if cfg.adapter_train_norms and norm and not houlsby.is_adapter(name + "."):
                module.requires_grad_(True)
        if kind == "scalar":
            getattr(model, SCALAR_HEAD).requires_grad_(True)
        return model
    if cfg.method == "freeze":
        model.requires_grad_(False)
        layers = decoder_layers(model)
        for layer in list(layers)[len(layers) - cfg.freeze_layers :] if cfg.freeze_layers else []:
            layer.requires_grad_(True)
        names = list(cfg.freeze_modules) + ([SCALAR_HEAD] if kind == "scalar" else [])
        modules = dict(model.named_modules())
        for name in names:
            hits = [m for n, m in modules.items() if n == name or n.endswith("." + name)]
            if not hits:
                raise ValueError(f"peft.freeze_modules: {type(model).__name__} has no module {name!r}")
            for m in hits:
                m.requires_grad_(True)
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if cfg.method == "qlora":  # norms in fp32, inputs that carry grad into the adapters
        check_4bit_widths(model, cfg)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    peft_model = get_peft_model(model, lora_config(cfg, "CAUSAL_LM" if kind == "causal_lm" else "SEQ_CLS"))
    if cfg.method == "pissa":  # the initial adapter, to convert the trained one to a plain LoRA later
        initial = Path(tempfile.mkdtemp(prefix="alignflow-pissa-"))
        config = peft_model.peft_config["default"]
        init, config.init_lora_weights = config.init_lora_weights, True
        peft_model.save_pretrained(initial, safe_serialization=True)
        config.init_lora_weights = init
        peft_model.alignflow_pissa_initial = initial
        weakref.finalize(peft_model, shutil.rmtree, initial, True)  # kept while the model lives: it may export twice
    return peft_model


def check_4bit_widths(model, cfg: PeftConfig) -> None:
    """bitsandbytes' CPU kernels for 4-bit inference (sampling, evaluation) repack each weight in
    blocks of 64 input features: a narrower layer fails there, mid-stage. Refuse it at load."""
    import torch

    if cfg.quant_bits != 4 or cfg.quant_method != "bitsandbytes" or torch.cuda.is_available():
        return
    import bitsandbytes as bnb

    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit) and module.in_features % 64:
            raise ValueError(
                "peft.method=qlora on CPU: bitsandbytes' 4-bit CPU kernels need layer widths in multiples of 64; "
                f"{name} takes {module.in_features} (hidden_size, intermediate_size); "
                "use quant_bits=8, a GPU, or a wider model"
            )


def export(
    model,
    cfg: PeftConfig,
    folder: Path,
    *,
    base: Path,
    adapter: Path | None = None,
    kind: str = "causal_lm",
    fresh_base: bool = False,
):
    """Write the trained `model` as a plain `from_pretrained` folder at `folder` and, for adapter
    methods with `adapter` given, the adapter (loads with `PeftModel.from_pretrained` on `base`).
    `model` itself is left as it was.

    - LoRA, DoRA, LoRA+: the adapter as trained; the plain folder is it merged into the base.
    - PiSSA: the adapter is converted to a LoRA on the *original* base (peft's
      `path_initial_model_for_weight_conversion`), which the trained base's residual is not.
    - QLoRA: the adapter is reloaded onto `base` in full precision and merged there: a merge into
      4-bit weights would round them, and a QLoRA adapter is meant to load on a full-precision base.
    - `fresh_base` (ZeRO-3, the weights gathered): merged the same way, since a partitioned model
      cannot be copied.
    """
    folder = Path(folder)
    if cfg.method == "houlsby":  # the base weights as a plain folder, the bottlenecks beside them
        houlsby.save(model, folder)
        if adapter is not None:
            houlsby.save_adapter(model, Path(adapter))
        return
    if not cfg.adapters:
        model.save_pretrained(folder, safe_serialization=True)
        return
    with tempfile.TemporaryDirectory(prefix="alignflow-adapter-") as scratch:
        target = Path(adapter) if adapter is not None else Path(scratch) / "adapter"
        initial = getattr(model, "alignflow_pissa_initial", None)
        if initial is not None:
            model.save_pretrained(
                target, safe_serialization=True, path_initial_model_for_weight_conversion=str(initial)
            )
            _keep_saved_modules(model, target, Path(scratch) / "as-trained")
        else:
            model.save_pretrained(target, safe_serialization=True)
        if cfg.method == "qlora" or fresh_base:  # merge on the original full-precision base
            merged = load_adapter(target, base, kind).merge_and_unload()
            merged.config.pad_token_id = model.config.pad_token_id
        else:  # on a copy: the caller may train on (PPO's EMA weights are loaded after the last iterate's export)
            merged = copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(folder, safe_serialization=True)


def _keep_saved_modules(model, converted: Path, scratch: Path) -> None:
    """peft's PiSSA-to-LoRA conversion writes the adapters only: put back the modules trained in
    full beside them (a reward model's `score` head), from a save as trained."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(scratch, safe_serialization=True)
    plain = load_file(str(scratch / "adapter_model.safetensors"))
    path = converted / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors |= {k: v for k, v in plain.items() if "lora_" not in k and k not in tensors}
    save_file(tensors, str(path), metadata={"format": "pt"})


def load_adapter(adapter: Path, base: Path, kind: str = "causal_lm"):
    """An adapter folder on its full-precision base: a `PeftModel`."""
    from peft import PeftModel

    from stages.models.modeling import load_causal_lm, load_scalar_model

    model = load_causal_lm(base) if kind == "causal_lm" else load_scalar_model(base)
    return PeftModel.from_pretrained(model, str(adapter))
