"""The K-way ranking loss against hand-computed values."""

import math

import pytest
import torch

from stages.reward_model import ranking_loss, ranking_pairs


def test_ranking_pairs_enumerate_all_c_k_2():
    assert sorted(ranking_pairs([1, 2, 0])) == [(0, 1), (2, 0), (2, 1)]
    assert len(ranking_pairs(list(range(9)))) == 36
    assert ranking_pairs([0, 0, 1]) == [(0, 2), (1, 2)]  # the tie gives no pair


def test_ranking_loss_k3_by_hand():
    scores = torch.tensor([[0.0, 1.0, 2.0]])
    pairs = [ranking_pairs([2, 1, 0])]  # best is index 2
    # pairs: (2,1): d=1, (2,0): d=2, (1,0): d=1
    expected = -(2 * math.log(1 / (1 + math.exp(-1))) + math.log(1 / (1 + math.exp(-2)))) / 3
    assert ranking_loss(scores, pairs).item() == pytest.approx(expected, rel=1e-6)


def test_k2_is_the_pairwise_loss_and_prompts_average():
    scores = torch.tensor([[0.5, -0.5], [0.0, 3.0]])
    pairs = [ranking_pairs([0, 1]), ranking_pairs([0, 1])]
    expected = (-math.log(1 / (1 + math.exp(-1.0))) - math.log(1 / (1 + math.exp(3.0)))) / 2
    assert ranking_loss(scores, pairs).item() == pytest.approx(expected, rel=1e-6)


def test_margin_and_all_tied_prompts():
    scores = torch.tensor([[1.0, 0.0], [5.0, 5.0]])
    pairs = [ranking_pairs([0, 1]), ranking_pairs([0, 0])]  # the second prompt is all ties
    expected = -math.log(1 / (1 + math.exp(-(1.0 - 0.5))))
    assert ranking_loss(scores, pairs, margin=0.5).item() == pytest.approx(expected, rel=1e-6)
