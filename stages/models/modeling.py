"""Loading, prompting, sampling and scoring causal LMs: one path for tiny local models and hub ids.

Secure defaults: weights load from safetensors only and `trust_remote_code` is off unless the
config asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from stages.data.images import IMAGE_TOKEN, batch_vision, row_vision
from stages.data.tokens import Packed, context_window, decode_response, prompt_ids, render, response_ids
from stages.models import houlsby, vision
from stages.models.compute import amp, model_device
from stages.runtime.errors import ExpectedFailure
from stages.settings.models import POOLINGS, ModelConfig


class ModelError(ExpectedFailure, ValueError):
    """A model or tokenizer the pipeline cannot use safely; the message names the folder and why."""


def check_model_folder(path: str | Path) -> None:
    """A local model folder must hold safetensors weights: pickled checkpoints (`.bin`, `.pt`) can run
    arbitrary code when loaded, so they are refused rather than loaded."""
    folder = Path(path)
    if not folder.is_dir():
        return  # a hub id: `from_pretrained` asks for safetensors (`use_safetensors=True`)
    if not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        found = f"found only {', '.join(pickles)}" if pickles else "found no weights"
        raise ModelError(
            f"{folder}: no *.safetensors weights ({found}). Pickled weights can execute code when loaded, so "
            "alignflow loads safetensors only; convert with `model.save_pretrained(folder, safe_serialization=True)`"
        )


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False):
    """The tokenizer of a model folder or hub id; pad falls back to EOS, and a tokenizer without EOS
    is refused (responses could never end)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if _has_processor(path):  # a VLM: prompts with images encode through its processor
        from transformers import AutoProcessor

        tok.processor = AutoProcessor.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        tok.processor.tokenizer = tok
    if tok.eos_token_id is None:
        raise ModelError(
            f"{path}: the tokenizer has no EOS token, so a response could never end; set `eos_token` in its "
            "tokenizer_config.json (or `tokenizer.eos_token = ...` before `save_pretrained`)"
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _has_processor(path: str | Path) -> bool:
    folder = Path(path)
    if folder.is_dir():
        return (folder / "processor_config.json").is_file() or (folder / "preprocessor_config.json").is_file()
    try:  # a hub id: a VLM's config says so
        return vision.folder_is_vlm(path)
    except (OSError, ValueError):
        return False


def save_tokenizer(tokenizer, folder: str | Path) -> None:
    """The tokenizer, and a VLM's processor with it, into a model folder."""
    processor = getattr(tokenizer, "processor", None)
    if processor is not None:
        processor.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


def model_context(path: str | Path, *, trust_remote_code: bool = False) -> int:
    """The context window of the model in a folder or hub id, read from its config alone."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    return context_window(config.get_text_config() if vision.is_vlm(config) else config)


def load_causal_lm(
    path: str | Path, *, trust_remote_code: bool = False, device=None, dtype: torch.dtype = torch.float32, **load
):
    """`device`: where the weights go (a frozen model's: reference, sampler, judge); `dtype`: fp32 for a
    model that trains (master weights), the compute dtype for a frozen one (`compute.compute_dtype`);
    `load`: more `from_pretrained` arguments (attention implementation, quantisation: `stages/models/tuning.py`)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    check_model_folder(path)
    is_vlm = vision.folder_is_vlm(path, trust_remote_code=trust_remote_code)
    auto = AutoModelForImageTextToText if is_vlm else AutoModelForCausalLM
    model = auto.from_pretrained(
        str(path), trust_remote_code=trust_remote_code, use_safetensors=True, dtype=dtype, **load
    )
    model = houlsby.restore(model, Path(path))  # a Houlsby-adapted folder: its bottlenecks back in place
    return _placed(model, device, dtype)


def render_prompts(tokenizer, prompts: list[str] | list[list[dict]]) -> list[str]:
    """Prompts as the policy sees them: the chat template with the generation prompt. A prompt is a
    user message, or a conversation (`[{"role", "content"}, ...]`, as in HH-RLHF pairs)."""
    return [render(tokenizer, p) for p in prompts]


@dataclass
class Rollout:
    """A batch of sampled responses.

    query: (batch, query_len) left-padded; response: (batch, response_len) right-padded with pad;
    response_mask: (batch, response_len) 1 on response tokens up to and including EOS;
    finished: (batch,) whether the response ended with EOS;
    vision: each row's image tensors (`stages/data/images.py`), None for text prompts;
    tool_mask: (batch, response_len) 1 on the tokens a tool wrote into the response (`stages/rl/tools.py`),
    None without tools. They are context the policy reads, never tokens it is trained on (`loss_mask`).
    """

    query: torch.Tensor
    query_mask: torch.Tensor
    response: torch.Tensor
    response_mask: torch.Tensor
    finished: torch.Tensor
    vision: list[dict[str, torch.Tensor] | None] | None = None
    tool_mask: torch.Tensor | None = None

    @property
    def loss_mask(self) -> torch.Tensor:
        """1 on the tokens the policy sampled: the response less what tools wrote into it."""
        return self.response_mask if self.tool_mask is None else self.response_mask * (1 - self.tool_mask)

    def to(self, device) -> Rollout:
        if self.query.device == torch.device(device):
            return self
        tensors = (self.query, self.query_mask, self.response, self.response_mask, self.finished)
        tools = None if self.tool_mask is None else self.tool_mask.to(device)
        return Rollout(*(t.to(device) for t in tensors), vision=self.vision, tool_mask=tools)

    def select(self, idx) -> Rollout:
        """The rows `idx` (a list or a tensor of indices)."""
        tensors = (self.query, self.query_mask, self.response, self.response_mask, self.finished)
        vision = None  # the rows' indices are read on the host only for images (a sync on a GPU)
        if self.vision is not None:
            vision = [self.vision[i] for i in (idx.tolist() if isinstance(idx, torch.Tensor) else list(idx))]
        tools = None if self.tool_mask is None else self.tool_mask[idx]
        return Rollout(*(t[idx] for t in tensors), vision=vision, tool_mask=tools)

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.cat([self.query, self.response], dim=1)
        mask = torch.cat([self.query_mask, self.response_mask], dim=1)
        return ids, mask

    def packed(self) -> Packed:
        ids, mask = self.sequences()
        response = torch.cat([torch.zeros_like(self.query_mask), self.response_mask], dim=1)
        return Packed(ids, mask, response, self.vision)


def vision_kwargs(batch: Rollout | Packed, device) -> dict[str, torch.Tensor]:
    """The image arguments of a batch's forward pass ({} for text rows)."""
    return batch_vision(batch.vision, device) if batch.vision is not None else {}


def encode_queries(
    tokenizer, prompts: list, max_prompt_length: int | None = None, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, list | None]:
    """Left-padded prompt ids (`stages.data.tokens.prompt_ids`), each keeping its last `max_prompt_length`,
    on `device`: two (batch, query_len) tensors, and each row's image tensors (None for text prompts)."""
    rows = [prompt_ids(tokenizer, p) for p in prompts]
    if max_prompt_length is not None:
        rows = [r[-max_prompt_length:] for r in rows]
    width = max(len(r) for r in rows)
    query = [[tokenizer.pad_token_id] * (width - len(r)) + list(r) for r in rows]
    mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
    vision = [row_vision(r) for r in rows]
    return (
        torch.tensor(query, dtype=torch.long, device=device),
        torch.tensor(mask, dtype=torch.long, device=device),
        vision if any(vision) else None,
    )


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator_seed: int | None = None,
    max_prompt_length: int | None = None,
    static_cache: bool = False,
    precision: str = "fp32",
) -> Rollout:
    """Batched sampling with the KV cache (`generate`) on the model's device; the seam where a faster
    engine plugs in. `static_cache`: a preallocated cache of fixed shape, which transformers compiles
    the decode step for on a GPU (`torch.compile`); the same tokens as the dynamic cache. `precision`:
    the stage's compute dtype (`compute.precision`), autocast over the whole generation."""
    query, query_mask, images = encode_queries(tokenizer, prompts, max_prompt_length, device=model_device(model))
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    kw = {"temperature": temperature, "top_p": top_p, "static_cache": static_cache, "precision": precision}
    return sample_ids(model, tokenizer, query, query_mask, images, max_new_tokens=max_new_tokens, **kw)


@torch.no_grad()
def sample_ids(
    model,
    tokenizer,
    query: torch.Tensor,
    query_mask: torch.Tensor,
    images: list | None = None,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    static_cache: bool = False,
    precision: str = "fp32",
    stop_ids: tuple[int, ...] = (),
) -> Rollout:
    """`sample` from encoded, left-padded queries. A response ends at EOS or at the first of `stop_ids`
    (kept, as EOS is; `finished` stays EOS's alone): where a multi-turn rollout hands over to a tool."""
    image_token = getattr(getattr(tokenizer, "processor", None), "image_token_id", None)
    was_training = model.training
    model.eval()
    with amp(query.device, precision):
        out = model.generate(
            input_ids=query,
            attention_mask=query_mask,
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            max_new_tokens=max_new_tokens,
            eos_token_id=[tokenizer.eos_token_id, *stop_ids] if stop_ids else tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,  # on while sampling, though gradient checkpointing turns it off for training
            **({"cache_implementation": "static"} if static_cache else {}),
            **batch_vision(images or [], query.device),
            # a VLM never samples its image token: a response holding one would not match its images
            **({"suppress_tokens": [image_token]} if image_token is not None else {}),
        )
    model.train(was_training)
    response = out[:, query.shape[1] :]
    is_eos = response == tokenizer.eos_token_id
    is_stop = is_eos
    for stop in stop_ids:
        is_stop = is_stop | (response == stop)
    # mask: tokens up to and including the first EOS (or stop token)
    after_stop = (is_stop.cumsum(dim=1) - is_stop.long()) > 0
    response_mask = (~after_stop).long()
    finished = (is_eos & ~after_stop).any(dim=1)
    response = response.masked_fill(response_mask == 0, tokenizer.pad_token_id)
    return Rollout(query, query_mask, response, response_mask, finished, images)


def decode_responses(tokenizer, rollout: Rollout) -> list[str]:
    """Texts of the sampled responses, EOS excluded (see `stages.data.tokens.decode_response`)."""
    texts = []
    for ids, m, f in zip(rollout.response, rollout.response_mask, rollout.finished.tolist()):
        kept = ids[m.bool()].tolist()
        texts.append(decode_response(tokenizer, kept[:-1] if f else kept))
    return texts


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so a left-padded row scores like an unpadded one."""
    return (mask.cumsum(dim=1) - 1).clamp(min=0)


def response_logprobs(model, rollout: Rollout, *, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and entropies of the response tokens: two (batch, response_len) tensors.

    Only the positions that predict response tokens go through the LM head (`logits_to_keep`): on
    long prompts and a large vocabulary the head and its softmax are most of the cost otherwise."""
    rollout = rollout.to(model_device(model))
    ids, mask = rollout.sequences()
    keep = rollout.response.shape[1] + 1  # the last query position predicts the first response token
    extra = vision_kwargs(rollout, ids.device)
    logits = model(
        input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), logits_to_keep=keep, **extra
    ).logits
    logits = logits[:, -keep:-1, :] / temperature
    logp_all = F.log_softmax(logits.float(), dim=-1)
    logp = logp_all.gather(-1, rollout.response.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


@torch.no_grad()
def mean_token_kl(policy, reference, rollouts: list[Rollout], *, temperature: float = 1.0) -> float:
    """Mean per-token KL(pi || pi_ref), estimated on the policy's own samples in `rollouts`."""
    kl_sum, tokens = 0.0, 0.0
    for r in rollouts:
        lp, _ = response_logprobs(policy, r, temperature=temperature)
        lq, _ = response_logprobs(reference, r, temperature=temperature)
        kl_sum += ((lp - lq) * r.response_mask).sum().item()
        tokens += r.response_mask.sum().item()
    return kl_sum / max(tokens, 1.0)


def encode_rollout(
    tokenizer, prompts: list, responses: list[str], finished: list[bool], device: torch.device | str = "cpu"
) -> Rollout:
    """Tokenize given responses into the same layout `sample` returns (EOS kept where finished), on `device`."""
    query, query_mask, images = encode_queries(tokenizer, prompts, device=device)
    rows = [response_ids(tokenizer, r, f) for r, f in zip(responses, finished)]
    return response_rollout(query, query_mask, rows, tokenizer.pad_token_id, finished, images)


def response_rollout(
    query, query_mask, rows: list[list[int]], pad: int, finished: list[bool], vision: list | None = None
) -> Rollout:
    """Response token rows right-padded into a `Rollout` beside `query`, on the query's device."""
    width = max(1, max(len(r) for r in rows))
    device = query.device
    response = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
    done = torch.tensor(finished, dtype=torch.bool, device=device)
    return Rollout(query, query_mask, response, mask, done, vision)


def hidden_states(backbone, rollout: Rollout) -> torch.Tensor:
    """Last hidden states of a decoder stack over query + response: (batch, seq_len, hidden)."""
    rollout = rollout.to(model_device(backbone))
    ids, mask = rollout.sequences()
    extra = vision_kwargs(rollout, ids.device)
    return backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), **extra).last_hidden_state


def scalar_parts(model):
    """(decoder stack, scalar head) of a sequence-classification model, plain or under peft (whose
    adapters sit inside the stack, and whose trained copy of the head `score` routes to)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.base_model, inner.score


def token_values(model, rollout: Rollout, *, backbone=None, head=None) -> torch.Tensor:
    """Scalar head on every response position: (batch, response_len). Defaults to a
    sequence-classification model's own backbone and `score` head.

    Value t is read at the state that predicts response token t, as the policy's logits are.
    """
    if backbone is None:
        backbone, head = scalar_parts(model)
    hidden = hidden_states(backbone, rollout)
    q = rollout.query.shape[1]
    return head(hidden[:, q - 1 : -1, :]).squeeze(-1).float()


def sequence_scores(model, batch: Rollout | Packed, pooling: str = "last") -> torch.Tensor:
    """A reward model's score per sequence: (batch,). `batch`: sampled rollouts or jointly packed rows.

    - "last": the scalar head at the last real token (InstructGPT, TRL, DeepSpeed-Chat);
    - "mean": the scalar head on every response token (EOS included), averaged over the response.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling: {pooling!r} is not one of {', '.join(POOLINGS)}")
    packed = batch.packed() if isinstance(batch, Rollout) else batch
    backbone, head = scalar_parts(model)
    packed = packed.to(model_device(model))
    mask = packed.attention_mask
    extra = vision_kwargs(packed, mask.device)
    hidden = backbone(
        input_ids=packed.ids, attention_mask=mask, position_ids=position_ids(mask), **extra
    ).last_hidden_state
    if pooling == "mean":
        per_token = head(hidden).squeeze(-1).float()
        resp = packed.response_mask.float()
        return (per_token * resp).sum(1) / resp.sum(1).clamp(min=1.0)
    last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(dim=1)
    return head(hidden[torch.arange(hidden.shape[0], device=hidden.device), last]).squeeze(-1).float()


def sequence_logprobs(model, packed: Packed) -> torch.Tensor:
    """Summed log-probability of each row's response tokens under `model`: (batch,)."""
    packed = packed.to(model_device(model))
    mask = packed.attention_mask
    extra = vision_kwargs(packed, mask.device)
    logits = model(input_ids=packed.ids, attention_mask=mask, position_ids=position_ids(mask), **extra).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, packed.ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (logp * packed.response_mask[:, 1:]).sum(1)


def lm_loss(model, tokenizer, texts: list[str], max_length: int | None = None) -> torch.Tensor:
    """Mean next-token loss on plain texts (each ending with EOS), padding ignored."""
    tokenizer.padding_side = "right"
    enc = tokenizer(
        [t + tokenizer.eos_token for t in texts],
        return_tensors="pt",
        padding=True,
        truncation=max_length is not None,
        max_length=max_length,
        add_special_tokens=False,
    )
    enc = enc.to(model_device(model))
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return model(**enc, labels=labels).loss


def load_scalar_model(
    path: str | Path, *, trust_remote_code: bool = False, device=None, dtype: torch.dtype = torch.float32, **load
):
    """A sequence-classification model with one output (reward or value head), on `device` if given, its
    weights in `dtype` (as `load_causal_lm`)."""
    from transformers import AutoModelForSequenceClassification

    check_model_folder(path)
    if vision.folder_is_vlm(path, trust_remote_code=trust_remote_code):  # LLaVA: `stages/models/vision.py`
        vision.register_scalar_class()  # (imported only here: transformers' LLaVA module loads torchao)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(path), num_labels=1, trust_remote_code=trust_remote_code, use_safetensors=True, dtype=dtype, **load
    )
    model = houlsby.restore(model, Path(path))
    return _placed(model, device, dtype)


def _placed(model, device, dtype: torch.dtype):
    """On `device`, every floating weight in `dtype` (a restored Houlsby bottleneck comes in fp32)."""
    if dtype != torch.float32 and not getattr(model, "is_quantized", False):
        model = model.to(dtype)
    return model if device is None else model.to(device)


def _tiny_llama_config(cfg: ModelConfig, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )


def build_tiny_llama(cfg: ModelConfig, tokenizer, seed: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(_tiny_llama_config(cfg, tokenizer))


def build_tiny_llava(cfg: ModelConfig, tokenizer, seed: int):
    """The embedded tiny Llama behind a one-layer CLIP vision tower and LLaVA's MLP projector, on
    16x16 images (`stages/models/vision.py`); the tokenizer has the image token (`vision.build_processor`)."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    tower = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden_size,
        intermediate_size=2 * cfg.vision_hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=vision.IMAGE_SIZE,
        patch_size=vision.PATCH_SIZE,
        projection_dim=cfg.vision_hidden_size,
    )
    config = LlavaConfig(
        vision_config=tower,
        text_config=_tiny_llama_config(cfg, tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=(vision.IMAGE_SIZE // vision.PATCH_SIZE) ** 2,
        tie_word_embeddings=False,
    )
    config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    return LlavaForConditionalGeneration(config)
