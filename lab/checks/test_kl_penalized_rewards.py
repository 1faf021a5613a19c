"""Lab checks of ppo.kl_penalized_rewards: the per-token rewards of step 2.

r_t = -β·KL_t + s·[t = the last real token of the row]     (KL_t from per_token_kl), 0 after </s>
"""

import torch
from test_per_token_kl import definition as kl_definition

import ppo
from checklib import (
    assert_any_size,
    assert_close,
    assert_dtype,
    call_keeping_inputs,
    conditions,
    convert,
    describe,
    draw_lengths,
    junk_after_eos,
    prefix_mask,
    rand,
    tolerance,
)

F64 = torch.float64
DEFINITION = "r_t = -β·KL_t + s·[t = last real token], 0 after </s>"

# The mistakes a message may name, each only when the rewards are what it gives (recomputed).
CAUSES = {
    "last_column": "the score lands on the last column, not on the last real token",
    "after_eos": "the score lands on the last real token and on every position after it",
    "sign": "+β·KL: the penalty's sign is flipped",
    "settings": "kl_min, kl_max and estimator are not passed on to the KL: they are the rewards of "
    "the default clamp [0, 10] and k1",
}


def definition(
    scores,
    logprobs,
    ref_logprobs,
    mask,
    beta,
    kl_min=0.0,
    kl_max=10.0,
    estimator="k1",
    where="last",
):
    """r_t written out in float64: the KL penalty on every real token, the score on the last one
    (where="last"; "column" and "after" put it on the last column, or from the last real token on:
    two mistakes)."""
    rewards = -beta * kl_definition(logprobs, ref_logprobs, mask, kl_min, kl_max, estimator)
    for b in range(mask.shape[0]):
        n = int(mask[b].sum())
        if n and where == "column":
            rewards[b, -1] += scores[b].item()
        elif n and where == "after":
            rewards[b, n - 1 :] += scores[b].item()
        elif n:  # a row without a real token gets no score
            rewards[b, n - 1] += scores[b].item()
    return rewards


def causes(scores, logprobs, ref_logprobs, mask, beta, *settings):
    """(words, rewards) of each mistake of CAUSES, on these inputs."""
    args = (scores, logprobs, ref_logprobs, mask)
    return [
        (CAUSES["last_column"], definition(*args, beta, *settings, where="column")),
        (CAUSES["after_eos"], definition(*args, beta, *settings, where="after")),
        (CAUSES["sign"], definition(*args, -beta, *settings)),
        (CAUSES["settings"], definition(*args, beta)),
    ]


def rollout(seed, lengths=None, T=None):
    """Scores, log-probs of π and π_ref on replies that end early (junk after </s>), and their mask;
    sizes drawn from seed unless given."""
    if lengths is None:
        lengths, T = draw_lengths(seed)
    mask = prefix_mask(lengths, T)
    scores = rand(len(lengths), seed, scale=2.0)
    ref_logprobs = -rand(mask.shape, seed + 1).abs()
    logprobs = ref_logprobs + 3 * rand(mask.shape, seed + 2)
    return (
        scores,
        junk_after_eos(logprobs, mask, seed + 3),
        junk_after_eos(ref_logprobs, mask, seed + 4),
        mask,
    )


def test_kl_penalized_rewards_work_for_any_batch_size_and_reply_length():
    """Batches of 3 to 9 rows of up to 30 tokens (the tiny preset samples replies of up to 12
    tokens, the cpu preset up to 30) get the definition's rewards, as the batch of 5 rows of 7
    tokens does."""

    def compute(lengths, width):
        args = rollout(80, lengths, width)
        return ppo.kl_penalized_rewards(*args, 0.3), definition(*args, 0.3)

    assert_any_size(compute, "rewards", 90)


def test_score_lands_on_the_last_real_token():
    """With β = 0 the reward is the score s of the reply on its last real token (</s>, where the
    mask is last 1), and 0 on every other position."""
    args = rollout(0)
    rewards = ppo.kl_penalized_rewards(*args, 0.0)
    assert_close(
        rewards,
        definition(*args, 0.0),
        "rewards with β = 0",
        causes=causes(*args, 0.0),
        definition=DEFINITION,
    )


def test_kl_penalized_rewards_leave_their_inputs_unchanged():
    """kl_penalized_rewards changes none of its arguments in place, with float64, float32 or
    bfloat16 inputs and int64, bool or float masks (the scores and log-probs are used again)."""
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
    assert_close(
        rewards * (1 - mask), torch.zeros_like(mask), "rewards after </s>", expected="it should be"
    )


def test_every_real_token_pays_beta_times_kl():
    """With scores 0 the reward is -β·KL_t on every real token (KL_t clamped to [0, 10] as
    per_token_kl)."""
    _, logprobs, ref_logprobs, mask = rollout(10)
    args = (torch.zeros(mask.shape[0], dtype=F64), logprobs, ref_logprobs, mask)
    assert_close(
        ppo.kl_penalized_rewards(*args, 0.3),
        definition(*args, 0.3),
        "rewards with scores 0, β = 0.3",
        causes=causes(*args, 0.3),
        definition=DEFINITION,
    )


def test_the_kl_settings_are_passed_on():
    """kl_min, kl_max and estimator reach the KL: r_t = -β·KL_t(kl_min, kl_max, estimator) +
    score."""
    args = rollout(30)
    for settings in ((-1.0, 2.0, "k1"), (0.0, 10.0, "k3"), (0.0, 0.5, "k3")):
        assert_close(
            ppo.kl_penalized_rewards(*args, 0.5, *settings),
            definition(*args, 0.5, *settings),
            "rewards with kl_min={}, kl_max={}, estimator={!r}".format(*settings),
            causes=causes(*args, 0.5, *settings),
            definition=DEFINITION,
        )


def test_kl_penalized_rewards_match_the_definition():
    """r_t = -β·KL_t + s·[t = last real token] on random inputs, for several β."""
    for seed, beta in ((40, 0.05), (50, 0.2), (60, 1.0)):
        args = rollout(seed)
        assert_close(
            ppo.kl_penalized_rewards(*args, beta),
            definition(*args, beta),
            f"rewards (β = {beta})",
            causes=causes(*args, beta),
            definition=DEFINITION,
        )


def test_kl_penalized_rewards_in_float32_and_bfloat16_with_integer_and_bool_masks():
    """In training's dtypes: scores and log-probs in float32 or bfloat16 with an int64 mask (as
    emprl.reply_mask makes it), a bool or a float one, on batches of up to 30 tokens: rewards in the
    inputs' dtype or float32, equal to the definition within that dtype's rounding (float32: 1e-5
    relative; bfloat16: 3 % of the largest |value|)."""
    for i, (dtype, mask_dtype, lengths, width) in enumerate(conditions(600)):
        scores, logprobs, ref_logprobs, mask = rollout(600 + 10 * i, lengths, width)
        inputs = [x.to(dtype).to(F64) for x in (scores, logprobs, ref_logprobs)]  # as rounded
        got = ppo.kl_penalized_rewards(
            *[convert(x, dtype) for x in inputs], mask.to(mask_dtype), 0.2
        )
        assert_dtype(got, "the rewards", dtype, mask_dtype)
        want = definition(*inputs, mask, 0.2)
        rtol, atol = tolerance(dtype, want)
        condition = describe(dtype, mask_dtype, lengths, width)
        assert_close(got, want, f"rewards ({condition})", rtol, atol, definition=DEFINITION)
