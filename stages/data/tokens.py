"""One tokenization for every stage: the token ids a response is trained on (SFT, RM, DPO) are the
ids it is sampled as and scored as (PPO, evaluate).

- A prompt is rendered with the chat template (generation prompt included) and encoded without
  special tokens; BOS is prepended when the tokenizer itself adds one (Llama-style SentencePiece)
  and the template did not already write it. GPT-2- and Qwen-style tokenizers add none.
- A response is encoded on its own, never joined to the prompt as text (BPE merges across the
  boundary, and SentencePiece turns a joining space into a token of its own), and ends with EOS when
  it finished. Its text is `decode(ids)` without stripping, so decode then encode gives the ids back.
- Lengths: prompts keep their last `max_prompt_length` tokens (trl's `keep_end` for prompts) and
  responses their first `max_length - len(prompt)`.
- Rows are padded jointly (prompt and response as one sequence, right-padded), not prompt and
  response each to its own batch maximum.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from stages.data.images import IMAGE_TOKEN, ImageError, VisionIds, images_of, open_image, row_vision, text_only
from stages.runtime.errors import ExpectedFailure
from stages.runtime.manifest import read_jsonl

# Used when a base model ships without a chat template. Its role markers become special tokens of
# the tokenizer (added, with the embeddings resized, where the vocabulary lacks them), so a marker
# is one token and never splits into pieces.
ROLE_MARKERS = ("<|user|>", "<|assistant|>")
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }} "
    "{% elif message['role'] == 'user' %}<|user|> {{ message['content'] }} "
    "{% elif message['role'] == 'assistant' %}<|assistant|> {{ message['content'] }}{{ eos_token }} "
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

log = logging.getLogger(__name__)


def ensure_chat_template(tokenizer) -> list[str]:
    """Give a template-less tokenizer the default template and its markers as special tokens.
    Returns the markers added (the model's embeddings must then be resized to `len(tokenizer)`)."""
    if tokenizer.chat_template is not None:
        return []
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    vocab = tokenizer.get_vocab()
    missing = [m for m in ROLE_MARKERS if m not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return missing


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of plain text by default."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def render(tokenizer, prompt: str | list[dict]) -> str:
    """A prompt as the policy sees it: a user message or a conversation, with the generation prompt."""
    messages = text_only(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_ids(tokenizer, prompt: str | list[dict]) -> list[int]:
    """The prompt's token ids; a prompt with images gives `VisionIds` (`stages/data/images.py`)."""
    images = images_of(prompt)
    if images:
        return image_text_ids(tokenizer, render(tokenizer, prompt), images)
    return _with_bos(tokenizer, tokenizer(render(tokenizer, prompt), add_special_tokens=False)["input_ids"])


def _with_bos(tokenizer, ids: list[int]) -> list[int]:
    """BOS in front where the tokenizer itself adds one and the text did not already start with it."""
    if adds_bos(tokenizer) and ids[:1] != [tokenizer.bos_token_id]:
        return [tokenizer.bos_token_id, *ids]
    return ids


def image_text_ids(tokenizer, text: str, images: list[str]) -> VisionIds:
    """Ids of `text` with one `<image>` per image, through the VLM's processor (each placeholder
    expanded to the model's image tokens), carrying the processor's image tensors."""
    processor = getattr(tokenizer, "processor", None)
    if processor is None:
        raise ImageError(
            f"{tokenizer.name_or_path}: a prompt has images but the model has no image processor "
            "(processor_config.json): a text-only model cannot read image-text rows"
        )
    if text.count(IMAGE_TOKEN) != len(images):
        raise ImageError(f"a prompt has {len(images)} images but {text.count(IMAGE_TOKEN)} {IMAGE_TOKEN} placeholders")
    text = text.replace(IMAGE_TOKEN, processor.image_token)
    out = processor(text=[text], images=[open_image(i) for i in images], return_tensors="pt", add_special_tokens=False)
    ids = _with_bos(tokenizer, out["input_ids"][0].tolist())
    vision = {
        k: v for k, v in out.items() if k not in ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
    }
    return VisionIds(ids, vision, processor.image_token_id)


def response_ids(tokenizer, text: str, finished: bool = True) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if finished else [])


def decode_response(tokenizer, ids: list[int]) -> str:
    """The text of sampled response ids (EOS and padding excluded by the caller), not stripped, so
    that `response_ids(decode_response(ids))` gives the ids back for canonically tokenized text."""
    return tokenizer.decode(ids, skip_special_tokens=True)


@dataclass(frozen=True)
class Budget:
    """Token limits of one stage; `max_length` bounds prompt + response."""

    max_prompt_length: int
    max_length: int

    def fit(self, prompt: list[int], response: list[int]) -> tuple[list[int], list[int], bool]:
        """(prompt, response, truncated): the prompt keeps its end, the response its start."""
        p = prompt[-self.max_prompt_length :]
        r = response[: max(0, self.max_length - len(p))]
        return p, r, len(p) < len(prompt) or len(r) < len(response)

    def fit_row(self, prompt: list[int], responses: list[list[int]]) -> tuple[list[int], list[list[int]]]:
        """A prompt and its responses cut as `fit` cuts each pair (the prompt is cut the same for all)."""
        return prompt[-self.max_prompt_length :], [self.fit(prompt, r)[1] for r in responses]

    def fits(self, prompt: list[int], response: list[int]) -> bool:
        return len(prompt) <= self.max_prompt_length and len(prompt) + len(response) <= self.max_length


def resolve_budget(
    stage: str, max_prompt_length: int | None, max_length: int | None, context: int, new_tokens: int | None = None
) -> Budget:
    """A stage's limits in tokens of the model in use: `max_length` defaults to the context window,
    `max_prompt_length` to what leaves a quarter of it (or `new_tokens`) for the response. Raises,
    naming the key, when a limit cannot hold."""
    length = context if max_length is None else max_length
    if length > context:
        raise ValueError(f"stage.{stage}.max_length: {length} is above the model's context window ({context} tokens)")
    room = new_tokens if new_tokens is not None else max(1, length // 4)
    prompt = max(1, length - room) if max_prompt_length is None else max_prompt_length
    if prompt >= length:
        raise ValueError(
            f"stage.{stage}.max_prompt_length: {prompt} leaves no room for a response within max_length={length}"
        )
    return Budget(prompt, length)


def default_new_tokens(context: int) -> int:
    """Sampling budget when `max_new_tokens` is null: a quarter of the context, at most 256 tokens."""
    return max(1, min(256, context // 4))


def context_window(config) -> int:
    """The positions a model can attend to (`max_position_embeddings`, or GPT-2's `n_positions`)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"{type(config).__name__}: no context window (max_position_embeddings) in the model config")


@dataclass
class Packed:
    """Prompt + response rows padded jointly to the longest row: (batch, seq_len) each.

    attention_mask: 1 on real tokens; response_mask: 1 on response tokens (EOS included)."""

    ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    vision: list[dict[str, torch.Tensor] | None] | None = None  # each row's image tensors (image-text rows)

    def to(self, device) -> Packed:
        return Packed(self.ids.to(device), self.attention_mask.to(device), self.response_mask.to(device), self.vision)


def pack(rows: list[tuple[list[int], list[int]]], pad_id: int, device: torch.device | str = "cpu") -> Packed:
    """Rows laid out on the host, then moved to `device` in one transfer per tensor."""
    width = max(1, max(len(p) + len(r) for p, r in rows))
    ids = [list(p) + list(r) + [pad_id] * (width - len(p) - len(r)) for p, r in rows]
    attn = [[1] * (len(p) + len(r)) + [0] * (width - len(p) - len(r)) for p, r in rows]
    resp = [[0] * len(p) + [1] * len(r) + [0] * (width - len(p) - len(r)) for p, r in rows]
    vision = [row_vision(p) for p, _ in rows]
    tensors = (torch.tensor(x, dtype=torch.long, device=device) for x in (ids, attn, resp))
    return Packed(*tensors, vision=vision if any(vision) else None)


def length_buckets(lengths: list[int], batch: int, generator: torch.Generator | None = None) -> list[list[int]]:
    """Indices grouped into batches of similar length, the batches in random order: rows sorted by
    length within windows of 50 batches (so an epoch still mixes), then cut into batches."""
    order = (
        torch.randperm(len(lengths), generator=generator, device="cpu").tolist()
        if generator is not None
        else list(range(len(lengths)))
    )
    window = batch * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch] for i in range(0, len(chunk), batch)]
    if generator is not None:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator, device="cpu").tolist()]
    return batches


def row_sources(rows: list[dict], path) -> list[str]:
    """Where each row came from: its `source` (the user's file and line), else its line in `path`."""
    return [r.get("source", f"{path}:{i}") for i, r in enumerate(rows, 1)]


class LengthError(ExpectedFailure, ValueError):
    """Rows that do not fit a stage's token limits; the message names the key to raise."""


@dataclass
class Fitted:
    """Encoded rows after a stage's limits: `rows[i]` = (prompt ids, [response ids, ...]) for the
    kept rows, `kept[i]` their index in the input."""

    rows: list[tuple[list[int], list[list[int]]]]
    kept: list[int]
    truncated: int
    dropped: int

    def metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/truncated": float(self.truncated), f"{prefix}/dropped": float(self.dropped)}


def fit_rows(
    rows: list[tuple[list[int], list[list[int]]]],
    budget: Budget,
    *,
    stage: str,
    truncation: bool = True,
    max_dropped_fraction: float = 0.0,
    sources: list[str] | None = None,
) -> Fitted:
    """Apply `budget` to encoded rows (a prompt and its responses; none for prompt-only rows).

    With `truncation` a long row is cut (`Budget.fit`); a ranking whose responses become identical
    once cut cannot be learned from and is dropped. Without it a row that does not fit is dropped.
    More than `max_dropped_fraction` of the rows dropped raises `LengthError`, naming the first such
    row (`sources[i]`, a file and line) and the key to raise."""
    out, kept, truncated, dropped, first = [], [], 0, 0, None
    for i, (p, responses) in enumerate(rows):
        fits = all(budget.fits(p, r) for r in responses) if responses else len(p) <= budget.max_prompt_length
        if fits:
            out.append((p, responses))
            kept.append(i)
            continue
        if not truncation:
            dropped += 1
            first = first or (i, "longer than the limits and data.truncation is off")
            continue
        cut_prompt, cut_responses = budget.fit_row(p, responses)
        if len(responses) > 1 and len({tuple(r) for r in cut_responses}) == 1:
            dropped += 1
            first = first or (i, "its responses are identical once cut to max_length")
            continue
        truncated += 1
        out.append((cut_prompt, cut_responses))
        kept.append(i)
    if dropped and dropped <= max_dropped_fraction * len(rows):  # allowed, and said loudly
        i, why = first
        where = sources[i] if sources else f"row {i + 1}"
        log.warning(
            "%s: %d of %d rows dropped (%.1f%%, within data.max_dropped_fraction=%s); the first, %s: %s",
            stage, dropped, len(rows), 100 * dropped / len(rows), max_dropped_fraction, where, why,
        )  # fmt: skip
    if dropped > max_dropped_fraction * len(rows):
        i, why = first
        p, responses = rows[i]
        where = sources[i] if sources else f"row {i + 1}"
        longest = max((len(r) for r in responses), default=0)
        raise LengthError(
            f"{where}: {why} (prompt {len(p)} tokens, response {longest}; stage.{stage}.max_prompt_length="
            f"{budget.max_prompt_length}, stage.{stage}.max_length={budget.max_length}). {dropped} of {len(rows)} "
            f"rows dropped, above data.max_dropped_fraction={max_dropped_fraction}: raise "
            f"stage.{stage}.max_prompt_length or stage.{stage}.max_length"
            + ("" if truncation else ", or set data.truncation=true")
        )
    return Fitted(out, kept, truncated, dropped)


@dataclass(frozen=True)
class SamplingBudget:
    max_prompt_length: int
    max_new_tokens: int


def resolve_sampling(
    stage: str, max_prompt_length: int | None, max_new_tokens: int | None, context: int
) -> SamplingBudget:
    """A sampling stage's limits: `max_new_tokens` defaults to a quarter of the context, the prompt
    to the rest. Raises, naming the key, when prompt and response cannot both fit the context."""
    new = default_new_tokens(context) if max_new_tokens is None else max_new_tokens
    prompt = context - new if max_prompt_length is None else max_prompt_length
    if new < 1 or prompt < 1 or prompt + new > context:
        raise ValueError(
            f"stage.{stage}.max_new_tokens: {new} new tokens after prompts of up to {prompt} tokens exceed the "
            f"model's context window ({context} tokens); lower stage.{stage}.max_new_tokens or max_prompt_length"
        )
    return SamplingBudget(prompt, new)


def fit_prompt_file(tokenizer, path, budget: SamplingBudget, *, stage: str, **overflow) -> tuple[list, Fitted]:
    """The prompts of a `{"prompt"}` JSONL file (an artifact's prompt set) that a sampling stage keeps."""
    rows = read_jsonl(path)
    return fit_prompts(
        tokenizer, [r["prompt"] for r in rows], budget, stage=stage, sources=row_sources(rows, path), **overflow
    )


def fit_prompts(
    tokenizer,
    prompts: list,
    budget: SamplingBudget,
    *,
    stage: str,
    truncation: bool = True,
    max_dropped_fraction: float = 0.0,
    sources: list[str] | None = None,
) -> tuple[list, Fitted]:
    """The prompts a sampling stage keeps (sampling cuts each to its last `max_prompt_length` ids)."""
    fitted = fit_rows(
        [(prompt_ids(tokenizer, p), []) for p in prompts],
        Budget(budget.max_prompt_length, budget.max_prompt_length + budget.max_new_tokens),
        stage=stage,
        truncation=truncation,
        max_dropped_fraction=max_dropped_fraction,
        sources=sources,
    )
    return [prompts[i] for i in fitted.kept], fitted
