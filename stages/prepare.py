"""Prepare stage: a run's data, tokenizer and base model.

The rows come from `stages/data/sources.py`: the embedded task (generated from `data.seed`) or the
user's files, in the internal schemas (`{"messages": [...]}` demonstrations, ranking rows for
comparisons, prompt sets). `sources.json` records where each prompt set came from and whether a
gold rule scores the data.

The base model and tokenizer:
- `model.name_or_path` set: loaded from there (safetensors only). A tokenizer without a chat
  template gets the default one, its role markers added as special tokens and the embeddings
  resized, so a marker is one token (`stages/data/tokens.py`).
- embedded task: a word-level tokenizer trained on the task's words and a tiny Llama, pretrained
  briefly on unformatted task text.
- own data without a model: a byte-level BPE tokenizer trained on the data and a tiny Llama,
  pretrained briefly on the data's text.
Both are saved with `save_pretrained` and every later stage loads them back through
`from_pretrained`, the path a hub id or a real model folder takes.

Alone: `python -m flows.align pipeline.stop_after=prepare`.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from stages.data import sources
from stages.data.images import IMAGE_TOKEN
from stages.data.tokens import (
    DEFAULT_CHAT_TEMPLATE,
    ROLE_MARKERS,
    ensure_chat_template,
    image_text_ids,
    pack,
    response_ids,
)
from stages.data.tool_calls import ensure_tool_tags, has_tool_turns
from stages.models import vision
from stages.models.compute import amp, model_device, pick_device
from stages.models.modeling import (
    build_tiny_llama,
    build_tiny_llava,
    lm_loss,
    load_causal_lm,
    load_tokenizer,
    save_tokenizer,
    sequence_logprobs,
)
from stages.runtime.manifest import Manifest, folder_digest, write_jsonl
from stages.runtime.progress import progress
from stages.settings.data import EMBEDDED_GOLD, DataConfig
from stages.settings.models import ModelConfig

SPECIAL_TOKENS = ["<pad>", "<unk>", "<eos>", *ROLE_MARKERS]
log = logging.getLogger(__name__)


def build_tokenizer(corpus: list[str]):
    """A word-level tokenizer trained on the task corpus, wrapped for `transformers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    # a real corpus has a long tail of words: keep the frequent ones, the rest become <unk>
    tok.train_from_iterator(
        corpus, trainers.WordLevelTrainer(vocab_size=8000, special_tokens=SPECIAL_TOKENS, show_progress=False)
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<eos>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    fast.chat_template = DEFAULT_CHAT_TEMPLATE
    return fast


def build_bpe_tokenizer(corpus: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2's scheme) trained on the data: any text encodes, nothing is
    unknown, and decode(encode(text)) == text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<pad>", "<eos>", *ROLE_MARKERS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", additional_special_tokens=list(ROLE_MARKERS)
    )
    fast.chat_template = DEFAULT_CHAT_TEMPLATE
    return fast


def caption_loss(model, tokenizer, captions: list[dict]) -> torch.Tensor:
    """Mean next-token loss on captions after their pictures (`<image> a red circle<eos>`), the
    image tokens unscored: a VLM base's image-text pretraining."""
    rows = [
        (image_text_ids(tokenizer, IMAGE_TOKEN, [d["image"]]), response_ids(tokenizer, d["text"])) for d in captions
    ]
    packed = pack(rows, tokenizer.pad_token_id, model_device(model))
    return -sequence_logprobs(model, packed).sum() / packed.response_mask[:, 1:].sum()


def pretrain(
    model,
    tokenizer,
    documents: list,
    cfg: ModelConfig,
    seed: int,
    max_length: int | None = None,
    precision: str = "fp32",
) -> list[float]:
    """Plain next-token training on `documents` (full weights, under `precision`'s autocast): texts, or
    captioned pictures (`caption_loss`); returns the per-epoch mean loss."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_learning_rate)
    model.train()
    losses = []
    bar = progress(cfg.pretrain_epochs * math.ceil(len(documents) / 32), "prepare: pretraining")
    for _ in range(cfg.pretrain_epochs):
        order = torch.randperm(len(documents), generator=gen, device="cpu").tolist()
        total, batches = 0.0, 0
        for start in range(0, len(order), 32):
            batch = [documents[i] for i in order[start : start + 32]]
            with amp(model_device(model), precision):
                if isinstance(batch[0], dict):
                    loss = caption_loss(model, tokenizer, batch)
                else:
                    loss = lm_loss(model, tokenizer, batch, max_length)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, batches = total + loss.item(), batches + 1
            bar.update(1)
        losses.append(total / batches)
    bar.close()
    return losses


def _texts(prompt: Any) -> list[str]:
    return [prompt] if isinstance(prompt, str) else [m["content"] for m in prompt]


def _tool_tags(tokenizer, data: sources.Sourced) -> list[str]:
    """Where the demonstrations call tools: the tool-call tags as tokens of the tokenizer (added ones)."""
    if not any(has_tool_turns(r["messages"]) for r in data.demonstrations):
        return []
    return ensure_tool_tags(tokenizer)


def base_model(
    cfg: DataConfig, model_cfg: ModelConfig, data: sources.Sourced, device: str = "auto", precision: str = "fp32"
):
    """(tokenizer, model, pretraining losses, notes) as described in the module docstring; the
    embedded base pretrains on `device` in `precision` (`compute.*`)."""
    notes: dict[str, Any] = {}
    if model_cfg.name_or_path is not None:
        tokenizer = load_tokenizer(model_cfg.name_or_path, trust_remote_code=model_cfg.trust_remote_code)
        model = load_causal_lm(model_cfg.name_or_path, trust_remote_code=model_cfg.trust_remote_code)
        had_template = tokenizer.chat_template is not None
        added = ensure_chat_template(tokenizer)
        if tags := _tool_tags(tokenizer, data):
            notes["tool_tags"] = f"added tokens {tags} (the demonstrations call tools)"
        if not had_template:
            notes["chat_template"] = "default (the model has none)" + (f"; added tokens {added}" if added else "")
            log.warning(
                "prepare: %s has no chat template; using the default one, markers %s", model_cfg.name_or_path, added
            )
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            # new rows are drawn around the mean embedding: seeded, so the same model and data give
            # the same base (and its digest), and the stages keyed on it stay cached
            torch.manual_seed(cfg.seed)
            model.resize_token_embeddings(len(tokenizer))
        return tokenizer, model, [], notes
    texts = [" ".join(m["content"] for m in r["messages"]) for r in data.demonstrations]
    if data.gold == "vision":  # the tiny LLaVA, pretrained on captioned pictures
        tokenizer = build_tokenizer([*texts, *data.pretrain, " ".join(sources.vocabulary_hint(data.gold))])
        tokenizer.processor = vision.build_processor(tokenizer)
        model = build_tiny_llava(model_cfg, tokenizer, cfg.seed).to(pick_device(device))
    elif data.gold in EMBEDDED_GOLD.values():
        tokenizer = build_tokenizer([*texts, " ".join(sources.vocabulary_hint(data.gold))])
    else:
        texts += [" ".join(_texts(p)) for ps in data.prompt_sets.values() for p in ps]
        texts += [" ".join(_texts(r["prompt"]) + r["responses"]) for rows in data.comparisons.values() for r in rows]
        tokenizer = build_bpe_tokenizer(texts, model_cfg.bpe_vocab_size)
        _tool_tags(tokenizer, data)
        notes["tokenizer"] = f"byte-level BPE trained on the data ({len(tokenizer)} tokens)"
    if data.gold != "vision":
        model = build_tiny_llama(model_cfg, tokenizer, cfg.seed).to(pick_device(device))
    docs = (data.captions or data.pretrain)[: model_cfg.pretrain_documents]
    limit = model_cfg.max_position_embeddings
    losses = pretrain(model, tokenizer, docs, model_cfg, cfg.seed, max_length=limit, precision=precision)
    return tokenizer, model, losses, notes


def run(
    cfg: DataConfig, model_cfg: ModelConfig, *, out_dir: Path, device: str = "auto", precision: str = "fp32"
) -> Manifest:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = sources.assemble(cfg, model_cfg.pretrain_documents)  # every file validated before any compute
    metrics: dict[str, float] = dict(data.metrics)
    files: dict[str, str] = {}
    for name, rows in data.comparisons.items():
        write_jsonl(out_dir / f"{name}.jsonl", rows)
        files[name] = f"{name}.jsonl"
        metrics[f"prepare/{name}/rows"] = float(len(rows))
    write_jsonl(out_dir / "demonstrations.jsonl", data.demonstrations)
    metrics["prepare/demonstrations/rows"] = float(len(data.demonstrations))
    for name, prompts in data.prompt_sets.items():
        write_jsonl(out_dir / f"{name}.jsonl", [{"prompt": p} for p in prompts])
        metrics[f"prepare/{name}/rows"] = float(len(prompts))
    tokenizer, model, pretrain_losses, notes = base_model(cfg, model_cfg, data, device, precision)
    write_jsonl(out_dir / "pretrain.jsonl", [{"text": d} for d in data.pretrain])  # PPO-ptx's mix
    described = {"prompt_source": data.prompt_source, "gold": data.gold, **notes}
    (out_dir / "sources.json").write_text(json.dumps(described, indent=2, sort_keys=True))
    for name, where in data.prompt_source.items():
        log.info("prepare: %s from %s", name, where)
    base = out_dir / "base"
    save_tokenizer(tokenizer, base)
    model.save_pretrained(base, safe_serialization=True)
    # round trip: the artifact must load through the same path a hub model takes
    reloaded = load_causal_lm(base)
    n_params = sum(p.numel() for p in reloaded.parameters())
    return Manifest(
        stage="prepare",
        path=str(out_dir),
        digest=folder_digest(out_dir),
        metrics={
            "prepare/params": float(n_params),
            "prepare/vocab": float(len(tokenizer)),
            **metrics,
            **({"prepare/pretrain/loss_last": pretrain_losses[-1]} if pretrain_losses else {}),
        },
        files={
            "base": "base",
            **{k: f"{k}.jsonl" for k in data.prompt_sets},
            "demonstrations": "demonstrations.jsonl",
            "pretrain": "pretrain.jsonl",
            "sources": "sources.json",
            **files,
        },
    )
