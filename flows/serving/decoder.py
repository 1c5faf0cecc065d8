"""A small batched decoding engine on transformers, for `serve-model` and `chat` where vLLM is absent.

Requests wait in an inbox; a worker thread takes up to `max_batch` of them (those that arrive within
`window_s` of the first), left-pads them into one batch and decodes it token by token with the KV cache,
each row with its own temperature, top-p, token budget, stop strings and random generator. Every new
piece of text is handed to the request's `emit` as it is decoded (streaming), then a final event with
the finish reason ("stop": EOS or a stop string; "length": the budget ran out) and the token counts.
A batch decodes until its last row finishes; requests that arrive meanwhile form the next batch.
"""

from __future__ import annotations

import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from stages.models.compute import amp


@dataclass
class Token:
    id: int
    text: str  # the token alone, decoded
    logprob: float
    top: list[tuple[str, float]]  # the `top_logprobs` most likely tokens at this step


@dataclass
class Delta:
    text: str  # new text since the last Delta (held back while it ends inside a UTF-8 character)
    tokens: list[Token]


@dataclass
class Done:
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    text: str  # the whole completion, stop string cut off


@dataclass
class Request:
    ids: list[int]  # the prompt, tokenised
    max_tokens: int
    emit: Callable[[Delta | Done], None]
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    top_logprobs: int = 0
    seed: int | None = None
    token_texts: bool = True  # each Token's own text (for logprobs); a client that asked none is spared the decode
    emitted: bool = False  # set by the engine once a Delta went out (a failed batch retries the others alone)
    finished: bool = False  # set by the engine once its Done went out


class Decoder:
    def __init__(
        self, model, tokenizer, *, max_batch: int = 8, window_s: float = 0.02, precision: str = "fp32"
    ) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.window_s = max_batch, window_s
        self.precision = precision  # every forward under its autocast (autocast is per thread: set here)
        self.device = next(model.parameters()).device
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos = {tokenizer.eos_token_id} | set(_extra_eos(model))
        self.inbox: queue.Queue[Request | None] = queue.Queue()
        self.batches = 0  # how many forward batches ran (tests read it to see requests batched together)
        self.largest_batch = 0
        self._thread = threading.Thread(target=self._loop, name="alignflow-engine", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> None:
        self.inbox.put(request)

    def close(self) -> None:
        self.inbox.put(None)
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            first = self.inbox.get()
            if first is None:
                return
            batch, deadline = [first], time.monotonic() + self.window_s
            while len(batch) < self.max_batch:
                try:
                    more = self.inbox.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if more is None:
                    self.inbox.put(None)
                    break
                batch.append(more)
            self._decode_isolated(batch)

    def _decode_isolated(self, batch: list[Request]) -> None:
        """Decode `batch`; if it fails, a request that has streamed nothing yet is decoded again alone,
        so one request that breaks the forward pass fails only itself, not the requests beside it."""
        try:
            self.decode(batch)
        except Exception as e:  # a bug, a bad input, out of memory
            for r in batch:
                if r.finished:
                    continue
                if len(batch) > 1 and not r.emitted:
                    self._decode_isolated([r])
                else:
                    r.emit(e)  # type: ignore[arg-type]

    @torch.no_grad()
    def decode(self, batch: list[Request]) -> None:
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        width = max(len(r.ids) for r in batch)
        ids = torch.tensor([[self.pad] * (width - len(r.ids)) + r.ids for r in batch], device=self.device)
        mask = torch.tensor([[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in batch], device=self.device)
        gens = [_generator(r.seed, self.device) for r in batch]
        rows = [_Row(r) for r in batch]
        cache, step_ids = None, ids
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        for _ in range(max(r.max_tokens for r in batch)):
            with amp(self.device, self.precision):
                out = self.model(
                    input_ids=step_ids,
                    attention_mask=mask,
                    position_ids=positions,
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=1,  # the next token's logits only: the prompt's are never read
                )
            cache = out.past_key_values
            logp = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)
            chosen = _choose(logp, rows, gens)
            for row, (token, token_logp, top) in zip(rows, self._to_host(logp, chosen, rows), strict=True):
                if not row.done:
                    self._advance(row, token, token_logp, top)
            if all(row.done for row in rows):
                break
            step_ids = torch.where(torch.tensor([r.done for r in rows], device=self.device), self.pad, chosen)[:, None]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            positions = positions[:, -1:] + 1
        for row in rows:
            if not row.done:
                self._finish(row, "length")

    def _to_host(self, logp: torch.Tensor, chosen: torch.Tensor, rows: list[_Row]):
        """Each row's (token, its log-prob, its top alternatives), sampled on the device and brought to the
        host in one copy of a few numbers per row (never the vocabulary's logits)."""
        k = max((r.request.top_logprobs for r in rows if not r.done), default=0)
        parts = [chosen[:, None].double(), logp.gather(1, chosen[:, None]).double()]
        if k > 0:
            values, ids = logp.topk(k, dim=-1)
            parts += [values.double(), ids.double()]
        host = torch.cat(parts, dim=1).tolist()  # one host sync per decoding step
        for row, line in zip(rows, host, strict=True):
            n = row.request.top_logprobs
            top = [(self.tokenizer.decode([int(i)]), v) for v, i in zip(line[2 : 2 + n], line[2 + k : 2 + k + n])]
            yield int(line[0]), line[1], top

    def _advance(self, row: _Row, token: int, token_logp: float, top: list[tuple[str, float]]) -> None:
        r = row.request
        if token in self.eos:
            row.generated += 1
            self._finish(row, "stop")
            return
        row.ids.append(token)
        row.generated += 1
        info = Token(token, self.tokenizer.decode([token]) if r.token_texts else "", token_logp, top)
        row.pending.append(info)
        text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
        cut = _stop_at(text, r.stop, len(row.sent))
        if cut is not None:
            row.text = text[:cut]
            self._finish(row, "stop")
            return
        row.text = text
        if text.endswith("\ufffd"):  # inside a multi-byte character: wait for its other bytes
            return
        held = max((len(s) - 1 for s in r.stop), default=0)  # a stop string may be starting
        visible = len(text) - held if held else len(text)
        if visible > len(row.sent) or row.pending and not held:
            r.emitted = True
            r.emit(Delta(text[len(row.sent) : visible], row.pending))
            row.sent, row.pending = text[:visible], []
        if row.generated >= r.max_tokens:
            self._finish(row, "length")

    def _finish(self, row: _Row, reason: str) -> None:
        r = row.request
        row.done = True
        if len(row.text) > len(row.sent) or row.pending:
            r.emitted = True
            r.emit(Delta(row.text[len(row.sent) :], row.pending))
        r.finished = True
        r.emit(Done(reason, len(r.ids), row.generated, row.text))


class _Row:
    def __init__(self, request: Request) -> None:
        self.request = request
        self.ids: list[int] = []
        self.generated = 0
        self.text = ""
        self.sent = ""
        self.pending: list[Token] = []
        self.done = False


def _extra_eos(model) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return [eos] if isinstance(eos, int) else list(eos or [])


def _generator(seed: int | None, device) -> torch.Generator:
    """A request's own stream of draws, on the device (the logits never leave it). Any integer seed is
    reduced into torch's range (2**64 values), so a huge or negative one still means one stream."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed % 2**64 if seed is not None else secrets.randbits(63))  # torch.seed() reseeds torch
    return gen


GREEDY_BELOW = 1e-5  # a temperature this small is greedy decoding (as vLLM does): its softmax would overflow


def _choose(logp: torch.Tensor, rows: list[_Row], gens: list[torch.Generator]) -> torch.Tensor:
    """Each row's next token, (batch,) on logp's device: one argmax for the whole batch (greedy rows, and
    every row's fallback), then a draw for each row still sampling."""
    greedy = logp.nan_to_num(nan=-torch.inf).argmax(-1)
    sampling = [i for i, row in enumerate(rows) if not row.done and row.request.temperature >= GREEDY_BELOW]
    if not sampling:
        return greedy
    chosen = greedy.clone()
    for i in sampling:
        chosen[i] = _pick(logp[i], rows[i].request, gens[i], greedy[i])
    return chosen


def _pick(logp: torch.Tensor, r: Request, gen: torch.Generator, greedy: torch.Tensor) -> torch.Tensor:
    """A draw from the temperature-scaled, top-p-truncated distribution, a 0-d tensor on logp's device
    (masked, not indexed: no host sync). A distribution that is not one (NaN logits) falls back to
    `greedy`, the most likely token, rather than failing the batch."""
    probs = torch.softmax(logp / r.temperature, dim=-1).nan_to_num(nan=0.0)
    if r.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < r.top_p  # the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p * keep)
    valid = torch.isfinite(probs).all() & (probs.sum() > 0)
    probs = torch.where(valid, probs, torch.nn.functional.one_hot(greedy, probs.shape[-1]).to(probs.dtype))
    return torch.multinomial(probs, 1, generator=gen)[0]


def _stop_at(text: str, stops: list[str], sent: int) -> int | None:
    """Where the first stop string begins in `text` (searching only text not yet sent whole), or None."""
    found = [i for s in stops if s and (i := text.find(s, max(0, sent - len(s)))) >= 0]
    return min(found) if found else None
