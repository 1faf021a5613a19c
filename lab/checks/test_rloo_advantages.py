"""Lab checks of ppo.rloo_advantages: REINFORCE leave-one-out.

A_i = r_i - 1/(k-1) Σ_{j≠i} r_j     over the k consecutive replies i, j to the same context
"""

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

F64 = torch.float64
DEFINITION = "A_i = r_i - 1/(k-1) Σ_{j≠i} r_j over the k consecutive replies of i's context"

# The mistakes a message may name, each only when the advantages are what it gives (recomputed).
CAUSES = {
    "all": "the baseline is the mean of all k replies, the reply itself included",
    "k": "the other replies' sum is divided by k, not by k - 1",
    "strided": "the groups are every (N/k)-th reply, not k consecutive ones",
}


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
    return torch.tensor(advantages, dtype=F64)


def causes(rewards, k):
    """(words, advantages) of each mistake of CAUSES, on these rewards."""
    r = rewards.view(-1, k)
    others = r.sum(1, keepdim=True) - r
    s = rewards.view(k, -1).t()  # row g: rewards g, g + N/k, g + 2N/k, ...
    strided = (s - (s.sum(1, keepdim=True) - s) / (k - 1)).reshape(-1)
    return [
        (CAUSES["all"], (r - r.mean(1, keepdim=True)).view(-1)),
        (CAUSES["k"], (r - others / k).view(-1)),
        (CAUSES["strided"], strided),
    ]


def call(rewards, k):
    return tensor(ppo.rloo_advantages(rewards.clone(), k), "advantages")


def test_rloo_works_for_any_number_of_replies():
    """Batches of 3 to 9 contexts of k = 4 replies (the cpu preset: 8 contexts, 32 rollouts) get
    the definition's advantages, as 5 contexts do."""

    def compute(lengths, T):  # one context per row of the drawn batch
        rewards = rand(4 * len(lengths), 5 + T)
        return call(rewards, 4), definition(rewards, 4)

    assert_any_size(compute, "advantages", 320, lambda lengths, T: f"{4 * len(lengths)} rewards")


def test_rloo_gives_one_advantage_per_reply():
    """rloo_advantages(rewards (N,), k) returns one advantage per reply, shape (N,): here 5 contexts
    of k = 4 replies."""
    advantages = call(rand(20, 0), 4)
    assert advantages.shape == (20,), (
        f"advantages have shape {tuple(advantages.shape)}, expected (20,)"
    )


def test_rloo_leaves_its_inputs_unchanged():
    """rloo_advantages changes none of its arguments in place, with float64, float32 or bfloat16
    rewards: the rewards stay as they were."""
    call_keeping_inputs(ppo.rloo_advantages, "rewards", rand(12, 8), 4)


def test_rloo_baseline_leaves_the_reply_itself_out():
    """The baseline of reply i is the mean reward of the *other* k - 1 replies to its context: with
    k = 2 and rewards (1, 3) the advantages are (1 - 3, 3 - 1) = (-2, 2); with k = 3 and (1, 2, 6),
    1 - (2 + 6)/2, 2 - (1 + 6)/2, 6 - (1 + 2)/2."""
    for rewards, k in (([1.0, 3.0], 2), ([1.0, 2.0, 6.0], 3)):
        rewards = torch.tensor(rewards, dtype=F64)
        assert_close(
            call(rewards, k),
            definition(rewards, k),
            "advantages" if k == 2 else "advantages (k = 3)",
            causes=causes(rewards, k),
            definition=DEFINITION,
        )


def test_rloo_groups_are_k_consecutive_replies():
    """Replies 0 .. k-1 answer the first context, k .. 2k-1 the second, and so on: a baseline never
    mixes contexts."""
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0], dtype=F64)
    assert_close(
        call(rewards, 3),
        definition(rewards, 3),
        "advantages of two contexts, k = 3",
        causes=causes(rewards, 3),
        definition=DEFINITION,
    )


def test_rloo_matches_the_definition():
    """A_i = r_i - 1/(k-1) Σ_{j≠i} r_j for random rewards, k = 2, 3, 4, 5 and several contexts."""
    for k in (2, 3, 4, 5):
        rewards = rand(6 * k, k)
        assert_close(
            call(rewards, k),
            definition(rewards, k),
            f"advantages (k = {k})",
            causes=causes(rewards, k),
            definition=DEFINITION,
        )


def test_rloo_advantages_sum_to_zero_per_context():
    """Σ_i A_i = 0 over the k replies to one context; equal rewards give advantage 0 (nothing to
    learn)."""
    advantages = call(rand(20, 7), 4)
    assert_close(advantages.view(5, 4).sum(1), torch.zeros(5, dtype=F64), "sum of the advantages")
    assert_close(
        call(torch.full((6,), 0.25, dtype=F64), 3),
        torch.zeros(6),
        "advantages of equal rewards",
    )


def test_rloo_in_float32_and_bfloat16():
    """In training's dtypes: rewards in float32 or bfloat16 (32 rollouts, k = 4) give advantages in
    the rewards' dtype or float32, equal to the definition within that dtype's rounding (float32:
    1e-5 relative; bfloat16: 3 % of the largest |value|)."""
    for dtype in (torch.float32, torch.bfloat16):
        rewards = rand(32, 330, scale=2.0)
        got = ppo.rloo_advantages(convert(rewards, dtype), 4)
        assert_dtype(got, "advantages", dtype)
        want = definition(rewards.to(dtype).to(F64), 4)
        rtol, atol = tolerance(dtype, want)
        assert_close(
            got, want, f"advantages ({describe(dtype)})", rtol, atol, definition=DEFINITION
        )
