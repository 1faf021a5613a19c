"""Lab checks of reward.reward_from_logits: the empathy reward [R1].

r = Π_k p_k(y*_k),   p_k = softmax over the C levels of mechanism k's logits
logits (B, M, C), targets (B, M)
"""

import math

import torch

import reward
from checklib import assert_close, call_keeping_inputs, rand, tensor


def definition(logits, targets):
    """r written out reply by reply in float64: the product over mechanisms of the target level's
    probability."""
    out = []
    for b in range(logits.shape[0]):
        r = 1.0
        for k in range(logits.shape[1]):
            row = logits[b, k].tolist()
            # softmax over the levels
            r *= math.exp(row[targets[b, k]]) / sum(math.exp(x) for x in row)
        out.append(r)
    return torch.tensor(out, dtype=torch.float64)


def levels(shape, seed, C=3):
    return torch.randint(0, C, shape, generator=torch.Generator().manual_seed(seed))


def call(logits, targets):
    return tensor(reward.reward_from_logits(logits.clone(), targets.clone()), "the reward")


def test_reward_gives_one_number_per_reply():
    """reward_from_logits(logits (B, M, C), targets (B, M)) returns one reward per reply, shape
    (B,)."""
    r = call(rand((6, 3, 3), 0), levels((6, 3), 1))
    assert r.shape == (6,), f"the reward has shape {tuple(r.shape)}, expected (6,)"


def test_reward_leaves_its_inputs_unchanged():
    """reward_from_logits changes none of its arguments in place (no `logits -= logits.max()` on the
    caller's tensor)."""
    call_keeping_inputs(
        reward.reward_from_logits, "logits, targets", rand((6, 3, 3), 80), levels((6, 3), 81)
    )


def test_softmax_is_over_the_levels_of_each_mechanism():
    """With one mechanism (M = 1) the reward is the softmax of its logits over the C levels (the
    last axis, not over the mechanisms or the batch), at the target level: C = 3 and C = 4."""
    for seed, C in enumerate((3, 4)):
        logits, targets = rand((5, 1, C), 10 + seed, scale=2.0), levels((5, 1), 20 + seed, C)
        assert_close(
            call(logits, targets), definition(logits, targets), f"the reward (M = 1, C = {C})"
        )


def test_reward_is_the_product_of_the_target_levels_probabilities():
    """r = Π_k p_k(y*_k): for each mechanism the softmax over its levels, at the target level,
    multiplied over the mechanisms (a product, not a sum or a mean)."""
    logits = torch.tensor(
        [
            [[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [-3.0, 1.0, 4.0]],
            [[0.0, 0.0, 0.0], [3.0, -2.0, 0.0], [1.0, 2.0, 3.0]],
        ],
        dtype=torch.float64,
    )
    targets = torch.tensor([[0, 2, 1], [1, 0, 2]])
    assert_close(call(logits, targets), definition(logits, targets), "the reward")


def test_reward_lies_in_0_1_and_is_1_for_certain_identifiers():
    """0 < r <= 1; identifiers certain of the target levels (logits ±50) give r = 1."""
    r = call(rand((8, 3, 3), 30, scale=3.0), levels((8, 3), 31))
    assert bool(((r > 0) & (r <= 1)).all()), f"rewards outside (0, 1]: {r.tolist()}"
    certain = torch.full((2, 3, 3), -50.0)
    certain[:, :, 1] = 50.0
    assert_close(
        call(certain, torch.ones(2, 3, dtype=torch.long)),
        [1.0, 1.0],
        "the reward of certain identifiers",
    )


def test_reward_matches_the_definition():
    """r = Π_k softmax(l_k)[y*_k] on random logits and target levels: M = 3 mechanisms (the reward),
    M = 2 (one left out, an ablation), and C = 4 levels."""
    for seed, (M, C) in zip((40, 50, 60, 70), [(3, 3), (3, 3), (2, 3), (3, 4)]):
        logits, targets = rand((16, M, C), seed, scale=2.0), levels((16, M), seed + 1, C)
        assert_close(
            call(logits, targets), definition(logits, targets), f"the reward (M = {M}, C = {C})"
        )
