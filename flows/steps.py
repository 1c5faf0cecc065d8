"""The stage calls the branches share. Each call is word-identical in every branch, so its cache key
is the same wherever it runs: `pipeline=dpo` after `pipeline=rlhf` reuses prepare, sft and
comparisons."""

from __future__ import annotations

from pathlib import Path

from flows.config import Config
from flows.fingerprint import Fingerprints
from stages.rl import rewards
from stages.runtime.manifest import Manifest
from stages.settings.models import PeftConfig, Tuning


class QualityGate(ValueError):
    """A model whose held-out accuracy does not clear its bound: what follows would optimise noise."""


def check_accuracy(what: str, manifest: Manifest, accuracy: str, pairs: str, bound: float, key: str) -> None:
    """Stop the pipeline when the lower end of `manifest`'s held-out accuracy CI is below `bound`."""
    from stages.preference.validity import validity

    n = int(manifest.metrics.get(pairs, 0))
    if bound <= 0 or n == 0:  # the gate is off, or nothing measured it (an external judge)
        return
    v = validity(what, manifest.metrics[accuracy] * n, n, bound=bound, key=key)
    if not v["valid"]:
        raise QualityGate(
            f"{v['reason']}: what follows would optimise noise. "
            f"Give it more or cleaner comparisons, or set {key}=0 to go on anyway"
        )


def gold(cfg: Config) -> str | None:
    """The gold rule that scores the data: the embedded task's, none for your own data."""
    return cfg.data.gold


def lengths(cfg: Config) -> dict:
    """How every stage treats rows longer than its limits (`data.truncation`, `data.max_dropped_fraction`)."""
    return {"truncation": cfg.data.truncation, "max_dropped_fraction": cfg.data.max_dropped_fraction}


def prepare(run, cfg: Config) -> Manifest:
    files = config_files(cfg, run.fingerprints)
    return run("prepare", cfg.data, cfg.model, files=files, device=cfg.compute.device, precision=cfg.compute.precision)


def pretrain(run, cfg: Config, prep: Manifest) -> Manifest | None:
    """Continued pretraining of the base on `data.pretrain`'s raw text (keyed by the file's content),
    with SFT's method and optimizer; None when no text is given."""
    if cfg.data.pretrain is None:
        return None
    return run(
        "pretrain",
        cfg.stage.pretrain,
        cfg.tuning("sft"),
        serves="sft",
        base=prep.file("base"),
        text=Path(cfg.data.pretrain.path).resolve(),
    )


def sft(run, cfg: Config, prep: Manifest) -> Manifest:
    """SFT on the demonstrations, from the base (or the continued-pretraining stage's model first)."""
    pre = pretrain(run, cfg, prep)
    return run(
        "sft",
        cfg.stage.sft,
        cfg.tuning("sft"),
        base=pre.file("policy") if pre is not None else prep.file("base"),
        demonstrations=prep.file("demonstrations"),
        **lengths(cfg),
        checkpointed=True,
    )


def best_of_n(run, cfg: Config, policy: Manifest, prep: Manifest, rm: Manifest, *, round_: int, name: str):
    """n samples per prompt from `policy`, the reward model's best of each kept as demonstrations."""
    return run(
        "best_of_n",
        cfg.stage.best_of_n,
        name=name,
        policy=policy.file("policy"),
        prompts=prep.file("ppo_prompts"),
        reward_model=rm.file("model"),
        normalization=rm.file("normalization"),
        round=round_,
        gold=gold(cfg),
        target_len=cfg.data.target_len,
        device=cfg.compute.device,
        precision=cfg.compute.precision,
        **lengths(cfg),
    )


def sft_on(run, cfg: Config, policy: Manifest, best: Manifest, *, name: str) -> Manifest:
    """The SFT stage again, from `policy`, on best-of-n's kept responses (it belongs to the best_of_n row)."""
    return run(
        "sft",
        cfg.stage.sft,
        cfg.tuning("sft"),
        name=name,
        serves="best_of_n",
        base=policy.file("policy"),
        demonstrations=best.file("demonstrations"),
        **lengths(cfg),
        checkpointed=True,
    )


def judge(run, cfg: Config) -> Manifest:
    """The AI labeler's model: the embedded judge trained here, or a record of `labeler.ai`'s model.
    Stops the pipeline unless the embedded judge's held-out agreement with (simulated) human
    preferences clears `pipeline.min_labeler_accuracy`: its labels would train the reward model."""
    j = run("judge", cfg.stage.judge, cfg.labeler, cfg.compute, target_len=cfg.data.target_len)
    bound, key = cfg.pipeline.min_labeler_accuracy, "pipeline.min_labeler_accuracy"
    check_accuracy("AI labeler", j, "judge/agreement_human", "judge/agreement_human_pairs", bound, key)
    return j


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
        gold=gold(cfg),
        device=cfg.compute.device,
        precision=cfg.compute.precision,
        **lengths(cfg),
        **from_file,
        **with_judge,
    )


def reward_model(run, cfg: Config, sft: Manifest, cmp: Manifest) -> Manifest:
    """The reward model PPO optimises; stops the pipeline here unless its held-out accuracy clears
    `pipeline.min_rm_accuracy` (a judge at chance would have PPO optimise noise)."""
    rm = run(
        "reward_model",
        cfg.stage.reward_model,
        cfg.tuning("reward_model"),
        files=_local("stage.reward_model.name_or_path", cfg.stage.reward_model.name_or_path),
        policy=sft.file("policy"),
        comparisons=cmp.file("comparisons"),
        heldout=cmp.file("heldout_comparisons"),
        **lengths(cfg),
        checkpointed=True,
    )
    key = "pipeline.min_rm_accuracy"
    check_accuracy("reward model", rm, "rm/eval/accuracy", "rm/eval/pairs", cfg.pipeline.min_rm_accuracy, key)
    return rm


def eval_reward_model(run, cfg: Config, sft: Manifest, prep: Manifest) -> Manifest | None:
    """Without a gold rule: an independent reward model on the comparisons' evaluation split, which
    the policy's reward model never sees (Gao et al. 2022), to judge wins; None without that split."""
    if gold(cfg) is not None or "dataset_eval_rm_comparisons" not in prep.files:
        return None
    return run(
        "reward_model",
        cfg.stage.reward_model,
        Tuning(peft=PeftConfig(method="full"), compute=cfg.compute),  # full fine-tuning, on the run's device
        name="eval_reward_model",
        serves="evaluate",
        files=_local("stage.reward_model.name_or_path", cfg.stage.reward_model.name_or_path),
        policy=sft.file("policy"),
        comparisons=prep.file("dataset_eval_rm_comparisons"),
        heldout=prep.file("dataset_heldout_comparisons"),
        **lengths(cfg),
        checkpointed=True,
    )


def ppo(run, cfg: Config, sft: Manifest, prep: Manifest, *, rm: Manifest | None = None, judge: Manifest | None = None):
    """PPO against the reward model `rm` (InstructGPT), or, d-RLAIF, scored by the AI labeler over `judge`;
    `stage.ppo.reward_function` scores beside them, or alone (neither given: `pipeline=rlvr`)."""
    labeler = (cfg.labeler,) if judge is not None else ()
    scorer: dict = {}
    if rm is not None:
        scorer = {"reward_model": rm.file("model"), "normalization": rm.file("normalization")}
    elif judge is not None:
        scorer = {"judge": Path(judge.path)}
    files = _tool_files(cfg)  # an edited tool retrains
    if cfg.stage.ppo.reward_function and (source := rewards.source_file(cfg.stage.ppo.reward_function)):
        files["stage.ppo.reward_function"] = source  # an edited reward function retrains
    watched: dict = {}
    if cfg.stage.ppo.watch_every:  # the over-optimisation watch: held-out prompts, an independent judge
        watched["watch_prompts"] = prep.file("heldout_comparison_prompts")
        if (erm := eval_reward_model(run, cfg, sft, prep)) is not None:
            watched |= {"judge_reward_model": erm.file("model"), "judge_normalization": erm.file("normalization")}
    return run(
        "ppo",
        cfg.stage.ppo,
        cfg.tuning("ppo"),
        *labeler,
        policy=sft.file("policy"),
        **scorer,
        prompts=prep.file("ppo_prompts"),
        pretrain=prep.file("pretrain"),
        gold=gold(cfg),
        target_len=cfg.data.target_len,
        **lengths(cfg),
        **watched,
        files=files,
        checkpointed=True,
    )


def dpo(run, cfg: Config, policy: Manifest, sft: Manifest, cmp: Manifest, *, name: str = "dpo") -> Manifest:
    """DPO from `policy` on `cmp`, the SFT policy as the reference."""
    return run(
        "dpo",
        cfg.stage.dpo,
        cfg.tuning("dpo"),
        name=name,
        policy=policy.file("policy"),
        reference=sft.file("policy"),
        comparisons=cmp.file("comparisons"),
        heldout=cmp.file("heldout_comparisons"),
        **lengths(cfg),
        checkpointed=True,
    )


def evaluate(
    run,
    cfg: Config,
    sft: Manifest,
    policy: Manifest,
    prep: Manifest,
    *,
    rm: Manifest | None,
    cmp: Manifest | None,
    judge: Manifest | None = None,
) -> Manifest:
    """Aligned policy against SFT. Wins are judged by the gold rule's simulated labeler, else the AI
    labeler over `judge`, else an evaluation reward model; the proxy reward model's scores and
    accuracy and the labelers' agreement where they exist."""
    scored = {"reward_model": rm.file("model"), "normalization": rm.file("normalization")} if rm else {}
    if "budget" in policy.files:  # DPO's token limits: its held-out implicit-reward accuracy keeps them
        scored["policy_budget"] = policy.file("budget")
    held = {"heldout_comparisons": cmp.file("heldout_comparisons")} if cmp else {}
    judged: dict = {}
    labeler: tuple = ()
    if gold(cfg) is None and judge is not None:
        judged, labeler = {"judge": Path(judge.path)}, (cfg.labeler,)
    elif (erm := eval_reward_model(run, cfg, sft, prep)) is not None:
        judged = {"eval_reward_model": erm.file("model"), "eval_normalization": erm.file("normalization")}
    return run(
        "evaluate",
        cfg.stage.evaluate,
        *labeler,
        sft_policy=sft.file("policy"),
        policy=policy.file("policy"),
        prompts=prep.file("eval_prompts"),
        target_len=cfg.data.target_len,
        gold=gold(cfg),
        device=cfg.compute.device,
        precision=cfg.compute.precision,
        data_sources=prep.file("sources"),
        **lengths(cfg),
        **scored,
        **held,
        **judged,
        **_tools(cfg),
    )


def _tools(cfg: Config) -> dict:
    """Where the policy trained with tools (`stage.ppo.tools`), evaluation samples with them too."""
    if not cfg.stage.ppo.tools:
        return {}
    ppo = cfg.stage.ppo
    return {"tools": list(ppo.tools), "max_tool_calls": ppo.max_tool_calls, "files": _tool_files(cfg)}


def _tool_files(cfg: Config) -> dict[str, Path]:
    """Each tool's source file by its key (`stage.ppo.tools[i]`), for the cache keys of what runs it."""
    keys = {f"stage.ppo.tools[{i}]": spec for i, spec in enumerate(cfg.stage.ppo.tools)}
    return {k: f for k, spec in keys.items() if (f := rewards.source_file(spec, k)) is not None}


def config_files(cfg: Config, fingerprints: Fingerprints) -> dict[str, Path]:
    """Local files and folders the config names (datasets, the pictures their rows name, a model folder):
    their content keys prepare, so new data in the same file, or a replaced picture, reruns prepare and
    what reads its changed outputs."""
    datasets = {
        "data.demonstrations": cfg.data.demonstrations,
        "data.comparisons": cfg.data.comparisons,
        "data.prompts": cfg.data.prompts,
        "data.eval_prompts": cfg.data.eval_prompts,
    }
    named = {k: ds.path for k, ds in datasets.items() if ds is not None} | {
        "model.name_or_path": cfg.model.name_or_path
    }
    files = {k: Path(v) for k, v in named.items() if v is not None and Path(v).exists()}
    for key, ds in datasets.items():
        if key in files and files[key].is_file():
            column = (ds.columns or {}).get("images", "images")
            pictures = fingerprints.named_pictures(files[key], column)
            files |= {f"{key}.images:{ref}": path for ref, path in pictures.items()}
    return files


def _local(key: str, path: str | None) -> dict[str, Path]:
    return {key: Path(path)} if path is not None and Path(path).exists() else {}


def rankings_file(cfg: Config) -> dict[str, Path]:
    """Human rankings live outside the artifacts: their content joins the comparisons' key."""
    path = cfg.labeler.rankings_file
    if cfg.labeler.kind != "file" or not path or not Path(path).exists():
        return {}
    return {"labeler.rankings_file": Path(path)}
