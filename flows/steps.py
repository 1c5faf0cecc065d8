"""The stage calls the branches share. Each call is word-identical in every branch, so its cache key
is the same wherever it runs: `pipeline=dpo` after `pipeline=rlhf` reuses prepare, sft and
comparisons."""

from __future__ import annotations

from pathlib import Path

from flows.config import Config
from stages.manifest import Manifest


def prepare(run, cfg: Config) -> Manifest:
    return run("prepare", cfg.data, cfg.model, files=config_files(cfg))


def sft(run, cfg: Config, prep: Manifest) -> Manifest:
    return run(
        "sft",
        cfg.stage.sft,
        cfg.peft,
        base=prep.file("base"),
        demonstrations=prep.file("demonstrations"),
    )


def judge(run, cfg: Config) -> Manifest:
    """The AI labeler's model: the embedded judge trained here, or a record of `labeler.ai`'s model."""
    return run("judge", cfg.stage.judge, cfg.labeler, target_len=cfg.data.target_len)


def comparisons(
    run, cfg: Config, policy: Manifest, prep: Manifest, *, judge: Manifest | None = None, name: str = "comparisons"
) -> Manifest:
    """K responses per prompt from `policy`, ranked by `cfg.labeler` (or a dataset's comparisons)."""
    from_file = (
        {"dataset": prep.file("dataset_comparisons"), "dataset_heldout": prep.file("dataset_heldout_comparisons")}
        if cfg.data.comparisons is not None
        else {}  # sampled from the policy and ranked by the labeler
    )
    with_judge = {"judge": Path(judge.path)} if judge is not None else {}
    return run(
        "comparisons",
        cfg.stage.comparisons,
        cfg.labeler,
        files=rankings_file(cfg),
        name=name,
        policy=policy.file("policy"),
        prompts=prep.file("comparison_prompts"),
        heldout_prompts=prep.file("heldout_comparison_prompts"),
        target_len=cfg.data.target_len,
        **from_file,
        **with_judge,
    )


def reward_model(run, cfg: Config, sft: Manifest, cmp: Manifest) -> Manifest:
    return run(
        "reward_model",
        cfg.stage.reward_model,
        policy=sft.file("policy"),
        comparisons=cmp.file("comparisons"),
        heldout=cmp.file("heldout_comparisons"),
    )


def ppo(run, cfg: Config, sft: Manifest, prep: Manifest, *, rm: Manifest | None = None, judge: Manifest | None = None):
    """PPO against the reward model `rm` (InstructGPT), or, d-RLAIF, scored by the AI labeler over `judge`."""
    labeler = () if rm is not None else (cfg.labeler,)
    scorer = (
        {"reward_model": rm.file("model"), "normalization": rm.file("normalization")}
        if rm is not None
        else {"judge": Path(judge.path)}
    )
    return run(
        "ppo",
        cfg.stage.ppo,
        cfg.peft,
        *labeler,
        policy=sft.file("policy"),
        **scorer,
        prompts=prep.file("ppo_prompts"),
        pretrain=prep.file("pretrain"),
        gold_target_len=cfg.data.target_len,
        checkpointed=True,
    )


def dpo(run, cfg: Config, policy: Manifest, sft: Manifest, cmp: Manifest, *, name: str = "dpo") -> Manifest:
    """DPO from `policy` on `cmp`, the SFT policy as the reference."""
    return run(
        "dpo",
        cfg.stage.dpo,
        cfg.peft,
        name=name,
        policy=policy.file("policy"),
        reference=sft.file("policy"),
        comparisons=cmp.file("comparisons"),
        heldout=cmp.file("heldout_comparisons"),
    )


def evaluate(
    run, cfg: Config, sft: Manifest, policy: Manifest, prep: Manifest, *, rm: Manifest | None, cmp: Manifest | None
) -> Manifest:
    """Aligned policy against SFT; the reward model's accuracy and the labelers' agreement where they exist."""
    scored = {"reward_model": rm.file("model"), "normalization": rm.file("normalization")} if rm else {}
    held = {"heldout_comparisons": cmp.file("heldout_comparisons")} if cmp else {}
    return run(
        "evaluate",
        cfg.stage.evaluate,
        sft_policy=sft.file("policy"),
        policy=policy.file("policy"),
        prompts=prep.file("eval_prompts"),
        target_len=cfg.data.target_len,
        **scored,
        **held,
    )


def config_files(cfg: Config) -> dict[str, Path]:
    """Local files and folders the config names (datasets, a model folder): their content keys prepare,
    so new data in the same file reruns prepare and what reads its changed outputs."""
    named = {
        "data.demonstrations": cfg.data.demonstrations.path if cfg.data.demonstrations else None,
        "data.comparisons": cfg.data.comparisons.path if cfg.data.comparisons else None,
        "model.name_or_path": cfg.model.name_or_path,
    }
    return {k: Path(v) for k, v in named.items() if v is not None and Path(v).exists()}


def rankings_file(cfg: Config) -> dict[str, Path]:
    """Human rankings live outside the artifacts: their content joins the comparisons' key."""
    path = cfg.labeler.rankings_file
    if cfg.labeler.kind != "file" or not path or not Path(path).exists():
        return {}
    return {"labeler.rankings_file": Path(path)}
