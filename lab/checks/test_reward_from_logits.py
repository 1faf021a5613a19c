"""Lab checks of reward.reward_from_logits: the empathy reward [R1].

r = Π_k p_k(y*_k),   p_k = softmax over the C levels of mechanism k's logits
logits (B, M, C), targets (B, M)
"""

import math

import torch

import reward
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
DEFINITION = "r = Π_k softmax(logits[b, k])[y*_k], the softmax over the C levels"

# The mistakes a message may name, each only when the reward is what it gives (recomputed).
CAUSES = {
    "mechanisms": "the softmax is over the mechanisms (dim 1), not over the levels (the last dim)",
    "sum": "a sum of the probabilities, not their product",
}


def definition(logits, targets, over="levels", combine="product"):
    """r written out reply by reply in float64: the product over mechanisms of the target level's
    probability. over="mechanisms" and combine="sum" make two mistakes instead."""
    out = []
    for b in range(logits.shape[0]):
        probs = []
        for k in range(logits.shape[1]):
            y = targets[b, k].item()
            if over == "levels":  # softmax over the levels
                row = logits[b, k].tolist()
            else:
                row = logits[b, :, y].tolist()
            chosen = logits[b, k, y].item()
            probs.append(math.exp(chosen) / sum(math.exp(x) for x in row))
        out.append(math.prod(probs) if combine == "product" else sum(probs))
    return torch.tensor(out, dtype=F64)


def causes(logits, targets):
    """(words, reward) of each mistake of CAUSES, on these inputs."""
    return [
        (CAUSES["mechanisms"], definition(logits, targets, over="mechanisms")),
        (CAUSES["sum"], definition(logits, targets, combine="sum")),
    ]


def levels(shape, seed, C=3):
    return torch.randint(0, C, shape, generator=torch.Generator().manual_seed(seed))


def call(logits, targets):
    return tensor(reward.reward_from_logits(logits.clone(), targets.clone()), "the reward")


def test_reward_works_for_any_batch_size():
    """Batches of 3 to 9 replies (the tiny preset scores 8 rollouts an iteration, the cpu preset
    32) get the definition's rewards, as a batch of 5 does."""

    def compute(lengths, T):  # one reply per row of the drawn batch
        logits = rand((len(lengths), 3, 3), T)
        targets = levels((len(lengths), 3), T + 1)
        return call(logits, targets), definition(logits, targets)

    assert_any_size(compute, "the reward", 90, lambda lengths, T: f"{len(lengths)} replies")


def test_reward_gives_one_number_per_reply():
    """reward_from_logits(logits (B, M, C), targets (B, M)) returns one reward per reply, shape
    (B,): here B = 5 replies, M = 3 mechanisms, C = 3 levels."""
    r = call(rand((5, 3, 3), 0), levels((5, 3), 1))
    assert r.shape == (5,), f"the reward has shape {tuple(r.shape)}, expected (5,)"


def test_reward_leaves_its_inputs_unchanged():
    """reward_from_logits changes none of its arguments in place, with float64, float32 or bfloat16
    logits: the identifiers' logits stay as they were."""
    call_keeping_inputs(
        reward.reward_from_logits, "logits, targets", rand((6, 3, 3), 80), levels((6, 3), 81)
    )


def test_softmax_is_over_the_levels_of_each_mechanism():
    """With one mechanism (M = 1) the reward is the softmax of its logits over the C levels (the
    last axis, not over the mechanisms or the batch), at the target level: C = 3 and C = 4."""
    for seed, C in enumerate((3, 4)):
        logits = rand((5, 1, C), 10 + seed, scale=2.0)
        targets = levels((5, 1), 20 + seed, C)
        assert_close(
            call(logits, targets),
            definition(logits, targets),
            f"the reward (M = 1, C = {C})",
            causes=causes(logits, targets),
            definition=DEFINITION,
        )


def test_reward_is_the_product_of_the_target_levels_probabilities():
    """r = Π_k p_k(y*_k): for each mechanism the softmax over its levels, at the target level,
    multiplied over the mechanisms."""
    logits = torch.tensor(
        [
            [[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [-3.0, 1.0, 4.0]],
            [[0.0, 0.0, 0.0], [3.0, -2.0, 0.0], [1.0, 2.0, 3.0]],
        ],
        dtype=F64,
    )
    targets = torch.tensor([[0, 2, 1], [1, 0, 2]])
    assert_close(
        call(logits, targets),
        definition(logits, targets),
        "the reward",
        causes=causes(logits, targets),
        definition=DEFINITION,
    )


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
        logits = rand((16, M, C), seed, scale=2.0)
        targets = levels((16, M), seed + 1, C)
        assert_close(
            call(logits, targets),
            definition(logits, targets),
            f"the reward (M = {M}, C = {C})",
            causes=causes(logits, targets),
            definition=DEFINITION,
        )


def test_reward_in_float32_and_bfloat16():
    """In training's dtypes: logits in float32 or bfloat16 (the identifiers' output) with int64
    target levels, 32 replies: rewards in the logits' dtype or float32, equal to the definition
    within that dtype's rounding (float32: 1e-5 relative; bfloat16: 3 % of the largest |value|)."""
    for dtype in (torch.float32, torch.bfloat16):
        logits = rand((32, 3, 3), 90, scale=2.0).to(dtype).to(F64)  # as rounded
        targets = levels((32, 3), 91)
        got = reward.reward_from_logits(convert(logits, dtype), targets)
        assert_dtype(got, "the reward", dtype)
        want = definition(logits, targets)
        rtol, atol = tolerance(dtype, want)
        assert_close(
            got, want, f"the reward ({describe(dtype)})", rtol, atol, definition=DEFINITION
        )
