"""Lab checks of ppo.grpo_advantages (skipped while ppo.py has none): group-normalised advantages
(GRPO).

    A_i = (r_i - mean_g(r)) / (std_g(r) + ε)     over the k consecutive replies i of one context g

std_g with k - 1 (unbiased, as TRL's GRPOTrainer), over the group's k rewards only, ε added to the
std (not under the square root). Most checks allow any default ε up to about 1e-3; the small-spread
check passes ε = 1e-4.
"""

import pytest
import torch

import ppo
from checklib import assert_close, call_keeping_inputs, rand, tensor

if not hasattr(ppo, "grpo_advantages"):
    pytest.skip("ppo.py has no grpo_advantages", allow_module_level=True)

F64 = torch.float64


def call(rewards, k):
    return tensor(ppo.grpo_advantages(rewards.clone(), k), "advantages")


def test_grpo_gives_one_advantage_per_reply():
    """grpo_advantages(rewards (N,), k) returns one advantage per reply, shape (N,)."""
    advantages = call(rand(12, 0), 4)
    assert advantages.shape == (12,), (
        f"advantages have shape {tuple(advantages.shape)}, expected (12,)"
    )


def test_grpo_leaves_its_inputs_unchanged():
    """grpo_advantages changes none of its arguments in place: the scores stay as they were."""
    call_keeping_inputs(ppo.grpo_advantages, "rewards", rand(12, 9), 4)


def test_grpo_std_is_the_groups_not_the_batchs():
    """Each context's advantages are divided by the std of *its own* k rewards, not by one std over
    the whole batch: contexts with rewards around 0 (std about 1), 100 (std about 10) and -5 (std
    about 1)."""
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
            f"every context's centred rewards are divided by the same number (1 / "
            f"{1 / scales.mean().item():.4g}): one std over the whole batch; "
            "divide each context by "
            f"the std of its own k rewards"
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
        assert abs(scale.item() * std.item() - 1) < 1e-3, (
            f"context {g}: A = (r - mean) × {scale.item() * std.item():.6g} / std, expected (r - "
            "mean) / std"
        )


def test_equal_rewards_give_zero_advantages_not_nan():
    """A context whose k replies all earn the same reward gets advantage 0 (finite: ε keeps 0/0
    away)."""
    advantages = call(torch.full((6,), 0.25, dtype=F64), 3)
    assert_close(advantages, torch.zeros(6, dtype=F64), "advantages of equal rewards", atol=1e-5)


def test_epsilon_is_added_to_the_std_not_under_the_root():
    """A_i = (r_i - mean) / (std + ε) with ε = 1e-4 passed in: a context whose rewards spread by
    about 1e-3 (std ≈ 1e-3) tells std + ε (advantages of about ±0.9) from sqrt(var + ε) (about
    ±0.1)."""
    rewards = torch.tensor([0.500, 0.501, 0.499, 0.5015, 0.2, 0.4, 0.6, 0.8], dtype=F64)
    advantages = tensor(ppo.grpo_advantages(rewards.clone(), 4, eps=1e-4), "advantages")
    r = rewards.view(2, 4)
    centred = r - r.mean(1, keepdim=True)
    want = (centred / (r.std(1, keepdim=True) + 1e-4)).view(-1)
    under_root = (centred / (r.var(1, keepdim=True) + 1e-4).sqrt()).view(-1)
    if torch.allclose(advantages, under_root, rtol=1e-4, atol=1e-6):
        raise AssertionError(
            "advantages of the small-spread context are "
            f"{advantages[:4].tolist()}, the "
            f"definition gives {want[:4].tolist()}: ε is under the square root, "
            "sqrt(var + ε), "
            f"instead of added to the std, std + ε"
        )
    assert_close(advantages, want, "advantages (a context with std ≈ 1e-3, ε = 1e-4)", rtol=1e-4)
