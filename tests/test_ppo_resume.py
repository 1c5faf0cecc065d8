"""A PPO run killed by a real signal resumes from its last checkpoint and finishes."""

import sys

import pytest
from conftest import PPO_STAGE_SCRIPT, finish, kill_after_checkpoint, run_tiny_ppo


@pytest.mark.slow
def test_killed_ppo_resumes_from_its_checkpoint(tiny_prepare, tiny_reward_model, tmp_path):
    ck = tmp_path / "checkpoints"
    args = [sys.executable, "-c", PPO_STAGE_SCRIPT, "{}", tiny_prepare.path, tiny_reward_model]
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


def test_half_written_checkpoint_is_never_picked_up(tiny_prepare, tiny_reward_model, tmp_path):
    from stages import ppo

    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "state.pt.tmp").write_bytes(b"half a checkpoint")  # a crash mid-save leaves only this
    cfg = ppo.PpoConfig(updates=1, rollouts_per_update=8, minibatch_size=8, checkpoint_every=1, ema_decay=None)
    m = run_tiny_ppo(cfg, tiny_prepare, tiny_reward_model, tmp_path / "out", ck)
    assert m.metrics["ppo/resumed_from"] == 0.0


def test_non_finite_reward_stops_before_any_checkpoint(tiny_prepare, tiny_reward_model, tmp_path):
    import shutil

    from stages import ppo

    rm = tmp_path / "rm"
    shutil.copytree(tiny_reward_model, rm)
    (rm / "normalization.json").write_text('{"bias": NaN}')  # a broken normalisation poisons every reward
    cfg = ppo.PpoConfig(updates=2, rollouts_per_update=8, minibatch_size=8, checkpoint_every=1)
    with pytest.raises(FloatingPointError, match="non-finite reward at update 0"):
        run_tiny_ppo(cfg, tiny_prepare, rm, tmp_path / "out", tmp_path / "ck")
    assert not (tmp_path / "ck" / "state.pt").exists()


def test_kl_bound_warns_once(tiny_prepare, tiny_reward_model, tmp_path):
    from stages import ppo

    cfg = ppo.PpoConfig(
        updates=2, rollouts_per_update=8, minibatch_size=8, kl_warn=1e-9, learning_rate=1e-2, ema_decay=None
    )
    with pytest.warns(UserWarning, match="stage.ppo.kl_warn") as record:
        run_tiny_ppo(cfg, tiny_prepare, tiny_reward_model, tmp_path / "out")
    assert sum("kl_warn" in str(w.message) for w in record) == 1
