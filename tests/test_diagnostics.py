"""Reward-hacking diagnostics by hand (`stages/runtime/diagnostics.py`)."""

import pytest

from stages.runtime.diagnostics import describe, distinct_n, repetition, verdict


def test_distinct_and_repetition_by_hand():
    texts = ["great great great great", "a b c"]
    assert distinct_n(texts, 1) == pytest.approx(4 / 7)  # {great, a, b, c} of 7 words
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)  # {great great, a b, b c} of 3 + 2 bigrams
    assert repetition(texts) == pytest.approx((0.75 + 0.0) / 2)
    assert repetition(["", "x"]) == 0.0 and distinct_n([""], 2) == 0.0


def test_describe_reports_length_and_eos_rate():
    d = describe(["a a", "b"], lengths=[3, 1], finished=[True, False])
    assert d["length"] == 2.0 and d["eos_rate"] == 0.5 and d["repetition"] == 0.25


def test_verdict_flags_kl_or_repetition_past_their_bounds():
    assert verdict(0.5, 0.1, max_kl_per_token=1.0, max_repetition=0.5) == {"status": "ok", "reasons": []}
    flagged = verdict(1.7, 0.75, max_kl_per_token=1.0, max_repetition=0.5)
    assert flagged["status"] == "flagged" and len(flagged["reasons"]) == 2
    assert "max_kl_per_token=1.0" in flagged["reasons"][0] and "max_repetition=0.5" in flagged["reasons"][1]
