"""Labelers rank K responses to a prompt. They all share one interface:

    labeler.rank_all(items) -> list[list[int]]   # items: [(prompt, [responses])]; per response its
                                                 # rank, 0 = best, ties share a rank

- `simulated`: the embedded default's gold rule plus noise (below);
- `file`: exports a JSONL task for human rankers, imports their rankings back, validated against
  the export; stops with `LabelsMissing` (saying where the file is and how to resume) until then;
- (`ai`, an LLM judge, arrives with the RLAIF issue and slots in here.)

`CachedLabeler` wraps any of them: labels are cached by content (labeler identity, prompt and
responses), so re-running never re-asks a labeler about the same prompt and responses.

`SimulatedLabeler` stands in for InstructGPT's human rankers on the embedded default: it scores
with the hidden gold rule plus Gaussian noise, so, as with real labelers, its agreement with the
gold ordering is below 100%. The noise is seeded by the content, so asking twice about the same
prompt and responses gives the same answer (labels are cached by content).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from stages import task
from stages.data import DatasetConfig, load, read_records
from stages.manifest import read_jsonl, write_jsonl


@dataclass(frozen=True)
class LabelerConfig:
    kind: str = "simulated"  # simulated | file
    noise: float = 0.3  # simulated: std of the Gaussian added to gold scores (gold spans [-2, 2])
    seed: int = 0
    task_file: str = "artifacts/labeling/task.jsonl"  # file: where the task for rankers is exported
    rankings_file: str | None = None  # file: the rankers' filled-in copy of the task, to import
    cache_file: str | None = None  # content-keyed label cache (JSONL); null: no cache

    def __post_init__(self) -> None:
        if self.kind not in ("simulated", "file"):
            raise ValueError(f"labeler.kind: {self.kind!r} is not one of 'simulated', 'file'")
        if self.noise < 0:
            raise ValueError(f"labeler.noise: must be >= 0, got {self.noise}")


class Labeler(Protocol):
    identity: str

    def rank_all(self, items: list[tuple[str, list[str]]]) -> list[list[int]]: ...


class LabelsMissing(RuntimeError):
    """Raised by the file labeler until the rankers' file exists; the message says how to resume."""


class SimulatedLabeler:
    def __init__(self, cfg: LabelerConfig, target_len: int = 6) -> None:
        self.cfg = cfg
        self.target_len = target_len
        self.identity = f"simulated:noise={cfg.noise}:seed={cfg.seed}:target_len={target_len}"

    def noisy_scores(self, prompt: str, responses: list[str]) -> list[float]:
        content = "\x1f".join([str(self.cfg.seed), prompt, *responses]).encode()
        rng = random.Random(hashlib.sha256(content).hexdigest())
        return [
            task.gold_score(prompt, r, target_len=self.target_len) + rng.gauss(0.0, self.cfg.noise) for r in responses
        ]

    def rank(self, prompt: str, responses: list[str]) -> list[int]:
        return ranks_from_scores(self.noisy_scores(prompt, responses))

    def rank_all(self, items: list[tuple[str, list[str]]]) -> list[list[int]]:
        return [self.rank(p, rs) for p, rs in items]


def _task_rows(items: list[tuple[str, list[str]]]) -> list[dict]:
    return [
        {"id": f"p{i}", "prompt": p, "responses": [{"id": f"r{j}", "text": r} for j, r in enumerate(rs)], "ranking": []}
        for i, (p, rs) in enumerate(items)
    ]


class FileLabeler:
    """Human rankers through files: export `task_file`, import `rankings_file` (same rows, each with
    `ranking` filled in as response ids best to worst, or `ranks` / `scores`)."""

    identity = "file"

    def __init__(self, cfg: LabelerConfig) -> None:
        self.cfg = cfg

    def rank_all(self, items: list[tuple[str, list[str]]]) -> list[list[int]]:
        if not items:
            return []
        expected = _task_rows(items)
        rankings = Path(self.cfg.rankings_file) if self.cfg.rankings_file else None
        if rankings is None or not rankings.exists():
            task_file = Path(self.cfg.task_file)
            task_file.parent.mkdir(parents=True, exist_ok=True)
            write_jsonl(task_file, expected)
            raise LabelsMissing(
                f"{len(items)} prompts need rankings. Rank the responses in {task_file.resolve()} (fill each row's "
                f"'ranking' with response ids, best first), save the file, and re-run with "
                f"labeler.rankings_file=<that file>" + (f" (not found: {rankings})" if rankings else "")
            )
        records = list(read_records(rankings))
        if len(records) != len(expected):
            raise ValueError(
                f"{rankings}: {len(records)} rows, but the export {self.cfg.task_file} has {len(expected)}"
            )
        for (line, rec), exp in zip(records, expected):
            if not isinstance(rec, dict) or rec.get("id") != exp["id"] or rec.get("prompt") != exp["prompt"]:
                raise ValueError(f"{rankings}:{line}: id: expected prompt {exp['id']} of the export, in order")
            if rec.get("responses") != exp["responses"]:
                raise ValueError(f"{rankings}:{line}: responses: differ from the export (ids or texts changed)")
        rows = load(DatasetConfig(path=str(rankings), kind="rankings", format="ranked")).rows
        return [r["ranks"] for r in rows]


class CachedLabeler:
    """Asks `inner` only about (prompt, responses) it has not labelled before; appends to `path`
    (kept in memory only when `path` is None). `asked` counts the last call's fresh questions."""

    def __init__(self, inner: Labeler, path: str | Path | None) -> None:
        self.inner, self.path = inner, Path(path) if path else None
        self.identity = inner.identity
        self.asked = 0
        exists = self.path is not None and self.path.exists()
        self.cache = {r["key"]: r["ranks"] for r in read_jsonl(self.path)} if exists else {}

    def key(self, prompt: str, responses: list[str]) -> str:
        return hashlib.sha256(json.dumps([self.identity, prompt, responses]).encode()).hexdigest()

    def rank_all(self, items: list[tuple[str, list[str]]]) -> list[list[int]]:
        keys = [self.key(p, rs) for p, rs in items]
        todo = [i for i, k in enumerate(keys) if k not in self.cache]
        fresh = self.inner.rank_all([items[i] for i in todo])
        for i, ranks in zip(todo, fresh):
            self.cache[keys[i]] = ranks
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                for i, ranks in zip(todo, fresh):
                    f.write(json.dumps({"key": keys[i], "ranks": ranks}) + "\n")
        self.asked = len(todo)
        return [self.cache[k] for k in keys]


def ranks_from_scores(scores: list[float]) -> list[int]:
    """0 for the highest score; equal scores share a rank."""
    distinct = sorted(set(scores), reverse=True)
    return [distinct.index(s) for s in scores]


def make_labeler(cfg: LabelerConfig, target_len: int) -> CachedLabeler:
    inner: Labeler = SimulatedLabeler(cfg, target_len) if cfg.kind == "simulated" else FileLabeler(cfg)
    return CachedLabeler(inner, cfg.cache_file)
