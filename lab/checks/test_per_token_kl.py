"""Lab checks of ppo.per_token_kl: the per-token KL estimate at the sampled tokens, clamped.

k1:  KL_t = log π(a_t) - log π_ref(a_t)
k3:  KL_t = (ρ_t - 1) - log ρ_t,  ρ_t = π_ref(a_t) / π(a_t)
clamped to [kl_min, kl_max] (default [0, 10]; None = that side open), 0 after </s>
"""

import math

import torch

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
    gradient,
    junk_after_eos,
    prefix_mask,
    rand,
    tolerance,
)

F64 = torch.float64
DEFINITION = "KL_t = clamp(log π - log π_ref, kl_min, kl_max) (k1) on real tokens, 0 after </s>"

# The mistakes a message may name, each only when the KL is what it gives (recomputed).
CAUSES = {
    "sign": "the sign is flipped: log π_ref - log π",
    "unclamped": "the estimate is not clamped to [kl_min, kl_max]",
    "fixed_clamp": "the clamp is [0, 10] whatever kl_min and kl_max say",
    "k3_inverted": "k3 of the inverted ratio ρ = π / π_ref",
}


def definition(logprobs, ref_logprobs, mask, kl_min=0.0, kl_max=10.0, estimator="k1", sign=1.0):
    """KL_t written out token by token in float64 (sign=-1: the log-ratio the wrong way round)."""
    out = torch.zeros_like(logprobs)
    for b in range(logprobs.shape[0]):
        for t in range(logprobs.shape[1]):
            if mask[b, t] == 0:
                continue  # after </s>: no token, no KL
            log_ratio = sign * (logprobs[b, t].item() - ref_logprobs[b, t].item())
            if estimator == "k1":
                kl = log_ratio
            else:
                rho = math.exp(-log_ratio)  # π_ref / π
                kl = (rho - 1) - math.log(rho)
            if kl_min is not None:
                kl = max(kl, kl_min)
            if kl_max is not None:
                kl = min(kl, kl_max)
            out[b, t] = kl
    return out


def causes(logprobs, ref_logprobs, mask, kl_min=0.0, kl_max=10.0, estimator="k1"):
    """(words, KL) of each mistake of CAUSES, on these inputs."""
    args = (logprobs, ref_logprobs, mask)
    return [
        (CAUSES["sign"], definition(*args, kl_min, kl_max, estimator, sign=-1.0)),
        (CAUSES["unclamped"], definition(*args, None, None, estimator)),
        (CAUSES["fixed_clamp"], definition(*args, 0.0, 10.0, estimator)),
        (CAUSES["k3_inverted"], definition(*args, kl_min, kl_max, "k3", sign=-1.0)),
    ]


def logprobs_pair(seed, spread=1.0, lengths=None, T=None):
    """Log-probs of the sampled tokens under π and π_ref (negative numbers), junk after </s>; sizes
    drawn from seed unless given."""
    if lengths is None:
        lengths, T = draw_lengths(seed)
    mask = prefix_mask(lengths, T)
    ref_logprobs = -rand(mask.shape, seed).abs() - 0.1
    logprobs = ref_logprobs + spread * rand(mask.shape, seed + 1)
    return (
        junk_after_eos(logprobs, mask, seed + 2),
        junk_after_eos(ref_logprobs, mask, seed + 3),
        mask,
    )


def test_per_token_kl_works_for_any_batch_size_and_reply_length():
    """Batches of 3 to 9 rows of up to 30 tokens (the tiny preset samples replies of up to 12
    tokens, the cpu preset up to 30) get the definition's KL, as the batch of 5 rows of 7 tokens
    does."""

    def compute(lengths, width):
        logprobs, ref_logprobs, mask = logprobs_pair(80, 2.0, lengths, width)
        got = ppo.per_token_kl(logprobs, ref_logprobs, mask, -1.0, 2.0)
        return got, definition(logprobs, ref_logprobs, mask, -1.0, 2.0)

    assert_any_size(compute, "KL", 90)


def test_kl_is_log_pi_minus_log_pi_ref():
    """KL_t = log π(a_t) - log π_ref(a_t): positive where the policy gives the sampled token more
    probability than the reference model does (the penalty must push the policy back, not reward it
    for drifting)."""
    mask = torch.ones(1, 4, dtype=F64)
    ref_logprobs = torch.tensor([[-3.0, -2.0, -5.0, -1.5]], dtype=F64)
    # π > π_ref on every token; log π - log π_ref = 0.5, 1, 2.5, 0.25
    logprobs = ref_logprobs + torch.tensor([[0.5, 1.0, 2.5, 0.25]], dtype=F64)
    assert_close(
        ppo.per_token_kl(logprobs, ref_logprobs, mask),
        definition(logprobs, ref_logprobs, mask),
        "KL",
        causes=causes(logprobs, ref_logprobs, mask),
        definition=DEFINITION,
    )


def test_per_token_kl_leaves_its_inputs_unchanged():
    """per_token_kl changes none of its arguments in place, with float64, float32 or bfloat16
    log-probs and int64, bool or float masks (the rollout's log-probs are used again)."""
    logprobs, ref_logprobs, mask = logprobs_pair(70)
    call_keeping_inputs(
        ppo.per_token_kl, "logprobs, ref_logprobs, mask", logprobs, ref_logprobs, mask
    )


def test_kl_is_clamped_to_0_10_by_default():
    """By default the estimate is clamped to [kl_min, kl_max] = [0, 10]: a token the policy likes
    less than the reference gives 0 (not a bonus), and no token costs more than 10 nats."""
    mask = torch.ones(1, 5, dtype=F64)
    logprobs = torch.tensor([[-1.0, -2.0, -30.0, -0.5, -3.0]], dtype=F64)
    ref_logprobs = torch.tensor([[-2.0, -1.0, -0.1, -40.0, -3.0]], dtype=F64)
    # log π - log π_ref = 1, -1, -29.9, 39.5, 0 -> clamped 1, 0, 0, 10, 0
    assert_close(
        ppo.per_token_kl(logprobs, ref_logprobs, mask),
        [[1.0, 0.0, 0.0, 10.0, 0.0]],
        "KL",
        causes=causes(logprobs, ref_logprobs, mask),
        definition=DEFINITION,
    )


def test_kl_is_0_after_eos():
    """KL_t is 0 on the padding after </s> (where the mask is 0), whatever log-probs lie there:
    multiply by the mask."""
    logprobs, ref_logprobs, mask = logprobs_pair(0)
    kl = ppo.per_token_kl(logprobs, ref_logprobs, mask)
    assert_close(kl * (1 - mask), torch.zeros_like(mask), "KL after </s>", expected="it should be")


def test_kl_clamp_follows_kl_min_and_kl_max():
    """The clamp is [kl_min, kl_max] as given (here [-1, 2]); None leaves that side open, both None
    no clamp."""
    logprobs, ref_logprobs, mask = logprobs_pair(10, spread=3.0)
    for kl_min, kl_max in ((-1.0, 2.0), (None, 2.0), (-1.0, None), (None, None)):
        kl = ppo.per_token_kl(logprobs, ref_logprobs, mask, kl_min=kl_min, kl_max=kl_max)
        assert_close(
            kl,
            definition(logprobs, ref_logprobs, mask, kl_min, kl_max),
            f"KL with kl_min={kl_min}, kl_max={kl_max}",
            causes=causes(logprobs, ref_logprobs, mask, kl_min, kl_max)[2:3],
            definition=DEFINITION,
        )


def test_k3_estimator():
    """estimator="k3": KL_t = (ρ_t - 1) - log ρ_t with ρ_t = π_ref(a_t) / π(a_t), >= 0 on every
    token."""
    logprobs, ref_logprobs, mask = logprobs_pair(20)
    kl = ppo.per_token_kl(logprobs, ref_logprobs, mask, estimator="k3")
    assert_close(
        kl,
        definition(logprobs, ref_logprobs, mask, estimator="k3"),
        "k3 KL",
        causes=causes(logprobs, ref_logprobs, mask, estimator="k3")[3:],
        definition="KL_t = (ρ_t - 1) - log ρ_t, ρ_t = π_ref / π, clamped, 0 after </s>",
    )


def test_kl_matches_the_definition():
    """KL_t = clamp(log π(a_t) - log π_ref(a_t), 0, 10) on real tokens, 0 after </s>, on random
    log-probs."""
    for seed in (30, 40, 50):
        logprobs, ref_logprobs, mask = logprobs_pair(seed, spread=4.0)
        kl = ppo.per_token_kl(logprobs, ref_logprobs, mask)
        assert_close(
            kl,
            definition(logprobs, ref_logprobs, mask),
            "KL",
            causes=causes(logprobs, ref_logprobs, mask),
            definition=DEFINITION,
        )


def definition_gradient(logprobs, ref_logprobs, mask, kl_min, kl_max, estimator):
    """d KL_t / d log π written out: 1 (k1) or 1 - π_ref/π (k3) on real tokens inside the clamp, 0
    where the clamp binds and after </s>."""
    want = torch.zeros_like(logprobs)
    value = definition(logprobs, ref_logprobs, mask, None, None, estimator)
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            inside = (kl_min is None or value[b, t] > kl_min) and (
                kl_max is None or value[b, t] < kl_max
            )
            if mask[b, t] and inside:
                ratio = math.exp(ref_logprobs[b, t].item() - logprobs[b, t].item())
                want[b, t] = 1.0 if estimator == "k1" else 1 - ratio
    return want


def test_kl_gradient_flows_to_the_policy_log_probs():
    """GRPO puts β·mean_m(KL_t) into the loss, so KL_t is differentiated with respect to log π: d
    KL_t / d log π is 1 (k1) or 1 - π_ref/π (k3) on real tokens inside the clamp, 0 where the clamp
    binds and after </s>."""
    logprobs, ref_logprobs, mask = logprobs_pair(60, spread=2.0)
    for kl_min, kl_max, estimator in ((None, None, "k3"), (0.0, 10.0, "k1"), (0.0, 1.0, "k3")):
        x = logprobs.clone().requires_grad_(True)
        kl = ppo.per_token_kl(x, ref_logprobs.clone(), mask.clone(), kl_min, kl_max, estimator)
        grad = gradient(kl.sum() if isinstance(kl, torch.Tensor) else kl, x, "logprobs")
        assert_close(
            grad,
            definition_gradient(logprobs, ref_logprobs, mask, kl_min, kl_max, estimator),
            f"the gradient of Σ KL_t with respect to logprobs ({estimator}, "
            f"kl_min={kl_min}, kl_max={kl_max})",
        )


def test_per_token_kl_in_float32_and_bfloat16_with_integer_and_bool_masks():
    """In training's dtypes: log-probs in float32 or bfloat16 with an int64 mask (as
    emprl.reply_mask makes it), a bool or a float one, on batches of up to 30 tokens, k1 and k3
    (the way GRPO calls it: no clamp, differentiated): the KL in the log-probs' dtype or float32,
    equal to the definition within that dtype's rounding (float32: 1e-5 relative; bfloat16: 3 % of
    the largest |value|), and in float32 its gradient too."""
    for i, (dtype, mask_dtype, lengths, width) in enumerate(conditions(500)):
        logprobs, ref_logprobs, mask = logprobs_pair(500 + 10 * i, 1.0, lengths, width)
        logprobs, ref_logprobs = (x.to(dtype).to(F64) for x in (logprobs, ref_logprobs))
        condition = describe(dtype, mask_dtype, lengths, width)
        for kl_min, kl_max, estimator in ((0.0, 10.0, "k1"), (None, None, "k3")):
            x = convert(logprobs, dtype).requires_grad_(True)
            kl = ppo.per_token_kl(
                x, convert(ref_logprobs, dtype), mask.to(mask_dtype), kl_min, kl_max, estimator
            )
            assert_dtype(kl, "the KL", dtype, mask_dtype)
            want = definition(logprobs, ref_logprobs, mask, kl_min, kl_max, estimator)
            rtol, atol = tolerance(dtype, want)
            assert_close(
                kl, want, f"{estimator} KL ({condition})", rtol, atol, definition=DEFINITION
            )
            if dtype == torch.float32:
                grad = gradient(kl.sum(), x, f"logprobs ({condition})")
                want = definition_gradient(logprobs, ref_logprobs, mask, kl_min, kl_max, estimator)
                rtol, atol = tolerance(dtype, want)
                assert_close(
                    grad, want, f"the gradient of Σ {estimator} KL ({condition})", rtol, atol
                )
