"""The embedded task's gold rule and the simulated labeler."""

import pytest

from stages.data import task
from stages.labeling.labelers import CachedLabeler, SimulatedLabeler
from stages.settings.labeling import LabelerConfig


def test_gold_rule_by_hand():
    # 6 words, both nouns on topic (garden), no sentiment words: 1 + 0 - 0
    assert task.gold_score("write about the garden", "the rose and the old seed") == pytest.approx(1.0)
    # 3 words, one noun on topic of two, length penalty 0.5, compound sentiment of "great" alone
    tone = task._analyzer().polarity_scores("great rose fish")["compound"]
    assert task.gold_score("describe the garden", "great rose fish") == pytest.approx(0.5 + tone - 0.5)


def test_unknown_topic_is_a_clear_error():
    with pytest.raises(ValueError, match="does not name a known topic"):
        task.gold_score("write about the weather", "nice")


def test_generation_is_deterministic_and_mixed_quality():
    a, b = task.make_demonstrations(200, seed=3), task.make_demonstrations(200, seed=3)
    assert a == b
    scores = [task.gold_score(d.prompt, d.response) for d in a]
    assert min(scores) < 0 < max(scores)  # headroom for RLHF


def test_simulated_labeler_is_noisy_and_its_noise_is_seeded_by_the_content():
    prompts = task.make_prompts(300, seed=5)
    responses = [d.response for d in task.make_demonstrations(600, seed=6)]
    noisy = SimulatedLabeler(LabelerConfig(noise=0.5))
    exact = SimulatedLabeler(LabelerConfig(noise=0.0))
    agree = sum(
        noisy.rank(p, responses[2 * i : 2 * i + 2]) == exact.rank(p, responses[2 * i : 2 * i + 2])
        for i, p in enumerate(prompts)
    )
    assert 0.6 < agree / len(prompts) < 0.99
    # its noise is seeded by the content, not by the order of the questions: a fresh labeler asked in
    # another order gives every item the same ranks
    items = [(p, responses[2 * i : 2 * i + 3]) for i, p in enumerate(prompts[:50])]
    fresh = SimulatedLabeler(LabelerConfig(noise=0.5))
    assert [fresh.rank(p, rs) for p, rs in reversed(items)][::-1] == [noisy.rank(p, rs) for p, rs in items]


class Counting:
    """A labeler that records what it was asked."""

    identity = "counting"

    def __init__(self) -> None:
        self.asked: list[tuple[str, list[str]]] = []

    def label_all(self, items):
        self.asked += items
        return [{"ranks": list(range(len(rs)))} for _, rs in items]


def test_the_cached_labeler_asks_only_what_it_has_not_labelled_and_remembers_across_processes(tmp_path):
    cache = tmp_path / "labels.jsonl"
    inner = Counting()
    labeler = CachedLabeler(inner, cache)
    a, b, c = ("p1", ["x", "y"]), ("p2", ["y", "z"]), ("p3", ["z", "x"])
    assert labeler.rank_all([a, b, a]) == [[0, 1], [0, 1], [0, 1]]
    assert inner.asked == [a, b] and labeler.asked == 2  # the repeated item asked once
    labeler.rank_all([b, c])
    assert inner.asked == [a, b, c] and labeler.asked == 1  # only the new one
    again = Counting()  # a later run: a new labeler on the same file
    assert CachedLabeler(again, cache).rank_all([c, a, b]) == [[0, 1]] * 3
    assert again.asked == []
    other = Counting()  # the key includes the labeler's identity: another labeler asks afresh
    other.identity = "another"
    CachedLabeler(other, cache).rank_all([a])
    assert other.asked == [a]
