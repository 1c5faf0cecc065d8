"""Labelers: the file labeler round trip (export, rank outside, import, train) and the content cache."""

import json
from pathlib import Path

import pytest

from stages import comparisons, reward_model
from stages.labeling.labelers import CachedLabeler, SimulatedLabeler
from stages.runtime.errors import LabelsMissing
from stages.runtime.manifest import read_jsonl
from stages.settings.labeling import LabelerConfig


def _file_cfg(tmp_path: Path, rankings: Path | None = None) -> LabelerConfig:
    return LabelerConfig(
        kind="file",
        task_file=str(tmp_path / "task.jsonl"),
        rankings_file=str(rankings) if rankings else None,
        cache_file=str(tmp_path / "cache.jsonl"),
    )


def test_file_labeler_round_trip_trains_a_reward_model(tiny_prepare, tmp_path):
    policy = tiny_prepare.file("base")
    kw = dict(
        policy=policy,
        prompts=tiny_prepare.file("comparison_prompts"),
        heldout_prompts=tiny_prepare.file("heldout_comparison_prompts"),
        target_len=6,
    )
    cfg = comparisons.ComparisonsConfig(k=3, max_new_tokens=8)
    # 1. export: the stage stops and says where the task is and how to resume
    with pytest.raises(LabelsMissing, match="labeler.rankings_file") as err:
        comparisons.run(cfg, _file_cfg(tmp_path), out_dir=tmp_path / "out1", **kw)
    assert str(tmp_path / "task.jsonl") in str(err.value)
    task_rows = read_jsonl(tmp_path / "task.jsonl")
    assert len(task_rows) == 160 and all(len(r["responses"]) == 3 for r in task_rows)
    # 2. rankers fill in the file outside the program: longest response first
    for row in task_rows:
        row["ranking"] = [r["id"] for r in sorted(row["responses"], key=lambda r: -len(r["text"]))]
    filled = tmp_path / "rankings.jsonl"
    filled.write_text("".join(json.dumps(r) + "\n" for r in task_rows))
    # 3. import: rankings land in the comparisons, then a reward model trains on them
    m = comparisons.run(cfg, _file_cfg(tmp_path, filled), out_dir=tmp_path / "out2", **kw)
    rows = read_jsonl(m.file("comparisons"))
    for row, exported in zip(rows, task_rows):
        best = exported["ranking"][0]
        assert row["ranks"][int(best[1:])] == 0
    rm = reward_model.run(
        reward_model.RewardModelConfig(epochs=1, learning_rate=1e-3),
        policy=policy,
        comparisons=m.file("comparisons"),
        heldout=m.file("heldout_comparisons"),
        out_dir=tmp_path / "rm",
    )
    assert rm.metrics["rm/train/loss_last"] == rm.metrics["rm/train/loss_last"]  # finite


def test_file_labeler_rejects_rankings_that_do_not_match_the_export(tiny_prepare, tmp_path):
    kw = dict(
        policy=tiny_prepare.file("base"),
        prompts=tiny_prepare.file("comparison_prompts"),
        heldout_prompts=tiny_prepare.file("heldout_comparison_prompts"),
        target_len=6,
    )
    cfg = comparisons.ComparisonsConfig(k=2, max_new_tokens=4)
    with pytest.raises(LabelsMissing):
        comparisons.run(cfg, _file_cfg(tmp_path), out_dir=tmp_path / "o", **kw)
    rows = read_jsonl(tmp_path / "task.jsonl")
    for row in rows:
        row["ranking"] = ["r0", "r1"]
    rows[4]["responses"][1]["id"] = "r9"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=rf"{bad}:5: responses: differ from the export"):
        comparisons.run(cfg, _file_cfg(tmp_path, bad), out_dir=tmp_path / "o2", **kw)
    assert not (tmp_path / "o2" / "comparisons.jsonl").exists()


def test_labels_are_cached_by_content(tmp_path):
    cached = CachedLabeler(SimulatedLabeler(LabelerConfig()), tmp_path / "cache.jsonl")
    items = [("write about the garden", ["lovely rose", "sad fish"]), ("describe the ocean", ["wave", "bus"])]
    first = cached.rank_all(items)
    assert cached.asked == 2
    again = CachedLabeler(SimulatedLabeler(LabelerConfig()), tmp_path / "cache.jsonl")  # a new process
    assert again.rank_all(items) == first and again.asked == 0
    assert again.rank_all(items + [("describe the ocean", ["fish", "bus"])])[:2] == first and again.asked == 1
