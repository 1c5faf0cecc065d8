"""Where a run's data comes from, behind one interface: the embedded task, or the user's own files.

`assemble(cfg)` returns every row set the pipeline needs (demonstrations, comparisons and their
splits, the prompt sets, pretraining text) and says where each prompt set came from. It reads files
and generates rows but loads no model, so the flow's preflight can check lengths on it before any
compute.

- **embedded** (no data file configured): the synthetic task of `stages/data/task.py`, the only module
  that names it, with its hidden gold rule (`gold_scorer("embedded")`); or, `data.task=arithmetic`,
  the verifiable task of `stages/data/arithmetic.py`, scored by exact match (`gold_scorer("arithmetic")`);
  or, `data.task=vision`, the visual task of `stages/data/shapes.py` (images drawn here, the colour
  of the shape read back from the pixels as the gold rule, `gold_scorer("vision")`); or, `data.task=calculator`,
  the tool task of `stages/data/calculator.py` (two-digit sums, a calculator to call, exact match).
- **files** (`data.demonstrations`, `data.comparisons`, `data.prompts`, `data.eval_prompts`, any of
  them): rows through the data worker (`stages/data/reader.py`). Nothing comes from the synthetic
  generator and there is no gold rule. Without a prompt file the prompts come from the user's data:
  PPO's from the reward model's training split, evaluation's from the held-out split (of the
  comparisons, else of the demonstrations). Without demonstrations, SFT imitates the best-ranked
  response of each training comparison (HH-RLHF's chosen transcripts). A share of the comparisons
  (`data.eval_rm_fraction`) is kept for an independent evaluation reward model that the policy's
  reward model never sees (Gao et al. 2022's gold-RM protocol).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stages.data import arithmetic, calculator, shapes, task
from stages.data.reader import DataError, as_ranking_rows, load, normalise_record
from stages.data.tool_calls import split_conversation, tagged_segments
from stages.settings.data import EMBEDDED_GOLD, DatasetConfig

PROMPT_SETS = ("comparison_prompts", "heldout_comparison_prompts", "ppo_prompts", "eval_prompts")


@dataclass
class Sourced:
    demonstrations: list[dict[str, Any]]  # {"messages": [...], "source": "file:line"}
    prompt_sets: dict[str, list[Any]]  # name -> prompts (a string or a conversation)
    prompt_source: dict[str, str]  # name -> where those prompts came from, in words
    pretrain: list[str]  # plain text: the tiny base's pretraining and PPO-ptx's mix
    comparisons: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # split -> ranking rows
    gold: str | None = None  # the gold rule that scores this data, if any
    captions: list[dict[str, str]] = field(default_factory=list)  # {"image", "text"}: a VLM base's pretraining
    metrics: dict[str, float] = field(default_factory=dict)


def gold_scorer(name: str | None, target_len: int = 6) -> Callable[[Any, str], float] | None:
    """The gold rule a data source brings: `gold(prompt, response) -> float`; None for real data."""
    if name is None:
        return None
    if name == "arithmetic":
        return lambda prompt, response: arithmetic.exact_match(prompt, response)
    if name == "vision":
        return lambda prompt, response: shapes.exact_match(prompt, response)
    if name == "calculator":
        return lambda prompt, response: calculator.exact_match(prompt, response)
    if name != "embedded":
        raise ValueError(f"gold: {name!r} is not a known gold rule ({', '.join(EMBEDDED_GOLD.values())})")
    return lambda prompt, response: task.gold_score(prompt, response, target_len=target_len)


def _sizes(cfg) -> dict[str, int]:
    return dict(
        zip(
            PROMPT_SETS,
            (cfg.n_comparison_prompts, cfg.n_heldout_comparison_prompts, cfg.n_ppo_prompts, cfg.n_eval_prompts),
        )
    )


def embedded(cfg, pretrain_documents: int) -> Sourced:
    """The synthetic task, generated from `cfg.seed` (cfg: `stages.prepare.DataConfig`)."""
    if cfg.task == "arithmetic":
        return embedded_arithmetic(cfg, pretrain_documents)
    if cfg.task == "vision":
        return embedded_vision(cfg, pretrain_documents)
    if cfg.task == "calculator":
        return embedded_calculator(cfg, pretrain_documents)
    demos = task.make_demonstrations(cfg.n_demonstrations, cfg.seed, target_len=cfg.target_len)
    rows = [
        {"messages": [{"role": "user", "content": d.prompt}, {"role": "assistant", "content": d.response}]}
        for d in demos
    ]
    gold = [task.gold_score(d.prompt, d.response, target_len=cfg.target_len) for d in demos]
    sizes = _sizes(cfg)
    sets = {name: task.make_prompts(n, cfg.seed * 1000 + i + 1) for i, (name, n) in enumerate(sizes.items())}
    web = task.make_demonstrations(pretrain_documents, cfg.seed + 7919, target_len=cfg.target_len)
    return Sourced(
        demonstrations=rows,
        prompt_sets=sets,
        prompt_source=dict.fromkeys(sets, "embedded task generator"),
        pretrain=[f"{d.prompt} {d.response}" for d in web],
        gold="embedded",
        metrics={"prepare/demonstrations/gold_mean": sum(gold) / len(gold)},
    )


def embedded_arithmetic(cfg, pretrain_documents: int) -> Sourced:
    """The verifiable task: every training set from the training combinations, evaluation's from the
    held-out ones (`stages/data/arithmetic.py`)."""
    train, held = arithmetic.split(cfg.seed)
    demos = arithmetic.make_demonstrations(cfg.n_demonstrations, cfg.seed, train)
    rows = [
        {"messages": [{"role": "user", "content": d.prompt}, {"role": "assistant", "content": d.response}]}
        for d in demos
    ]
    sets, source = _held_out_sets(cfg, train, held, "arithmetic")
    web = arithmetic.make_demonstrations(pretrain_documents, cfg.seed + 7919, train)
    return Sourced(
        demonstrations=rows,
        prompt_sets=sets,
        prompt_source=source,
        pretrain=[f"{d.prompt} {d.response}" for d in web],
        gold="arithmetic",
        metrics={"prepare/demonstrations/accuracy": sum(d.correct for d in demos) / max(1, len(demos))},
    )


def _held_out_sets(cfg, train: list[str], held: list[str], task: str) -> tuple[dict, dict]:
    """(prompt sets, where each came from) of a task split into combinations: every training set drawn
    from `train`, evaluation's from `held`."""
    sets = {
        name: arithmetic.make_prompts(n, cfg.seed * 1000 + i + 1, held if name == "eval_prompts" else train)
        for i, (name, n) in enumerate(_sizes(cfg).items())
    }
    source = dict.fromkeys(sets, f"embedded {task} task, training combinations")
    source["eval_prompts"] = f"embedded {task} task, held-out combinations"
    return sets, source


def embedded_calculator(cfg, pretrain_documents: int) -> Sourced:
    """The tool task (`stages/data/calculator.py`): OpenAI-style tool-use conversations, read through the
    data worker's normalisation as a user's file is; prompts as the arithmetic task's."""
    train, held = calculator.split(cfg.seed)
    demos = calculator.make_demonstrations(cfg.n_demonstrations, cfg.seed, train)
    rows = [normalise_record({"messages": d.messages, "tools": [calculator.SCHEMA]}, "messages", "demonstrations")
            for d in demos]  # fmt: skip
    sets, source = _held_out_sets(cfg, train, held, "calculator")
    web = calculator.make_demonstrations(pretrain_documents, cfg.seed + 7919, train)
    web_rows = [normalise_record({"messages": d.messages}, "messages", "demonstrations") for d in web]
    return Sourced(
        demonstrations=rows,
        prompt_sets=sets,
        prompt_source=source,
        pretrain=[_plain_text(r["messages"]) for r in web_rows],
        gold="calculator",
        metrics={
            "prepare/demonstrations/accuracy": sum(d.correct for d in demos) / max(1, len(demos)),
            "prepare/demonstrations/tool_share": sum(d.uses_tool for d in demos) / max(1, len(demos)),
        },
    )


def _plain_text(messages: list[dict]) -> str:
    """A conversation as unformatted text, its tool use in the tagged form (pretraining's documents)."""
    context, rest = split_conversation(messages)
    return " ".join(m["content"] for m in context) + " " + "".join(text for text, _ in tagged_segments(rest))


def embedded_vision(cfg, pretrain_documents: int) -> Sourced:
    """The visual task: every prompt a fresh picture, each set from its own seed (`stages/data/shapes.py`)."""
    demos = shapes.make_demonstrations(cfg.n_demonstrations, cfg.seed)
    rows = [{"messages": [*d.prompt, {"role": "assistant", "content": d.response}]} for d in demos]
    sets = {name: shapes.make_prompts(n, cfg.seed * 1000 + i + 1) for i, (name, n) in enumerate(_sizes(cfg).items())}
    right = sum(shapes.final_colour(d.response) == d.colour for d in demos)
    captions = shapes.captions(pretrain_documents, cfg.seed + 7919)
    return Sourced(
        demonstrations=rows,
        prompt_sets=sets,
        prompt_source=dict.fromkeys(sets, "embedded visual task (pictures drawn from the seed)"),
        pretrain=[d["text"] for d in captions],  # PPO-ptx's text mix
        captions=captions,
        gold="vision",
        metrics={"prepare/demonstrations/accuracy": right / max(1, len(demos))},
    )


def vocabulary_hint(gold: str = "embedded") -> list[str]:
    """Every word of an embedded task, so its word-level tokenizer has no unknown words."""
    known = {"arithmetic": arithmetic.vocabulary, "vision": shapes.vocabulary, "calculator": calculator.vocabulary}
    return known.get(gold, task.vocabulary)()


def _loaded(ds: DatasetConfig, kind: str) -> tuple[list[dict[str, Any]], int]:
    got = load(ds)
    if ds.kind != kind and not (kind == "comparisons" and ds.kind in ("preferences", "rankings", "unary")):
        raise DataError([f"{ds.path}:0: kind: {ds.kind!r} cannot serve as {kind}"])
    return [{**r, "source": f"{ds.path}:{line}"} for r, line in zip(got.rows, got.lines)], got.bad


def _split(rows: list, fraction: float, seed: int, what: str) -> tuple[list, list]:
    """(held out, rest), shuffled by `seed`; at least one row on each side."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(fraction * len(rows)))
    if n_held >= len(rows):
        raise ValueError(f"{what}: {len(rows)} rows leave nothing to train on once {n_held} are held out")
    return [rows[i] for i in order[:n_held]], [rows[i] for i in order[n_held:]]


def _demo(prompt: Any, response: str, source: str) -> dict[str, Any]:
    turns = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    return {"messages": [*turns, {"role": "assistant", "content": response}], "source": source}


def _unique(prompts: list[Any]) -> list[Any]:
    seen, out = set(), []
    for p in prompts:
        key = repr(p)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def _split_prompts(path: str, train: list[Any], held: list[Any], train_split: str) -> tuple[dict, dict]:
    """(prompt sets, their sources): comparison and PPO prompts from the training split, held-out
    comparison and evaluation prompts from the held-out one."""
    train, held = _unique(train), _unique(held)
    sets = {"comparison_prompts": train, "heldout_comparison_prompts": held, "ppo_prompts": train, "eval_prompts": held}
    where = {"comparison_prompts": train_split, "ppo_prompts": train_split}
    return sets, {name: f"{path}: {where.get(name, 'held-out split')}" for name in sets}


def files(cfg) -> Sourced:
    """The user's data (cfg: `stages.prepare.DataConfig` with at least one file set)."""
    metrics: dict[str, float] = {}
    comparisons: dict[str, list[dict[str, Any]]] = {}
    sets: dict[str, list[Any]] = {}
    source: dict[str, str] = {}
    demos: list[dict[str, Any]] = []
    if cfg.comparisons is not None:
        rows, bad = _loaded(cfg.comparisons, "comparisons")
        ranked = as_ranking_rows(rows, cfg.comparisons.kind)
        metrics["prepare/comparisons/bad_rows"] = float(bad)
        held, rest = _split(ranked, cfg.heldout_fraction, cfg.seed, str(cfg.comparisons.path))
        eval_rm: list[dict[str, Any]] = []
        if cfg.eval_rm_fraction > 0 and cfg.comparisons.kind != "unary":  # thumbs rank nothing to train on
            eval_rm, rest = _split(rest, cfg.eval_rm_fraction, cfg.seed + 1, str(cfg.comparisons.path))
        comparisons = {"dataset_comparisons": rest, "dataset_heldout_comparisons": held}
        if eval_rm:
            comparisons["dataset_eval_rm_comparisons"] = eval_rm
        sets, source = _split_prompts(
            cfg.comparisons.path,
            [r["prompt"] for r in rest],
            [r["prompt"] for r in held],
            "reward-model training split",
        )
        best = [_demo(r["prompt"], r["responses"][r["ranks"].index(min(r["ranks"]))], r["source"]) for r in rest]
    if cfg.demonstrations is not None:
        demos, bad = _loaded(cfg.demonstrations, "demonstrations")
        metrics["prepare/data/bad_rows"] = float(bad)
        if cfg.comparisons is None:  # the prompts come from held-out demonstrations
            held_demos, demos = _split(demos, cfg.heldout_fraction, cfg.seed, str(cfg.demonstrations.path))
            sets, source = _split_prompts(
                cfg.demonstrations.path,
                [d["messages"][:-1] for d in demos],
                [d["messages"][:-1] for d in held_demos],
                "SFT training split",
            )
    elif cfg.comparisons is not None:
        demos = best
        metrics["prepare/demonstrations/from_comparisons"] = 1.0
    else:
        raise ValueError("data: own data needs data.demonstrations or data.comparisons (SFT has nothing to imitate)")
    for key, name in (("prompts", "ppo_prompts"), ("eval_prompts", "eval_prompts")):
        ds = getattr(cfg, key)
        if ds is not None:
            rows, _ = _loaded(ds, "prompts")
            sets[name] = [r["prompt"] for r in rows]
            source[name] = f"{ds.path} (data.{key})"
    limits = _sizes(cfg)
    sets = {name: sets[name][: limits[name]] for name in PROMPT_SETS}
    pretrain = [" ".join(m["content"] for m in d["messages"]) for d in demos]
    return Sourced(
        demonstrations=demos,
        prompt_sets=sets,
        prompt_source=source,
        pretrain=pretrain,
        comparisons=comparisons,
        metrics=metrics,
    )


def assemble(cfg, pretrain_documents: int = 0) -> Sourced:
    """Every row set of a run (cfg: `stages.prepare.DataConfig`)."""
    return embedded(cfg, pretrain_documents) if cfg.is_embedded else files(cfg)
