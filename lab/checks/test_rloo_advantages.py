"""Lab checks of ppo.rloo_advantages: REINFORCE leave-one-out.

A_i = r_i - 1/(k-1) Σ_{j≠i} r_j     over the k consecutive replies i, j to the same context
"""

import torch

import ppo
from checklib import assert_close, call_keeping_inputs, rand, tensor


def definition(rewards, k):
    """A_i written out reply by reply in float64: the mean of the *other* replies of the same
    group."""
    r = rewards.tolist()
    advantages = []
    for i in range(len(r)):
        # the k consecutive replies to the context of reply i
        group = range(i - i % k, i - i % k + k)
        others = [r[j] for j in group if j != i]
        advantages.append(r[i] - sum(others) / len(others))
    return torch.tensor(advantages, dtype=torch.float64)


def call(rewards, k):
    return tensor(ppo.rloo_advantages(rewards.clone(), k), "advantages")


def test_rloo_gives_one_advantage_per_reply():
    """rloo_advantages(rewards (N,), k) returns one advantage per reply, shape (N,)."""
    advantages = call(rand(12, 0), 4)
    assert advantages.shape == (12,), (
        f"advantages have shape {tuple(advantages.shape)}, expected (12,)"
    )


def test_rloo_leaves_its_inputs_unchanged():
    """rloo_advantages changes none of its arguments in place: the rewards stay as they were."""
    call_keeping_inputs(ppo.rloo_advantages, "rewards", rand(12, 8), 4)


def test_rloo_baseline_leaves_the_reply_itself_out():
    """The baseline of reply i is the mean reward of the *other* k - 1 replies to its context, not
    the mean of all k: with k = 2 and rewards (1, 3) the advantages are (1 - 3, 3 - 1) = (-2, 2)."""
    assert_close(call(torch.tensor([1.0, 3.0], dtype=torch.float64), 2), [-2.0, 2.0], "advantages")
    rewards = torch.tensor([1.0, 2.0, 6.0], dtype=torch.float64)
    assert_close(
        call(rewards, 3), [1 - (2 + 6) / 2, 2 - (1 + 6) / 2, 6 - (1 + 2) / 2], "advantages (k = 3)"
    )


def test_rloo_groups_are_k_consecutive_replies():
    """Replies 0 .. k-1 answer the first context, k .. 2k-1 the second, and so on: a baseline never
    mixes contexts."""
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0], dtype=torch.float64)
    assert_close(call(rewards, 3), definition(rewards, 3), "advantages of two contexts, k = 3")


def test_rloo_matches_the_definition():
    """A_i = r_i - 1/(k-1) Σ_{j≠i} r_j for random rewards, k = 2, 3, 4, 5 and several contexts."""
    for k in (2, 3, 4, 5):
        rewards = rand(6 * k, k)
        assert_close(call(rewards, k), definition(rewards, k), f"advantages (k = {k})")


def test_rloo_advantages_sum_to_zero_per_context():
    """Σ_i A_i = 0 over the k replies to one context; equal rewards give advantage 0 (nothing to
    learn)."""
    advantages = call(rand(20, 7), 4)
    assert_close(
        advantages.view(5, 4).sum(1), torch.zeros(5, dtype=torch.float64), "sum of the advantages"
    )
    assert_close(
        call(torch.full((6,), 0.25, dtype=torch.float64), 3),
        torch.zeros(6),
        "advantages of equal rewards",
    )
