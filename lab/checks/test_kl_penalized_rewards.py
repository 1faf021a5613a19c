"""Lab checks of ppo.kl_penalized_rewards: the per-token rewards of step 2.

r_t = -β·KL_t + s·[t = the last real token of the row]     (KL_t from per_token_kl), 0 after </s>
"""

import torch
from test_per_token_kl import definition as kl_definition

import ppo
from checklib import (
    LENGTHS,
    T,
    assert_close,
    call_keeping_inputs,
    junk_after_eos,
    prefix_mask,
    rand,
)

F64 = torch.float64


def definition(scores, logprobs, ref_logprobs, mask, beta, kl_min=0.0, kl_max=10.0, estimator="k1"):
    """r_t written out in float64: the KL penalty on every real token, the score on the last one."""
    rewards = -beta * kl_definition(logprobs, ref_logprobs, mask, kl_min, kl_max, estimator)
    for b in range(mask.shape[0]):
        n = int(mask[b].sum())
        if n:  # a row without a real token gets no score
            rewards[b, n - 1] += scores[b].item()
    return rewards


def rollout(seed):
    """Scores, log-probs of π and π_ref on replies that end early (junk after </s>), and their
    mask."""
    mask = prefix_mask()
    scores = rand(len(LENGTHS), seed, scale=2.0)
    ref_logprobs = -rand((len(LENGTHS), T), seed + 1).abs()
    logprobs = ref_logprobs + 3 * rand((len(LENGTHS), T), seed + 2)
    return (
        scores,
        junk_after_eos(logprobs, mask, seed + 3),
        junk_after_eos(ref_logprobs, mask, seed + 4),
        mask,
    )


def test_score_lands_on_the_last_real_token():
    """With β = 0 the reward is the score s of the reply on its last real token (</s>, where the
    mask is last 1), and 0 on every other position — not on the last column, not one past the end.
    """
    scores, logprobs, ref_logprobs, mask = rollout(0)
    rewards = ppo.kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, 0.0)
    assert_close(
        rewards, definition(scores, logprobs, ref_logprobs, mask, 0.0), "rewards with β = 0"
    )


def test_kl_penalized_rewards_leave_their_inputs_unchanged():
    """kl_penalized_rewards changes none of its arguments in place (the scores and log-probs are
    used again)."""
    scores, logprobs, ref_logprobs, mask = rollout(70)
    call_keeping_inputs(
        ppo.kl_penalized_rewards,
        "scores, logprobs, ref_logprobs, mask",
        scores,
        logprobs,
        ref_logprobs,
        mask,
        0.2,
    )


def test_rewards_are_0_after_eos():
    """Nothing lands after </s>: the rewards are 0 where the mask is 0."""
    scores, logprobs, ref_logprobs, mask = rollout(20)
    rewards = ppo.kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, 0.2)
    assert_close(rewards * (1 - mask), torch.zeros_like(mask), "rewards after </s>")


def test_every_real_token_pays_beta_times_kl():
    """With scores 0 the reward is -β·KL_t on every real token (KL_t clamped to [0, 10] as
    per_token_kl)."""
    _, logprobs, ref_logprobs, mask = rollout(10)
    zeros = torch.zeros(len(LENGTHS), dtype=F64)
    rewards = ppo.kl_penalized_rewards(zeros, logprobs, ref_logprobs, mask, 0.3)
    assert_close(
        rewards,
        definition(zeros, logprobs, ref_logprobs, mask, 0.3),
        "rewards with scores 0, β = 0.3",
    )


def test_the_kl_settings_are_passed_on():
    """kl_min, kl_max and estimator reach the KL: r_t = -β·KL_t(kl_min, kl_max, estimator) +
    score."""
    scores, logprobs, ref_logprobs, mask = rollout(30)
    for kl_min, kl_max, estimator in ((-1.0, 2.0, "k1"), (0.0, 10.0, "k3"), (0.0, 0.5, "k3")):
        rewards = ppo.kl_penalized_rewards(
            scores, logprobs, ref_logprobs, mask, 0.5, kl_min, kl_max, estimator
        )
        want = definition(scores, logprobs, ref_logprobs, mask, 0.5, kl_min, kl_max, estimator)
        assert_close(
            rewards, want, f"rewards with kl_min={kl_min}, kl_max={kl_max}, estimator={estimator!r}"
        )


def test_kl_penalized_rewards_match_the_definition():
    """r_t = -β·KL_t + s·[t = last real token] on random inputs, for several β."""
    for seed, beta in ((40, 0.05), (50, 0.2), (60, 1.0)):
        scores, logprobs, ref_logprobs, mask = rollout(seed)
        rewards = ppo.kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, beta)
        assert_close(
            rewards, definition(scores, logprobs, ref_logprobs, mask, beta), f"rewards (β = {beta})"
        )
