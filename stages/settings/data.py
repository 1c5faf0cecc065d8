"""What a run reads: the embedded task's sizes (`data.*`) and the dataset files a user names (`DatasetConfig`).

Configs are data: this module imports no torch, so composing and checking a config stays fast."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from stages.runtime.rules import (
    COUNT,
    OPEN_UNIT,
    UNCONSTRAINED,
    UNIT,
    Rule,
    between,
    check_fields,
)

KINDS = ("demonstrations", "preferences", "rankings", "prompts", "unary", "text")


FORMATS = (
    "auto",
    "alpaca",
    "sharegpt",
    "messages",
    "prompt_completion",
    "chosen_rejected",
    "hh",
    "sharegpt_pairs",
    "ranked",
    "prompt",
    "text",
)


@dataclass(frozen=True)
class DatasetConfig:
    """One dataset, as named in `conf/data/*.yaml`."""

    path: str = ""
    kind: str = "demonstrations"
    format: str = "auto"
    split: str = "train"  # for hub ids
    columns: dict[str, str] = field(default_factory=dict)  # internal name -> column name in the file
    on_error: str = "raise"
    max_bad_fraction: float = 0.1
    # rows that carry no training signal (chosen equal to rejected, a ranking whose responses all tie
    # or with an empty response) are bad rows unless kept: the file labeler keeps them, since a
    # sampled response may be empty and a ranker may tie them all
    keep_degenerate: bool = False

    RULES: ClassVar[dict[str, Rule]] = {
        "max_bad_fraction": UNIT,
    }  # fmt: skip

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"data.kind: {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.format not in FORMATS:
            raise ValueError(f"data.format: {self.format!r} is not one of {', '.join(FORMATS)}")
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"data.on_error: {self.on_error!r} is not 'raise' or 'skip'")


# the embedded tasks (`data.task`) by the name of their gold rule; an exact-match rule scores 0 or 1,
# so its mean is an accuracy (evaluation reports it with a Wilson interval)
EMBEDDED_GOLD = {"words": "embedded", "arithmetic": "arithmetic", "vision": "vision", "calculator": "calculator"}


EXACT_MATCH = ("arithmetic", "vision", "calculator")


@dataclass(frozen=True)
class DataConfig:
    seed: int = 0
    task: str = "words"  # the embedded task: words (hidden gold rule), arithmetic or calculator (exact match), vision
    target_len: int = 6  # the gold rule's preferred response length, in words
    n_demonstrations: int = 3000
    n_comparison_prompts: int = 600  # the embedded task sets 3,000: its RM needs about that many to near the ceiling
    n_heldout_comparison_prompts: int = 200
    n_ppo_prompts: int = 2048
    n_eval_prompts: int = 400
    demonstrations: DatasetConfig | None = None  # a real dataset instead of the embedded task's
    # ranked or pairwise comparisons for the reward model instead of sampling and labelling them
    comparisons: DatasetConfig | None = None
    prompts: DatasetConfig | None = None  # PPO's prompts (kind: prompts); default: from the data above
    eval_prompts: DatasetConfig | None = None  # evaluation's prompts; default: the data's held-out split
    # raw text (kind: text; plain text, JSONL or Parquet) for stage.pretrain before SFT; null: no pretrain stage
    pretrain: DatasetConfig | None = None
    heldout_fraction: float = 0.1  # of the comparisons (else demonstrations), held out for evaluation
    eval_rm_fraction: float = 0.5  # of the rest of the comparisons: the evaluation reward model's split; 0: none
    truncation: bool = True  # cut long rows (prompt keeps its end); false: rows that do not fit are dropped
    # more rows dropped than this stops the run, naming the key to raise; fewer are reported loudly. From
    # `make bench-lengths`: default limits drop at most 1.0% of a shared dataset's rows at a 256-token
    # context (ShareGPT pairs, a 512-piece SentencePiece tokenizer), 4.7% at 128 tokens
    max_dropped_fraction: float = 0.05

    RULES: ClassVar[dict[str, Rule]] = {
        "seed": UNCONSTRAINED, "target_len": COUNT, "n_demonstrations": COUNT, "n_comparison_prompts": COUNT,
        "n_heldout_comparison_prompts": COUNT, "n_ppo_prompts": COUNT, "n_eval_prompts": COUNT,
        "heldout_fraction": OPEN_UNIT, "eval_rm_fraction": between(0, 1, high_open=True),
        "max_dropped_fraction": UNIT,
    }  # fmt: skip

    def __post_init__(self) -> None:
        check_fields(self, "data.")
        if self.task not in EMBEDDED_GOLD:
            raise ValueError(f"data.task: {self.task!r} is not one of {', '.join(EMBEDDED_GOLD)}")
        if self.comparisons is not None and self.comparisons.kind not in ("preferences", "rankings", "unary"):
            raise ValueError(
                f"data.comparisons.kind: {self.comparisons.kind!r} is not 'preferences', 'rankings' or 'unary' "
                "(thumbs-up/down labels, for KTO)"
            )
        if self.pretrain is not None and self.pretrain.kind != "text":
            raise ValueError(f"data.pretrain.kind: {self.pretrain.kind!r} must be 'text' (raw documents)")
        for key in ("prompts", "eval_prompts"):
            ds = getattr(self, key)
            if ds is not None and ds.kind != "prompts":
                raise ValueError(f"data.{key}.kind: {ds.kind!r} must be 'prompts'")

    @property
    def is_embedded(self) -> bool:
        """No data file is configured: the run is the embedded task's."""
        return all(getattr(self, k) is None for k in ("demonstrations", "comparisons", "prompts", "eval_prompts"))

    @property
    def gold(self) -> str | None:
        """The gold rule that scores the data: the embedded task's, none for your own data."""
        return EMBEDDED_GOLD[self.task] if self.is_embedded else None
