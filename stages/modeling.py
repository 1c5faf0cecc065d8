"""Loading, prompting, sampling and scoring causal LMs: one path for tiny local models and hub ids.

Secure defaults: weights load from safetensors only and `trust_remote_code` is off unless the
config asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

# Used when a base model ships without a chat template; every later stage reuses the SFT
# artifact's template, so prompts are rendered identically in SFT, sampling, PPO and evaluation.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }} "
    "{% elif message['role'] == 'user' %}<|user|> {{ message['content'] }} "
    "{% elif message['role'] == 'assistant' %}<|assistant|> {{ message['content'] }}{{ eos_token }} "
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class ModelConfig:
    """`name_or_path` null builds the embedded tiny Llama from the sizes below."""

    name_or_path: str | None = None
    trust_remote_code: bool = False
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    max_position_embeddings: int = 64
    # The embedded base is pretrained briefly on unformatted task text (a stand-in for web text), so
    # that SFT, like SFT of a real LLM, adapts a model that already knows the language; LoRA on a
    # random-init base cannot learn the task.
    pretrain_documents: int = 8000
    pretrain_epochs: int = 4
    pretrain_learning_rate: float = 3e-3


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str | Path, *, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path), trust_remote_code=trust_remote_code, use_safetensors=True, dtype=torch.float32
    )


def render_prompts(tokenizer, prompts: list[str] | list[list[dict]]) -> list[str]:
    """Prompts as the policy sees them: the chat template with the generation prompt. A prompt is a
    user message, or a conversation (`[{"role", "content"}, ...]`, as in HH-RLHF pairs)."""
    return [
        tokenizer.apply_chat_template(
            p if isinstance(p, list) else [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]


@dataclass
class Rollout:
    """A batch of sampled responses.

    query: (batch, query_len) left-padded; response: (batch, response_len) right-padded with pad;
    response_mask: (batch, response_len) 1 on response tokens up to and including EOS;
    finished: (batch,) whether the response ended with EOS.
    """

    query: torch.Tensor
    query_mask: torch.Tensor
    response: torch.Tensor
    response_mask: torch.Tensor
    finished: torch.Tensor

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.cat([self.query, self.response], dim=1)
        mask = torch.cat([self.query_mask, self.response_mask], dim=1)
        return ids, mask


def encode_queries(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer.padding_side = "left"
    enc = tokenizer(render_prompts(tokenizer, prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


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
) -> Rollout:
    """Batched sampling with the KV cache (`generate`); the seam where a faster engine plugs in."""
    query, query_mask = encode_queries(tokenizer, prompts)
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    was_training = model.training
    model.eval()
    out = model.generate(
        input_ids=query,
        attention_mask=query_mask,
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        top_k=0,
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.train(was_training)
    response = out[:, query.shape[1] :]
    is_eos = response == tokenizer.eos_token_id
    # mask: tokens up to and including the first EOS
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    response_mask = (~after_eos).long()
    finished = is_eos.any(dim=1)
    response = response.masked_fill(response_mask == 0, tokenizer.pad_token_id)
    return Rollout(query, query_mask, response, response_mask, finished)


def decode_responses(tokenizer, rollout: Rollout) -> list[str]:
    return [
        tokenizer.decode(ids[m.bool()], skip_special_tokens=True).strip()
        for ids, m in zip(rollout.response, rollout.response_mask)
    ]


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so a left-padded row scores like an unpadded one."""
    return (mask.cumsum(dim=1) - 1).clamp(min=0)


def response_logprobs(model, rollout: Rollout, *, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and entropies of the response tokens: two (batch, response_len) tensors."""
    ids, mask = rollout.sequences()
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    q = rollout.query.shape[1]
    logits = logits[:, q - 1 : -1, :] / temperature
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


def encode_rollout(tokenizer, prompts: list[str], responses: list[str], finished: list[bool]) -> Rollout:
    """Tokenize given responses into the same layout `sample` returns (EOS kept where finished)."""
    query, query_mask = encode_queries(tokenizer, prompts)
    rows = [
        tokenizer(" " + r, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if f else [])
        for r, f in zip(responses, finished)
    ]
    width = max(1, max(len(r) for r in rows))
    response = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        response[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        response_mask[i, : len(r)] = 1
    return Rollout(query, query_mask, response, response_mask, torch.tensor(finished))


def hidden_states(backbone, rollout: Rollout) -> torch.Tensor:
    """Last hidden states of a decoder stack over query + response: (batch, seq_len, hidden)."""
    ids, mask = rollout.sequences()
    return backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).last_hidden_state


def token_values(model, rollout: Rollout, *, backbone=None, head=None) -> torch.Tensor:
    """Scalar head on every response position: (batch, response_len). Defaults to a
    sequence-classification model's own backbone and `score` head.

    Value t is read at the state that predicts response token t, as the policy's logits are.
    """
    hidden = hidden_states(backbone or model.base_model, rollout)
    q = rollout.query.shape[1]
    return (head or model.score)(hidden[:, q - 1 : -1, :]).squeeze(-1).float()


POOLINGS = ("last", "mean")


def sequence_scores(model, rollout: Rollout, pooling: str = "last") -> torch.Tensor:
    """A reward model's score per sequence: (batch,).

    - "last": the scalar head at the last real token (InstructGPT, TRL, DeepSpeed-Chat);
    - "mean": the scalar head on every response token (EOS included), averaged over the response.
    """
    hidden = hidden_states(model.base_model, rollout)
    if pooling == "mean":
        q = rollout.query.shape[1]
        per_token = model.score(hidden[:, q:, :]).squeeze(-1).float()
        mask = rollout.response_mask.float()
        return (per_token * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    if pooling != "last":
        raise ValueError(f"pooling: {pooling!r} is not one of {', '.join(POOLINGS)}")
    mask = rollout.sequences()[1]
    last = (mask * torch.arange(mask.shape[1])).argmax(dim=1)
    return model.score(hidden[torch.arange(hidden.shape[0]), last]).squeeze(-1).float()


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
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return model(**enc, labels=labels).loss


def load_scalar_model(path: str | Path, *, trust_remote_code: bool = False):
    """A sequence-classification model with one output (reward or value head)."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        str(path), num_labels=1, trust_remote_code=trust_remote_code, use_safetensors=True, dtype=torch.float32
    )
