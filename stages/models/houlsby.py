"""Houlsby bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP").

A bottleneck `x + up(act(down(x)))` after the attention block and/or after the feed-forward block of
every decoder layer, on the block's output before the residual sum, as in the paper. `up` starts at
zero, so an inserted adapter is the identity and training starts from the base model's function.
Only the adapters train (optionally with the layer norms, as the paper does).

A bottleneck is non-linear, so it cannot be merged into the base weights. A trained model is
therefore written as the base's plain `from_pretrained` folder (the base weights, which the method
leaves unchanged) plus `houlsby.safetensors` and `houlsby.json` beside them; alignflow's loader
(`stages/models/modeling.py`) puts the adapters back whenever it loads such a folder, so every later
stage, the evaluation and the export use the adapted model. Plain `AutoModelForCausalLM` on that
folder gives the *base* model: load it with `stages.models.modeling.load_causal_lm`. The same two
files alone are the small adapter artifact.

Each adapter sits on its block as a submodule named `houlsby`, applied by a forward hook: the base's
parameter names stay as they were, so the base weights save and load as a plain folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from stages.settings.models import ADAPTER_ACTIVATIONS

CONFIG = "houlsby.json"
WEIGHTS = "houlsby.safetensors"
ACTIVATIONS = dict(zip(ADAPTER_ACTIVATIONS, (nn.GELU, nn.ReLU, nn.Tanh, nn.SiLU), strict=True))  # the config's names
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn")


class Bottleneck(nn.Module):
    def __init__(self, hidden: int, size: int, activation: str) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, size)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(size, hidden)
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)  # the identity at insertion
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))


def _hook(module: nn.Module, args, output):
    """On an attention block the output is `(hidden, weights, ...)`; on a feed-forward block a tensor."""
    if isinstance(output, tuple):
        return (module.houlsby(output[0]), *output[1:])
    return module.houlsby(output)


def decoder_layers(model):
    """The decoder's list of layers (Llama-family `model.layers`, GPT-2's `transformer.h`), under a
    classification or LM head."""
    for outer, inner in (("model", "layers"), ("transformer", "h")):
        layers = getattr(getattr(model, outer, None), inner, None)
        if layers is not None:
            return layers
    raise ValueError(f"peft: {type(model).__name__} has no `model.layers` or `transformer.h` (its decoder layers)")


def _blocks(model, placement: str) -> list[nn.Module]:
    kinds = {"attention": ATTENTION_NAMES, "mlp": MLP_NAMES}
    blocks = []
    for i, layer in enumerate(decoder_layers(model)):
        for kind in list(kinds) if placement == "both" else [placement]:
            block = next((getattr(layer, n) for n in kinds[kind] if hasattr(layer, n)), None)
            if block is None:
                raise ValueError(f"peft=houlsby: decoder layer {i} has no {kind} block ({', '.join(kinds[kind])})")
            blocks.append(block)
    return blocks


def insert(model, size: int, placement: str, activation: str) -> list[nn.Module]:
    """Adapters on every decoder layer's blocks (kept where they already are: a folder loaded with
    them trains on); returns the adapters."""
    hidden = model.config.hidden_size
    adapters = []
    for block in _blocks(model, placement):
        if not hasattr(block, "houlsby"):
            weight = next(block.parameters())
            block.houlsby = Bottleneck(hidden, size, activation).to(device=weight.device, dtype=weight.dtype)
            block.register_forward_hook(_hook)
        adapters.append(block.houlsby)
    model.alignflow_houlsby = {"size": size, "placement": placement, "activation": activation}
    return adapters


def is_adapter(name: str) -> bool:
    return ".houlsby." in name


def save(model, folder: Path) -> None:
    """The base weights as a plain folder, the adapters beside them (`houlsby.safetensors`, `.json`)."""
    state = {k: v for k, v in model.state_dict().items() if not is_adapter(k)}
    model.save_pretrained(Path(folder), state_dict=state, safe_serialization=True)
    save_adapter(model, folder)


def save_adapter(model, folder: Path) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if is_adapter(k)}
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    (folder / CONFIG).write_text(json.dumps(model.alignflow_houlsby, indent=2) + "\n")


def restore(model, folder: Path):
    """A model loaded from `folder`: its adapters back in place, if the folder has them."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CONFIG).is_file():
        return model
    spec = json.loads((folder / CONFIG).read_text())
    insert(model, spec["size"], spec["placement"], spec["activation"])
    tensors = load_file(str(folder / WEIGHTS))  # causal LM and scalar model of one base share these names
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    wanted = {n for n, _ in model.named_parameters() if is_adapter(n)}
    if unexpected or wanted & set(missing):
        raise ValueError(f"{folder / WEIGHTS}: does not fit the model (unexpected {unexpected[:3]})")
    return model
