"""A PPO run killed by a real signal resumes from its last checkpoint and finishes."""

import sys
from pathlib import Path

import pytest
from conftest import finish, kill_after_checkpoint

SCRIPT = """
import json, sys
from pathlib import Path
import flows  # telemetry off
from stages import ppo
from stages.settings.models import PeftConfig
from stages.settings.models import Tuning
p, rm, out, ck = (Path(a) for a in sys.argv[1:5])
cfg = ppo.PpoConfig(updates=6, rollouts_per_update=16, minibatch_size=8, checkpoint_every=2)
m = ppo.run(cfg, Tuning(PeftConfig("full")), policy=p / "base", reward_model=rm / "model",
            normalization=rm / "normalization.json",
            prompts=p / "ppo_prompts.jsonl", out_dir=out, checkpoint_dir=ck)
print("MANIFEST " + json.dumps(m.metrics))
"""


@pytest.fixture(scope="module")
def reward_model_dir(tiny_prepare, tiny_comparisons, tmp_path_factory):
    from stages import reward_model

    return reward_model.run(
        reward_model.RewardModelConfig(epochs=1),
        policy=tiny_prepare.file("base"),
        comparisons=tiny_comparisons.file("comparisons"),
        heldout=tiny_comparisons.file("heldout_comparisons"),
        out_dir=tmp_path_factory.mktemp("rm"),
    ).path


@pytest.mark.slow
def test_killed_ppo_resumes_from_its_checkpoint(tiny_prepare, reward_model_dir, tmp_path):
    ck = tmp_path / "checkpoints"
    args = [sys.executable, "-c", SCRIPT, tiny_prepare.path, reward_model_dir]
    # 1. start, wait for the first checkpoint, then kill -9 mid-stage
    kill_after_checkpoint(args + [str(tmp_path / "out1"), str(ck)], lambda: (ck / "state.pt").exists())
    assert not (tmp_path / "out1" / "policy").exists()
    import torch

    saved = torch.load(ck / "state.pt", weights_only=True)["at"]["step"]  # the updates done
    assert 2 <= saved < 6
    # 2. run again: it continues from the checkpoint and finishes
    metrics = finish(args + [str(tmp_path / "out2"), str(ck)])
    assert metrics["ppo/resumed_from"] == saved  # fewer updates ran
    assert metrics["ppo/history_length"] == 6  # metrics continue from the checkpoint's step
    assert (tmp_path / "out2" / "policy" / "model.safetensors").exists()
    assert not ck.exists()  # spent checkpoints are removed once the stage finished


def run_ppo(cfg, prepared, rm_dir: Path, out: Path, checkpoint_dir: Path | None = None):
    """The PPO stage on the tiny prepared task and the module's reward model."""
    from stages import ppo
    from stages.settings.models import PeftConfig, Tuning

    return ppo.run(
        cfg,
        Tuning(PeftConfig("full")),
        policy=prepared.file("base"),
        reward_model=Path(rm_dir, "model"),
        normalization=Path(rm_dir, "normalization.json"),
        prompts=prepared.file("ppo_prompts"),
        out_dir=out,
        checkpoint_dir=checkpoint_dir,
    )


def test_half_written_checkpoint_is_never_picked_up(tiny_prepare, reward_model_dir, tmp_path):
    from stages import ppo

    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "state.pt.tmp").write_bytes(b"half a checkpoint")  # a crash mid-save leaves only this
    cfg = ppo.PpoConfig(updates=1, rollouts_per_update=8, minibatch_size=8, checkpoint_every=1, ema_decay=None)
    m = run_ppo(cfg, tiny_prepare, reward_model_dir, tmp_path / "out", ck)
    assert m.metrics["ppo/resumed_from"] == 0.0


def test_non_finite_reward_stops_before_any_checkpoint(tiny_prepare, reward_model_dir, tmp_path):
    import shutil

    from stages import ppo

    rm = tmp_path / "rm"
    shutil.copytree(reward_model_dir, rm)
    (rm / "normalization.json").write_text('{"bias": NaN}')  # a broken normalisation poisons every reward
    cfg = ppo.PpoConfig(updates=2, rollouts_per_update=8, minibatch_size=8, checkpoint_every=1)
    with pytest.raises(FloatingPointError, match="non-finite reward at update 0"):
        run_ppo(cfg, tiny_prepare, rm, tmp_path / "out", tmp_path / "ck")
    assert not (tmp_path / "ck" / "state.pt").exists()


def test_kl_bound_warns_once(tiny_prepare, reward_model_dir, tmp_path):
    from stages import ppo

    cfg = ppo.PpoConfig(
        updates=2, rollouts_per_update=8, minibatch_size=8, kl_warn=1e-9, learning_rate=1e-2, ema_decay=None
    )
    with pytest.warns(UserWarning, match="stage.ppo.kl_warn") as record:
        run_ppo(cfg, tiny_prepare, reward_model_dir, tmp_path / "out")
    assert sum("kl_warn" in str(w.message) for w in record) == 1
