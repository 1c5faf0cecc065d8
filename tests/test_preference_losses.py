"""SimPO, ORPO and KTO (stages/preference/losses.py) by hand on small tensors, and thumbs from rankings."""

import math

import pytest
import torch

from stages.preference import losses
from stages.preference.losses import group_loss, plackett_luce_loss
from stages.preference.rankings import ranking_pairs
from stages.settings.recipe import DpoConfig


def _nls(x: float) -> float:  # -log sigmoid(x)
    return math.log1p(math.exp(-x))


def test_pairs_are_every_better_worse_couple_ties_dropped():
    assert ranking_pairs([1, 0, 2]) == [(0, 2), (1, 0), (1, 2)]
    assert ranking_pairs([0, 0, 1]) == [(0, 2), (1, 2)]
    with pytest.raises(ValueError, match="every response tied"):
        losses.simpo_loss(torch.tensor([-1.0, -1.0]), torch.tensor([1.0, 1.0]), [0, 0], 2.0, 1.0)


def test_simpo_by_hand():
    # rewards beta * logp / |y| = 2 * [-2/2, -6/3] = [-2, -4]; margin -2 - (-4) - gamma 1 = 1
    got = losses.simpo_loss(torch.tensor([-2.0, -6.0]), torch.tensor([2.0, 3.0]), [0, 1], beta=2.0, gamma=1.0)
    assert got.item() == pytest.approx(_nls(1.0))
    # three responses, ranks [2, 0, 1]: pairs (1,0), (1,2), (2,0) on r = [-1, -0.5, -0.75] (beta 1, gamma 0)
    got = losses.simpo_loss(torch.tensor([-2.0, -1.0, -3.0]), torch.tensor([2.0, 2.0, 4.0]), [2, 0, 1], 1.0, 0.0)
    assert got.item() == pytest.approx((_nls(0.5) + _nls(0.25) + _nls(0.25)) / 3)


def test_orpo_by_hand():
    def log_odds(a):
        return a - math.log(1 - math.exp(a))

    # mean token log-likelihoods a = [-1, -3]: NLL of the best 1.0, plus 0.1 * -log sigmoid(odds gap)
    got = losses.orpo_loss(torch.tensor([-2.0, -3.0]), torch.tensor([2.0, 1.0]), [0, 1], lam=0.1)
    assert got.item() == pytest.approx(1.0 + 0.1 * _nls(log_odds(-1.0) - log_odds(-3.0)))
    # the best is response 1 here: its NLL, and the pair (1, 0)
    got = losses.orpo_loss(torch.tensor([-2.0, -3.0]), torch.tensor([2.0, 1.0]), [1, 0], lam=1.0)
    assert got.item() == pytest.approx(3.0 + _nls(log_odds(-3.0) - log_odds(-1.0)))


def test_kto_by_hand():
    def sig(x):
        return 1 / (1 + math.exp(-x))

    rewards, desirable = torch.tensor([2.0, 0.0]), torch.tensor([True, False])
    z = losses.kto_reference_point(rewards)
    assert z.item() == 1.0  # the batch's mean reward
    got = losses.kto_loss(rewards, desirable, z, beta=0.5, w_d=1.0, w_u=2.0)
    assert got.item() == pytest.approx(((1 - sig(0.5 * (2 - 1))) + 2 * (1 - sig(0.5 * (1 - 0)))) / 2)
    low = torch.tensor([-2.0, -4.0], requires_grad=True)
    assert losses.kto_reference_point(low).item() == 0.0  # clamped at 0
    got = losses.kto_loss(low, desirable, losses.kto_reference_point(low), beta=0.5)
    assert got.item() == pytest.approx(((1 - sig(-1.0)) + (1 - sig(2.0))) / 2)
    got.backward()  # z is detached: the gradient is the two terms' own
    assert low.grad[0] < 0 < low.grad[1]  # raise the desirable, lower the undesirable


def test_thumbs_from_rankings():
    assert losses.thumbs_from_ranks([2, 0, 1, 3]) == [False, True, True, False]
    assert losses.thumbs_from_ranks([1, 0, 2]) == [None, True, False]  # the middle of an odd K: no label
    assert losses.thumbs_from_ranks([0, 0]) == [True, False]  # a tie: by response order


def test_group_loss_routes_each_loss_type():
    logps, ref = torch.tensor([-2.0, -6.0, -1.0, -3.0]), torch.tensor([-3.0, -5.0, -2.0, -2.0])
    lengths = torch.tensor([2.0, 3.0, 1.0, 1.0])
    batch = [{"responses": [0, 0], "ranks": [0, 1]}, {"responses": [0, 0], "ranks": [1, 0]}]
    pl = group_loss(DpoConfig(loss_type="plackett_luce", beta=0.1), logps, ref, lengths, batch)
    r = 0.1 * (logps - ref)
    expected = (plackett_luce_loss(r[:2], [0, 1]) + plackett_luce_loss(r[2:], [1, 0])) / 2
    assert pl.item() == pytest.approx(expected.item())
    simpo = group_loss(DpoConfig(loss_type="simpo", simpo_beta=2.0, simpo_gamma=1.0), logps, None, lengths, batch)
    first = losses.simpo_loss(logps[:2], lengths[:2], [0, 1], 2.0, 1.0)
    second = losses.simpo_loss(logps[2:], lengths[2:], [1, 0], 2.0, 1.0)
    assert simpo.item() == pytest.approx(((first + second) / 2).item())
    kto = group_loss(DpoConfig(loss_type="kto", beta=0.5), logps, ref, lengths, batch)
    rewards = logps - ref  # [1, -1, 1, -1]: thumbs [up, down, down, up]
    want = losses.kto_loss(rewards, torch.tensor([True, False, False, True]), torch.tensor(0.0), 0.5)
    assert kto.item() == pytest.approx(want.item())
    labelled = [
        {"responses": [0], "ranks": [0], "thumbs": [False]},
        {"responses": [0, 0, 0], "ranks": [0, 1, 2], "thumbs": [True, None, False]},
    ]
    kto = group_loss(DpoConfig(loss_type="kto", beta=0.5), logps, ref, lengths, labelled)
    want = losses.kto_loss(rewards[[0, 1, 3]], torch.tensor([False, True, False]), torch.tensor(0.0), 0.5)
    assert kto.item() == pytest.approx(want.item())
