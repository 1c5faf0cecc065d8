"""Comparisons from a file (`data.comparisons`): HH-RLHF-style pairs train the reward model as
K = 2 rankings through the same code, with nothing sampled and no labeler asked."""

import json
import random

import pytest

from stages import comparisons, prepare, reward_model
from stages.data import task
from stages.data.reader import DataError
from stages.labeling.judges import labeler_ceiling
from stages.runtime.manifest import read_jsonl
from stages.settings.data import DatasetConfig
from stages.settings.labeling import LabelerConfig
from stages.settings.models import ModelConfig

TINY = ModelConfig(hidden_size=32, intermediate_size=64, pretrain_documents=200, pretrain_epochs=1)


def _hh_rows(n: int) -> list[dict]:
    """HH-RLHF transcripts on the embedded task: the chosen reply has the higher gold score; every
    fifth row is two turns long."""
    rng = random.Random(0)
    rows = []
    for i in range(n):
        prompt, topic = task.make_prompt(rng)
        a, b = (task.make_response(rng, topic, rng.random()) for _ in range(2))
        if task.gold_score(prompt, a) < task.gold_score(prompt, b):
            a, b = b, a
        head = f"\n\nHuman: hello\n\nAssistant: hi\n\nHuman: {prompt}" if i % 5 == 0 else f"\n\nHuman: {prompt}"
        rows.append({"chosen": f"{head}\n\nAssistant: {a}", "rejected": f"{head}\n\nAssistant: {b}"})
    return rows


@pytest.fixture(scope="module")
def hh_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("hh") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _hh_rows(200)))
    return path


def test_pairs_from_a_file_train_the_reward_model(hh_file, tmp_path):
    data = prepare.DataConfig(
        n_demonstrations=100,
        n_comparison_prompts=8,
        n_heldout_comparison_prompts=4,
        n_ppo_prompts=8,
        n_eval_prompts=8,
        comparisons=DatasetConfig(path=str(hh_file), kind="preferences", format="hh"),
        heldout_fraction=0.2,
    )
    prep = prepare.run(data, TINY, out_dir=tmp_path / "prep")
    # 20% held out; of the rest, half for the policy's RM and half for the evaluation RM, disjoint
    assert prep.metrics["prepare/dataset_comparisons/rows"] == 80
    assert prep.metrics["prepare/dataset_heldout_comparisons/rows"] == 40
    assert prep.metrics["prepare/dataset_eval_rm_comparisons/rows"] == 80
    splits = [read_jsonl(prep.file(f)) for f in ("dataset_comparisons", "dataset_eval_rm_comparisons")]
    assert not {r["source"] for r in splits[0]} & {r["source"] for r in splits[1]}
    assert splits[0][0]["source"].startswith(f"{hh_file}:")  # every row knows its file and line
    cmp = comparisons.run(
        comparisons.ComparisonsConfig(),
        LabelerConfig(kind="file", rankings_file=str(tmp_path / "never-read.jsonl")),  # must not be asked
        policy=prep.file("base"),
        prompts=prep.file("comparison_prompts"),
        heldout_prompts=prep.file("heldout_comparison_prompts"),
        target_len=6,
        out_dir=tmp_path / "cmp",
        dataset=prep.file("dataset_comparisons"),
        dataset_heldout=prep.file("dataset_heldout_comparisons"),
    )
    rows = read_jsonl(cmp.file("comparisons"))
    assert len(rows) == 80 and all(r["ranks"] == [0, 1] and len(r["responses"]) == 2 for r in rows)
    two_turns = [r for r in rows if len(r["prompt"]) == 3]
    assert two_turns and [m["role"] for m in two_turns[0]["prompt"]] == ["user", "assistant", "user"]
    held = read_jsonl(cmp.file("heldout_comparisons"))
    assert labeler_ceiling(held, None) is None  # a dataset's comparisons have no gold rule to compare with
    rm = reward_model.run(
        reward_model.RewardModelConfig(epochs=4, learning_rate=3e-3, pooling="mean"),
        policy=prep.file("base"),
        comparisons=cmp.file("comparisons"),
        heldout=cmp.file("heldout_comparisons"),
        out_dir=tmp_path / "rm",
    )
    assert rm.metrics["rm/train/accuracy"] > 0.6
    assert "rm/eval/accuracy_k2" in rm.metrics


def test_bad_comparison_rows_stop_prepare_before_any_compute(tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: yes"}) + "\n")
    data = prepare.DataConfig(comparisons=DatasetConfig(path=str(bad), kind="preferences", format="hh"))
    with pytest.raises(DataError, match=r"pairs.jsonl:1: rejected"):
        prepare.run(data, TINY, out_dir=tmp_path / "prep")
    assert not (tmp_path / "prep" / "base").exists()


def test_comparisons_kind_is_checked():
    with pytest.raises(ValueError, match="data.comparisons.kind"):
        prepare.DataConfig(comparisons=DatasetConfig(path="x.jsonl", kind="demonstrations"))
