"""Labelers rank K responses to a prompt. They all share one interface:

    labeler.label_all(items) -> list[dict]   # items: [(prompt, [responses])]; per item a label:
                                             # {"ranks": per response its rank, 0 = best, ties share
                                             #  a rank, and, from the AI labeler, "prefs": the (K, K)
                                             #  soft preferences P(i > j)}

- `simulated`: the embedded default's gold rule plus noise (below);
- `file`: exports a JSONL task for human rankers, imports their rankings back, validated against
  the export; stops with `LabelsMissing` (saying where the file is and how to resume) until then;
- `ai`: a language model judges pairs, position-debiased, with soft preferences (RLAIF,
  `stages/labeling/ai_labeler.py`); it also scores single responses for d-RLAIF (`score_all`).

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
from pathlib import Path
from typing import Protocol

import torch

from stages.data import sources
from stages.data.reader import load, read_records
from stages.labeling.ai_labeler import AiLabeler, load_judge
from stages.preference.rankings import ranks_from_scores
from stages.runtime.errors import LabelsMissing
from stages.runtime.manifest import read_jsonl, write_jsonl
from stages.settings.data import EXACT_MATCH, DatasetConfig
from stages.settings.labeling import LabelerConfig


class Labeler(Protocol):
    identity: str

    def label_all(self, items: list[tuple[str, list[str]]]) -> list[dict]: ...


class SimulatedLabeler:
    """Gold rule plus noise; only data that brings a gold rule (the embedded task's) can be labelled."""

    def __init__(self, cfg: LabelerConfig, target_len: int = 6, gold: str = "embedded") -> None:
        self.cfg = cfg
        self.target_len = target_len
        self.gold = sources.gold_scorer(gold, target_len)
        # an exact-match task: each answer is marked right or wrong (the noise flips a mark now and then)
        # and equal marks tie, as a human checking answers would; noise alone would rank two wrong
        # answers at random and fill the comparisons with pairs nothing can learn
        self.verdicts = gold in EXACT_MATCH
        self.identity = f"simulated:noise={cfg.noise}:seed={cfg.seed}:target_len={target_len}"
        self.identity += ":verdicts" if self.verdicts else ""

    def noisy_scores(self, prompt: str, responses: list[str]) -> list[float]:
        text = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)  # a conversation
        content = "\x1f".join([str(self.cfg.seed), text, *responses]).encode()
        rng = random.Random(hashlib.sha256(content).hexdigest())
        noisy = [self.gold(prompt, r) + rng.gauss(0.0, self.cfg.noise) for r in responses]
        return [float(x >= 0.5) for x in noisy] if self.verdicts else noisy

    def rank(self, prompt: str, responses: list[str]) -> list[int]:
        return ranks_from_scores(self.noisy_scores(prompt, responses))

    def label_all(self, items: list[tuple[str, list[str]]]) -> list[dict]:
        return [{"ranks": self.rank(p, rs)} for p, rs in items]


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

    def label_all(self, items: list[tuple[str, list[str]]]) -> list[dict]:
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
        rows = load(DatasetConfig(path=str(rankings), kind="rankings", format="ranked", keep_degenerate=True)).rows
        return [{"ranks": r["ranks"]} for r in rows]


class CachedLabeler:
    """Asks `inner` only about (prompt, responses) it has not labelled before; appends to `path`
    (kept in memory only when `path` is None). `asked` counts the last call's fresh questions.
    A labeler that fails part-way caches nothing of that call."""

    def __init__(self, inner: Labeler, path: str | Path | None) -> None:
        self.inner, self.path = inner, Path(path) if path else None
        self.identity = inner.identity
        self.asked = 0
        exists = self.path is not None and self.path.exists()
        # rows from before labels carried more than ranks: {"key", "ranks"}
        self.cache = (
            {r["key"]: r.get("label") or {"ranks": r["ranks"]} for r in read_jsonl(self.path)} if exists else {}
        )

    def key(self, prompt: str, responses: list[str], kind: str = "rank") -> str:
        head = [self.identity] if kind == "rank" else [self.identity, kind]
        return hashlib.sha256(json.dumps([*head, prompt, responses]).encode()).hexdigest()

    def _fresh(self, keys: list[str]) -> list[int]:
        """Indices of the keys not cached yet, first occurrences only, in order (the export order)."""
        first = {}
        for i, k in enumerate(keys):
            if k not in self.cache:
                first.setdefault(k, i)
        return list(first.values())

    def _remember(self, keys: list[str], labels: list[dict]) -> None:
        for k, label in zip(keys, labels):
            self.cache[k] = label
        if self.path is not None and keys:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                for k, label in zip(keys, labels):
                    f.write(json.dumps({"key": k, "label": label}) + "\n")

    @property
    def frozen(self) -> list:
        """The local judge's model, if any (what PPO's `offload_frozen` moves)."""
        model = getattr(getattr(self.inner, "judge", None), "model", None)
        return [model] if isinstance(model, torch.nn.Module) else []

    def label_all(self, items: list[tuple[str, list[str]]]) -> list[dict]:
        keys = [self.key(p, rs) for p, rs in items]
        todo = self._fresh(keys)
        self._remember([keys[i] for i in todo], self.inner.label_all([items[i] for i in todo]))
        self.asked = len(todo)
        return [self.cache[k] for k in keys]

    def rank_all(self, items: list[tuple[str, list[str]]]) -> list[list[int]]:
        return [label["ranks"] for label in self.label_all(items)]

    def score_all(self, prompts: list[str], responses: list[str]) -> list[float]:
        """d-RLAIF scores (the AI labeler only), cached by content like labels."""
        if not isinstance(self.inner, AiLabeler):
            raise ValueError(f"labeler.kind: direct scoring needs the AI labeler (labeler=ai), not {self.identity}")
        keys = [self.key(p, [r], "score") for p, r in zip(prompts, responses)]
        todo = self._fresh(keys)
        fresh = self.inner.score_all([prompts[i] for i in todo], [responses[i] for i in todo])
        self._remember([keys[i] for i in todo], [{"score": s} for s in fresh])
        self.asked = len(todo)
        return [self.cache[k]["score"] for k in keys]


def make_labeler(
    cfg: LabelerConfig,
    target_len: int,
    judge_dir: Path | None = None,
    gold: str | None = "embedded",
    device=None,
    precision: str = "fp32",
) -> CachedLabeler:
    """`judge_dir`: the `judge` stage's artifact, whose model the AI labeler uses unless
    `labeler.ai.model` names another (loaded on `device`, computing in `precision`). `gold`: the data's
    gold rule, which the simulated labeler needs."""
    inner: Labeler
    if cfg.kind == "simulated":
        if gold is None:
            raise ValueError(
                "labeler.kind: the simulated labeler scores with the embedded task's gold rule, and this data has "
                "none; give data.comparisons, or use labeler=ai or labeler=file"
            )
        inner = SimulatedLabeler(cfg, target_len, gold)
    elif cfg.kind == "file":
        inner = FileLabeler(cfg)
    else:
        inner = AiLabeler(cfg.ai, load_judge(cfg.ai, judge_dir, device, precision))
    return CachedLabeler(inner, cfg.cache_file)
