"""Who ranks the responses: the simulated labeler, a rankings file, or an AI labeler (`labeler.*`).

Configs are data: this module imports no torch, so composing and checking a config stays fast."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from stages.runtime.rules import (
    COUNT,
    NONNEGATIVE,
    OFF_OR_COUNT,
    POSITIVE,
    UNCONSTRAINED,
    UNIT,
    Rule,
    check_fields,
    one_of,
)


@dataclass(frozen=True)
class FewShot:
    prompt: str
    response_1: str
    response_2: str
    preferred: int  # 1 or 2

    RULES: ClassVar[dict[str, Rule]] = {
        "preferred": one_of(1, 2),
    }  # fmt: skip


@dataclass(frozen=True)
class AiLabelerConfig:
    backend: str = "local"  # local: a Hugging Face causal LM | http: an OpenAI-compatible server
    model: str | None = None  # local: path or hub id (null: the embedded judge the pipeline prepares); http: model name
    base_url: str = "http://127.0.0.1:8000/v1"
    # http: chat (/chat/completions: the server wraps the text in its chat template, as instruction-tuned
    # judges expect) | completions (/completions: the text as is, as the local backend feeds it)
    # http: chat (/chat/completions, the server's chat template: instruction-tuned judges) or completions
    # (/completions, the text as is: a base model, or `alignflow serve-model` serving the embedded judge)
    endpoint: str = "chat"
    api_key_env: str | None = "OPENAI_API_KEY"  # the key is read from this variable, never logged; null: no key
    preamble: str = "Which response is better?"
    score_preamble: str = "Rate the response from 1 to 10."
    # e.g. [{prompt: ..., response_1: ..., response_2: ..., preferred: 1}]
    few_shot: list[FewShot] = field(default_factory=list)
    chain_of_thought: bool = False  # generate a rationale before the answer
    rationale_tokens: int = 32
    max_invalid_fraction: float = 0.1  # stop when more answers than this are neither "1" nor "2"
    batch_size: int = 64  # local: judging prompts per forward pass
    timeout_s: float = 30.0  # http: per request
    max_retries: int = 4  # http: retries after a 429, a 5xx or a timeout
    backoff_s: float = 1.0  # http: first retry delay, doubled each time
    concurrency: int = 4  # http: requests in flight
    trust_remote_code: bool = False

    RULES: ClassVar[dict[str, Rule]] = {
        "rationale_tokens": COUNT, "max_invalid_fraction": UNIT, "batch_size": COUNT, "timeout_s": POSITIVE,
        "max_retries": OFF_OR_COUNT, "backoff_s": NONNEGATIVE, "concurrency": COUNT,
    }  # fmt: skip

    def __post_init__(self) -> None:
        if self.backend not in ("local", "http"):
            raise ValueError(f"labeler.ai.backend: {self.backend!r} is not 'local' or 'http'")
        if self.endpoint not in ("chat", "completions"):
            raise ValueError(f"labeler.ai.endpoint: {self.endpoint!r} is not 'chat' or 'completions'")
        if self.backend == "http" and not self.model:
            raise ValueError("labeler.ai.model: the http backend needs the served model's name")
        check_fields(self, "labeler.ai.")
        for i, shot in enumerate(self.few_shot):
            if shot.preferred not in (1, 2):
                raise ValueError(f"labeler.ai.few_shot[{i}].preferred: must be 1 or 2, got {shot.preferred}")


@dataclass(frozen=True)
class LabelerConfig:
    kind: str = "simulated"  # simulated | file | ai
    noise: float = 0.3  # simulated: std of the Gaussian added to gold scores (gold spans [-2, 2])
    seed: int = 0
    task_file: str = "artifacts/labeling/task.jsonl"  # file: where the task for rankers is exported
    rankings_file: str | None = None  # file: the rankers' filled-in copy of the task, to import
    cache_file: str | None = None  # content-keyed label cache (JSONL); null: no cache
    ai: AiLabelerConfig = field(default_factory=AiLabelerConfig)  # ai: the judge, its prompt and backend

    RULES: ClassVar[dict[str, Rule]] = {
        "noise": NONNEGATIVE, "seed": UNCONSTRAINED,
    }  # fmt: skip

    def __post_init__(self) -> None:
        if self.kind not in ("simulated", "file", "ai"):
            raise ValueError(f"labeler.kind: {self.kind!r} is not one of 'simulated', 'file', 'ai'")
        check_fields(self, "labeler.")
