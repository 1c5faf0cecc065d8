"""The one resumable training loop (`stages/runtime/training.py`): a run stopped after a checkpoint and
resumed ends where an uninterrupted run ends, the interrupted pass repeating its batch order; a
non-finite loss stops it before the step, naming the key."""

import pytest
import torch

from stages.runtime.errors import NonFiniteStop
from stages.runtime.process_group import Engine
from stages.runtime.training import TrainingLoop

X = torch.randn(24, 3, generator=torch.Generator().manual_seed(0))
Y = X @ torch.tensor([1.0, -2.0, 0.5]) + 0.1


def _loop(folder, stop_after=None, steps=14):
    """Linear regression in batches of 5 (5 per pass: the last batch short), checkpointing every 4 steps.
    Returns the weights, the loop, and the batches it trained."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.9)
    loop = TrainingLoop("sft", Engine(model, opt, None, micro_batch=5), steps=steps, seed=7, sched=sched,
                        checkpoint_dir=folder, checkpoint_every=4)  # fmt: skip
    loop.extra = {"seen": 0}
    loop.resume()
    trained = []
    for batches in loop.passes(lambda gen: torch.randperm(len(X), generator=gen).split(5)):
        for idx in batches:
            if stop_after is not None and loop.step_index == stop_after:
                return model.weight.detach().clone(), loop, trained  # "killed" here
            loss = ((model(X[idx]).squeeze(1) - Y[idx]) ** 2).mean()
            loop.extra["seen"] += len(idx)
            loop.step(loss)
            trained.append(idx.tolist())
    return model.weight.detach().clone(), loop, trained


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    whole, loop, batches = _loop(tmp_path / "whole")
    assert loop.step_index == 14 and loop.at["pass"] == 3  # 5 batches a pass: passes 0, 1, then 4 of pass 2
    _, killed, before = _loop(tmp_path / "ck", stop_after=10)  # after the checkpoint at step 8
    resumed, again, after = _loop(tmp_path / "ck")
    assert again.resumed_from == 8 and again.step_index == 14
    torch.testing.assert_close(resumed, whole, rtol=0, atol=0)  # bit-identical
    assert before[:8] + after == batches  # the interrupted pass repeated its order from its ninth batch
    assert again.extra["seen"] == loop.extra["seen"]  # the stage's own counters came back with it
    assert again.sched.get_last_lr() == loop.sched.get_last_lr()


def test_a_non_finite_loss_stops_before_the_step(tmp_path):
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loop = TrainingLoop("reward_model", Engine(model, opt, None, micro_batch=1), steps=3, seed=0,
                        checkpoint_dir=None, checkpoint_every=0, hint=" (now 0.1)")  # fmt: skip
    before = model.weight.detach().clone()
    with pytest.raises(NonFiniteStop, match=r"reward_model: non-finite loss at step 0; lower stage.reward_model"):
        loop.step(model(X[:2]).sum() * float("nan"))
    assert torch.equal(model.weight, before) and loop.step_index == 0
