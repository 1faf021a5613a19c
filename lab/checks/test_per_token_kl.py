"""Lab checks of ppo.per_token_kl: the per-token KL estimate at the sampled tokens, clamped.

k1:  KL_t = log π(a_t) - log π_ref(a_t)
k3:  KL_t = (ρ_t - 1) - log ρ_t,  ρ_t = π_ref(a_t) / π(a_t)
clamped to [kl_min, kl_max] (default [0, 10]; None = that side open), 0 after </s>
"""

import math

import torch

import ppo
from checklib import (
    LENGTHS,
    T,
    assert_close,
    call_keeping_inputs,
    gradient,
    junk_after_eos,
    prefix_mask,
    rand,
)

F64 = torch.float64


def definition(logprobs, ref_logprobs, mask, kl_min=0.0, kl_max=10.0, estimator="k1"):
    """KL_t written out token by token in float64."""
    out = torch.zeros_like(logprobs)
    for b in range(logprobs.shape[0]):
        for t in range(logprobs.shape[1]):
            if mask[b, t] == 0:
                continue  # after </s>: no token, no KL
            log_pi, log_ref = logprobs[b, t].item(), ref_logprobs[b, t].item()
            if estimator == "k1":
                kl = log_pi - log_ref
            else:
                rho = math.exp(log_ref - log_pi)  # π_ref / π
                kl = (rho - 1) - math.log(rho)
            if kl_min is not None:
                kl = max(kl, kl_min)
            if kl_max is not None:
                kl = min(kl, kl_max)
            out[b, t] = kl
    return out


def logprobs_pair(seed, spread=1.0):
    """Log-probs of the sampled tokens under π and π_ref (negative numbers), junk after </s>."""
    mask = prefix_mask()
    ref_logprobs = -rand((len(LENGTHS), T), seed).abs() - 0.1
    logprobs = ref_logprobs + spread * rand((len(LENGTHS), T), seed + 1)
    return (
        junk_after_eos(logprobs, mask, seed + 2),
        junk_after_eos(ref_logprobs, mask, seed + 3),
        mask,
    )


def test_kl_is_log_pi_minus_log_pi_ref():
    """KL_t = log π(a_t) - log π_ref(a_t): positive where the policy gives the sampled token more
    probability than the reference model does (the penalty must push the policy back, not reward it
    for drifting)."""
    mask = torch.ones(1, 4, dtype=F64)
    ref_logprobs = torch.tensor([[-3.0, -2.0, -5.0, -1.5]], dtype=F64)
    # π > π_ref on every token
    logprobs = ref_logprobs + torch.tensor([[0.5, 1.0, 2.5, 0.25]], dtype=F64)
    assert_close(ppo.per_token_kl(logprobs, ref_logprobs, mask), [[0.5, 1.0, 2.5, 0.25]], "KL")


def test_per_token_kl_leaves_its_inputs_unchanged():
    """per_token_kl changes none of its arguments in place (the rollout's log-probs are used
    again)."""
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
    assert_close(ppo.per_token_kl(logprobs, ref_logprobs, mask), [[1.0, 0.0, 0.0, 10.0, 0.0]], "KL")


def test_kl_is_0_after_eos():
    """KL_t is 0 on the padding after </s> (where the mask is 0), whatever log-probs lie there:
    multiply by the mask."""
    logprobs, ref_logprobs, mask = logprobs_pair(0)
    kl = ppo.per_token_kl(logprobs, ref_logprobs, mask)
    assert_close(kl * (1 - mask), torch.zeros_like(mask), "KL after </s>")


def test_kl_clamp_follows_kl_min_and_kl_max():
    """The clamp is [kl_min, kl_max] as given (here [-1, 2]); None leaves that side open, both None
    no clamp."""
    logprobs, ref_logprobs, mask = logprobs_pair(10, spread=3.0)
    for kl_min, kl_max in ((-1.0, 2.0), (None, 2.0), (-1.0, None), (None, None)):
        kl = ppo.per_token_kl(logprobs, ref_logprobs, mask, kl_min=kl_min, kl_max=kl_max)
        want = definition(logprobs, ref_logprobs, mask, kl_min, kl_max)
        assert_close(kl, want, f"KL with kl_min={kl_min}, kl_max={kl_max}")


def test_k3_estimator():
    """estimator="k3": KL_t = (ρ_t - 1) - log ρ_t with ρ_t = π_ref(a_t) / π(a_t), >= 0 on every
    token."""
    logprobs, ref_logprobs, mask = logprobs_pair(20)
    kl = ppo.per_token_kl(logprobs, ref_logprobs, mask, estimator="k3")
    assert_close(kl, definition(logprobs, ref_logprobs, mask, estimator="k3"), "k3 KL")


def test_kl_matches_the_definition():
    """KL_t = clamp(log π(a_t) - log π_ref(a_t), 0, 10) on real tokens, 0 after </s>, on random
    log-probs."""
    for seed in (30, 40, 50):
        logprobs, ref_logprobs, mask = logprobs_pair(seed, spread=4.0)
        kl = ppo.per_token_kl(logprobs, ref_logprobs, mask)
        assert_close(kl, definition(logprobs, ref_logprobs, mask), "KL")


def test_kl_gradient_flows_to_the_policy_log_probs():
    """GRPO puts β·mean_m(KL_t) into the loss, so KL_t is differentiated with respect to log π: d
    KL_t / d log π is 1 (k1) or 1 - π_ref/π (k3) on real tokens inside the clamp, 0 where the clamp
    binds and after </s>."""
    logprobs, ref_logprobs, mask = logprobs_pair(60, spread=2.0)
    for kl_min, kl_max, estimator in ((None, None, "k3"), (0.0, 10.0, "k1"), (0.0, 1.0, "k3")):
        x = logprobs.clone().requires_grad_(True)
        kl = ppo.per_token_kl(x, ref_logprobs.clone(), mask.clone(), kl_min, kl_max, estimator)
        grad = gradient(kl.sum() if isinstance(kl, torch.Tensor) else kl, x, "logprobs")
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
        assert_close(
            grad,
            want,
            f"the gradient of Σ KL_t with respect to logprobs ({estimator}, "
            f"kl_min={kl_min}, "
            f"kl_max={kl_max})",
        )
