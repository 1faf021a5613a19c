"""Lab checks of ppo.grpo_advantages (skipped while ppo.py has none): group-normalised advantages
(GRPO).

    A_i = (r_i - mean_g(r)) / (std_g(r) + ε)     over the k consecutive replies i of one context g

std_g with k - 1 (unbiased, as TRL's GRPOTrainer), over the group's k rewards only, ε added to the
std (not under the square root). Most checks allow any default ε up to about 1e-3; the small-spread
checks pass ε = 1e-4 and ε = 1e-2.
"""

import math

import pytest
import torch

import ppo
from checklib import (
    assert_any_size,
    assert_close,
    assert_dtype,
    call_keeping_inputs,
    convert,
    describe,
    rand,
    tensor,
    tolerance,
)

if not hasattr(ppo, "grpo_advantages"):
    pytest.skip("ppo.py has no grpo_advantages", allow_module_level=True)

F64 = torch.float64
DEFINITION = "A_i = (r_i - mean_g r) / (std_g r + ε), std over the group's k rewards with k - 1"

# The mistakes a message may name, each only when the advantages are what it gives (recomputed or
# measured).
CAUSES = {
    "batch_std": "every context's centred rewards are divided by the same number: one std over the "
    "whole batch; divide each context by the std of its own k rewards",
    "biased": "the std divides by k, not by k - 1 (the biased std)",
    "under_root": "ε is under the square root, sqrt(var + ε), instead of added to the std, std + ε",
    "eps_ignored": "the eps passed in is ignored: they are the advantages of ε = 1e-4 (the "
    "default) or of no ε",
}


def definition(rewards, k, eps):
    """A_i written out group by group in float64."""
    out = []
    for start in range(0, len(rewards), k):
        group = rewards[start : start + k].tolist()
        mean = sum(group) / k
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (k - 1))
        out += [(x - mean) / (std + eps) for x in group]
    return torch.tensor(out, dtype=F64)


def call(rewards, k, **kwargs):
    return tensor(ppo.grpo_advantages(rewards.clone(), k, **kwargs), "advantages")


def test_grpo_works_for_any_number_of_replies():
    """Batches of 3 to 9 contexts of k = 4 replies (the cpu preset: 8 contexts, 32 rollouts) get
    the definition's advantages (ε = 1e-4 passed in), as 5 contexts do."""

    def compute(lengths, T):  # one context per row of the drawn batch
        rewards = rand(4 * len(lengths), 7 + T)
        return call(rewards, 4, eps=1e-4), definition(rewards, 4, 1e-4)

    assert_any_size(compute, "advantages", 330, lambda lengths, T: f"{4 * len(lengths)} rewards")


def test_grpo_gives_one_advantage_per_reply():
    """grpo_advantages(rewards (N,), k) returns one advantage per reply, shape (N,): here 5 contexts
    of k = 4 replies."""
    advantages = call(rand(20, 0), 4)
    assert advantages.shape == (20,), (
        f"advantages have shape {tuple(advantages.shape)}, expected (20,)"
    )


def test_grpo_leaves_its_inputs_unchanged():
    """grpo_advantages changes none of its arguments in place, with float64, float32 or bfloat16
    rewards: the scores stay as they were."""
    call_keeping_inputs(ppo.grpo_advantages, "rewards", rand(12, 9), 4)


def test_grpo_std_is_the_groups_not_the_batchs():
    """Each context's advantages are divided by the std of *its own* k rewards: contexts with
    rewards around 0 (std about 1), 100 (std about 10) and -5 (std about 1) are scaled differently.
    """
    rewards = torch.cat(
        [rand(4, 11), rand(4, 12, scale=10.0, shift=100.0), rand(4, 13, shift=-5.0)]
    )
    advantages = call(rewards, 4).view(3, 4)
    r = rewards.view(3, 4)
    centred = r - r.mean(1, keepdim=True)
    # A = scale_g · (r - mean) per context
    scales = (advantages * centred).sum(1) / (centred * centred).sum(1)
    # the contexts' stds differ tenfold; their scales should too
    if scales.max() / scales.min() < 1.05:
        raise AssertionError(
            f"the advantages of the three contexts are their centred rewards × "
            f"{scales.mean().item():.4g}, the definition divides them by "
            f"{', '.join(f'{s:.4g}' for s in r.std(1).tolist())}: {CAUSES['batch_std']}"
        )


def test_grpo_advantages_are_the_rewards_centred_and_scaled_per_context():
    """Per context A_i = (r_i - mean) / std with the std over its k replies with k - 1 (unbiased):
    zero mean, in the order of the rewards, each context's k consecutive replies normalised on their
    own."""
    # three scales
    rewards = torch.cat([rand(4, 1), rand(4, 2, scale=10.0, shift=100.0), rand(4, 3, shift=-5.0)])
    advantages = call(rewards, 4).view(3, 4)
    r = rewards.view(3, 4)
    assert_close(
        advantages.mean(1), torch.zeros(3, dtype=F64), "the mean advantage of a context", atol=1e-5
    )
    for g in range(3):
        centred = r[g] - r[g].mean()
        # A = scale · (r - mean) per context
        scale = (advantages[g] * centred).sum() / (centred * centred).sum()
        assert_close(
            advantages[g],
            scale * centred,
            f"advantages of context {g} (proportional to r - mean)",
            atol=1e-5,
        )
        std = centred.pow(2).sum().div(4 - 1).sqrt()  # unbiased, k = 4
        factor = scale.item() * std.item()
        if abs(factor - 1) >= 1e-3:
            named = abs(factor - math.sqrt(4 / 3)) < 1e-3  # 1/std with std over k = 4
            raise AssertionError(
                f"context {g}: A = (r - mean) × {factor:.6g} / std, the definition (r - mean) / "
                + (
                    f"std: {CAUSES['biased']}"
                    if named
                    else f"(std + ε); the definition: {DEFINITION}"
                )
            )


def test_equal_rewards_give_zero_advantages_not_nan():
    """A context whose k replies all earn the same reward gets advantage 0 (finite: ε keeps 0/0
    away)."""
    advantages = call(torch.full((6,), 0.25, dtype=F64), 3)
    assert_close(advantages, torch.zeros(6, dtype=F64), "advantages of equal rewards", atol=1e-5)


SMALL_SPREAD = torch.tensor([0.500, 0.501, 0.499, 0.5015, 0.2, 0.4, 0.6, 0.8], dtype=F64)


def test_epsilon_is_added_to_the_std_not_under_the_root():
    """A_i = (r_i - mean) / (std + ε) with ε = 1e-4 passed in: a context whose rewards spread by
    about 1e-3 (std ≈ 1e-3) tells std + ε (advantages of about ±0.9) from sqrt(var + ε) (about
    ±0.1)."""
    rewards = SMALL_SPREAD
    advantages = call(rewards, 4, eps=1e-4)
    r = rewards.view(2, 4)
    centred = r - r.mean(1, keepdim=True)
    under_root = (centred / (r.var(1, keepdim=True) + 1e-4).sqrt()).view(-1)
    assert_close(
        advantages,
        definition(rewards, 4, 1e-4),
        "advantages (a context with std ≈ 1e-3, ε = 1e-4)",
        rtol=1e-4,
        causes=[(CAUSES["under_root"], under_root)],
        definition=DEFINITION,
    )


def test_grpo_uses_the_eps_it_is_given():
    """ε is an argument: with ε = 1e-2 passed in, a context whose rewards spread by about 1e-3 gets
    advantages of about ±0.09 ((r - mean) / (std + 1e-2)), where ε = 1e-4 would give about ±0.9."""
    rewards = SMALL_SPREAD
    assert_close(
        call(rewards, 4, eps=1e-2),
        definition(rewards, 4, 1e-2),
        "advantages (a context with std ≈ 1e-3, ε = 1e-2)",
        rtol=1e-4,
        causes=[(CAUSES["eps_ignored"], definition(rewards, 4, e)) for e in (1e-4, 0.0)],
        definition=DEFINITION,
    )


def test_grpo_in_float32_and_bfloat16():
    """In training's dtypes: rewards in float32 or bfloat16 (32 rollouts, k = 4) give advantages in
    the rewards' dtype or float32, equal to the definition within that dtype's rounding (float32:
    1e-5 relative; bfloat16: 3 % of the largest |value|)."""
    for dtype in (torch.float32, torch.bfloat16):
        rewards = rand(32, 340, scale=2.0)
        got = ppo.grpo_advantages(convert(rewards, dtype), 4, eps=1e-4)
        assert_dtype(got, "advantages", dtype)
        want = definition(rewards.to(dtype).to(F64), 4, 1e-4)
        rtol, atol = tolerance(dtype, want)
        assert_close(
            got, want, f"advantages ({describe(dtype)})", rtol, atol, definition=DEFINITION
        )
