"""What a run checks before any compute: the model folders (weights headers, architecture, tokenizer),
the judge server (one probe request), every stage's token limits
against the model's context window, and (with a model to tokenize with) every row of the user's
data against those limits. Each failure names the folder, file and line, or config key.

Reads configs, tokenizer files and data files only; loads no weights. The same functions that the
stages use (`stages/data/tokens.py`) decide what fits, so preflight and stages cannot disagree.
"""

from __future__ import annotations

from flows.config import PIPELINES, Config
from stages.data import sources
from stages.data.tokens import (
    ensure_chat_template,
    fit_prompts,
    fit_rows,
    resolve_budget,
    resolve_sampling,
    row_sources,
)
from stages.labeling.ai_labeler import HttpJudge
from stages.models import compute, peft_setup
from stages.models.folders import inspect_model
from stages.models.modeling import model_context
from stages.preference.rankings import encode_rankings
from stages.rl import rollout
from stages.sft import encode_demonstrations

TRAINING = ("sft", "reward_model", "dpo")  # stages with max_prompt_length / max_length
SAMPLING = {
    "comparisons": "comparison_prompts",
    "ppo": "ppo_prompts",
    "best_of_n": "ppo_prompts",
    "evaluate": "eval_prompts",
}


def context(cfg: Config) -> int:
    if cfg.model.name_or_path is None:
        return cfg.model.max_position_embeddings
    return model_context(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)


def preflight(cfg: Config) -> None:
    compute.check(cfg.compute)  # precision, attention, kernels this machine cannot run: before any model loads
    if cfg.distributed.mode != "single":
        compute.check_ranks(cfg.compute.device, cfg.distributed.nproc_per_node)
    peft_setup.check_quantization(cfg.peft, cfg.compute.precision)  # a quantised base this machine cannot build
    if "ppo" in PIPELINES[cfg.pipeline.name]:
        rollout.check(cfg.stage.ppo.generation)  # vLLM needs a GPU
    if cfg.labeler.kind == "ai" and cfg.labeler.ai.backend == "http":  # the key, then one request
        HttpJudge(cfg.labeler.ai).probe(scores=cfg.pipeline.name == "rlaif_direct")
    tokenizer = None
    if cfg.model.name_or_path is not None:
        remote = cfg.model.trust_remote_code
        tokenizer = inspect_model(cfg.model.name_or_path, key="model.name_or_path", trust_remote_code=remote)
        ensure_chat_template(tokenizer)  # as prepare will: the markers count in the prompt lengths
    if cfg.stage.reward_model.name_or_path is not None:
        inspect_model(cfg.stage.reward_model.name_or_path, key="stage.reward_model.name_or_path", role="reward")
    judge = cfg.labeler.ai
    if cfg.labeler.kind == "ai" and judge.backend == "local" and judge.model is not None:
        inspect_model(judge.model, key="labeler.ai.model", trust_remote_code=judge.trust_remote_code)
    ctx = context(cfg)
    stages = PIPELINES[cfg.pipeline.name]
    budgets = {
        name: resolve_budget(name, getattr(cfg.stage, name).max_prompt_length, getattr(cfg.stage, name).max_length, ctx)
        for name in TRAINING
        if name in stages
    }
    sampling = {
        name: resolve_sampling(
            name, getattr(cfg.stage, name).max_prompt_length, getattr(cfg.stage, name).max_new_tokens, ctx
        )
        for name in SAMPLING
        if name in stages
    }
    if cfg.data.is_embedded:
        return
    data = sources.assemble(cfg.data)  # every file read and every row validated: a bad one stops the run here
    if tokenizer is not None:
        check_lengths(cfg, data, tokenizer, budgets, sampling)


def check_lengths(cfg: Config, data: sources.Sourced, tokenizer, budgets: dict, sampling: dict) -> None:
    """Every row of the user's data against the limits of the stages that read it."""
    overflow = {"truncation": cfg.data.truncation, "max_dropped_fraction": cfg.data.max_dropped_fraction}
    if "sft" in budgets:
        rows = data.demonstrations
        fit_rows(
            encode_demonstrations(tokenizer, rows),
            budgets["sft"],
            stage="sft",
            sources=row_sources(rows, "-"),
            **overflow,
        )
    for name in ("reward_model", "dpo"):
        if name in budgets and "dataset_comparisons" in data.comparisons:
            rows = data.comparisons["dataset_comparisons"]
            fit_rows(
                encode_rankings(tokenizer, rows),
                budgets[name],
                stage=name,
                sources=row_sources(rows, "-"),
                **overflow,
            )
    for name, budget in sampling.items():
        prompts = data.prompt_sets[SAMPLING[name]]
        fit_prompts(
            tokenizer, prompts, budget, stage=name, sources=[_where(data, SAMPLING[name])] * len(prompts), **overflow
        )


def _where(data: sources.Sourced, prompt_set: str) -> str:
    return f"{prompt_set} ({data.prompt_source.get(prompt_set, '?')})"
