"""Lab checks of ppo.grpo_advantages (skipped while ppo.py has none): group-normalised advantages (GRPO).

    A_i = (r_i - mean_g(r)) / (std_g(r) + ε)     over the k consecutive replies i of one context g

std_g with k - 1 (unbiased, as TRL's GRPOTrainer); the checks allow any ε up to about 1e-3.
"""
import pytest
import torch

import ppo
from checklib import assert_close, rand, tensor

if not hasattr(ppo, "grpo_advantages"):
    pytest.skip("ppo.py has no grpo_advantages", allow_module_level=True)

F64 = torch.float64


def call(rewards, k):
    return tensor(ppo.grpo_advantages(rewards.clone(), k), "advantages")


def test_grpo_gives_one_advantage_per_reply():
    """grpo_advantages(rewards (N,), k) returns one advantage per reply, shape (N,)."""
    advantages = call(rand(12, 0), 4)
    assert advantages.shape == (12,), f"advantages have shape {tuple(advantages.shape)}, expected (12,)"


def test_grpo_advantages_are_the_rewards_centred_and_scaled_per_context():
    """Per context A_i = (r_i - mean) / std with the std over its k replies with k - 1 (unbiased): zero mean, in the
    order of the rewards, each context's k consecutive replies normalised on their own."""
    rewards = torch.cat([rand(4, 1), rand(4, 2, scale=10.0, shift=100.0), rand(4, 3, shift=-5.0)])  # three scales
    advantages = call(rewards, 4).view(3, 4)
    r = rewards.view(3, 4)
    assert_close(advantages.mean(1), torch.zeros(3, dtype=F64), "the mean advantage of a context", atol=1e-5)
    for g in range(3):
        centred = r[g] - r[g].mean()
        scale = (advantages[g] * centred).sum() / (centred * centred).sum()  # A = scale · (r - mean) per context
        assert_close(advantages[g], scale * centred, f"advantages of context {g} (proportional to r - mean)", atol=1e-5)
        std = centred.pow(2).sum().div(4 - 1).sqrt()  # unbiased, k = 4
        assert abs(scale.item() * std.item() - 1) < 1e-3, \
            f"context {g}: A = (r - mean) × {scale.item() * std.item():.6g} / std, expected (r - mean) / std"


def test_equal_rewards_give_zero_advantages_not_nan():
    """A context whose k replies all earn the same reward gets advantage 0 (finite: ε keeps 0/0 away)."""
    advantages = call(torch.full((6,), 0.25, dtype=F64), 3)
    assert_close(advantages, torch.zeros(6, dtype=F64), "advantages of equal rewards", atol=1e-5)
