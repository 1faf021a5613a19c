"""ppo.py against its definitions, in float64 on small hand-made tensors (B batch, T reply
tokens)."""

import math

import numpy as np
import pytest
import torch

import ppo

F64 = torch.float64


def t(x):
    return torch.tensor(x, dtype=F64)


# a prefix mask: row 0 has 4 real tokens (EOS at index 3), row 1 has 2, row 2 has all 5
MASK = t([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])


def rand(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ----------------------------------------------------------------------------- masked statistics


def test_masked_mean_and_var_ignore_padding():
    x = rand((3, 5), 0)
    real = x[MASK.bool()].numpy()
    assert ppo.masked_mean(x, MASK).item() == pytest.approx(real.mean())
    assert ppo.masked_var(x, MASK).item() == pytest.approx(real.var(ddof=1))
    assert ppo.masked_var(x, MASK, unbiased=False).item() == pytest.approx(real.var())


def test_masked_mean_accepts_integer_and_bool_masks():
    x = rand((3, 5), 1)
    ref = ppo.masked_mean(x, MASK)
    assert torch.equal(ppo.masked_mean(x, MASK.long()), ref)
    assert torch.equal(ppo.masked_mean(x, MASK.bool()), ref)


def test_masked_var_unbiased_needs_two_tokens():
    with pytest.raises(ValueError, match="at least 2"):
        ppo.masked_var(t([[3.0, 7.0]]), t([[1, 0]]))


def test_masked_whiten_gives_mean_0_var_1_and_zero_padding():
    x = 5 + 3 * rand((3, 5), 2)
    w = ppo.masked_whiten(x, MASK)
    assert ppo.masked_mean(w, MASK).item() == pytest.approx(0.0, abs=1e-12)
    assert ppo.masked_var(w, MASK).item() == pytest.approx(1.0, abs=1e-6)
    assert torch.all(w[MASK == 0] == 0)


def test_masked_whiten_without_shift_keeps_the_mean_and_scales_deviations():
    x = 5 + 3 * rand((3, 5), 3)
    w = ppo.masked_whiten(x, MASK, shift_mean=False)
    mean, var = ppo.masked_mean(x, MASK), ppo.masked_var(x, MASK)
    assert ppo.masked_mean(w, MASK).item() == pytest.approx(mean.item())
    assert ppo.masked_var(w, MASK).item() == pytest.approx(1.0, abs=1e-6)
    expected = ((x - mean) / torch.sqrt(var + 1e-8) + mean) * MASK  # TRL's formula
    torch.testing.assert_close(w, expected)


# ----------------------------------------------------------------------------- 2. reward


def test_per_token_kl_is_clamped_nonnegative_bounded_and_masked():
    logprobs = t([[-1.0, -2.0, -30.0, -0.5, -0.1]])
    ref = t([[-2.0, -1.0, -0.1, -40.0, -9.0]])
    mask = t([[1, 1, 1, 1, 0]])
    kl = ppo.per_token_kl(logprobs, ref, mask)
    # diffs: +1, -1 (-> 0), -29.9 (-> 0), +39.5 (-> 10), padding -> 0
    torch.testing.assert_close(kl, t([[1.0, 0.0, 0.0, 10.0, 0.0]]))
    unclamped = ppo.per_token_kl(logprobs, ref, mask, kl_min=None, kl_max=None)
    torch.testing.assert_close(unclamped, t([[1.0, -1.0, -29.9, 39.5, 0.0]]))


def test_score_lands_on_last_real_token_and_nothing_after_eos():
    logprobs, ref = rand((3, 5), 4), rand((3, 5), 5)
    scores = t([10.0, 20.0, 30.0])
    beta = 0.3
    rewards = ppo.kl_penalized_rewards(scores, logprobs, ref, MASK, beta)
    kl = (logprobs - ref).clamp(0, 10) * MASK
    expected = -beta * kl
    expected[0, 3] += 10.0  # EOS of row 0 at index 3
    expected[1, 1] += 20.0
    expected[2, 4] += 30.0
    torch.testing.assert_close(rewards, expected)
    assert torch.all(rewards[MASK == 0] == 0)


def test_rows_with_empty_mask_get_no_score():
    mask = t([[0, 0, 0], [1, 0, 0]])
    rewards = ppo.kl_penalized_rewards(
        t([5.0, 7.0]), torch.zeros(2, 3, dtype=F64), torch.zeros(2, 3, dtype=F64), mask, 0.2
    )
    torch.testing.assert_close(rewards, t([[0.0, 0.0, 0.0], [7.0, 0.0, 0.0]]))


def test_running_moments_equal_numpy_over_the_concatenation():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=n) for n in (32, 7, 50, 2)]
    moments = ppo.RunningMoments()
    for i, b in enumerate(batches):
        batch_mean, batch_std = moments.update(torch.tensor(b))
        assert batch_mean == pytest.approx(b.mean())
        assert batch_std == pytest.approx(b.std(ddof=1))
        seen = np.concatenate(batches[: i + 1])
        assert moments.mean == pytest.approx(seen.mean(), rel=1e-12)
        assert moments.std == pytest.approx(seen.std(ddof=1), rel=1e-12)
        assert moments.count == seen.size


def test_running_moments_state_dict_round_trips_as_plain_floats():
    moments = ppo.RunningMoments()
    moments.update(t([1.0, 2.0, 4.0]))
    state = moments.state_dict()
    assert all(isinstance(v, (int, float)) for v in state.values())
    restored = ppo.RunningMoments()
    restored.load_state_dict(state)
    moments.update(t([0.5, 9.0]))
    restored.update(t([0.5, 9.0]))
    assert restored.state_dict() == moments.state_dict()


def test_normalize_scores_uses_running_moments():
    moments = ppo.RunningMoments()
    scores = t([1.0, 2.0, 3.0, 6.0])
    # before any update: ~identity
    assert torch.equal(ppo.normalize_scores(scores, moments), scores / (1 + 1e-8))
    moments.update(scores)
    s = ppo.normalize_scores(scores, moments)
    assert s.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert s.std().item() == pytest.approx(1.0, abs=1e-6)


# ----------------------------------------------------------------------------- 3. GAE


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_equals_explicit_sum_of_discounted_td_errors(gamma, lam):
    rewards, values = rand((3, 5), 6), rand((3, 5), 7)
    advantages, returns = ppo.gae(rewards, values, MASK, gamma, lam)
    for b in range(3):
        n = int(MASK[b].sum())  # prefix mask: real tokens 0..n-1, V beyond EOS counts as 0
        v = [values[b, i].item() if i < n else 0.0 for i in range(n + 1)]
        deltas = [rewards[b, i].item() + gamma * v[i + 1] - v[i] for i in range(n)]
        for i in range(n):
            expected = sum((gamma * lam) ** k * deltas[i + k] for k in range(n - i))
            assert advantages[b, i].item() == pytest.approx(expected, abs=1e-12)
    torch.testing.assert_close(returns, (advantages + values) * MASK)  # R = A + V on real tokens


def test_gae_with_gamma_lam_1_gives_reward_to_go_minus_value():
    rewards, values = rand((3, 5), 8), rand((3, 5), 9)
    advantages, returns = ppo.gae(rewards, values, MASK, gamma=1.0, lam=1.0)
    reward_to_go = (rewards * MASK).flip(1).cumsum(1).flip(1) * MASK
    torch.testing.assert_close(returns, reward_to_go)
    torch.testing.assert_close(advantages, (reward_to_go - values) * MASK)


def test_nothing_lands_after_eos_in_advantages_and_returns():
    rewards, values = 100 + rand((3, 5), 10), 100 + rand((3, 5), 11)  # big junk in the padding too
    advantages, returns = ppo.gae(rewards, values, MASK)
    assert torch.all(advantages[MASK == 0] == 0) and torch.all(returns[MASK == 0] == 0)
    # and the junk beyond EOS does not leak into the real tokens
    rewards2, values2 = rewards.clone(), values.clone()
    rewards2[MASK == 0], values2[MASK == 0] = -5.0, 7.0
    advantages2, returns2 = ppo.gae(rewards2, values2, MASK)
    torch.testing.assert_close(advantages2, advantages)
    torch.testing.assert_close(returns2, returns)


def test_rloo_advantages_are_reward_minus_the_mean_of_the_other_replies_to_the_same_context():
    """k = 3 replies per context, two contexts, against the definition written out by hand."""
    r = t([1.0, 2.0, 6.0, -1.0, 0.0, 4.0])
    expected = [
        1 - (2 + 6) / 2,
        2 - (1 + 6) / 2,
        6 - (1 + 2) / 2,
        -1 - (0 + 4) / 2,
        0 - (-1 + 4) / 2,
        4 - (-1 + 0) / 2,
    ]
    assert ppo.rloo_advantages(r, 3).tolist() == pytest.approx(expected)
    # zero-mean per context
    assert ppo.rloo_advantages(r, 3).view(2, 3).sum(1).tolist() == pytest.approx([0.0, 0.0])
    # equal rewards: nothing to learn
    assert ppo.rloo_advantages(t([5.0, 5.0]), 2).tolist() == [0.0, 0.0]


def test_grpo_advantages_standardise_each_reply_within_its_context_group():
    """Hand case: groups (1, 2, 3) and (5, 5, 8), k = 3: (r - mean) / (unbiased std + 1e-4), reply
    included."""
    a = ppo.grpo_advantages(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 8.0], dtype=torch.float64), k=3)
    want = [
        -1 / 1.0001,
        0.0,
        1 / 1.0001,
        -1 / (math.sqrt(3) + 1e-4),
        -1 / (math.sqrt(3) + 1e-4),
        2 / (math.sqrt(3) + 1e-4),
    ]
    assert torch.allclose(a, torch.tensor(want, dtype=torch.float64))
    with pytest.raises(ValueError, match="not groups of k"):
        ppo.grpo_advantages(torch.zeros(5), k=3)


def test_rloo_refuses_k_1_and_groups_that_do_not_divide_the_batch():
    with pytest.raises(ValueError, match="k >= 2"):
        ppo.rloo_advantages(t([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="not groups of k = 4"):
        ppo.rloo_advantages(t([1.0, 2.0, 3.0]), 4)


def test_rloo_rows_with_no_real_token_get_no_advantage():
    """Laid out over the reply tokens (as emprl.ppo_iteration does), a row without a real token gets
    0 everywhere, like every position after </s>."""
    mask = t([[1, 1, 0], [0, 0, 0], [1, 0, 0], [1, 1, 1]])
    per_token = ppo.rloo_advantages(t([1.0, 3.0, 2.0, 2.0]), 2)[:, None] * mask
    assert per_token[1].tolist() == [0.0, 0.0, 0.0] and (per_token[mask == 0] == 0).all()
    assert per_token[0].tolist() == [-2.0, -2.0, 0.0]


# ----------------------------------------------------------------------------- 4. losses


def test_policy_clipping_triggers_exactly_outside_the_trust_region():
    ratios = [0.7, 0.85, 1.0, 1.15, 1.3]
    logprobs = t([ratios, ratios]).log()
    old = torch.zeros(2, 5, dtype=F64)
    advantages = t([[1.0] * 5, [-1.0] * 5])
    mask = torch.ones(2, 5, dtype=F64)
    pg_loss, stats = ppo.policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
    # A > 0: the objective is capped at ρ = 1.2 (the 1.3 token is clipped); ρ < 0.8 is NOT clipped
    # (pessimism) A < 0: the objective is capped at ρ = 0.8 (the 0.7 token is clipped); ρ > 1.2 is
    # NOT clipped
    per_token = t([[-0.7, -0.85, -1.0, -1.15, -1.2], [0.8, 0.85, 1.0, 1.15, 1.3]])
    assert pg_loss.item() == pytest.approx(per_token.mean().item())
    assert stats["clipfrac"].item() == pytest.approx(2 / 10)
    assert stats["ratio"].item() == pytest.approx(np.mean(ratios))
    lr = np.log(ratios)
    assert stats["approx_kl"].item() == pytest.approx(0.5 * np.mean(lr**2))
    assert stats["approx_kl_k3"].item() == pytest.approx(np.mean(np.array(ratios) - 1 - lr))


def test_clipped_tokens_get_no_policy_gradient():
    logprobs = t([[math.log(1.3), math.log(1.1), math.log(0.7)]]).requires_grad_()
    pg_loss, _ = ppo.policy_loss(
        logprobs, torch.zeros(1, 3, dtype=F64), t([[1.0, 1.0, -1.0]]), torch.ones(1, 3, dtype=F64)
    )
    pg_loss.backward()
    g = logprobs.grad[0]
    assert g[0] == 0 and g[2] == 0 and g[1] != 0


def test_ratio_exactly_1_and_clipfrac_0_before_first_update():
    logprobs = rand((3, 5), 12)
    pg_loss, stats = ppo.policy_loss(logprobs, logprobs.clone(), rand((3, 5), 13), MASK)
    assert stats["ratio"].item() == 1.0
    assert stats["clipfrac"].item() == 0.0
    assert stats["approx_kl"].item() == 0.0
    assert all(not v.requires_grad for v in stats.values())


def test_policy_loss_ignores_padding():
    logprobs, old, adv = rand((3, 5), 14), rand((3, 5), 15), rand((3, 5), 16)
    loss, _ = ppo.policy_loss(logprobs, old, adv, MASK)
    logprobs2 = logprobs.clone()
    logprobs2[MASK == 0] = 50.0
    loss2, _ = ppo.policy_loss(logprobs2, old, adv, MASK)
    assert loss2.item() == pytest.approx(loss.item())


def test_value_clipping():
    old_values = torch.zeros(1, 4, dtype=F64)
    values = t([[0.1, 0.5, -0.5, 0.5]])
    returns = t([[1.0, 1.0, 1.0, 0.0]])
    vf_loss, stats = ppo.value_loss(
        values, old_values, returns, torch.ones(1, 4, dtype=F64), clip_range_value=0.2
    )
    # token 0 inside the range: (0.1-1)^2; token 1 moved toward R past +0.2: clipped 0.2 is worse ->
    # (0.2-1)^2; token 2 moved away from R: unclipped is worse -> (-0.5-1)^2; token 3 moved away
    # past +0.2: (0.5-0)^2
    per_token = [0.81, 0.64, 2.25, 0.25]
    assert vf_loss.item() == pytest.approx(0.5 * np.mean(per_token))
    assert stats["vf_clipfrac"].item() == pytest.approx(1 / 4)


# ----------------------------------------------------------------------------- 5. statistics


def test_entropy_equals_minus_sum_p_log_p():
    logits = 3 * rand((2, 3, 7), 17)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(ppo.entropy_from_logits(logits), -(p * p.log()).sum(-1))
    uniform = torch.zeros(1, 1, 7, dtype=F64)
    assert ppo.entropy_from_logits(uniform).item() == pytest.approx(math.log(7))
    masked = uniform.clone()
    # </s> forbidden before the minimum length: the entropy of the other 6, not nan
    masked[..., 0] = float("-inf")
    assert ppo.entropy_from_logits(masked).item() == pytest.approx(math.log(6))


def test_explained_variance_is_1_for_perfect_and_0_for_mean_predictions():
    returns = rand((3, 5), 18)
    assert ppo.explained_variance(returns.clone(), returns, MASK) == pytest.approx(1.0)
    mean_prediction = torch.full_like(returns, ppo.masked_mean(returns, MASK).item())
    assert ppo.explained_variance(mean_prediction, returns, MASK) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(ppo.explained_variance(returns, torch.ones_like(returns), MASK))


def test_adaptive_kl_controller_follows_the_formula_and_saturates_at_20_percent():
    ctl = ppo.KLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    ctl.update(6.6, n_steps=32)  # KL above target: β up by (6.6/6 - 1) * 32/10000
    assert ctl.value == pytest.approx(0.2 * (1 + 0.1 * 32 / 10000))
    before = ctl.value
    ctl.update(3.0, n_steps=32)  # below: error -0.5 saturates at -0.2
    assert ctl.value == pytest.approx(before * (1 - 0.2 * 32 / 10000))
    before = ctl.value
    ctl.update(1000.0, n_steps=32)  # far above: saturates at +0.2
    assert ctl.value == pytest.approx(before * (1 + 0.2 * 32 / 10000))
    before = ctl.value
    ctl.update(6.0, n_steps=32)  # on target: unchanged
    assert ctl.value == before
    restored = ppo.KLController()
    restored.load_state_dict(ctl.state_dict())
    assert restored.state_dict() == ctl.state_dict()


def test_fixed_kl_controller_does_not_move():
    ctl = ppo.KLController(0.5, adaptive=False)
    for kl in (0.0, 6.0, 100.0):
        ctl.update(kl, n_steps=32)
    assert ctl.value == 0.5
    restored = ppo.KLController(0.1, adaptive=False)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == 0.5
