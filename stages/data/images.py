"""Images in prompts: how an image-text row is held, checked, and turned into a VLM's inputs.

A prompt with images is a conversation whose messages carry an `images` list beside their `content`
(LLaMA-Factory's layout: an `<image>` placeholder in the text for each image, in order). An image is a
file path or an inline `data:image/...;base64,` URI; the data worker inlines files when it reads them
(`stages/data/reader.py`), so every later artifact is self-contained and its digest covers the pixels.

Token ids of such a prompt are a `VisionIds`: a list of ints (the processor's ids, each `<image>`
expanded to the model's image tokens) that also carries the processor's image tensors
(`pixel_values`, and `image_grid_thw` or `image_sizes` where the model family uses them). Slicing
keeps them when every image token is kept (a slice without any gives plain ids, one that cuts
through them raises), concatenation keeps them, and `stages/data/tokens.py`'s
`pack` and `stages/models/modeling.py`'s rollouts collect them per row, so the stages that pack
prompt and response ids (SFT, reward model, DPO, PPO, evaluation) pass images to the model without
code of their own.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
from pathlib import Path
from typing import Any

import torch

from stages.runtime.errors import ExpectedFailure

IMAGE_TOKEN = "<image>"
DATA_URI = "data:image/"


class ImageError(ExpectedFailure, ValueError):
    """An image that cannot be read; the message names the file, the line and the image."""


def images_of(prompt: Any) -> list[str]:
    """The images of a prompt, in order (none for a text prompt)."""
    if not isinstance(prompt, list):
        return []
    return [im for m in prompt if isinstance(m, dict) for im in m.get("images") or []]


def text_only(prompt: Any) -> Any:
    """The prompt without its image lists (what a chat template renders)."""
    if not isinstance(prompt, list):
        return prompt
    return [{k: v for k, v in m.items() if k != "images"} for m in prompt]


def _decode_bytes(raw: bytes):
    """A PIL image with every pixel decoded now (a truncated file fails here, not mid-training),
    its file format kept."""
    from PIL import Image

    image = Image.open(io.BytesIO(raw))
    fmt = image.format
    image.load()
    image.format = fmt
    return image


def _decode(ref: str):
    if ref.startswith(DATA_URI):
        head, _, payload = ref.partition(",")
        if not head.endswith(";base64"):
            raise ValueError("an inline image must be base64 (data:image/png;base64,...)")
        raw = base64.b64decode(payload, validate=True)
    else:
        raw = Path(ref).read_bytes()
    return _decode_bytes(raw).convert("RGB")


@functools.lru_cache(maxsize=4096)
def open_image(ref: str):
    """A PIL RGB image from a path or a data URI (cached: a prompt is encoded by several stages)."""
    return _decode(ref)


def inline(path: Path) -> str:
    """An image file as a data URI, after decoding it fully; raises `ImageError` naming the file."""
    try:
        raw = path.read_bytes()
        image = _decode_bytes(raw)
    except FileNotFoundError:
        raise ImageError(f"{path} does not exist") from None
    except (OSError, ValueError, SyntaxError) as err:  # PIL raises these on corrupt or unknown files
        raise ImageError(f"{path} is not a readable image ({type(err).__name__}: {err})") from None
    return f"{DATA_URI}{(image.format or 'png').lower()};base64,{base64.b64encode(raw).decode()}"


def check_inline(ref: str) -> None:
    """An inline image must decode; raises `ImageError`."""
    try:
        _decode(ref)
    except (OSError, ValueError, SyntaxError, binascii.Error) as err:
        raise ImageError(f"an inline image does not decode ({type(err).__name__}: {err})") from None


def attach(row: dict[str, Any], images: list, folder: Path) -> dict[str, Any]:
    """A normalised row with its `images` (paths relative to the data file's `folder`, absolute
    paths, or data URIs) inlined onto the user turns whose `<image>` placeholders they fill, in
    order. Raises `ImageError` on a count mismatch or an unreadable image, naming the image."""
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise ImageError("expected a list of image paths")
    refs = []
    for ref in images:
        if ref.startswith(DATA_URI):
            check_inline(ref)
            refs.append(ref)
        else:
            path = Path(ref) if Path(ref).is_absolute() else folder / ref
            refs.append(inline(path))
    key = "messages" if "messages" in row else "prompt"
    turns = row[key]
    if isinstance(turns, str):
        turns = [{"role": "user", "content": turns}]
    placeholders = sum(m["content"].count(IMAGE_TOKEN) for m in turns if m["role"] == "user")
    if placeholders == 0 and len(refs) == 1:  # one image and no placeholder: before the first user turn's text
        first = next(i for i, m in enumerate(turns) if m["role"] == "user")
        turns = [
            *turns[:first],
            {**turns[first], "content": f"{IMAGE_TOKEN}{turns[first]['content']}"},
            *turns[first + 1 :],
        ]
        placeholders = 1
    if placeholders != len(refs):
        raise ImageError(f"{len(refs)} images but {placeholders} {IMAGE_TOKEN} placeholders in the user turns")
    out, left = [], list(refs)
    for m in turns:
        n = m["content"].count(IMAGE_TOKEN) if m["role"] == "user" else 0
        out.append({**m, "images": left[:n]} if n else m)
        left = left[n:]
    return {**row, key: out}


def to_png_uri(image) -> str:
    """A PIL image as an inline PNG data URI."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return f"{DATA_URI}png;base64,{base64.b64encode(buf.getvalue()).decode()}"


class VisionIds(list):
    """Prompt token ids with the image tensors of the same prompt (`vision`: name -> tensor, the
    images stacked along dim 0). See the module docstring."""

    def __init__(self, ids, vision: dict[str, torch.Tensor], image_token_id: int) -> None:
        super().__init__(ids)
        self.vision = vision
        self.image_token_id = image_token_id

    def _like(self, ids) -> VisionIds:
        return VisionIds(ids, self.vision, self.image_token_id)

    def __getitem__(self, key):
        got = super().__getitem__(key)
        if not isinstance(key, slice):
            return got
        kept, total = got.count(self.image_token_id), self.count(self.image_token_id)
        if kept == 0:
            return got  # no image token left: plain ids
        if kept != total:
            raise ImageError(
                "a prompt with an image was cut inside its image tokens: raise the stage's max_prompt_length "
                f"(the prompt is {len(self)} tokens, {self.count(self.image_token_id)} of them image tokens)"
            )
        return self._like(got)

    def __add__(self, other):
        return self._like(list(self) + list(other))

    def __radd__(self, other):
        return self._like(list(other) + list(self))


def row_vision(ids) -> dict[str, torch.Tensor] | None:
    return getattr(ids, "vision", None)


def batch_vision(rows: list[dict[str, torch.Tensor] | None], device) -> dict[str, torch.Tensor]:
    """The model's image arguments for a batch: each row's tensors concatenated along dim 0, in row
    order (the order of the image tokens in the batch); {} when no row has an image."""
    present = [r for r in rows if r]
    if not present:
        return {}
    return {k: torch.cat([r[k] for r in present], dim=0).to(device) for k in present[0]}
