"""Prepare stage: the embedded default's data, tokenizer and base model.

Generates, deterministically from `data.seed`, the demonstrations (mixed quality), the prompt sets
for comparisons, PPO and evaluation (disjoint draws), trains a word-level tokenizer on that corpus
and builds a tiny Llama from a config. Both are saved with `save_pretrained` and every later stage
loads them back through `from_pretrained`, the path a hub id or a real model folder takes.

With `model.name_or_path` set, the base model and tokenizer come from there instead; with
`data.demonstrations` set, the demonstrations come from that file through the data worker
(`stages/data.py`), in the internal `{"messages": [...]}` schema; with `data.comparisons` set, the
reward model's comparisons come from that file (pairs are K = 2 rankings), split into train and
held-out, and the comparisons stage passes them through instead of sampling and labelling.

Alone: `python -c "from stages import prepare; ..."` or `python -m flows.align pipeline.stop_after=prepare`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stages import task
from stages.data import DatasetConfig, as_ranking_rows, load
from stages.manifest import Manifest, folder_digest, write_jsonl
from stages.modeling import DEFAULT_CHAT_TEMPLATE, ModelConfig, lm_loss, load_causal_lm, load_tokenizer

SPECIAL_TOKENS = ["<pad>", "<unk>", "<eos>", "<|user|>", "<|assistant|>"]


@dataclass(frozen=True)
class DataConfig:
    seed: int = 0
    target_len: int = 6  # the gold rule's preferred response length, in words
    n_demonstrations: int = 3000
    n_comparison_prompts: int = 600
    n_heldout_comparison_prompts: int = 200
    n_ppo_prompts: int = 2048
    n_eval_prompts: int = 400
    demonstrations: DatasetConfig | None = None  # a real dataset instead of the embedded task's
    # ranked or pairwise comparisons for the reward model instead of sampling and labelling them
    comparisons: DatasetConfig | None = None
    heldout_fraction: float = 0.1  # of `comparisons`, held out for the reward model's evaluation

    def __post_init__(self) -> None:
        if self.comparisons is not None and self.comparisons.kind not in ("preferences", "rankings"):
            raise ValueError(f"data.comparisons.kind: {self.comparisons.kind!r} is not 'preferences' or 'rankings'")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"data.heldout_fraction: must be in (0, 1), got {self.heldout_fraction}")


def _texts(prompt: str | list[dict]) -> list[str]:
    return [prompt] if isinstance(prompt, str) else [m["content"] for m in prompt]


def build_tokenizer(corpus: list[str]):
    """A word-level tokenizer trained on the task corpus, wrapped for `transformers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    # a real corpus has a long tail of words: keep the frequent ones, the rest become <unk>
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(vocab_size=8000, special_tokens=SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<eos>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    fast.chat_template = DEFAULT_CHAT_TEMPLATE
    return fast


def build_tiny_llama(cfg: ModelConfig, tokenizer, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
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
    return LlamaForCausalLM(config)


def pretrain(model, tokenizer, documents: list[str], cfg: ModelConfig, seed: int) -> list[float]:
    """Plain next-token training on `documents` (full weights); returns the per-epoch mean loss."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_learning_rate)
    model.train()
    losses = []
    for _ in range(cfg.pretrain_epochs):
        order = torch.randperm(len(documents), generator=gen).tolist()
        total, batches = 0.0, 0
        for start in range(0, len(order), 32):
            loss = lm_loss(model, tokenizer, [documents[i] for i in order[start : start + 32]])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, batches = total + loss.item(), batches + 1
        losses.append(total / batches)
    return losses


def run(cfg: DataConfig, model_cfg: ModelConfig, *, out_dir: Path) -> Manifest:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, float] = {}
    files: dict[str, str] = {}
    compared: list[dict[str, Any]] = []
    if cfg.comparisons is not None:  # validated before any compute
        loaded_cmp = load(cfg.comparisons)
        compared = as_ranking_rows(loaded_cmp.rows, cfg.comparisons.kind)
        metrics["prepare/comparisons/bad_rows"] = float(loaded_cmp.bad)
        order = list(range(len(compared)))
        random.Random(cfg.seed).shuffle(order)
        n_held = max(1, round(cfg.heldout_fraction * len(order)))
        if n_held >= len(order):
            raise ValueError(f"{cfg.comparisons.path}: {len(order)} rows leave nothing to train on once held out")
        for name, part in (("dataset_heldout_comparisons", order[:n_held]), ("dataset_comparisons", order[n_held:])):
            write_jsonl(out_dir / f"{name}.jsonl", [compared[i] for i in part])
            files[name] = f"{name}.jsonl"
            metrics[f"prepare/{name}/rows"] = float(len(part))
    if cfg.demonstrations is None:
        demos = task.make_demonstrations(cfg.n_demonstrations, cfg.seed, target_len=cfg.target_len)
        rows: list[dict[str, Any]] = [
            {"messages": [{"role": "user", "content": d.prompt}, {"role": "assistant", "content": d.response}]}
            for d in demos
        ]
        gold = [task.gold_score(d.prompt, d.response, target_len=cfg.target_len) for d in demos]
        metrics["prepare/demonstrations/gold_mean"] = sum(gold) / len(gold)
    else:
        loaded = load(cfg.demonstrations)
        rows = loaded.rows
        metrics["prepare/data/bad_rows"] = float(loaded.bad)
    metrics["prepare/demonstrations/rows"] = float(len(rows))
    write_jsonl(out_dir / "demonstrations.jsonl", rows)
    prompt_sets = {
        "comparison_prompts": cfg.n_comparison_prompts,
        "heldout_comparison_prompts": cfg.n_heldout_comparison_prompts,
        "ppo_prompts": cfg.n_ppo_prompts,
        "eval_prompts": cfg.n_eval_prompts,
    }
    for i, (name, n) in enumerate(prompt_sets.items()):
        write_jsonl(out_dir / f"{name}.jsonl", [{"prompt": p} for p in task.make_prompts(n, cfg.seed * 1000 + i + 1)])

    base = out_dir / "base"
    if model_cfg.name_or_path is None:
        corpus = [" ".join(m["content"] for m in r["messages"]) for r in rows] + [" ".join(task.vocabulary())]
        corpus += [" ".join(_texts(r["prompt"]) + r["responses"]) for r in compared]
        tokenizer = build_tokenizer(corpus)
        model = build_tiny_llama(model_cfg, tokenizer, cfg.seed)
        web = task.make_demonstrations(model_cfg.pretrain_documents, cfg.seed + 7919, target_len=cfg.target_len)
        documents = [f"{d.prompt} {d.response}" for d in web]
        pretrain_losses = pretrain(model, tokenizer, documents, model_cfg, cfg.seed)
    else:
        tokenizer = load_tokenizer(model_cfg.name_or_path, trust_remote_code=model_cfg.trust_remote_code)
        if tokenizer.chat_template is None:
            tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        model = load_causal_lm(model_cfg.name_or_path, trust_remote_code=model_cfg.trust_remote_code)
        pretrain_losses = []
        documents = [" ".join(m["content"] for m in r["messages"]) for r in rows]
    write_jsonl(out_dir / "pretrain.jsonl", [{"text": d} for d in documents])  # PPO-ptx's mix
    tokenizer.save_pretrained(base)
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
            **{k: f"{k}.jsonl" for k in prompt_sets},
            "demonstrations": "demonstrations.jsonl",
            "pretrain": "pretrain.jsonl",
            **files,
        },
    )
