"""The K-way ranking loss against hand-computed values."""

import math

import pytest
import torch

from stages.preference.losses import ranking_loss
from stages.preference.rankings import ranking_pairs


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


class _Backbone(torch.nn.Module):
    """Hidden state = the token id itself (hidden size 1), so pooled scores are sums of ids."""

    def forward(self, input_ids, attention_mask, position_ids):
        return type("Out", (), {"last_hidden_state": input_ids.float().unsqueeze(-1)})()


class _ScalarModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.base_model = _Backbone()
        self.score = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.ones_(self.score.weight)


def _rollout():
    from stages.models.modeling import Rollout

    # two rows; query left-padded with 0; responses right-padded with 0 after the mask
    return Rollout(
        query=torch.tensor([[0, 7, 8], [9, 7, 8]]),
        query_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]),
        response=torch.tensor([[2, 4, 6], [5, 0, 0]]),
        response_mask=torch.tensor([[1, 1, 1], [1, 0, 0]]),
        finished=torch.tensor([True, False]),
    )


def test_sequence_scores_last_token_and_mean_by_hand():
    from stages.models.modeling import sequence_scores

    model = _ScalarModel()
    assert sequence_scores(model, _rollout(), "last").tolist() == [6.0, 5.0]  # last real token
    assert sequence_scores(model, _rollout(), "mean").tolist() == [4.0, 5.0]  # (2+4+6)/3, 5/1
    with pytest.raises(ValueError, match="pooling"):
        sequence_scores(model, _rollout(), "max")


def test_normalization_file_is_validated(tmp_path):
    from stages.preference.scorers import load_normalization

    path = tmp_path / "normalization.json"
    path.write_text('{"bias": 0.5}')  # written before pooling was recorded: last token
    assert (load_normalization(path).bias, load_normalization(path).pooling) == (0.5, "last")
    path.write_text('{"bias": 0.5, "pooling": "median"}')
    with pytest.raises(ValueError, match="normalization.json: pooling"):
        load_normalization(path)
    path.write_text('{"pooling": "mean"}')
    with pytest.raises(ValueError, match="normalization.json: bias"):
        load_normalization(path)


def test_soft_preference_loss_by_hand():
    from stages.preference.losses import soft_preference_loss

    scores = [torch.tensor([1.0, 0.0])]
    p = 0.75
    expected = -(p * math.log(1 / (1 + math.exp(-1.0))) + (1 - p) * math.log(1 / (1 + math.exp(1.0))))
    assert soft_preference_loss(scores, [[[0.5, p], [1 - p, 0.5]]]).item() == pytest.approx(expected)
    # hard targets (p = 1) give the ranking loss; K = 3 averages its three pairs
    hard = soft_preference_loss([torch.tensor([2.0, 1.0, 0.0])], [[[0.5, 1, 1], [0, 0.5, 1], [0, 0, 0.5]]])
    assert hard.item() == pytest.approx(
        ranking_loss([torch.tensor([2.0, 1.0, 0.0])], [[(0, 1), (0, 2), (1, 2)]]).item()
    )


def test_soft_targets_need_ai_preferences(tmp_path, tiny_prepare):
    from stages.reward_model import run
    from stages.runtime.manifest import write_jsonl
    from stages.settings.recipe import RewardModelConfig

    rows = [{"prompt": "describe the ocean", "responses": ["fish", "bus"], "finished": [True, True], "ranks": [0, 1]}]
    write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(ValueError, match=r"c.jsonl:1: prefs: missing.*labeler=ai"):
        run(
            RewardModelConfig(targets="soft"),
            policy=tiny_prepare.file("base"),
            comparisons=tmp_path / "c.jsonl",
            heldout=tmp_path / "c.jsonl",
            out_dir=tmp_path / "rm",
        )
