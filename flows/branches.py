"""The branches of the recipe, one small flow body each, read top to bottom as its DAG.

- `rlhf` (Ouyang et al. 2022): sft -> comparisons -> reward_model -> ppo -> evaluate
- `dpo` (Rafailov et al. 2023): sft -> comparisons -> dpo [-> comparisons -> dpo per further round] -> evaluate
- `rlaif` (Lee et al. 2023): sft -> judge -> comparisons (AI-labelled) -> reward_model (soft labels) -> ppo -> evaluate
- `rlaif_direct` (d-RLAIF): sft -> judge -> ppo (scored by the judge) -> evaluate
- `grpo` (Shao et al. 2024), `rloo` (Ahmadian et al. 2024): rlhf's DAG, the ppo stage with a critic-free
  estimator (`stage.ppo.advantage`, n samples per prompt, no value model); the other stages are rlhf's, cached
- `rlvr` (verifiable rewards, Tülu 3 / DeepSeek-R1): sft -> ppo (GRPO scored by `stage.ppo.reward_function`)
  -> evaluate; `rlvr_tools`: the same DAG, its rollouts calling tools (`stage.ppo.tools`, the calculator task)
- `best_of_n` (rejection sampling, Llama 2; RAFT): sft -> comparisons -> reward_model -> [best_of_n -> sft on the
  kept best] per round -> evaluate; prepare, sft, comparisons and reward_model are rlhf's, cached

`run` is the flow's stage runner (`flows.align.Pipeline`); the calls live in `flows/steps.py`, so a
stage two branches share has one cache key.
"""

from __future__ import annotations

from flows import steps
from flows.config import Config
from stages.runtime.manifest import Manifest


def rlhf(run, cfg: Config) -> Manifest:
    prep = steps.prepare(run, cfg)
    sft = steps.sft(run, cfg, prep)
    cmp = steps.comparisons(run, cfg, sft, prep)
    rm = steps.reward_model(run, cfg, sft, cmp)
    ppo = steps.ppo(run, cfg, sft, prep, rm=rm)
    return steps.evaluate(run, cfg, sft, ppo, prep, rm=rm, cmp=cmp)


def dpo(run, cfg: Config) -> Manifest:
    prep = steps.prepare(run, cfg)
    sft = steps.sft(run, cfg, prep)
    cmp = steps.comparisons(run, cfg, sft, prep)
    policy = steps.dpo(run, cfg, sft, sft, cmp)
    for round_ in range(2, cfg.pipeline.rounds + 1):  # iterative DPO: sample and label from the current policy
        fresh = steps.comparisons(run, cfg, policy, prep, name=f"comparisons_r{round_}")
        policy = steps.dpo(run, cfg, policy, sft, fresh, name=f"dpo_r{round_}")
    return steps.evaluate(run, cfg, sft, policy, prep, rm=None, cmp=cmp)


def rlaif(run, cfg: Config) -> Manifest:
    prep = steps.prepare(run, cfg)
    sft = steps.sft(run, cfg, prep)
    judge = steps.judge(run, cfg)
    cmp = steps.comparisons(run, cfg, sft, prep, judge=judge)
    rm = steps.reward_model(run, cfg, sft, cmp)
    ppo = steps.ppo(run, cfg, sft, prep, rm=rm)
    return steps.evaluate(run, cfg, sft, ppo, prep, rm=rm, cmp=cmp, judge=judge)


def rlaif_direct(run, cfg: Config) -> Manifest:
    prep = steps.prepare(run, cfg)
    sft = steps.sft(run, cfg, prep)
    judge = steps.judge(run, cfg)
    ppo = steps.ppo(run, cfg, sft, prep, judge=judge)
    return steps.evaluate(run, cfg, sft, ppo, prep, rm=None, cmp=None, judge=judge)


def grpo(run, cfg: Config) -> Manifest:
    return rlhf(run, cfg)  # the estimator is the ppo stage's config (conf/pipeline/grpo.yaml)


def rloo(run, cfg: Config) -> Manifest:
    return rlhf(run, cfg)  # the estimator is the ppo stage's config (conf/pipeline/rloo.yaml)


def dapo(run, cfg: Config) -> Manifest:
    return rlhf(run, cfg)  # DAPO's keys are the ppo stage's config (conf/pipeline/dapo.yaml)


def gspo(run, cfg: Config) -> Manifest:
    return rlhf(run, cfg)  # GSPO's keys are the ppo stage's config (conf/pipeline/gspo.yaml)


def rlvr(run, cfg: Config) -> Manifest:
    prep = steps.prepare(run, cfg)
    sft = steps.sft(run, cfg, prep)
    ppo = steps.ppo(run, cfg, sft, prep)  # scored by the reward function alone
    return steps.evaluate(run, cfg, sft, ppo, prep, rm=None, cmp=None)


def rlvr_tools(run, cfg: Config) -> Manifest:
    return rlvr(run, cfg)  # the tools are the ppo stage's config (conf/pipeline/rlvr_tools.yaml)


def best_of_n(run, cfg: Config) -> Manifest:
    prep = steps.prepare(run, cfg)
    sft = steps.sft(run, cfg, prep)
    cmp = steps.comparisons(run, cfg, sft, prep)
    rm = steps.reward_model(run, cfg, sft, cmp)
    policy = sft
    for round_ in range(1, cfg.stage.best_of_n.rounds + 1):  # sample n, keep the RM's best, fine-tune on it
        suffix = "" if round_ == 1 else f"_r{round_}"
        best = steps.best_of_n(run, cfg, policy, prep, rm, round_=round_, name=f"best_of_n{suffix}")
        policy = steps.sft_on(run, cfg, policy, best, name=f"best_of_n_sft{suffix}")
    return steps.evaluate(run, cfg, sft, policy, prep, rm=rm, cmp=cmp)


BRANCHES = {
    "rlhf": rlhf,
    "dpo": dpo,
    "rlaif": rlaif,
    "rlaif_direct": rlaif_direct,
    "grpo": grpo,
    "rloo": rloo,
    "dapo": dapo,
    "gspo": gspo,
    "rlvr": rlvr,
    "rlvr_tools": rlvr_tools,
    "best_of_n": best_of_n,
}
