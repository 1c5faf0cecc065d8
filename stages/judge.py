"""Judge stage: the AI labeler's model (RLAIF). On the embedded default, a small judge LM trained here.

RLAIF (Lee et al. 2023) asks an off-the-shelf LLM, which brings its own, imperfect notion of
quality. The embedded default has no such LLM, so this stage prepares one: a tiny Llama with its own
word-level tokenizer, trained to answer the AI labeler's exact prompts (`stages/labeling/ai_labeler.py`):
"Preferred response=" -> "1" / "2" and "Score=" -> "1".."10". It is then queried through the same
code path a large local or served model takes.

Its knowledge is independent of the simulated human labels the RLHF branch trains on, and partial:
its training targets come from a written rubric that covers only two of the gold rule's three terms,

    rubric(prompt, response) = on_topic + tone

with tone counted from a small word list (positive minus negative words, over both), not VADER, and
no length term at all. Pairs get soft targets sigmoid((rubric_a - rubric_b) / temperature); scores
are the rubric mapped to 1..10. Training texts are fresh draws of the task's generator plus random
word salads (so the judge has seen degenerate outputs that PPO may produce), never SFT samples or
simulated labels. The stage reports the judge's position consistency and agreement with the rubric,
the gold rule and the simulated human labeler on held-out pairs.

With `labeler.ai.model` set, or the http backend, nothing is trained: `judge.json` records the
backend and the AI labeler loads that model or server instead.

Alone: `python -m flows.align pipeline=rlaif pipeline.stop_after=judge`.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch

from stages.data import task
from stages.labeling.ai_labeler import AiLabeler, LocalJudge, pair_prompt, score_prompt
from stages.labeling.labelers import SimulatedLabeler
from stages.models.compute import autocast, checkpointing, grad_scaler, model_device, resolve_device
from stages.models.modeling import build_tiny_llama, position_ids
from stages.runtime.manifest import Manifest, folder_digest
from stages.runtime.tracking import log_metrics
from stages.settings.labeling import LabelerConfig
from stages.settings.models import ComputeConfig, ModelConfig
from stages.settings.recipe import JudgeConfig


def rubric(prompt: str, response: str) -> float:
    """The judge's partial rubric: on-topic fraction of the nouns plus word-list tone, in [-1, 2]."""
    topic = task.topic_of(prompt)
    words = response.split()
    nouns = [w for w in words if w in task.NOUN_TOPIC]
    on_topic = sum(task.NOUN_TOPIC[w] == topic for w in nouns) / len(nouns) if nouns else 0.0
    pos = sum(w in task.POSITIVE for w in words)
    neg = sum(w in task.NEGATIVE for w in words)
    return on_topic + (pos - neg) / max(1, pos + neg)


def rubric_score_token(r: float) -> str:
    """The rubric in [-1, 2] as a 1..10 score."""
    return str(min(10, max(1, 1 + round(9 * (r + 1) / 3))))


def _response(rng: random.Random, topic: str, cfg: JudgeConfig, target_len: int) -> str:
    if rng.random() < cfg.salad_fraction:
        vocab = [w for w in task.vocabulary() if w not in task.TOPICS]
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 14)))
    return task.make_response(rng, topic, rng.random(), target_len)


def _pairs(n: int, rng: random.Random, cfg: JudgeConfig, target_len: int) -> list[tuple[str, str, str]]:
    out = []
    for _ in range(n):
        prompt, topic = task.make_prompt(rng)
        out.append((prompt, _response(rng, topic, cfg, target_len), _response(rng, topic, cfg, target_len)))
    return out


def _build(cfg: JudgeConfig, corpus: list[str], seed: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.train_from_iterator(
        corpus, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<eos>"], show_progress=False)
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    longest = max(len(tokenizer(t)["input_ids"]) for t in corpus)
    sizes = ModelConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        max_position_embeddings=2 ** math.ceil(math.log2(longest + 8)),
    )
    return tokenizer, build_tiny_llama(sizes, tokenizer, seed)


def _train(
    model, tokenizer, texts: list[str], targets: list[dict[str, float]], cfg: JudgeConfig, compute: ComputeConfig
) -> float:
    """Cross-entropy at the answer position against each text's target distribution over tokens, on
    the model's device (mixed precision and checkpointing as `compute` says)."""
    vocab = tokenizer.get_vocab()
    device = model_device(model)
    dense = torch.zeros(len(texts), len(tokenizer), device="cpu")  # filled on the host, moved once
    for n, target in enumerate(targets):
        for token, p in target.items():
            dense[n, vocab[token]] = p
    dense = dense.to(device)
    checkpointing(model, compute)
    scaler = grad_scaler(compute)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)
    steps = cfg.epochs * math.ceil(len(texts) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.learning_rate, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(cfg.seed)
    tokenizer.padding_side = "left"
    model.train()
    step, loss = 0, 0.0
    for _ in range(cfg.epochs):
        for idx in torch.randperm(len(texts), generator=gen, device="cpu").split(cfg.batch_size):
            enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True).to(device)
            mask = enc["attention_mask"]
            with autocast(compute):
                logits = model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=position_ids(mask)).logits
            batch_loss = -(dense[idx.to(device)] * torch.log_softmax(logits[:, -1].float(), -1)).sum(-1).mean()
            opt.zero_grad()
            scaler.scale(batch_loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
            sched.step()
            step += 1
            loss = batch_loss.item()
            if step % 50 == 0:
                log_metrics({"judge/train/loss": loss}, step=step)
    model.eval()
    return loss


def _agreement(p: torch.Tensor, a: list[float], b: list[float]) -> float:
    """How often the judge's debiased preference picks the pair member that scores higher (ties half)."""
    hits = [0.5 if x == y else float((pi > 0.5) == (x > y)) for pi, x, y in zip(p.tolist(), a, b)]
    return sum(hits) / len(hits)


def run(
    cfg: JudgeConfig, labeler: LabelerConfig, compute: ComputeConfig | None = None, *, target_len: int, out_dir: Path
) -> Manifest:
    """`compute`: the device, precision and checkpointing the embedded judge trains with."""
    out_dir = Path(out_dir)
    compute = compute or ComputeConfig()
    out_dir.mkdir(parents=True, exist_ok=True)
    ai = labeler.ai
    if ai.backend == "http" or ai.model is not None:  # an existing model or server: nothing to prepare
        (out_dir / "judge.json").write_text(json.dumps({"backend": ai.backend, "model": ai.model}))
        return Manifest("judge", str(out_dir), folder_digest(out_dir), files={"judge": "judge.json"})
    rng = random.Random(cfg.seed)
    pairs = _pairs(cfg.n_pairs, rng, cfg, target_len)
    scored = [(p, a) for p, a, _ in _pairs(cfg.n_scores, rng, cfg, target_len)]
    texts = [pair_prompt(ai, *t) for t in pairs] + [score_prompt(ai, p, r) for p, r in scored]
    targets: list[dict[str, float]] = []
    for p, a, b in pairs:
        pa = 1.0 / (1.0 + math.exp(-(rubric(p, a) - rubric(p, b)) / cfg.temperature))
        targets.append({"1": pa, "2": 1.0 - pa})
    targets += [{rubric_score_token(rubric(p, r)): 1.0} for p, r in scored]
    corpus = texts + [" ".join(task.vocabulary()), " ".join(str(s) for s in range(1, 11)), ai.preamble]
    tokenizer, model = _build(cfg, corpus, cfg.seed)
    device = resolve_device(compute)
    loss = _train(model.to(device), tokenizer, texts, targets, cfg, compute)
    model.save_pretrained(out_dir / "model", safe_serialization=True)
    tokenizer.save_pretrained(out_dir / "model")
    (out_dir / "judge.json").write_text(json.dumps({"backend": "local", "model": None, "embedded": True}))
    # held-out agreement, asked through the AI labeler's own code path
    held = _pairs(cfg.n_eval_pairs, random.Random(cfg.seed + 1), cfg, target_len)
    labeler_ai = AiLabeler(
        ai, LocalJudge(out_dir / "model", batch_size=ai.batch_size, device=device, precision=compute.precision)
    )
    p, consistent = labeler_ai.preferences(held)
    human = SimulatedLabeler(LabelerConfig(), target_len)
    noisy = [human.noisy_scores(q, [a, b]) for q, a, b in held]
    metrics = {
        "judge/train/loss_last": loss,
        "judge/position_consistency": consistent.float().mean().item(),
        "judge/agreement_rubric": _agreement(p, [rubric(q, a) for q, a, _ in held], [rubric(q, b) for q, _, b in held]),
        "judge/agreement_gold": _agreement(
            p,
            [task.gold_score(q, a, target_len=target_len) for q, a, _ in held],
            [task.gold_score(q, b, target_len=target_len) for q, _, b in held],
        ),
        "judge/agreement_human": _agreement(p, [s[0] for s in noisy], [s[1] for s in noisy]),
        "judge/agreement_human_pairs": float(len(held)),  # its CI gates RLAIF (pipeline.min_labeler_accuracy)
    }
    log_metrics(metrics)
    return Manifest(
        "judge", str(out_dir), folder_digest(out_dir), metrics=metrics, files={"judge": "judge.json", "model": "model"}
    )
