"""Rewards from code and the embedded verifiable task: hand-checked answers, every bad reward function
named, the weighted sum by hand, and the PPO stage trained by a function defined in this file."""

import math

import pytest
import torch

from stages import ppo
from stages.data import arithmetic
from stages.evaluate import accuracy_block
from stages.rl import rewards, scoring
from stages.settings.models import PeftConfig, Tuning


def test_the_arithmetic_gold_rule_is_exact_match_of_the_final_answer():
    assert arithmetic.solve("what is 3 plus 4") == 7
    assert arithmetic.solve("what do 9 and 9 make") == 18
    assert arithmetic.final_answer("the answer is 12") == 12
    assert arithmetic.final_answer("the answer is") is None
    assert arithmetic.exact_match("add 2 and 5", "the answer is 7") == 1.0
    assert arithmetic.exact_match("add 2 and 5", "7 is not it, the answer is 8") == 0.0  # the last number counts
    assert arithmetic.exact_match("add 2 and 5", "the answer is 5 plus 2 is 7") == 1.0
    assert arithmetic.exact_match("add 2 and 5", "") == 0.0
    with pytest.raises(ValueError, match="not an arithmetic task prompt"):
        arithmetic.solve("write about the garden")


def test_held_out_combinations_are_never_trained_on():
    train, held = arithmetic.split(0)
    every = set(train) | set(held)
    assert len(every) == len(arithmetic.TEMPLATES) * (arithmetic.MAX_OPERAND + 1) ** 2 == 400
    assert not set(train) & set(held) and len(held) == 100
    assert arithmetic.split(0) == (train, held)  # seeded
    demos = arithmetic.make_demonstrations(2000, 0, train)
    assert {d.prompt for d in demos} <= set(train)
    share = sum(d.correct for d in demos) / len(demos)
    assert abs(share - arithmetic.DEMO_ACCURACY) < 0.03
    assert all(arithmetic.exact_match(d.prompt, d.response) == float(d.correct) for d in demos)
    words = set(arithmetic.vocabulary())
    assert all(set(d.prompt.split()) | set(d.response.split()) <= words for d in demos)


def test_the_embedded_arithmetic_data_keeps_evaluation_on_held_out_prompts():
    from stages.data import sources
    from stages.settings.data import DataConfig

    cfg = DataConfig(task="arithmetic", n_demonstrations=300, n_ppo_prompts=200, n_eval_prompts=100)
    data = sources.assemble(cfg, 50)
    train, held = arithmetic.split(0)
    assert data.gold == "arithmetic" and cfg.gold == "arithmetic"
    assert set(data.prompt_sets["eval_prompts"]) <= set(held)
    assert set(data.prompt_sets["ppo_prompts"]) <= set(train)
    assert sources.gold_scorer("arithmetic")("what is 1 plus 1", "the answer is 2") == 1.0
    with pytest.raises(ValueError, match="data.task"):
        DataConfig(task="algebra")


def test_accuracy_block_by_hand():
    block = accuracy_block([1, 0, 0, 0], [1, 1, 1, 0])
    assert block["sft"]["accuracy"] == 0.25 and block["policy"]["accuracy"] == 0.75
    assert block["difference"] == 0.5 and block["ratio"] == 3.0
    half = 1.96 * math.sqrt((0.25 * 0.75 + 0.75 * 0.25) / 4)
    assert block["difference_ci95"] == pytest.approx([0.5 - half, 0.5 + half])
    lo, hi = block["sft"]["ci95"]
    assert 0 < lo < 0.25 < hi < 1  # Wilson: inside [0, 1], around the estimate
    assert accuracy_block([0, 0], [1, 0])["ratio"] is None  # no ratio from a zero


# --- reward functions named in config -------------------------------------------------------------

CALLS: list[int] = []


def longer_is_better(prompts: list[str], responses: list[str]) -> list[float]:
    """A reward defined in the test file: the number of words, capped at 6."""
    CALLS.append(len(responses))
    assert len(prompts) == len(responses)
    return [min(6, len(r.split())) / 6 for r in responses]


def wrong_count(prompts, responses):
    return [0.0]


def not_finite(prompts, responses):
    return [math.nan] * len(responses)


NOT_CALLABLE = 3


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_colon_here", "not of the form package.module:name"),
        ("no.such.module:fn", "no module named|cannot find module"),
        (f"{__name__}:missing", "has no attribute 'missing'"),
        (f"{__name__}:NOT_CALLABLE", "is a int, not a callable"),
    ],
)
def test_a_bad_reward_function_is_named(spec, message):
    with pytest.raises(ValueError, match=f"stage.ppo.reward_function: .*({message})"):
        rewards.load(spec)


def test_a_misbehaving_reward_function_is_named():
    for name, message in (("wrong_count", "returned 1 scores for 2 responses"), ("not_finite", "non-finite")):
        score = rewards.FunctionScore(f"{__name__}:{name}")
        with pytest.raises(ValueError, match=f"stage.ppo.reward_function: .*{message}"):
            score.scores(["p", "q"], ["a", "b"], "cpu")


def test_reward_function_and_reward_model_sum_with_their_weights():
    class FakeModel:
        frozen: list = []

        def __call__(self, tokenizer, prompts, rollout):
            return torch.tensor([1.0, -1.0])

    cfg = ppo.PpoConfig(
        reward_function=f"{__name__}:longer_is_better", reward_model_weight=0.5, reward_function_weight=2
    )
    scores = scoring.Scores(FakeModel(), rewards.FunctionScore(cfg.reward_function), cfg)
    got = scores.function.scores(["p", "p"], ["a b c", "a b c d e f g"], "cpu")
    assert got.tolist() == [0.5, 1.0]
    # by hand: 0.5 * [1, -1] + 2 * [0.5, 1.0]
    expected = 0.5 * torch.tensor([1.0, -1.0]) + 2 * got
    assert expected.tolist() == [1.5, 1.5]
    with pytest.raises(ValueError, match="reward_model_weight: must be >= 0"):
        ppo.PpoConfig(reward_model_weight=-1)
    with pytest.raises(ValueError, match="nothing scores the rollouts"):
        ppo._scorer(ppo.PpoConfig(), None, None, None, None, "cpu", "fp32")


def test_ppo_trains_on_a_reward_function_defined_in_this_file(chain_prepare, tmp_path):
    """The reward-function path alone (pipeline=rlvr's): no reward model, GRPO's groups, the function
    called once per update with the whole batch, and the policy moved."""
    from safetensors.torch import load_file

    CALLS.clear()
    policy = chain_prepare
    m = ppo.run(
        ppo.PpoConfig(
            updates=2,
            rollouts_per_update=16,
            minibatch_size=8,
            advantage="grpo",
            samples_per_prompt=4,
            kl_penalty="loss",
            reward_function=f"{__name__}:longer_is_better",
        ),
        Tuning(PeftConfig("full")),
        policy=policy["sft"],
        prompts=policy["prompts"],
        out_dir=tmp_path,
    )
    assert CALLS == [16, 16]  # batched: one call per update
    assert m.metrics["ppo/value_model"] == 0.0
    before, after = (
        load_file(str(policy["sft"] / "model.safetensors")),
        load_file(str(m.file("policy") / "model.safetensors")),
    )
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.fixture(scope="module")
def chain_prepare(tiny_prepare, tmp_path_factory):
    from stages import sft

    out = sft.run(
        sft.SftConfig(epochs=1, batch_size=32),
        Tuning(PeftConfig("full")),
        base=tiny_prepare.file("base"),
        demonstrations=tiny_prepare.file("demonstrations"),
        out_dir=tmp_path_factory.mktemp("sft"),
    )
    return {"sft": out.file("policy"), "prompts": tiny_prepare.file("ppo_prompts")}
