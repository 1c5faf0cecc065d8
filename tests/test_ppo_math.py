"""PPO arithmetic against tensors computed by hand."""

import math

import pytest
import torch

from stages.rl import ppo_math as pm


def test_kl_penalty_on_every_token_and_score_on_the_last():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    score = torch.tensor([2.0, -1.0])
    kl = pm.kl_estimate(logp, ref, "k1") * mask
    rewards = pm.kl_penalized_rewards(score, kl, mask, beta=0.1)
    # kl = logp - ref: [[0.5, -1, 0], [1, 0, (masked)]]
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0], [1.0, 0.0, 0.0]]))
    expected = torch.tensor([[-0.05, 0.1, 2.0], [-0.1, -1.0, 0.0]])
    assert torch.allclose(rewards, expected)


def test_gae_matches_hand_computation():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.2, 0.4]])
    mask = torch.ones(1, 3)
    adv, ret = pm.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # deltas: t2 = 1 - 0.4 = 0.6; t1 = 0 + 0.4 - 0.2 = 0.2; t0 = 0 + 0.2 - 0.5 = -0.3
    # A2 = 0.6; A1 = 0.2 + 0.5*0.6 = 0.5; A0 = -0.3 + 0.5*0.5 = -0.05
    assert torch.allclose(adv, torch.tensor([[-0.05, 0.5, 0.6]]))
    assert torch.allclose(ret, torch.tensor([[0.45, 0.7, 1.0]]))


def test_gae_ignores_padding_after_the_response():
    rewards = torch.tensor([[0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 9.0]])  # the padded value must not leak in
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv, _ = pm.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # t1: 1 - 0.2 = 0.8; t0: 0 + 0.2 - 0.5 + 0.8 = 0.5
    assert torch.allclose(adv, torch.tensor([[0.5, 0.8, 0.0]]))


def test_masked_whiten():
    x = torch.tensor([[1.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    w = pm.masked_whiten(x, mask)
    # mean 2, var 1 over the unmasked entries
    assert torch.allclose(w, torch.tensor([[-1.0, 1.0, 0.0]]), atol=1e-6)


def test_clipped_policy_loss():
    old = torch.log(torch.tensor([[0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.75, 0.25]]))  # ratios 1.5 and 0.5
    adv = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    loss, clipfrac, approxkl = pm.policy_loss(new, old, adv, mask, clip=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(0.5, 0.8) = 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert clipfrac.item() == pytest.approx(1.0)
    assert approxkl.item() == pytest.approx(
        0.5 * ((torch.log(torch.tensor(1.5))) ** 2 + torch.log(torch.tensor(0.5)) ** 2).item() / 2
    )


def test_unclipped_region_is_plain_policy_gradient():
    old = torch.zeros(1, 1)
    new = torch.log(torch.tensor([[1.1]]))
    loss, clipfrac, _ = pm.policy_loss(new, old, torch.tensor([[2.0]]), torch.ones(1, 1), clip=0.2)
    assert loss.item() == pytest.approx(-2.2)
    assert clipfrac.item() == 0.0


def test_clipped_value_loss():
    old_values = torch.tensor([[1.0, 1.0]])
    values = torch.tensor([[2.0, 1.1]])
    returns = torch.tensor([[3.0, 0.0]])
    loss, clipfrac = pm.value_loss(values, old_values, returns, torch.ones(1, 2), clip=0.2)
    # token 0: unclipped (2-3)^2=1, clipped (1.2-3)^2=3.24 -> 3.24; token 1: (1.1)^2=1.21 vs 1.1^2 -> 1.21
    assert loss.item() == pytest.approx(0.5 * (3.24 + 1.21) / 2)
    assert clipfrac.item() == pytest.approx(0.5)


def test_k3_estimator_is_nonnegative_and_matches_by_hand():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    k3 = pm.kl_estimate(logp, ref, "k3")
    # log r = ref - logp = [-0.5, 1.0]; k3 = e^{log r} - 1 - log r
    expected = torch.tensor([[math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0]])
    assert torch.allclose(k3, expected)
    assert (k3 >= 0).all()
    with pytest.raises(ValueError, match="kl_estimator"):
        pm.kl_estimate(logp, ref, "k2")


def test_adaptive_kl_controller_by_hand():
    ctl = pm.KLController(beta=0.1, target=6.0, horizon=10000)
    # KL 9 -> error clip(9/6 - 1 = 0.5) = 0.2; beta *= 1 + 0.2 * 64 / 10000
    assert ctl.update(9.0, n_steps=64) == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))
    # KL 5.4 -> error -0.1
    before = ctl.beta
    assert ctl.update(5.4, n_steps=100) == pytest.approx(before * (1 - 0.1 * 100 / 10000))


def test_a_kl_controller_without_a_target_keeps_beta_fixed():
    ctl = pm.KLController(beta=0.02)
    assert ctl.update(50.0, n_steps=64) == 0.02 and ctl.beta == 0.02


def test_ema_update_by_hand():
    ema = {"w": torch.tensor([1.0, 2.0]), "step": torch.tensor(3)}
    pm.ema_update(ema, {"w": torch.tensor([3.0, 0.0]), "step": torch.tensor(4)}, decay=0.75)
    assert torch.allclose(ema["w"], torch.tensor([1.5, 1.5]))  # 0.75 * old + 0.25 * new
    assert ema["step"].item() == 4  # integer buffers are copied


def test_ptx_mixing_adds_the_scaled_lm_gradient():
    w = torch.tensor(2.0, requires_grad=True)
    ppo_loss, lm_loss = 3 * w, w**2
    pm.ptx_mix(ppo_loss, lm_loss, coef=27.8).backward()
    assert w.grad.item() == pytest.approx(3 + 27.8 * 2 * 2.0)


def test_group_estimators_by_hand():
    score = torch.tensor([1.0, 0.0, 3.0, 3.0])  # two groups of n=2: (1, 0) and (3, 3)
    # grpo: mean 0.5, unbiased std sqrt(0.5) = 0.7071 -> +-0.7071; the tied group gives 0
    grpo = pm.group_relative(score, 2, "grpo")
    assert torch.allclose(grpo, torch.tensor([0.5 / (0.5**0.5 + 1e-6), -0.5 / (0.5**0.5 + 1e-6), 0.0, 0.0]))
    assert torch.allclose(pm.group_relative(score, 2, "dr_grpo"), torch.tensor([0.5, -0.5, 0.0, 0.0]))
    # rloo, n=3 on (1, 2, 6): 1 - 4 = -3, 2 - 3.5 = -1.5, 6 - 1.5 = 4.5
    rloo = pm.group_relative(torch.tensor([1.0, 2.0, 6.0]), 3, "rloo")
    assert torch.allclose(rloo, torch.tensor([-3.0, -1.5, 4.5]))
    with pytest.raises(ValueError, match="samples_per_prompt"):
        pm.group_relative(score, 3, "grpo")


def test_critic_free_advantages_broadcast_the_return_and_penalise_kl():
    score = torch.tensor([1.0, 0.0])
    kl = torch.tensor([[0.5, 1.0, 0.0], [1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # dr_grpo, KL as a loss term (beta 0): (0.5, -0.5) on every response token
    adv = pm.critic_free_advantages(score, kl, mask, estimator="dr_grpo", n=2, beta=0.0)
    assert torch.allclose(adv, torch.tensor([[0.5, 0.5, 0.5], [-0.5, -0.5, 0.0]]))
    # rloo with the KL in the reward, beta 0.1
    # n=2 leave-one-out baselines: 1 - 0 = 1 and 0 - 1 = -1
    adv = pm.critic_free_advantages(score, kl, mask, estimator="rloo", n=2, beta=0.1)
    # rewards row0: [-0.05, -0.1, 1.0]; returns: [0.85, 0.9, 1.0]
    # rewards row1: [-0.1, -1.0, 0]; returns: [-1.1, -1.0, 0]
    assert torch.allclose(adv, torch.tensor([[0.85, 0.9, 1.0], [-1.1, -1.0, 0.0]]))


def test_reinforce_pp_whitens_the_returns_over_the_batch():
    score = torch.tensor([2.0, 0.0])
    kl = torch.zeros(2, 2)
    mask = torch.ones(2, 2)
    adv = pm.critic_free_advantages(score, kl, mask, estimator="reinforce_pp", n=1, beta=0.0)
    # returns [[2, 2], [0, 0]]: mean 1, variance 1 -> [[1, 1], [-1, -1]]
    assert torch.allclose(adv, torch.tensor([[1.0, 1.0], [-1.0, -1.0]]), atol=1e-4)
    base = pm.critic_free_advantages(score, kl, mask, estimator="reinforce_pp_baseline", n=2, beta=0.0)
    assert torch.allclose(base, torch.tensor([[1.0, 1.0], [-1.0, -1.0]]), atol=1e-4)


def test_dr_grpo_aggregation_has_no_length_bias():
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    assert pm.aggregate(x, mask).item() == pytest.approx(1.0)  # token mean
    assert pm.aggregate(x, mask, horizon=4).item() == pytest.approx((4 + 1) / (2 * 4))
    # k3 of equal log-probs is 0; of log r = -1: e^-1 - 1 + 1 = 0.3679
    logp, ref = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, -1.0]])
    assert pm.kl_loss(logp, ref, torch.ones(1, 2)).item() == pytest.approx(math.exp(-1) / 2, rel=1e-5)


def test_clip_higher_lets_an_unlikely_token_grow_past_the_symmetric_bound():
    """DAPO's decoupled clip, by hand: ratio 1.25 with advantage 2 is clipped at 1.2 symmetrically
    (loss -2.4, clipped) but not under clip_high=0.28 (loss -2.5, unclipped)."""
    old, new, mask, adv = torch.zeros(1, 1), torch.log(torch.tensor([[1.25]])), torch.ones(1, 1), torch.tensor([[2.0]])
    sym, sym_frac, _ = pm.policy_loss(new, old, adv, mask, clip=0.2)
    dapo, dapo_frac, _ = pm.policy_loss(new, old, adv, mask, clip=0.2, clip_high=0.28)
    assert sym.item() == pytest.approx(-2.4) and sym_frac.item() == 1.0
    assert dapo.item() == pytest.approx(-2.5) and dapo_frac.item() == 0.0
    low, _, _ = pm.policy_loss(torch.log(torch.tensor([[0.7]])), old, -adv, mask, clip=0.2, clip_high=0.28)
    assert low.item() == pytest.approx(2 * 0.8)  # the lower bound is still 1 - clip


def test_loss_aggregation_modes_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert pm.aggregate(x, mask, mode="token-mean").item() == pytest.approx(10 / 4)
    assert pm.aggregate(x, mask, mode="seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert pm.aggregate(x, mask, mode="seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    assert pm.aggregate(x, mask, horizon=5).item() == pytest.approx(10 / (2 * 5))  # Dr. GRPO


def test_gspo_sequence_ratio_by_hand():
    """One length-normalised ratio per response: log-ratios [0.1, 0.3] and [-0.2] (its second token is
    padding) give exp(0.2) = 1.2214 (clipped at 1.2 with advantage 1) and exp(-0.2) = 0.8187 (inside
    [0.8, 1.2] with advantage -1): loss mean(-1.2, 0.8187), one response of two clipped."""
    old = torch.zeros(2, 2)
    new = torch.tensor([[0.1, 0.3], [-0.2, 5.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    loss, clipfrac, approxkl = pm.policy_loss(new, old, adv, mask, clip=0.2, level="sequence")
    assert loss.item() == pytest.approx((-1.2 + math.exp(-0.2)) / 2, abs=1e-6)
    assert clipfrac.item() == 0.5
    assert approxkl.item() == pytest.approx(0.5 * (0.01 + 0.09 + 0.04) / 3)


def test_truncated_importance_weight_by_hand():
    """Asynchronous rollouts: each token's loss weighed by min(pi_old / pi_behaviour, cap). With the new
    policy at pi_old (ratio 1, no clipping) and advantage 1, token losses -1 become -w: log-ratios to
    the behaviour policy 0.5, -1.0 and 2.0 give exp(0.5) = 1.6487, exp(-1) = 0.3679 and exp(2) = 7.39,
    truncated at cap 2."""
    old = torch.tensor([[-1.0, -2.0, -0.5]])
    behaviour = torch.tensor([[-1.5, -1.0, -2.5]])
    mask, adv = torch.ones(1, 3), torch.ones(1, 3)
    loss, clipfrac, _ = pm.policy_loss(old.clone(), old, adv, mask, clip=0.2, behaviour_logprobs=behaviour, tis_cap=2.0)
    assert loss.item() == pytest.approx(-(math.exp(0.5) + math.exp(-1.0) + 2.0) / 3, abs=1e-6)
    assert clipfrac.item() == 0.0
    assert pm.truncated_is_weight(torch.tensor([0.5, -1.0, 2.0]), 2.0).tolist() == pytest.approx(
        [math.exp(0.5), math.exp(-1.0), 2.0]
    )
    plain, _, _ = pm.policy_loss(old.clone(), old, adv, mask, clip=0.2)
    assert plain.item() == pytest.approx(-1.0)  # without a behaviour policy every weight is 1


def test_truncated_importance_weight_gives_no_gradient_of_its_own():
    """The weight multiplies the clipped surrogate's gradient; it is not differentiated itself."""
    new = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    old, behaviour = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -2.0]])
    loss, _, _ = pm.policy_loss(new, old, torch.ones(1, 2), torch.ones(1, 2), clip=0.2, behaviour_logprobs=behaviour)
    loss.backward()  # d/dnew of -w * exp(new - old) at new = old: -w / 2 per token (token mean)
    assert new.grad[0].tolist() == pytest.approx([-math.exp(0.5) / 2, -0.5])


def test_truncated_importance_weight_at_the_sequence_level_by_hand():
    """GSPO's form: one weight per response from its mean token log-ratio to the behaviour policy:
    [0.4, 0.2] gives exp(0.3); [3.0] (its second token padding) exp(3) truncated at 2."""
    old = torch.zeros(2, 2)
    behaviour = torch.tensor([[-0.4, -0.2], [-3.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    loss, _, _ = pm.policy_loss(old.clone(), old, adv, mask, clip=0.2, level="sequence", behaviour_logprobs=behaviour)
    assert loss.item() == pytest.approx((-math.exp(0.3) + 2.0) / 2, abs=1e-6)


def test_async_rollouts_refuse_what_the_worker_cannot_do():
    from stages.settings.recipe import PpoConfig

    with pytest.raises(ValueError, match=r"async_rollouts=1 does not run with stage.ppo.dynamic_sampling"):
        PpoConfig(async_rollouts=1, dynamic_sampling=True, advantage="grpo", samples_per_prompt=4)
    with pytest.raises(ValueError, match=r"async_rollouts=2 does not run with stage.ppo.layout=shared_base"):
        PpoConfig(async_rollouts=2, layout="shared_base")
    with pytest.raises(ValueError, match=r"stage.ppo.tis_cap"):
        PpoConfig(tis_cap=0.5)
    with pytest.raises(ValueError, match=r"stage.ppo.async_rollouts"):
        PpoConfig(async_rollouts=-1)


def test_overlong_penalty_by_hand():
    """DAPO's soft punishment with 10 new tokens and a buffer of 4: nothing up to 6 tokens, then
    linear to -penalty at 10."""
    got = pm.overlong_penalty(torch.tensor([5, 6, 8, 10]), max_new_tokens=10, buffer=4, penalty=1.0)
    assert got.tolist() == pytest.approx([0.0, 0.0, -0.5, -1.0])
    assert pm.overlong_penalty(torch.tensor([9]), 10, 4, 0.5).item() == pytest.approx(-0.375)


def test_dapo_and_gspo_keys_are_checked_across_fields():
    from stages.settings.recipe import PpoConfig

    with pytest.raises(ValueError, match=r"loss_aggregation: 'sum' is not one of token-mean"):
        PpoConfig(loss_aggregation="sum")
    with pytest.raises(ValueError, match=r"advantage=dr_grpo aggregates its own way"):
        PpoConfig(
            advantage="dr_grpo", samples_per_prompt=4, rollouts_per_update=64, loss_aggregation="seq-mean-token-sum"
        )
    with pytest.raises(ValueError, match=r"ratio_level=sequence \(GSPO\) .* not gae"):
        PpoConfig(ratio_level="sequence")
    with pytest.raises(ValueError, match=r"overlong_buffer \(16\) must be below stage.ppo.max_new_tokens \(16\)"):
        PpoConfig(overlong_buffer=16, max_new_tokens=16)
    PpoConfig(advantage="grpo", samples_per_prompt=4, rollouts_per_update=64, ratio_level="sequence", clip_high=0.28)


def _fake_rollouts(scores_by_call: list[list[float]]):
    """A `sample_scored` that answers each call with the next scores, each response's query id its
    prompt's number (so the test can see which groups were kept)."""
    from stages.models.modeling import Rollout

    calls = iter(scores_by_call)

    def sample_scored(prompts):
        ids = torch.tensor([[int(p.split()[-1])] for p in prompts])
        ones = torch.ones_like(ids)
        rollout = Rollout(ids, ones, ids.clone(), ones, torch.ones(len(prompts), dtype=torch.bool))
        return rollout, torch.tensor(next(calls))

    return sample_scored


def _stream():
    counter = iter(range(100, 200))
    return lambda k: [f"prompt {next(counter)}" for _ in range(k)]


def test_dynamic_sampling_replaces_groups_that_scored_alike_within_its_bound():
    """Groups of n=2. First sample: prompt 1's pair ties (1, 1), prompt 2's differs (0, 1). Refill 1:
    prompt 100 ties again (2, 2); refill 2: prompt 101 differs (0, 3). The batch keeps its size."""
    from stages.rl.dynamic_sampling import fill, informative

    assert informative(torch.tensor([1.0, 1.0, 0.0, 1.0]), 2) == [False, True]
    prompts = ["prompt 1", "prompt 1", "prompt 2", "prompt 2"]
    calls = [[1.0, 1.0, 0.0, 1.0], [2.0, 2.0], [0.0, 3.0]]
    rollout, score, kept, stats = fill(_fake_rollouts(calls), _stream(), prompts, 2, max_refills=3, pad=0)
    assert kept == ["prompt 2", "prompt 2", "prompt 101", "prompt 101"]
    assert rollout.query[:, 0].tolist() == [2, 2, 101, 101] and score.tolist() == [0.0, 1.0, 0.0, 3.0]
    assert stats == {"uninformative_share": 0.5, "refills": 2.0, "uninformative_share_final": 0.0}
    bounded = fill(_fake_rollouts(calls), _stream(), prompts, 2, max_refills=1, pad=0)
    assert bounded[2] == ["prompt 2", "prompt 2", "prompt 100", "prompt 100"]  # the bound: one refill
    assert bounded[3]["uninformative_share_final"] == 0.5
