"""The typed config tree: stage dataclasses assembled into one schema that Hydra validates against.

An unknown key, a wrong type or an invalid value fails at composition, before any compute, with the
full key named.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from omegaconf import DictConfig, OmegaConf, ValidationError

from stages.runtime.rules import COUNT, NONNEGATIVE, POSITIVE, UNIT, ConfigError, Rule, check_fields, check_tree
from stages.settings.data import DataConfig
from stages.settings.distributed import DistributedConfig, refusal
from stages.settings.labeling import LabelerConfig
from stages.settings.models import (
    TRAINING_STAGES,
    ComputeConfig,
    ModelConfig,
    OptimConfig,
    PeftConfig,
    Tuning,
    check_optim,
    shared_base_refusal,
    shares_base,
)
from stages.settings.recipe import (
    BestOfNConfig,
    ComparisonsConfig,
    DpoConfig,
    EvaluateConfig,
    JudgeConfig,
    PpoConfig,
    PretrainConfig,
    RewardModelConfig,
    SftConfig,
)

# The stages of each branch, in order (`flows/branches.py` wires them; `pipeline.stop_after` names one)
PIPELINES = {
    "rlhf": ("prepare", "sft", "comparisons", "reward_model", "ppo", "evaluate"),
    "dpo": ("prepare", "sft", "comparisons", "dpo", "evaluate"),
    "rlaif": ("prepare", "sft", "judge", "comparisons", "reward_model", "ppo", "evaluate"),
    "rlaif_direct": ("prepare", "sft", "judge", "ppo", "evaluate"),
    # rlhf's DAG with a critic-free estimator in the ppo stage (no value model): its own ppo artifact,
    # the same cached prepare, sft, comparisons and reward_model
    "grpo": ("prepare", "sft", "comparisons", "reward_model", "ppo", "evaluate"),
    "rloo": ("prepare", "sft", "comparisons", "reward_model", "ppo", "evaluate"),
    # GRPO with DAPO's or GSPO's changes (conf/pipeline/dapo.yaml, gspo.yaml): the same DAG and caches
    "dapo": ("prepare", "sft", "comparisons", "reward_model", "ppo", "evaluate"),
    "gspo": ("prepare", "sft", "comparisons", "reward_model", "ppo", "evaluate"),
    # verifiable rewards: the ppo stage scored by `stage.ppo.reward_function` alone, no reward model
    "rlvr": ("prepare", "sft", "ppo", "evaluate"),
    # rlvr with multi-turn rollouts that call tools (conf/pipeline/rlvr_tools.yaml): the same DAG
    "rlvr_tools": ("prepare", "sft", "ppo", "evaluate"),
    # rejection-sampling fine-tuning: best_of_n samples and keeps the RM's best, SFT trains on them (per round)
    "best_of_n": ("prepare", "sft", "comparisons", "reward_model", "best_of_n", "evaluate"),
}
AI_LABELED = ("rlaif", "rlaif_direct")
# stages any branch runs when configured: pretrain before sft when data.pretrain names raw text
OPTIONAL_STAGES = ("pretrain",)
# the estimators (`stage.ppo.advantage`) a critic-free branch name stands for
ESTIMATOR_BRANCHES = {"grpo": ("grpo", "dr_grpo"), "rloo": ("rloo",), "dapo": ("grpo",), "gspo": ("grpo",)}


@dataclass(frozen=True)
class StageConfigs:
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)  # runs when data.pretrain is set
    sft: SftConfig = field(default_factory=SftConfig)
    comparisons: ComparisonsConfig = field(default_factory=ComparisonsConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    ppo: PpoConfig = field(default_factory=PpoConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    best_of_n: BestOfNConfig = field(default_factory=BestOfNConfig)


@dataclass(frozen=True)
class PipelineConfig:
    name: str = "rlhf"
    stop_after: str | None = None  # run the pipeline up to and including this stage
    rounds: int = 1  # dpo: iterative / online DPO, each further round samples K from the current policy
    # Quality gates: the lower end of the 95% CI of held-out accuracy that a reward model (before PPO)
    # and the embedded AI labeler (before its labels are distilled) must reach; 0 turns a gate off.
    # Chance is 0.5; the HH-RLHF reward model that PPO once optimised had 0.571 (CI 0.51-0.63).
    min_rm_accuracy: float = 0.55
    min_labeler_accuracy: float = 0.55

    RULES: ClassVar[dict[str, Rule]] = {"rounds": COUNT, "min_rm_accuracy": UNIT, "min_labeler_accuracy": UNIT}

    def __post_init__(self) -> None:
        check_fields(self, "pipeline.")
        if self.rounds > 1 and self.name != "dpo":
            raise ValueError(f"pipeline.rounds: must be 1, or more with pipeline=dpo; got {self.rounds}")
        if self.name not in PIPELINES:
            raise ValueError(f"pipeline.name: {self.name!r} is not one of {sorted(PIPELINES)}")
        if self.stop_after is not None and self.stop_after not in PIPELINES[self.name]:
            raise ValueError(
                f"pipeline.stop_after: {self.stop_after!r} is not a stage of {self.name}: "
                f"{', '.join(PIPELINES[self.name])}"
            )


@dataclass(frozen=True)
class TrackingConfig:
    uri: str | None = None  # null: SQLite under the artifacts folder; or e.g. http://127.0.0.1:5000
    experiment: str = "alignflow"
    give_up_s: float = 60.0  # a tracking server (or the Prefect server) silent this long ends the run

    RULES: ClassVar[dict[str, Rule]] = {"give_up_s": POSITIVE}


@dataclass(frozen=True)
class RegistryConfig:
    """The promotion gate (`flows/results/registry.py`): after evaluate, the aligned policy becomes a new version
    of `model_name` in the MLflow registry; alias `champion` only if it beats the champion's `metric`
    (a key of eval.json, dots for nesting) by `margin` with its KL to SFT at most `max_kl_per_token`."""

    enabled: bool = True
    model_name: str = "alignflow-policy"
    metric: str = "win_rate"  # exists on every branch and data source; e.g. gold_policy.mean on the embedded task
    higher_is_better: bool = True
    margin: float = 0.0
    max_kl_per_token: float = 1.0  # the evaluation's own reward-hacking bound (stage.evaluate.max_kl_per_token)

    RULES: ClassVar[dict[str, Rule]] = {"margin": NONNEGATIVE, "max_kl_per_token": POSITIVE}

    def __post_init__(self) -> None:
        if not self.metric.strip():
            raise ValueError("registry.metric: name a key of eval.json, e.g. win_rate or gold_policy.mean")
        check_fields(self, "registry.")


@dataclass(frozen=True)
class SweepConfig:
    objective: str = "eval.win_rate"  # what `python -m flows.align` returns to a sweeper (Optuna): a summary key


@dataclass(frozen=True)
class ScheduleConfig:
    """`make serve` (`flows/ops/serve.py`): a Prefect deployment of the align flow on a cron schedule, also
    started by a new-data event (`python -m flows.ops.notify <path>`), one run at a time."""

    deployment: str = "retrain"
    cron: str = "0 3 * * 1"  # Mondays 03:00
    timezone: str = "UTC"
    overrides: list[str] = field(default_factory=list)  # the Hydra overrides every scheduled run uses
    event: str = "alignflow.data.updated"
    api_url: str = "http://127.0.0.1:4200/api"  # the Prefect server serve starts when none answers there


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    labeler: LabelerConfig = field(default_factory=LabelerConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    stage: StageConfigs = field(default_factory=StageConfigs)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    artifacts_dir: str = "artifacts"
    preset: str | None = None  # the tuning preset in effect (conf/preset/): embedded for the embedded task
    threads: int | None = None  # torch threads; null: the usable cores divided by the jobs running at once

    RULES: ClassVar[dict[str, Rule]] = {"threads": COUNT}

    def tuning(self, stage: str) -> Tuning:
        """How `stage` trains (`peft/`, `optim/`, `compute/`), its fine-tuning method as `peft.stages` says."""
        tuning = Tuning(self.peft, self.optim, self.compute)
        if stage == "ppo" and self.stage.ppo.layout == "shared_base":
            return tuning  # an adapter layout: its adapters are the method's, whatever peft.stages says
        return tuning.for_stage(stage)

    def preset_note(self) -> str | None:
        """A line for a user whose own model would train with the embedded default's learning rates."""
        if self.preset != "embedded" or self.model.name_or_path is None:
            return None
        return (
            f"note: model.name_or_path={self.model.name_or_path} trains with the embedded task's preset "
            "(conf/preset/embedded.yaml: learning rates for a 94k-parameter model); `~preset` gives the "
            "published defaults, or set stage.<stage>.learning_rate"
        )

    def __post_init__(self) -> None:
        check_tree(Config, self)  # every numeric key in its declared range (`stages/runtime/rules.py`)
        for stage in TRAINING_STAGES:  # an optimizer that cannot train a stage's method: named before any compute
            try:
                check_optim(self.optim, self.tuning(stage).peft.method)
            except ValueError as e:
                raise ValueError(f"{e} (peft.stages includes {stage})") from None
        self._check_distributed()
        if self.stage.ppo.layout == "shared_base" and not shares_base(self.tuning("ppo")):
            raise ValueError(shared_base_refusal(self.peft.method))
        estimators = ESTIMATOR_BRANCHES.get(self.pipeline.name)
        if estimators is not None and self.stage.ppo.advantage not in estimators:
            raise ValueError(
                f"stage.ppo.advantage: pipeline={self.pipeline.name} runs {' or '.join(estimators)}, "
                f"got {self.stage.ppo.advantage!r} (other estimators run under pipeline=rlhf)"
            )
        if self.pipeline.name in ("rlvr", "rlvr_tools") and self.stage.ppo.reward_function is None:
            raise ValueError(
                f"stage.ppo.reward_function: pipeline={self.pipeline.name} scores with a reward from code; name one "
                "(package.module:name, see stages/rl/rewards.py)"
            )
        unary = self.data.comparisons is not None and self.data.comparisons.kind == "unary"
        ranked = "reward_model" in PIPELINES[self.pipeline.name] or self.stage.dpo.loss_type != "kto"
        if unary and ranked and self.pipeline.stop_after not in ("prepare", "sft"):
            raise ValueError(
                "data.comparisons.kind=unary: thumbs-up/down labels rank nothing, so they train KTO only "
                f"(pipeline=dpo stage.dpo.loss_type=kto); got pipeline={self.pipeline.name}, "
                f"stage.dpo.loss_type={self.stage.dpo.loss_type}"
            )
        labeled = "comparisons" in PIPELINES[self.pipeline.name] and self.pipeline.name not in AI_LABELED
        sampled = labeled and self.data.comparisons is None
        sampled = sampled and self.pipeline.stop_after not in ("prepare", "sft")
        if sampled and self.labeler.kind == "simulated" and not self.data.is_embedded:
            raise ValueError(
                "labeler.kind: the simulated labeler scores with the embedded task's gold rule, and your data has "
                "none; give data.comparisons, or use labeler=ai or labeler=file"
            )
        if self.pipeline.name in AI_LABELED and self.data.gold != "embedded" and self.labeler.ai.model is None:
            raise ValueError(
                "labeler.ai.model: the embedded judge knows only the embedded words task (data.task=words); on "
                "other data name a judge "
                "model (a local path or hub id, or a served model with labeler.ai.backend=http)"
            )
        if self.pipeline.name in AI_LABELED and self.labeler.kind != "ai":
            raise ValueError(
                f"labeler.kind: pipeline={self.pipeline.name} needs the AI labeler (labeler=ai), "
                f"got {self.labeler.kind!r}"
            )

    def _check_distributed(self) -> None:
        """What a process group cannot run (`distributed/`), named before any compute."""
        world = self.distributed.world_size
        for key, batch in (
            ("stage.sft.batch_size", self.stage.sft.batch_size if self.distributed.launches("sft") else 0),
            ("stage.dpo.batch_size", self.stage.dpo.batch_size if self.distributed.launches("dpo") else 0),
            (
                "stage.ppo.rollouts_per_update",
                self.stage.ppo.rollouts_per_update if self.distributed.launches("ppo") else 0,
            ),
            ("stage.ppo.minibatch_size", self.stage.ppo.minibatch_size if self.distributed.launches("ppo") else 0),
        ):
            if batch % world:  # each rank takes 1/N of the global batch
                raise ValueError(
                    f"{key} ({batch}) must be a multiple of the {world} processes (distributed={self.distributed.mode})"
                )
        for stage in self.distributed.stages:  # what a process group cannot run: named before any compute
            why = refusal(self.distributed, stage, method=self.tuning(stage).peft.method, layout=self.stage.ppo.layout)
            if why is not None:
                raise ValueError(why)
        if self.distributed.launches("ppo") and self.stage.ppo.watch_every:
            raise ValueError(
                f"stage.ppo.watch_every: the over-optimisation watch runs in one process, not under "
                f"distributed={self.distributed.mode}; set distributed.stages without ppo, or watch_every=0"
            )


def _writable(node: DictConfig) -> DictConfig:
    """Frozen dataclasses give read-only nodes, which Hydra could not override; clear the flag."""
    node._set_flag("readonly", None)
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            _writable(child)
    return node


def schema() -> DictConfig:
    return _writable(OmegaConf.structured(Config))


def register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="config_schema", node=schema())


def to_config(cfg: DictConfig) -> Config:
    """Typed, validated config; `__post_init__` checks raise naming their key."""
    merged = OmegaConf.merge(schema(), cfg)
    check_tree(Config, merged)  # ranges first: the dataclasses' own checks may divide by a size
    try:
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except ValidationError as e:  # a check in a __post_init__, wrapped by OmegaConf: its own message
        cause = e.__cause__ if isinstance(e.__cause__, ValueError) else e
        raise ConfigError(str(cause).split("\n")[0]) from e
    except ConfigError:
        raise
    except ValueError as e:  # a dataclass's own cross-key check: one line, the keys named
        raise ConfigError(str(e)) from e


def keys_doc() -> str:
    """docs/config-keys.md: every key with its default, valid values and comment, generated from the schema
    (`make config-keys`)."""
    from stages.runtime.rules import markdown

    return (
        "# Configuration reference\n\n"
        "Generated from the schema by `make config-keys`: the config dataclasses (`flows/config.py` and\n"
        "`stages/settings/`) are the one home of every key, its default and its comment, and the `RULES` table\n"
        "beside each gives a numeric key's valid values (`stages/runtime/rules.py`).\n"
        "`tests/test_bad_input.py` fails when this page is stale or a numeric key has no rule. Every value is\n"
        "checked when Hydra composes the config, before any compute; an out-of-range one stops the run with\n"
        "`error: <key>: must be ..., got ...` (exit code 1). `null` is valid where the key's type allows it.\n"
        "Rules across keys (a size that must divide another, a pipeline with a labeler it cannot use) live in\n"
        "the dataclasses' `__post_init__` and `Config.__post_init__`, named the same way.\n\n"
        "The defaults are a real model's; the embedded task's own tuning is `conf/preset/embedded.yaml`\n"
        "([Your own model and data](own-model.md)). A learning rate of `null` is chosen by the stage's\n"
        "method from `PUBLISHED_LEARNING_RATES`.\n\n" + markdown(Config)
    )
