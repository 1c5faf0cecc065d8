"""The embedded task's gold rule and the simulated labeler."""

import pytest

from stages import task
from stages.labelers import LabelerConfig, SimulatedLabeler


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


def test_simulated_labeler_is_noisy_but_content_cached():
    prompts = task.make_prompts(300, seed=5)
    responses = [d.response for d in task.make_demonstrations(600, seed=6)]
    noisy = SimulatedLabeler(LabelerConfig(noise=0.5))
    exact = SimulatedLabeler(LabelerConfig(noise=0.0))
    agree = sum(
        noisy.rank(p, responses[2 * i : 2 * i + 2]) == exact.rank(p, responses[2 * i : 2 * i + 2])
        for i, p in enumerate(prompts)
    )
    assert 0.6 < agree / len(prompts) < 0.99
    assert noisy.rank(prompts[0], responses[:4]) == noisy.rank(prompts[0], responses[:4])
