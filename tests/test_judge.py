"""The embedded judge: trained on its partial rubric, queried through the AI labeler's code path."""

import pytest

from stages import judge
from stages.labeling.ai_labeler import AiLabeler, load_judge
from stages.settings.labeling import AiLabelerConfig, LabelerConfig


def test_rubric_covers_topic_and_tone_but_not_length():
    assert judge.rubric("describe the garden", "lovely rose") == pytest.approx(1.0 + 1.0)
    assert judge.rubric("describe the garden", "sad fish") == pytest.approx(0.0 - 1.0)
    # length is not in the rubric: six more neutral words change nothing
    assert judge.rubric("describe the garden", "lovely rose the the the the the the") == pytest.approx(2.0)
    assert [judge.rubric_score_token(r) for r in (-1.0, 1.0, 2.0)] == ["1", "7", "10"]  # 1 + 9 * (r + 1) / 3


def test_embedded_judge_learns_its_rubric(tmp_path):
    cfg = judge.JudgeConfig(n_pairs=2000, n_scores=600, n_eval_pairs=200, epochs=2)
    ai = AiLabelerConfig(preamble="A good response stays on the topic and has a positive tone.")
    m = judge.run(cfg, LabelerConfig(kind="ai", ai=ai), target_len=6, out_dir=tmp_path / "judge")
    assert m.metrics["judge/agreement_rubric"] > 0.6  # an untrained judge sits at 0.5
    assert 0 <= m.metrics["judge/position_consistency"] <= 1
    labeler = AiLabeler(ai, load_judge(ai, tmp_path / "judge"))  # loaded back through from_pretrained
    [label] = labeler.label_all([("describe the garden", ["lovely rose tree", "awful bus sad"])])
    assert label["ranks"] == [0, 1]
    good, bad = labeler.score_all(["describe the garden"] * 2, ["lovely rose tree", "awful bus sad"])
    assert -1 <= bad < good <= 1


def test_an_external_judge_trains_nothing(tmp_path):
    ai = AiLabelerConfig(backend="http", model="judge-7b")
    m = judge.run(judge.JudgeConfig(), LabelerConfig(kind="ai", ai=ai), target_len=6, out_dir=tmp_path / "j")
    assert not (tmp_path / "j" / "model").exists() and m.metrics == {}
