"""The AI labeler (RLAIF, Lee et al. 2023): a language model judges which of two responses is better.

The judging prompt is the preamble (a written rubric, `labeler.ai.preamble`), optional few-shot
examples, the prompt and the two responses, then "Preferred response=". The preference is the
softmax over the log-probabilities of the tokens "1" and "2":

    P(1 preferred) = exp(lp_1) / (exp(lp_1) + exp(lp_2)) = sigmoid(lp_1 - lp_2)

- Position debiasing: both orders are scored and averaged, P(a > b) = (P(a first) + 1 - P(b first)) / 2;
  the two orders agreeing on the winner is "position consistency".
- Chain of thought (optional): the judge first writes a rationale, which is appended before the answer.
- K responses are ranked by their soft Borda count, the sum of their pairwise soft preferences.
- d-RLAIF (direct scoring): the expected 1-10 score from the probabilities of the tokens "1".."10",
  mapped to [-1, 1] as in the paper.

Two backends, one interface (`next_token_logprobs`, `generate`): `LocalJudge` (any Hugging Face
causal LM folder or hub id, safetensors only) and `HttpJudge` (an OpenAI-compatible server: vLLM,
Ollama, hosted APIs), with the API key from an environment variable, retries on 429 and 5xx with
exponential backoff, bounded concurrency and a timeout. Labels are cached by content in
`stages/labeling/labelers.CachedLabeler`, so a rerun never pays for the same judgement twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import torch

from stages.models.compute import amp, compute_dtype, model_device
from stages.models.modeling import load_causal_lm, load_tokenizer, position_ids
from stages.preference.rankings import ranks_from_scores
from stages.runtime.errors import ExpectedFailure
from stages.settings.labeling import AiLabelerConfig

ANSWERS = ("1", "2")
SCORES = tuple(str(s) for s in range(1, 11))
PROBE = ("What is two plus two?", "Four.", "Five.")  # preflight's one request to an HTTP judge


class JudgeError(ExpectedFailure, RuntimeError):
    """The judge could not give a usable answer (unreachable, malformed, too many invalid answers)."""


# ---------------------------------------------------------------- the maths (unit-tested by hand)


def two_way_preference(lp_1: torch.Tensor, lp_2: torch.Tensor) -> torch.Tensor:
    """P("1") renormalised over {"1", "2"}: sigmoid(lp_1 - lp_2). -inf for both gives 0.5."""
    both_missing = torch.isinf(lp_1) & torch.isinf(lp_2)
    return torch.sigmoid(torch.where(both_missing, torch.zeros_like(lp_1), lp_1 - lp_2))


def debias(p_ab: torch.Tensor, p_ba: torch.Tensor) -> torch.Tensor:
    """P(a > b) from P("1") with a first (`p_ab`) and with b first (`p_ba`), averaged over both orders."""
    return 0.5 * (p_ab + (1.0 - p_ba))


def position_consistent(p_ab: torch.Tensor, p_ba: torch.Tensor) -> torch.Tensor:
    """Whether both orders pick the same response (a first and preferred, and b first and not)."""
    return (p_ab > 0.5) == (p_ba < 0.5)


def ranks_from_preferences(prefs: list[list[float]]) -> list[int]:
    """Ranks (0 = best, ties share) by the soft Borda count: sum over j of P(i > j)."""
    k = len(prefs)
    return ranks_from_scores([round(sum(prefs[i][j] for j in range(k) if j != i), 9) for i in range(k)])


def expected_score(logprobs: torch.Tensor) -> torch.Tensor:
    """E[score] over 1..10 from (n, 10) log-probabilities of the score tokens, renormalised: (n,)."""
    probs = torch.softmax(logprobs, dim=-1)
    return (probs * torch.arange(1, logprobs.shape[-1] + 1, dtype=probs.dtype, device=probs.device)).sum(-1)


def normalized_score(expected: torch.Tensor) -> torch.Tensor:
    """d-RLAIF's reward: the expected 1-10 score mapped linearly to [-1, 1]."""
    return (expected - 5.5) / 4.5


# ---------------------------------------------------------------- prompts


def pair_prompt(cfg: AiLabelerConfig, prompt: str, first: str, second: str, rationale: str | None = None) -> str:
    shots = "".join(
        f"Prompt: {s.prompt}\nResponse 1: {s.response_1}\nResponse 2: {s.response_2}\n"
        f"Preferred response={s.preferred}\n\n"
        for s in cfg.few_shot
    )
    text = f"{cfg.preamble.strip()}\n\n{shots}Prompt: {prompt}\nResponse 1: {first}\nResponse 2: {second}\n"
    if rationale is not None:
        text += f"Rationale: {rationale.strip()}\n"
    return text + "Preferred response="


def rationale_prompt(cfg: AiLabelerConfig, prompt: str, first: str, second: str) -> str:
    return pair_prompt(cfg, prompt, first, second).removesuffix("Preferred response=") + "Rationale:"


def score_prompt(cfg: AiLabelerConfig, prompt: str, response: str) -> str:
    return f"{cfg.score_preamble.strip()}\n\nPrompt: {prompt}\nResponse: {response}\nScore="


# ---------------------------------------------------------------- backends


class Judge(Protocol):
    identity: str

    def next_token_logprobs(self, texts: list[str], candidates: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, len(candidates)) log-probabilities of each candidate as the continuation, and (n,)
        whether the judge's own top answer was one of the candidates."""
        ...

    def generate(self, texts: list[str], max_new_tokens: int) -> list[str]: ...


class LocalJudge:
    """A Hugging Face causal LM, loaded from safetensors; the text is fed as is (no chat template)."""

    def __init__(
        self,
        model: str | Path,
        *,
        batch_size: int = 64,
        trust_remote_code: bool = False,
        device=None,
        precision: str = "fp32",
    ) -> None:
        self.tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
        dtype = compute_dtype(precision)  # frozen: loaded in the compute dtype, run under its autocast
        self.model = load_causal_lm(model, trust_remote_code=trust_remote_code, device=device, dtype=dtype).eval()
        self.precision = precision
        self.batch_size = batch_size
        self.identity = f"local:{Path(model).name if Path(model).exists() else model}"

    def _continuation(self, candidate: str) -> list[int]:
        """The token ids `candidate` adds after a judging prompt (SentencePiece may add a '▁')."""
        stem = "Preferred response="
        full = self.tokenizer(stem + candidate, add_special_tokens=False)["input_ids"]
        head = self.tokenizer(stem, add_special_tokens=False)["input_ids"]
        return full[len(head) :] if full[: len(head)] == head else full[-1:]

    @torch.no_grad()
    def next_token_logprobs(self, texts: list[str], candidates: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [self._continuation(c) for c in candidates]
        if any(len(i) != 1 for i in ids):
            raise JudgeError(
                f"labeler.ai: the judge's tokenizer splits the answer tokens {candidates} into several pieces; "
                "use a model whose vocabulary holds each digit answer as one token"
            )
        device = model_device(self.model)
        cand = torch.tensor([i[0] for i in ids], dtype=torch.long, device=device)
        out_lp, out_valid = [], []
        tok = self.tokenizer
        tok.padding_side = "left"
        for start in range(0, len(texts), self.batch_size):
            enc = tok(
                texts[start : start + self.batch_size], return_tensors="pt", padding=True, add_special_tokens=True
            ).to(device)
            with amp(device, self.precision):
                logits = self.model(
                    input_ids=enc["input_ids"],
                    attention_mask=enc["attention_mask"],
                    position_ids=position_ids(enc["attention_mask"]),
                ).logits[:, -1, :]
            logp = torch.log_softmax(logits.float(), dim=-1)
            out_lp.append(logp[:, cand].cpu())  # answers are read on the host
            out_valid.append(torch.isin(logp.argmax(-1), cand).cpu())
        return torch.cat(out_lp), torch.cat(out_valid)

    @torch.no_grad()
    def generate(self, texts: list[str], max_new_tokens: int) -> list[str]:
        tok = self.tokenizer
        tok.padding_side = "left"
        outs = []
        for start in range(0, len(texts), self.batch_size):
            enc = tok(texts[start : start + self.batch_size], return_tensors="pt", padding=True)
            enc = enc.to(model_device(self.model))
            with amp(enc["input_ids"].device, self.precision):
                gen = self.model.generate(
                    **enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id
                )
            outs += tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        return [o.split("\n", 1)[0] for o in outs]


def api_key(cfg: AiLabelerConfig) -> str | None:
    """The key from `labeler.ai.api_key_env`; a clear error when that variable is unset."""
    if cfg.api_key_env is None:
        return None
    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise JudgeError(
            f"labeler.ai.api_key_env: the environment variable {cfg.api_key_env} is not set; export the API key "
            "there (or set labeler.ai.api_key_env=null for a server without authentication)"
        )
    return key


class HttpJudge:
    """An OpenAI-compatible `/chat/completions` (or `/completions`) endpoint, asked for the top
    log-probabilities of one token."""

    TOP_LOGPROBS = 20

    def __init__(self, cfg: AiLabelerConfig) -> None:
        import httpx

        self.cfg = cfg
        key = api_key(cfg)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.chat = cfg.endpoint == "chat"
        self.url = cfg.base_url.rstrip("/") + ("/chat/completions" if self.chat else "/completions")
        self.client = httpx.Client(headers=headers, timeout=cfg.timeout_s)
        self.identity = f"http:{cfg.base_url}:{cfg.model}"

    def _post(self, payload: dict) -> dict:
        import httpx

        what = ""
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                time.sleep(self.cfg.backoff_s * 2 ** (attempt - 1))
            try:
                response = self.client.post(self.url, json=payload)
            except httpx.TimeoutException:
                what = f"timed out after {self.cfg.timeout_s} s"
                continue
            except httpx.TransportError as e:
                raise JudgeError(f"labeler.ai: cannot reach {self.url}: {e}") from None
            if response.status_code == 429 or response.status_code >= 500:
                what = f"answered HTTP {response.status_code}"
                continue
            if response.status_code != 200:
                raise JudgeError(f"labeler.ai: {self.url} answered HTTP {response.status_code}: {response.text[:200]}")
            try:
                return response.json()
            except json.JSONDecodeError:
                raise JudgeError(
                    f"labeler.ai: malformed response from {self.url}: not JSON: {response.text[:200]!r}"
                ) from None
        raise JudgeError(f"labeler.ai: {self.url} {what} ({self.cfg.max_retries + 1} attempts)")

    def _top_logprobs(self, text: str) -> tuple[dict[str, float], str]:
        if self.chat:
            ask = {"messages": [{"role": "user", "content": text}], "logprobs": True, "top_logprobs": self.TOP_LOGPROBS}
            shape = "choices[0].logprobs.content[0].top_logprobs"
        else:
            ask, shape = {"prompt": text, "logprobs": self.TOP_LOGPROBS}, "choices[0].logprobs.top_logprobs[0]"
        body = self._post({"model": self.cfg.model, "max_tokens": 1, "temperature": 0.0, **ask})
        try:
            if self.chat:
                first = body["choices"][0]["logprobs"]["content"][0]
                entries, chosen = [(e["token"], e["logprob"]) for e in first["top_logprobs"]], first["token"]
            else:
                logprobs = body["choices"][0]["logprobs"]
                entries, chosen = list(logprobs["top_logprobs"][0].items()), logprobs["tokens"][0]
            top: dict[str, float] = {}
            for token, logprob in entries:
                token = str(token).strip()
                top[token] = max(top.get(token, -float("inf")), float(logprob))
            return top, str(chosen).strip()
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            raise JudgeError(
                f"labeler.ai: malformed response from {self.url}: no {shape} ({type(e).__name__}: {e})"
            ) from None

    def probe(self, *, scores: bool = False) -> None:
        """One small request of the kind the run will send, before any compute (preflight): the answer
        must carry logprobs, be one of the answer tokens, and (pairwise) rank both "1" and "2" among
        its top logprobs, or the run would fail only after the stages before comparisons."""
        prompt, first, second = PROBE
        text = score_prompt(self.cfg, prompt, first) if scores else pair_prompt(self.cfg, prompt, first, second)
        top, chosen = self._top_logprobs(text)
        candidates = SCORES if scores else ANSWERS
        where = f"labeler.ai: the probe request to {self.url} (model {self.cfg.model!r})"
        if chosen not in candidates:
            raise JudgeError(
                f"{where} was answered {chosen!r}, not {candidates[0]}..{candidates[-1]}; check labeler.ai.model "
                "and labeler.ai.preamble (the judge must answer with the number alone)"
            )
        missing = [c for c in candidates if c not in top] if not scores else []
        if missing:
            raise JudgeError(
                f"{where}: the answer tokens {' and '.join(ANSWERS)} are not both among its top "
                f"{self.TOP_LOGPROBS} logprobs (missing {', '.join(missing)}), so no preference can be read"
            )

    def next_token_logprobs(self, texts: list[str], candidates: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        with ThreadPoolExecutor(self.cfg.concurrency) as pool:
            answers = list(pool.map(self._top_logprobs, texts))
        lp = torch.tensor([[top.get(c, -float("inf")) for c in candidates] for top, _ in answers], device="cpu")
        valid = torch.tensor([chosen in candidates for _, chosen in answers], device="cpu")
        return lp, valid

    def generate(self, texts: list[str], max_new_tokens: int) -> list[str]:
        def one(text: str) -> str:
            ask = {"messages": [{"role": "user", "content": text}]} if self.chat else {"prompt": text}
            body = self._post({"model": self.cfg.model, "max_tokens": max_new_tokens, "temperature": 0.0, **ask})
            try:
                choice = body["choices"][0]
                return str(choice["message"]["content"] if self.chat else choice["text"]).split("\n", 1)[0]
            except (KeyError, IndexError, TypeError) as e:
                raise JudgeError(f"labeler.ai: malformed response from {self.url}: {type(e).__name__}: {e}") from None

        with ThreadPoolExecutor(self.cfg.concurrency) as pool:
            return list(pool.map(one, texts))


def load_judge(cfg: AiLabelerConfig, judge_dir: Path | None, device=None, precision: str = "fp32") -> Judge:
    """The configured backend; a local judge without `labeler.ai.model` is the pipeline's embedded
    judge in `judge_dir/model` (written by the `judge` stage), on `device`, computing in `precision`."""
    if cfg.backend == "http":
        return HttpJudge(cfg)
    local = {"batch_size": cfg.batch_size, "device": device, "precision": precision}
    if cfg.model is not None:
        return LocalJudge(cfg.model, trust_remote_code=cfg.trust_remote_code, **local)
    if judge_dir is None or not (Path(judge_dir) / "model").exists():
        raise JudgeError("labeler.ai.model is null, so the embedded judge is used, but no judge artifact was given")
    return LocalJudge(Path(judge_dir) / "model", **local)


# ---------------------------------------------------------------- the labeler


class AiLabeler:
    """Ranks K responses from debiased pairwise preferences; scores single responses (d-RLAIF)."""

    def __init__(self, cfg: AiLabelerConfig, judge: Judge) -> None:
        self.cfg, self.judge = cfg, judge
        prompt_version = json.dumps([cfg.preamble, cfg.score_preamble, repr(cfg.few_shot), cfg.chain_of_thought])
        self.identity = f"ai:{judge.identity}:{hashlib.sha256(prompt_version.encode()).hexdigest()[:16]}"

    def _answer(self, texts: list[str], candidates: tuple[str, ...], what: str) -> torch.Tensor:
        lp, valid = self.judge.next_token_logprobs(texts, candidates)
        invalid = 1.0 - valid.float().mean().item() if len(texts) else 0.0
        if invalid > self.cfg.max_invalid_fraction:
            raise JudgeError(
                f"labeler.ai: the judge answered something other than {' or '.join(candidates[:2])}"
                f"{'..' + candidates[-1] if len(candidates) > 2 else ''} on {invalid:.0%} of {len(texts)} {what}, "
                f"above labeler.ai.max_invalid_fraction={self.cfg.max_invalid_fraction}; check the preamble and model"
            )
        return lp

    def preferences(self, pairs: list[tuple[str, str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """For (prompt, a, b) triples: debiased P(a > b) and position consistency, both (n,)."""
        orders = [(p, a, b) for p, a, b in pairs] + [(p, b, a) for p, a, b in pairs]
        rationales: list[str | None] = [None] * len(orders)
        if self.cfg.chain_of_thought:
            rationales = list(
                self.judge.generate([rationale_prompt(self.cfg, *o) for o in orders], self.cfg.rationale_tokens)
            )
        texts = [pair_prompt(self.cfg, *o, rationale=r) for o, r in zip(orders, rationales)]
        lp = self._answer(texts, ANSWERS, "pairwise judgements")
        p_first = two_way_preference(lp[:, 0], lp[:, 1])
        p_ab, p_ba = p_first[: len(pairs)], p_first[len(pairs) :]
        return debias(p_ab, p_ba), position_consistent(p_ab, p_ba)

    def label_all(self, items: list[tuple[str, list[str]]]) -> list[dict]:
        """Per item: ranks, the (K, K) matrix of P(i > j), and how many pairs were position-consistent."""
        index = [(n, i, j) for n, (_, rs) in enumerate(items) for i in range(len(rs)) for j in range(i + 1, len(rs))]
        if not index:
            return []
        p, consistent = self.preferences([(items[n][0], items[n][1][i], items[n][1][j]) for n, i, j in index])
        labels = [{"prefs": [[0.5] * len(rs) for _ in rs], "pairs": 0, "consistent": 0} for _, rs in items]
        for (n, i, j), pij, c in zip(index, p.tolist(), consistent.tolist()):
            labels[n]["prefs"][i][j], labels[n]["prefs"][j][i] = pij, 1.0 - pij
            labels[n]["pairs"] += 1
            labels[n]["consistent"] += int(c)
        for label in labels:
            label["ranks"] = ranks_from_preferences(label["prefs"])
        return labels

    def score_all(self, prompts: list[str], responses: list[str]) -> list[float]:
        """d-RLAIF: the expected 1-10 score of each response, mapped to [-1, 1]."""
        texts = [score_prompt(self.cfg, p, r) for p, r in zip(prompts, responses)]
        if not texts:
            return []
        lp = self._answer(texts, SCORES, "scores")
        return normalized_score(expected_score(lp)).tolist()
