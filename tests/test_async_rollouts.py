"""Asynchronous rollouts (`stage.ppo.async_rollouts`, `stages/rl/async_rollouts.py`): the rollout worker on
the synchronous schedule is the synchronous loop, token for token; with k = 1 no batch is more than one
update old; a run killed mid-stage resumes to what the uninterrupted run publishes."""

import dataclasses
import functools
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import PPO_STAGE_SCRIPT, finish, kill_after_checkpoint, run_tiny_ppo
from safetensors.torch import load_file


def published(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "policy" / "model.safetensors")


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_worker_on_the_synchronous_schedule_is_the_synchronous_loop(
    tiny_prepare, tiny_reward_model, tmp_path, monkeypatch
):
    """With lag 0 the worker samples update u's batch with the weights after u updates, in its own
    process, from the update's own seed: the same tokens, scores and published weights, bit for bit."""
    from stages import ppo

    cfg = ppo.PpoConfig(updates=3, rollouts_per_update=16, minibatch_size=8, ema_decay=None)
    sync = run_tiny_ppo(cfg, tiny_prepare, tiny_reward_model, tmp_path / "sync")
    monkeypatch.setattr(ppo, "rollout_worker", functools.partial(ppo.rollout_worker, lag=0))
    worker = run_tiny_ppo(cfg, tiny_prepare, tiny_reward_model, tmp_path / "worker")
    assert worker.metrics["ppo/async/staleness_max"] == 0.0  # it ran through the worker
    assert "ppo/async/staleness_max" not in sync.metrics
    assert same_weights(published(tmp_path / "sync"), published(tmp_path / "worker"))
    assert (tmp_path / "sync" / "samples.jsonl").read_text() == (tmp_path / "worker" / "samples.jsonl").read_text()
    for key in ("ppo/objective/scores_first", "ppo/objective/scores_last", "ppo/objective/kl_last", "ppo/tokens"):
        assert worker.metrics[key] == sync.metrics[key], key


def test_with_k_1_no_batch_is_more_than_one_update_old(tiny_prepare, tiny_reward_model, tmp_path):
    """The first batch is sampled by the starting weights (staleness 0), every later one by the weights
    one update behind (1); the loss corrects them by their importance weights, so training differs."""
    from stages import ppo

    cfg = ppo.PpoConfig(updates=4, rollouts_per_update=16, minibatch_size=8, ema_decay=None)
    lagged = run_tiny_ppo(dataclasses.replace(cfg, async_rollouts=1), tiny_prepare, tiny_reward_model, tmp_path / "k1")
    assert lagged.metrics["ppo/async/staleness_max"] == 1.0
    assert lagged.metrics["ppo/async/staleness_mean"] == pytest.approx(3 / 4)
    assert 0.0 <= lagged.metrics["ppo/async/is_truncated_mean"] < 1.0
    run_tiny_ppo(cfg, tiny_prepare, tiny_reward_model, tmp_path / "sync")
    assert not same_weights(published(tmp_path / "sync"), published(tmp_path / "k1"))


def test_a_dead_worker_stops_the_stage_with_its_reason(tiny_prepare, tiny_reward_model, tmp_path, monkeypatch):
    """A worker that fails (here: a policy folder it cannot load) raises in the trainer with its traceback,
    not a hang; the worker process is gone afterwards."""
    from stages import ppo
    from stages.rl import async_rollouts

    started = []
    real = async_rollouts.RolloutWorker

    class BrokenFolder(real):
        def __init__(self, cfg, tuning, policy_dir, *args, **kw):
            super().__init__(cfg, tuning, tmp_path / "no-such-policy", *args, **kw)
            started.append(self)

    monkeypatch.setattr(ppo, "RolloutWorker", BrokenFolder)
    cfg = ppo.PpoConfig(updates=2, rollouts_per_update=16, minibatch_size=8, ema_decay=None, async_rollouts=1)
    with pytest.raises(RuntimeError, match=r"the rollout worker failed:(.|\n)*no-such-policy"):
        run_tiny_ppo(cfg, tiny_prepare, tiny_reward_model, tmp_path / "out")
    assert not started[0].process.is_alive()


@pytest.mark.slow
def test_a_killed_async_run_resumes_to_the_uninterrupted_result(tiny_prepare, tiny_reward_model, tmp_path):
    """Killed with SIGKILL after a checkpoint and run again, a k = 1 run publishes the weights the
    uninterrupted run publishes, bit for bit: the checkpoint kept the batch already sampled by the older
    weights, and the resumed run trains on it rather than sampling it again."""
    keys = json.dumps({"async_rollouts": 1})
    base = [sys.executable, "-c", PPO_STAGE_SCRIPT, keys, tiny_prepare.path, tiny_reward_model]
    whole = finish(base + [str(tmp_path / "whole"), str(tmp_path / "ck_whole")])
    ck = tmp_path / "ck"
    kill_after_checkpoint(base + [str(tmp_path / "out1"), str(ck)], lambda: (ck / "state.pt").exists())
    saved = torch.load(ck / "state.pt", weights_only=True)
    assert 2 <= saved["at"]["step"] < 6
    assert [b["update"] for b in saved["extra"]["async_pending"]] == [saved["at"]["step"]]
    resumed = finish(base + [str(tmp_path / "out2"), str(ck)])
    assert resumed["ppo/resumed_from"] == saved["at"]["step"]
    assert resumed["ppo/history_length"] == 6
    assert resumed["ppo/async/staleness_max"] == 1.0
    assert same_weights(published(tmp_path / "whole"), published(tmp_path / "out2"))
    assert json.dumps(whole["ppo/objective/scores_last"]) == json.dumps(resumed["ppo/objective/scores_last"])
