"""DPO: K-way to pairs, the Plackett-Luce loss by hand and its K = 2 equality with sigmoid DPO, the
stage on a tiny model (trl's pairwise losses and our listwise loop, LoRA and full), bad config."""

import math

import pytest
import torch
import torch.nn.functional as F

from stages import dpo
from stages.preference.losses import plackett_luce_loss
from stages.preference.rankings import preference_pairs
from stages.runtime.manifest import write_jsonl
from stages.settings.models import PeftConfig, Tuning
from stages.settings.recipe import TRL_LOSSES, DpoConfig


def test_k_way_ranking_expands_to_its_pairs_ties_dropped():
    a, b, c = [1, 2], [3, 4], [5, 6]  # token ids of three responses
    row = {"ranks": [1, 0, 2]}
    pairs = preference_pairs([([9], [a, b, c])], [row])
    assert {(tuple(p["chosen_ids"]), tuple(p["rejected_ids"])) for p in pairs} == {
        ((3, 4), (1, 2)),
        ((3, 4), (5, 6)),
        ((1, 2), (5, 6)),
    }  # C(3,2) = 3
    assert all(p["prompt_ids"] == [9] for p in pairs)
    tied = preference_pairs([([9], [a, b, c])], [{"ranks": [0, 0, 1]}])
    assert {(tuple(p["chosen_ids"]), tuple(p["rejected_ids"])) for p in tied} == {((1, 2), (5, 6)), ((3, 4), (5, 6))}


def test_plackett_luce_by_hand():
    rewards = torch.tensor([1.0, 2.0, 0.0])
    # best first: response 1 (2.0), then 0 (1.0), then 2 (0.0)
    expected = -(2.0 - math.log(math.e**2 + math.e + 1)) - (1.0 - math.log(math.e + 1))
    assert plackett_luce_loss(rewards, [1, 0, 2]).item() == pytest.approx(expected)


def test_plackett_luce_equals_sigmoid_dpo_at_k_2():
    beta = 0.1
    policy, ref = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.5])  # log-probs of (winner, loser)
    rewards = beta * (policy - ref)
    sigmoid_dpo = -F.logsigmoid(beta * ((policy[0] - ref[0]) - (policy[1] - ref[1])))
    assert plackett_luce_loss(rewards, [0, 1]).item() == pytest.approx(sigmoid_dpo.item())
    assert plackett_luce_loss(rewards.flip(0), [1, 0]).item() == pytest.approx(sigmoid_dpo.item())


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(loss_type="dpo_plus"), "stage.dpo.loss_type"),
        (dict(beta=0.0), "stage.dpo.beta"),
        (dict(beta=-0.1), "stage.dpo.beta"),
        (dict(label_smoothing=0.5), "stage.dpo.label_smoothing"),
    ],
)
def test_bad_dpo_config_is_named(kwargs, key):
    with pytest.raises(ValueError, match=key):
        DpoConfig(**kwargs)


def _comparisons(tiny_prepare, tmp_path):
    """Rankings in which responses with more positive words win (a learnable preference)."""
    from stages.data import task
    from stages.runtime.manifest import read_jsonl

    prompts = [r["prompt"] for r in read_jsonl(tiny_prepare.file("comparison_prompts"))][:48]
    rows = []
    for n, p in enumerate(prompts):
        topic = task.topic_of(p)
        responses = [f"{w} {topic} {w}" for w in ("lovely", "sad", "the")]
        rows.append({"prompt": p, "responses": responses, "finished": [True, True, n % 2 == 0], "ranks": [0, 2, 1]})
    write_jsonl(tmp_path / "cmp.jsonl", rows[:40])
    write_jsonl(tmp_path / "held.jsonl", rows[40:])
    return tmp_path / "cmp.jsonl", tmp_path / "held.jsonl"


@pytest.mark.parametrize(
    "method, loss",
    [
        ("lora", "sigmoid"),
        ("full", "ipo"),
        ("lora", "plackett_luce"),
        ("full", "simpo"),
        ("lora", "orpo"),
        ("full", "kto"),
    ],
)
def test_dpo_stage_moves_the_policy_towards_the_chosen(tiny_prepare, tmp_path, method, loss):
    from stages.models.modeling import load_causal_lm

    cmp, held = _comparisons(tiny_prepare, tmp_path)
    policy = tiny_prepare.file("base")
    cfg = DpoConfig(
        beta=0.1, loss_type=loss, epochs=3, learning_rate=5e-3, batch_size=16, kl_prompts=8, max_new_tokens=4
    )
    peft = Tuning(PeftConfig(method=method, r=4, alpha=8))
    m = dpo.run(cfg, peft, policy=policy, reference=policy, comparisons=cmp, heldout=held, out_dir=tmp_path / "out")
    before, after = load_causal_lm(policy).state_dict(), load_causal_lm(m.file("policy")).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # a plain, merged model folder
    assert m.metrics["dpo/pairs"] == 40 * 3
    assert m.metrics["dpo/eval/accuracy"] > 0.5  # implicit reward orders held-out pairs as labelled
    assert math.isfinite(m.metrics["dpo/kl_to_sft"])
    if loss in TRL_LOSSES:
        assert {"dpo/train/rewards/chosen", "dpo/train/rewards/margins", "dpo/train/rewards/accuracies"} <= set(
            m.metrics
        )
        assert m.metrics["dpo/train/rewards/margins"] > 0


def test_a_later_round_keeps_the_sft_reference(tiny_prepare, tmp_path):
    """Round 2 starts from round 1's policy; its reference is still the SFT policy (an explicit copy)."""
    cmp, held = _comparisons(tiny_prepare, tmp_path)
    sft = tiny_prepare.file("base")
    cfg = DpoConfig(epochs=1, learning_rate=5e-3, batch_size=16, kl_prompts=8, max_new_tokens=4)
    peft = Tuning(PeftConfig(method="lora", r=4, alpha=8))
    r1 = dpo.run(cfg, peft, policy=sft, reference=sft, comparisons=cmp, heldout=held, out_dir=tmp_path / "r1")
    r2 = dpo.run(
        cfg, peft, policy=r1.file("policy"), reference=sft, comparisons=cmp, heldout=held, out_dir=tmp_path / "r2"
    )
    # measured against SFT, not against round 1 (which would start round 2 at zero margin and zero KL)
    assert r2.metrics["dpo/kl_to_sft"] > 0.0
    assert r2.metrics["dpo/eval/accuracy"] > 0.5


def test_dataset_preferences_with_conversations_train_the_same_way(tiny_prepare, tmp_path):
    """`data.comparisons` rows (K = 2, a multi-turn prompt rendered with the chat template) pass as they are."""
    convo = [
        {"role": "user", "content": "describe the garden"},
        {"role": "assistant", "content": "a rose"},
        {"role": "user", "content": "tell me about the garden"},
    ]
    rows = [
        {"prompt": convo, "responses": ["lovely rose tree", "sad bus"], "finished": [True, True], "ranks": [0, 1]}
    ] * 8
    write_jsonl(tmp_path / "c.jsonl", rows)
    cfg = DpoConfig(epochs=1, learning_rate=5e-3, batch_size=4, kl_prompts=4, max_new_tokens=4)
    policy = tiny_prepare.file("base")
    m = dpo.run(
        cfg,
        Tuning(PeftConfig(method="lora", r=4, alpha=8)),
        policy=policy,
        reference=policy,
        comparisons=tmp_path / "c.jsonl",
        heldout=tmp_path / "c.jsonl",
        out_dir=tmp_path / "out",
    )
    assert m.metrics["dpo/pairs"] == 8 and math.isfinite(m.metrics["dpo/kl_to_sft"])


def test_kto_trains_on_unpaired_thumbs_read_by_the_data_worker(tiny_prepare, tmp_path):
    """`data.comparisons.kind=unary` (LLaMA-Factory's KTO layout: messages and a boolean label): each
    response on its own, thumbs up or down, no pair anywhere; KTO still learns which kind is wanted."""
    import json

    from stages.data import task
    from stages.data.reader import as_ranking_rows, load
    from stages.runtime.manifest import read_jsonl
    from stages.settings.data import DatasetConfig

    prompts = list(dict.fromkeys(r["prompt"] for r in read_jsonl(tiny_prepare.file("comparison_prompts"))))[:40]
    assert len(prompts) >= 20
    labelled = []
    for n, p in enumerate(prompts):  # one response per prompt: alternately a wanted and an unwanted one
        word, label = ("lovely", True) if n % 2 == 0 else ("sad", False)
        reply = f"{word} {task.topic_of(p)} {word}"
        labelled.append({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": reply}],
                         "label": label})  # fmt: skip
    path = tmp_path / "kto.json"
    path.write_text(json.dumps(labelled))
    rows = as_ranking_rows(load(DatasetConfig(path=str(path), kind="unary", format="auto")).rows, "unary")
    assert len(rows) == len(prompts) and all(len(r["responses"]) == 1 for r in rows)
    assert [r["thumbs"] for r in rows[:2]] == [[True], [False]]
    write_jsonl(tmp_path / "thumbs.jsonl", rows)
    _, held = _comparisons(tiny_prepare, tmp_path)  # ranked held-out rows: is "lovely" now above "sad"?
    policy = tiny_prepare.file("base")
    cfg = DpoConfig(beta=0.1, loss_type="kto", epochs=3, learning_rate=5e-3, batch_size=16, kl_prompts=8,
                    max_new_tokens=4)  # fmt: skip
    m = dpo.run(cfg, Tuning(PeftConfig(method="full")), policy=policy, reference=policy,
                comparisons=tmp_path / "thumbs.jsonl", heldout=held, out_dir=tmp_path / "out")  # fmt: skip
    assert m.metrics["dpo/pairs"] == 0  # nothing paired: KTO alone can train on this
    assert m.metrics["dpo/eval/accuracy"] > 0.5  # the implicit reward orders held-out rankings as wanted


def test_the_real_kto_demo_reads_as_unpaired_thumbs():
    from conftest import SHARED, need_shared

    from stages.data.reader import as_ranking_rows, load
    from stages.settings.data import DatasetConfig

    path = need_shared(SHARED / "data" / "llamafactory-demo" / "kto_en_demo.json")
    loaded = load(DatasetConfig(path=str(path), kind="unary", format="auto"))
    rows = as_ranking_rows(loaded.rows, "unary")
    thumbs = [t for r in rows for t in r["thumbs"]]
    assert loaded.bad == 0 and len(thumbs) == 300 and 0 < sum(thumbs) < 300  # both kinds of label
    assert all(r["ranks"] == [0 if t else 1 for t in r["thumbs"]] for r in rows)
