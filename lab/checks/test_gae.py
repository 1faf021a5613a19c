"""Lab checks of ppo.gae: generalised advantage estimation over the reply tokens.

δ_t = r_t + γ·V_{t+1}·m_{t+1} - V_t,   A_t = Σ_l (γλ)^l δ_{t+l} over the real tokens,
R_t = A_t + V_t
"""

import torch

import ppo
from checklib import (
    LENGTHS,
    T,
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
    tensor,
    tolerance,
)

F64 = torch.float64
DEFINITION = "A_t = Σ_l (γλ)^l δ_{t+l}, δ_t = r_t + γ·V_{t+1}·m_{t+1} - V_t, R_t = A_t + V_t"

# The mistakes a message may name, each only when the advantages are what it gives (recomputed).
CAUSES = {
    "lambda": "λ is ignored: they are the advantages of λ = 1 or of the default λ = 0.95",
    "bootstrap": "bootstraps past </s>: δ at the last real token uses the value after it",
    "gamma": "γ is left out of δ: they are those of δ_t = r_t + V_{t+1} - V_t",
    "returns": "the returns are the advantages alone: R_t = A_t + V_t",
}


def definition(rewards, values, mask, gamma, lam, bootstrap=False, gamma_in_delta=True):
    """A and R written out row by row in float64: no value after </s>, nothing after </s>. The flags
    make two mistakes instead: bootstrap (the value after </s> enters δ at the last real token) and
    gamma_in_delta=False (δ_t = r_t + V_{t+1} - V_t)."""
    advantages = torch.zeros_like(rewards)
    returns = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        n = int(mask[b].sum())  # real tokens 0 .. n-1, the last one is </s>
        after = values[b, n].item() if bootstrap and n < rewards.shape[1] else 0.0
        # V after </s> is 0: the reply has ended
        v = [values[b, t].item() for t in range(n)] + [after]
        discount = gamma if gamma_in_delta else 1.0
        deltas = [rewards[b, t].item() + discount * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            advantages[b, t] = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
            returns[b, t] = advantages[b, t] + v[t]
    return advantages, returns


def causes(rewards, values, mask, gamma, lam):
    """(words, advantages) of each mistake of CAUSES that changes the advantages, on these
    inputs."""
    out = [
        (CAUSES["lambda"], definition(rewards, values, mask, gamma, other)[0])
        for other in (1.0, 0.95)
        if other != lam
    ]
    out.append((CAUSES["bootstrap"], definition(rewards, values, mask, gamma, lam, True)[0]))
    if gamma != 1.0:
        out.append(
            (CAUSES["gamma"], definition(rewards, values, mask, gamma, lam, False, False)[0])
        )
    return out


def batch(seed, lengths=None, T=None):
    """Random rewards and values on replies that end early, with junk after </s> (as a rollout never
    has, but a correct gae never reads it); sizes drawn from seed unless given."""
    if lengths is None:
        lengths, T = draw_lengths(seed)
    mask = prefix_mask(lengths, T)
    rewards = junk_after_eos(rand(mask.shape, seed), mask, seed + 1)
    values = junk_after_eos(rand(mask.shape, seed + 2), mask, seed + 3)
    return rewards, values, mask


def call(rewards, values, mask, gamma, lam):
    out = ppo.gae(rewards.clone(), values.clone(), mask.clone(), gamma, lam)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise AssertionError(
            f"gae should return a pair (advantages, returns), got {type(out).__name__}"
        )
    return tensor(out[0], "advantages"), tensor(out[1], "returns")


def test_gae_works_for_any_batch_size_and_reply_length():
    """Batches of 3 to 9 rows of up to 30 tokens (the tiny preset samples replies of up to 12
    tokens, the cpu preset up to 30) get the definition's advantages and returns, as the batch of 5
    rows of 7 tokens does."""

    def compute(lengths, width):
        rewards, values, mask = batch(300, lengths, width)
        advantages, returns = call(rewards, values, mask, 0.9, 0.8)
        want = definition(rewards, values, mask, 0.9, 0.8)
        return torch.cat([advantages, returns], 1), torch.cat(want, 1)

    assert_any_size(compute, "advantages and returns (side by side)", 310)


def test_gae_returns_advantages_and_returns_of_shape_b_t():
    """gae returns a pair (advantages, returns), each of the rewards' shape (B, T)."""
    rewards, values, mask = batch(0, LENGTHS, T)
    advantages, returns = call(rewards, values, mask, 1.0, 0.95)
    for name, x in (("advantages", advantages), ("returns", returns)):
        assert x.shape == rewards.shape, (
            f"{name} has shape {tuple(x.shape)}, expected {tuple(rewards.shape)}"
        )


def test_gae_leaves_its_inputs_unchanged():
    """gae changes none of its arguments in place, with float64, float32 or bfloat16 inputs and
    int64, bool or float masks: the caller keeps the rollout's values for the value loss's clip and
    the statistics."""
    rewards, values, mask = batch(200)
    call_keeping_inputs(ppo.gae, "rewards, values, mask", rewards, values, mask, 1.0, 0.95)


def test_gae_puts_nothing_after_eos():
    """Advantages and returns are 0 after </s> (where the mask is 0), whatever rewards and values
    lie there."""
    rewards, values, mask = batch(10)
    advantages, returns = call(rewards, values, mask, 1.0, 0.95)
    assert_close(advantages * (1 - mask), torch.zeros_like(mask), "advantages after </s>")
    assert_close(returns * (1 - mask), torch.zeros_like(mask), "returns after </s>")


def test_gae_does_not_bootstrap_past_eos():
    """At the last real token t = n - 1 of each row (</s>) the advantage is δ_t = r_t - V_t: the
    reply ends there, no V_{t+1} enters; and what lies after </s> changes no advantage."""
    rewards, values, mask = batch(20)
    advantages, _ = call(rewards, values, mask, 1.0, 0.95)
    rows = [b for b in range(mask.shape[0]) if mask[b].sum() > 0]
    last = [int(mask[b].sum()) - 1 for b in rows]
    got = torch.stack([advantages[b, t] for b, t in zip(rows, last)])
    want = torch.stack([rewards[b, t] - values[b, t] for b, t in zip(rows, last)])
    bootstrapped = definition(rewards, values, mask, 1.0, 0.95, bootstrap=True)[0]
    assert_close(
        got,
        want,
        f"the advantages at the last real token of rows {rows} (positions {last})",
        causes=[(CAUSES["bootstrap"], [bootstrapped[b, t] for b, t in zip(rows, last)])],
        definition="A = δ = r - V at the last real token",
    )
    clean, _ = call(rewards * mask, values * mask, mask, 1.0, 0.95)
    assert_close(
        advantages, clean, "advantages with junk after </s>", expected="with zeros there they are"
    )


def test_gae_uses_lambda():
    """λ weighs the later TD errors: with λ = 0 the advantage is the TD error δ_t alone, with λ =
    0.5 the sum Σ_l (γλ)^l δ_{t+l}."""
    rewards, values, mask = batch(30)
    for lam in (0.0, 0.5):
        advantages, _ = call(rewards, values, mask, 1.0, lam)
        assert_close(
            advantages,
            definition(rewards, values, mask, 1.0, lam)[0],
            f"advantages with λ = {lam:g}",
            causes=causes(rewards, values, mask, 1.0, lam),
            definition=DEFINITION,
        )


def test_gae_uses_gamma():
    """γ discounts the next value and the later TD errors: with γ = 0.5, λ = 1 the advantage is
    Σ_l 0.5^l r_{t+l} - V_t."""
    rewards, values, mask = batch(40)
    advantages, _ = call(rewards, values, mask, 0.5, 1.0)
    assert_close(
        advantages,
        definition(rewards, values, mask, 0.5, 1.0)[0],
        "advantages with γ = 0.5, λ = 1",
        causes=causes(rewards, values, mask, 0.5, 1.0),
        definition=DEFINITION,
    )


def test_gae_returns_are_advantages_plus_values():
    """The returns (targets of the value head) are R_t = A_t + V_t on the real tokens."""
    rewards, values, mask = batch(50)
    advantages, returns = call(rewards, values, mask, 0.9, 0.8)
    assert_close(
        returns,
        (advantages + values) * mask,
        "returns",
        expected="A + V gives",
        causes=[(CAUSES["returns"], advantages)],
        definition="R_t = A_t + V_t on the real tokens, 0 after </s>",
    )


def test_gae_matches_the_definition():
    """A_t = Σ_l (γλ)^l δ_{t+l} with δ_t = r_t + γ·V_{t+1}·m_{t+1} - V_t and R_t = A_t + V_t, for
    several γ and λ."""
    for seed, (gamma, lam) in enumerate([(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.3)]):
        rewards, values, mask = batch(100 + 10 * seed)
        advantages, returns = call(rewards, values, mask, gamma, lam)
        want_advantages, want_returns = definition(rewards, values, mask, gamma, lam)
        where = f"(γ = {gamma}, λ = {lam})"
        assert_close(
            advantages,
            want_advantages,
            f"advantages {where}",
            causes=causes(rewards, values, mask, gamma, lam),
            definition=DEFINITION,
        )
        assert_close(returns, want_returns, f"returns {where}", definition=DEFINITION)


def test_gae_in_float32_and_bfloat16_with_integer_and_bool_masks():
    """In training's dtypes: rewards and values in float32 or bfloat16 with an int64 mask (as
    emprl.reply_mask makes it), a bool or a float one, on batches of up to 30 tokens: advantages and
    returns in the inputs' dtype or float32, equal to the definition within that dtype's rounding
    (float32: 1e-5 relative; bfloat16: 3 % of the largest |value|)."""
    for i, (dtype, mask_dtype, lengths, width) in enumerate(conditions(400)):
        rewards, values, mask = batch(400 + 10 * i, lengths, width)
        args = [convert(x, dtype) for x in (rewards, values)] + [mask.to(mask_dtype)]
        out = ppo.gae(*args, 0.99, 0.9)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise AssertionError(f"gae should return a pair, got {type(out).__name__}")
        condition = describe(dtype, mask_dtype, lengths, width)
        rewards, values = (x.to(dtype).to(F64) for x in (rewards, values))  # what gae was given
        want = definition(rewards, values, mask, 0.99, 0.9)
        for name, got, w in zip(("advantages", "returns"), out, want):
            assert_dtype(got, name, dtype, mask_dtype)
            rtol, atol = tolerance(dtype, w)
            assert_close(got, w, f"{name} ({condition})", rtol, atol, definition=DEFINITION)
