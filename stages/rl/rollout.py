"""Where PPO's rollouts are sampled (`stage.ppo.generation`): the seam behind `stages.models.modeling.sample`.

- `hf` (the default): transformers' `generate` with the KV cache, on the policy being trained, on its
  device. With `batch_size` the prompts are sorted by length and sampled in batches of that many (a
  batch of similar lengths pads little: less compute per token, less cache memory); with
  `static_cache` the cache is preallocated, and transformers compiles the decode step on a GPU. Under
  ZeRO-3, whose partitioned policy cannot generate rank by rank (each rank stops at its own EOS, so
  their per-layer gathers would not line up), on a whole copy of the policy that takes the gathered
  weights once per update (`sync`). trl gathers per generate call and removes DeepSpeed's hooks;
  the copy keeps DeepSpeed's internals out of it, for one policy's memory more per rank.
- `vllm` (GPU machines): a vLLM engine in the training process (colocated, as trl's `colocate` mode
  and verl's hybrid engine), its weights pushed after each update (`load_weights`, as OpenRLHF and
  verl sync their rollout engines), its prefix cache reset. Refused without CUDA and vllm.

Both return a `modeling.Rollout`, so what follows (scores, KL, GAE) does not know which sampled.
"""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import torch

from stages.data.tokens import prompt_ids
from stages.models.compute import model_device
from stages.models.modeling import Rollout, encode_queries, response_rollout, sample
from stages.settings.recipe import GENERATIONS


def check(generation: str, *, cuda: bool | None = None) -> None:
    """Refuse, before any model loads, a rollout engine this machine cannot run."""
    if generation not in GENERATIONS:
        raise ValueError(f"stage.ppo.generation: {generation!r} is not one of {', '.join(GENERATIONS)}")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if generation == "vllm" and not (cuda and importlib.util.find_spec("vllm") is not None):
        raise ValueError(
            "stage.ppo.generation=vllm needs a CUDA GPU and the vllm package (pip install vllm==0.33.*); "
            "this machine has " + ("no vllm" if cuda else "no CUDA device") + ": use stage.ppo.generation=hf"
        )


class HfRollout:
    """`generate` on `model`; with `copy_from` (ZeRO-3) on a whole copy `model` synced from it.
    `batch_size`: prompts per `generate` call, sorted by length (None: all in one call)."""

    def __init__(
        self,
        model,
        copy_from=None,
        *,
        batch_size: int | None = None,
        static_cache: bool = False,
        precision: str = "fp32",
    ) -> None:
        self.model, self.source = model, copy_from
        self.batch_size, self.static_cache, self.precision = batch_size, static_cache, precision

    def sample(self, tokenizer, prompts: list, **kw) -> Rollout:
        kw = {**kw, "static_cache": self.static_cache, "precision": self.precision}
        if self.batch_size is None or self.batch_size >= len(prompts):
            return sample(self.model, tokenizer, prompts, **kw)
        order = sorted(range(len(prompts)), key=lambda i: len(prompt_ids(tokenizer, prompts[i])))
        parts = [
            sample(self.model, tokenizer, [prompts[i] for i in order[s : s + self.batch_size]], **kw)
            for s in range(0, len(order), self.batch_size)
        ]
        return merge(parts, order, tokenizer.pad_token_id)

    def sync(self, gathered=contextlib.nullcontext) -> None:
        """After an update: copy the trained policy's weights in (`gathered()`: whole inside; collective)."""
        if self.source is None:
            return
        with gathered():
            for p, q in zip(self.source.parameters(), self.model.parameters(), strict=True):
                q.data.copy_(p.data)


class VllmRollout:
    """A colocated vLLM engine over the policy folder, its weights pushed from `source` after updates."""

    def __init__(self, policy: Path, source, *, seed: int, gpu_memory_utilization: float = 0.3) -> None:
        from vllm import LLM

        self.source = source
        _launcher_env()
        self.llm = LLM(
            model=str(policy),
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            # in this process, one engine per rank (as trl 1.16's colocate mode): vLLM's V1 engine keeps
            # `llm_engine.model_executor` (what `sync` writes into) only with the executor in-process
            distributed_executor_backend="external_launcher",
            enable_prefix_caching=True,
        )

    def sample(
        self, tokenizer, prompts: list, *, max_new_tokens: int, temperature=1.0, top_p=1.0, max_prompt_length=None
    ) -> Rollout:
        from vllm import SamplingParams

        device = model_device(self.source)  # the trained policy's: what scores the rollout
        query, query_mask, images = encode_queries(tokenizer, prompts, max_prompt_length, device=device)
        if images is not None:
            raise ValueError("stage.ppo.rollout_engine=vllm: prompts with images sample through transformers here")
        ids = [q[m.bool()].tolist() for q, m in zip(query, query_mask)]
        params = SamplingParams(
            temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, stop_token_ids=[tokenizer.eos_token_id]
        )
        outs = self.llm.generate([{"prompt_token_ids": x} for x in ids], params, use_tqdm=False)
        rows = [list(o.outputs[0].token_ids) for o in outs]
        return _rollout(query, query_mask, rows, tokenizer.eos_token_id, tokenizer.pad_token_id)

    def sync(self, gathered=contextlib.nullcontext) -> None:
        model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        with gathered():
            model.load_weights([(name, p.data) for name, p in self.source.named_parameters()])
        self.llm.reset_prefix_cache()  # cached keys and values were computed by the old weights


def _launcher_env(env=None) -> None:
    """The rendezvous `external_launcher` reads, for a process no launcher started (one rank); `env`:
    where to write it (this process's environment unless given)."""
    import os
    import socket

    env = os.environ if env is None else env
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        env.setdefault(name, value)
    if "MASTER_PORT" not in env:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            env["MASTER_PORT"] = str(s.getsockname()[1])


def _rollout(query, query_mask, rows: list[list[int]], eos: int, pad: int) -> Rollout:
    """Sampled token rows (each ending at its EOS, or cut at the budget) in `sample`'s layout."""
    return response_rollout(query, query_mask, rows, pad, [bool(r) and r[-1] == eos for r in rows])


def merge(parts: list[Rollout], order: list[int], pad: int) -> Rollout:
    """Rollouts of consecutive slices of `order` as one, in the original prompt order: queries
    left-padded and responses right-padded to the widest part."""
    q_width = max(p.query.shape[1] for p in parts)
    r_width = max(p.response.shape[1] for p in parts)
    pad_q = [torch.nn.functional.pad(p.query, (q_width - p.query.shape[1], 0), value=pad) for p in parts]
    pad_qm = [torch.nn.functional.pad(p.query_mask, (q_width - p.query.shape[1], 0)) for p in parts]
    pad_r = [torch.nn.functional.pad(p.response, (0, r_width - p.response.shape[1]), value=pad) for p in parts]
    pad_rm = [torch.nn.functional.pad(p.response_mask, (0, r_width - p.response.shape[1])) for p in parts]
    device = parts[0].query.device
    inverse = torch.empty(len(order), dtype=torch.long, device=device)
    inverse[torch.tensor(order, dtype=torch.long, device=device)] = torch.arange(
        len(order), dtype=torch.long, device=device
    )
    cat = [torch.cat(x)[inverse] for x in (pad_q, pad_qm, pad_r, pad_rm, [p.finished for p in parts])]
    vision = None
    if any(p.vision is not None for p in parts):
        rows = [v for p in parts for v in (p.vision or [None] * p.query.shape[0])]
        vision = [rows[i] for i in inverse.tolist()]
    tools = None
    if any(p.tool_mask is not None for p in parts):
        masks = [p.tool_mask if p.tool_mask is not None else torch.zeros_like(p.response_mask) for p in parts]
        tools = torch.cat([torch.nn.functional.pad(m, (0, r_width - m.shape[1])) for m in masks])[inverse]
    return Rollout(*cat, vision=vision, tool_mask=tools)
