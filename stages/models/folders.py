"""What preflight checks of a model folder or hub id before any weights load, one line per problem.

`inspect_model` reads the folder's config, each safetensors file's header (`safe_open`: the header
only, no tensor is read), and its tokenizer; it refuses a path that neither exists nor reads as a
hub id, corrupt or missing weights, an architecture the stage cannot use (an encoder such as BERT
where a causal LM must generate), and a folder without tokenizer files. Every message starts with
the config key and the folder.
"""

from __future__ import annotations

import re
from pathlib import Path

from stages.models import vision
from stages.models.modeling import ModelError, check_model_folder, load_tokenizer

# a hub id: `name` or `owner/name`, letters, digits, `-`, `_` and `.` (no leading dot, no `..`)
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
# what a tokenizer is saved as: fast (tokenizer.json), SentencePiece (*.model), BPE (vocab + merges), WordPiece
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "tiktoken.model")
# the class-name endings of models each role can use (`config.architectures`, written by save_pretrained)
ROLES = {
    "causal_lm": ("ForCausalLM", "LMHeadModel"),
    "reward": ("ForCausalLM", "LMHeadModel", "ForSequenceClassification"),
}


def inspect_model(path: str | Path, *, key: str, role: str = "causal_lm", trust_remote_code: bool = False):
    """Check the model `path` names (the value of config key `key`) and return its tokenizer."""
    text = str(path)
    folder = Path(text).expanduser()
    if not folder.exists():
        if not HUB_ID.match(text) or ".." in text:
            raise ModelError(f"{key}: {text}: no such folder (and not a hub id of the form owner/name)")
        return _hub(text, key=key, role=role, trust_remote_code=trust_remote_code)
    if not folder.is_dir():
        raise ModelError(f"{key}: {folder}: is a file, not a model folder (give the folder that holds config.json)")
    if not (folder / "config.json").is_file():
        raise ModelError(f"{key}: {folder}: no config.json (not a folder written by save_pretrained)")
    check_model_folder(folder)  # safetensors only
    for weights in sorted(folder.glob("*.safetensors")):
        _check_header(weights, key)
    _check_architecture(folder, key, role, trust_remote_code)
    check_prequantized(folder, key)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES) and not any(folder.glob("*.model")):
        raise ModelError(
            f"{key}: {folder}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); save the tokenizer "
            "beside the weights with `tokenizer.save_pretrained(folder)`"
        )
    return _tokenizer(folder, key, trust_remote_code)


# quantisation methods of already-quantised model folders whose kernels need CUDA, and their package
GPU_QUANTIZED = {"gptq": "gptqmodel", "awq": "autoawq", "aqlm": "aqlm", "exl2": "exllamav2", "vptq": "vptq"}


def check_prequantized(folder: Path, key: str, *, cuda: bool | None = None) -> None:
    """A folder already quantised by a GPU-only method (its config.json's `quantization_config`) cannot
    load here: refused before any model loads, the method and what it needs named. On a GPU it loads
    with its own quantisation and trains LoRA on top (`peft=qlora` or `lora`)."""
    import json

    try:
        quant = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return  # _check_architecture has named an unreadable config already
    method = str(quant.get("quant_method", "")).lower()
    if method not in GPU_QUANTIZED:
        return
    import torch

    if torch.cuda.is_available() if cuda is None else cuda:
        return
    raise ModelError(
        f"{key}: {folder}: a {method.upper()}-quantised model; its kernels need a CUDA GPU and the "
        f"{GPU_QUANTIZED[method]} package, and this machine has no GPU; use the full-precision folder with "
        "peft=qlora (bitsandbytes or torchao quantise it here)"
    )


def _check_header(weights: Path, key: str) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            if not list(f.keys()):
                raise ModelError(f"{key}: {weights}: the safetensors file holds no tensors")
    except ModelError:
        raise
    except Exception as e:  # safetensors' own errors (HeaderTooLarge, InvalidHeaderDeserialization, ...)
        raise ModelError(
            f"{key}: {weights}: corrupt safetensors file ({_first_line(e)}); re-save or re-download it"
        ) from None


def _check_architecture(where: str | Path, key: str, role: str, trust_remote_code: bool) -> None:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(where), trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelError(f"{key}: {where}: its config.json cannot be read ({_first_line(e)})") from None
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError(
            f"{key}: {where}: {config.model_type} is an encoder-decoder model; this stage needs a decoder-only "
            "causal LM (a *ForCausalLM architecture)"
        )
    if vision.is_vlm(config):  # an image-text model (LLaVA-, Qwen2-VL-style)
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

        if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
            raise ModelError(
                f"{key}: {where}: model type {config.model_type!r} has a vision tower but no image-text-to-text "
                "class in transformers (AutoModelForImageTextToText)"
            )
        return
    architectures = getattr(config, "architectures", None) or []
    if architectures and not any(a.endswith(ROLES[role]) for a in architectures):
        raise ModelError(
            f"{key}: {where}: its architecture {', '.join(architectures)} is not a causal LM (an encoder cannot "
            f"generate); this stage needs one of *{', *'.join(ROLES[role])}"
        )
    if not architectures:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise ModelError(f"{key}: {where}: model type {config.model_type!r} has no causal LM class in transformers")


def _tokenizer(where: str | Path, key: str, trust_remote_code: bool):
    try:
        return load_tokenizer(where, trust_remote_code=trust_remote_code)
    except ModelError as e:
        raise ModelError(f"{key}: {e}") from None
    except Exception as e:  # what transformers says of files it cannot read, on one line
        raise ModelError(f"{key}: {where}: its tokenizer does not load ({_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    """A library's error on one line (its first), or its type's name when it says nothing."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _hub(hub_id: str, *, key: str, role: str, trust_remote_code: bool):
    """A hub id: its config and tokenizer must resolve (from the local cache when the hub is offline)."""
    _check_architecture(hub_id, key, role, trust_remote_code)
    return _tokenizer(hub_id, key, trust_remote_code)
