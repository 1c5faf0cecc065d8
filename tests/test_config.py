"""Config composition: every pipeline and experiment composes; bad keys and values fail early, named."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from flows.config import Config, register, to_config

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
register()


def _compose(overrides=()):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_default_composes_to_typed_config():
    cfg = to_config(_compose())
    assert isinstance(cfg, Config)
    assert cfg.stage.ppo.beta == 0.02  # InstructGPT
    assert cfg.peft.method == "lora"
    assert cfg.pipeline.name == "rlhf"


@pytest.mark.parametrize("pipeline", [p.stem for p in (ROOT / "conf" / "pipeline").glob("*.yaml")])
def test_every_pipeline_composes(pipeline):
    assert to_config(_compose([f"pipeline={pipeline}"])).pipeline.name == pipeline


@pytest.mark.parametrize("data", [p.stem for p in (ROOT / "conf" / "data").glob("*.yaml")])
def test_every_data_option_composes(data):
    kto = ["pipeline=dpo", "stage.dpo.loss_type=kto"] if data == "kto_demo" else []  # thumbs train KTO only
    to_config(_compose([f"data={data}", "labeler=file", *kto]))  # the file labeler fits every data source


def test_thumbs_up_down_labels_are_refused_where_a_ranking_is_needed():
    with pytest.raises(ValueError, match=r"data.comparisons.kind=unary: thumbs-up/down labels rank nothing"):
        to_config(_compose(["data=kto_demo"]))  # rlhf: the reward model needs rankings
    with pytest.raises(ValueError, match=r"got pipeline=dpo, stage.dpo.loss_type=sigmoid"):
        to_config(_compose(["data=kto_demo", "pipeline=dpo"]))
    to_config(_compose(["data=kto_demo", "pipeline=dpo", "stage.dpo.loss_type=kto"]))


def test_own_data_without_comparisons_cannot_use_the_simulated_labeler():
    """The simulated labeler scores with the embedded task's gold rule: real prompts have none."""
    with pytest.raises(ValueError, match="labeler.kind: the simulated labeler"):
        to_config(_compose(["data=alpaca_demo"]))
    to_config(_compose(["data=alpaca_demo", "pipeline.stop_after=sft"]))  # SFT alone labels nothing
    to_config(_compose(["data=files"]))  # comparisons from the file: nothing to label
    with pytest.raises(ValueError, match="labeler.ai.model: the embedded judge knows only the embedded words task"):
        to_config(_compose(["data=files", "pipeline=rlaif"]))
    to_config(_compose(["data=files", "pipeline=rlaif", "labeler.ai.model=/models/judge"]))


def test_dataset_entry_is_typed():
    cfg = to_config(_compose(["data=alpaca_demo", "labeler=file"]))
    assert cfg.data.demonstrations.format == "alpaca"
    with pytest.raises(ValueError, match="data.kind"):
        to_config(_compose(["data=alpaca_demo", "labeler=file", "data.demonstrations.kind=pairs"]))


@pytest.mark.parametrize("experiment", [p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")])
def test_every_experiment_composes(experiment):
    text = (ROOT / "conf" / "experiment" / f"{experiment}.yaml").read_text()
    assert text.startswith("# @package _global_")
    to_config(_compose([f"+experiment={experiment}"]))


def test_overrides_reach_the_stage_config():
    cfg = to_config(_compose(["stage.ppo.beta=0.05", "peft=full", "stage.comparisons.k=6"]))
    assert (cfg.stage.ppo.beta, cfg.peft.method, cfg.stage.comparisons.k) == (0.05, "full", 6)


def test_unknown_key_is_named():
    with pytest.raises(ConfigCompositionException, match="stage.ppo.betta"):
        _compose(["stage.ppo.betta=0.1"])


def test_wrong_type_is_named():
    with pytest.raises(ConfigCompositionException, match="stage.sft.epochs"):
        _compose(["stage.sft.epochs=lots"])


def test_unknown_key_in_a_yaml_file_is_named(tmp_path):
    bad = tmp_path / "conf"
    import shutil

    shutil.copytree(CONF, bad)
    preset = bad / "preset" / "embedded.yaml"
    preset.write_text(preset.read_text().replace("  sft:\n", "  sft:\n    epoks: 3\n"))
    with initialize_config_dir(config_dir=str(bad), version_base="1.3"):
        with pytest.raises(Exception, match="stage.sft.epoks"):
            compose("config")


def test_invalid_value_is_named():
    with pytest.raises(ValueError, match="stage.comparisons.k"):
        to_config(_compose(["stage.comparisons.k=1"]))
    with pytest.raises(ValueError, match="peft.method"):
        to_config(_compose(["peft.method=prefix"]))


def test_cli_stops_before_any_training_naming_the_key(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "flows.align", f"artifacts_dir={tmp_path}", "stage.ppo.bta=0.1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Key 'bta' not in 'PpoConfig'" in proc.stderr and "full_key: stage.ppo.bta" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing was computed


def test_bad_reward_pooling_is_named():
    with pytest.raises(ValueError, match="stage.reward_model.pooling"):
        to_config(_compose(["stage.reward_model.pooling=max"]))


def test_ai_branches_need_the_ai_labeler():
    assert to_config(_compose(["pipeline=rlaif"])).labeler.kind == "ai"
    assert to_config(_compose(["pipeline=rlaif"])).stage.reward_model.targets == "soft"
    assert to_config(_compose(["pipeline=rlaif_direct"])).labeler.kind == "ai"
    with pytest.raises(ValueError, match="labeler.kind: pipeline=rlaif needs the AI labeler"):
        to_config(_compose(["pipeline=rlaif", "labeler=simulated"]))


def test_critic_free_branches_set_their_estimator_and_refuse_another():
    grpo = to_config(_compose(["pipeline=grpo"])).stage.ppo
    assert (grpo.advantage, grpo.samples_per_prompt, grpo.kl_penalty, grpo.critic_free) == ("grpo", 4, "loss", True)
    rloo = to_config(_compose(["pipeline=rloo"])).stage.ppo
    assert (rloo.advantage, rloo.kl_penalty) == ("rloo", "reward")
    assert to_config(_compose(["pipeline=grpo", "stage.ppo.advantage=dr_grpo"])).stage.ppo.advantage == "dr_grpo"
    with pytest.raises(ValueError, match="stage.ppo.advantage: pipeline=rloo runs rloo, got 'gae'"):
        to_config(_compose(["pipeline=rloo", "stage.ppo.advantage=gae", "stage.ppo.kl_penalty=reward"]))
    assert to_config(_compose(["stage.ppo.advantage=reinforce_pp"])).pipeline.name == "rlhf"  # any estimator there


@pytest.mark.parametrize(
    "override, key",
    [
        ("stage.dpo.loss_type=dpo_plus", "stage.dpo.loss_type"),
        ("stage.dpo.beta=0", "stage.dpo.beta"),
        ("stage.reward_model.targets=fuzzy", "stage.reward_model.targets"),
        ("labeler.ai.backend=grpc", "labeler.ai.backend"),
        ("pipeline.rounds=2", "pipeline.rounds"),
    ],
)
def test_bad_branch_values_are_named(override, key):
    with pytest.raises(ValueError, match=key):
        to_config(_compose(["pipeline=dpo" if "dpo" in override else "pipeline=rlhf", override]))


def test_missing_api_key_stops_before_any_compute(tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if k != "ALIGNFLOW_TEST_KEY"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.align",
            f"artifacts_dir={tmp_path}",
            "pipeline=rlaif",
            "labeler.ai.backend=http",
            "labeler.ai.model=judge-7b",
            "labeler.ai.api_key_env=ALIGNFLOW_TEST_KEY",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode != 0
    assert "ALIGNFLOW_TEST_KEY is not set" in proc.stderr + proc.stdout
    assert not (tmp_path / "prepare").exists() and not (tmp_path / "sft").exists()


def _schema_default(path: str):
    """The schema's default at a dotted path, or `_ABSENT` (a key the schema does not type, e.g. `hydra`)."""
    from omegaconf import OmegaConf

    from flows.config import schema

    node = OmegaConf.to_container(schema())
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


_ABSENT = object()


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            yield from _leaves(value, path)
        elif key != "defaults":
            yield path, value


def _package(path: Path, text: str) -> str:
    """Where a conf file's keys land: its `# @package` line, else its group's folder."""
    for line in text.splitlines()[:3]:
        if line.startswith("# @package"):
            package = line.split()[2]
            return "" if package == "_global_" else package
    return ".".join(path.relative_to(ROOT / "conf").parent.parts)


def test_no_yaml_file_repeats_a_schema_default():
    """The stage dataclasses are the schema and hold every default: a conf file states a key only to
    change it. The one exception is a key the embedded preset changed, set back by a file composed
    after it (an experiment)."""
    import yaml

    preset = dict(_leaves(yaml.safe_load((ROOT / "conf" / "preset" / "embedded.yaml").read_text())))
    repeats = []
    for path in sorted((ROOT / "conf").rglob("*.yaml")):
        text = path.read_text()
        package = _package(path, text)
        for key, value in _leaves(yaml.safe_load(text) or {}):
            full = f"{package}.{key}" if package else key
            default = _schema_default(full)
            if default is not _ABSENT and default == value and full not in preset:
                repeats.append(f"{path.relative_to(ROOT)}: {full}: {value!r}")
    assert repeats == [], "repeats the schema's default:\n" + "\n".join(repeats)


def test_a_repeated_default_is_caught(tmp_path, monkeypatch):
    """The check above can fail: a stage key restated at its default is found."""
    import yaml

    text = "# @package _global_\nstage:\n  ppo:\n    beta: 0.02\n    clip: 0.3\n"
    found = [
        key
        for key, value in _leaves(yaml.safe_load(text))
        if _schema_default(key) is not _ABSENT and _schema_default(key) == value
    ]
    assert found == ["stage.ppo.beta"]


def test_a_users_own_model_gets_the_published_defaults_not_the_embedded_tuning():
    """`model.name_or_path=... data=files`: no preset, so each stage trains with the published
    recipes' values (stages/settings/recipe.py), its learning rate chosen by its method."""
    from stages.settings.recipe import chosen_learning_rate

    own = to_config(_compose(["model.name_or_path=/models/my-llama", "data=files"]))
    assert own.preset is None and own.preset_note() is None
    rm, sft = own.stage.reward_model, own.stage.sft
    assert (rm.epochs, rm.pooling, sft.epochs) == (1, "last", 3.0)  # InstructGPT's RM; trl's SFT epochs
    rates = {
        stage: chosen_learning_rate(stage, getattr(own.stage, stage).learning_rate, own.tuning(stage).peft.method)
        for stage in ("sft", "reward_model", "ppo", "dpo")
    }
    # peft=lora's stages are sft and dpo (adapters: about ten times the full rate); the RM and PPO train in full
    assert rates == {"sft": 1e-4, "reward_model": 9e-6, "ppo": 1e-6, "dpo": 5e-6}
    full = to_config(_compose(["model.name_or_path=/models/my-llama", "data=files", "peft=full"]))
    assert chosen_learning_rate("sft", full.stage.sft.learning_rate, full.tuning("sft").peft.method) == 1e-5
    assert chosen_learning_rate("sft", 2e-5, "lora") == 2e-5  # a configured rate is kept


def test_the_embedded_task_keeps_its_own_tuning_and_says_so_to_a_real_model():
    embedded = to_config(_compose())
    rm = embedded.stage.reward_model
    assert embedded.preset == "embedded" and embedded.preset_note() is None
    assert (rm.epochs, rm.learning_rate, rm.pooling, embedded.stage.sft.learning_rate) == (10, 3e-3, "mean", 3e-3)
    assert to_config(_compose(["data=embedded_arithmetic"])).stage.ppo.learning_rate == 1e-4
    own = to_config(_compose(["model.name_or_path=/models/my-llama"]))  # a real model on the embedded task
    assert "conf/preset/embedded.yaml" in own.preset_note()
    assert to_config(_compose(["model.name_or_path=/models/my-llama", "~preset"])).stage.sft.learning_rate is None
