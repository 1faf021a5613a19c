"""Lab checks of ppo.gae: generalised advantage estimation over the reply tokens.

δ_t = r_t + γ·V_{t+1}·m_{t+1} - V_t,   A_t = Σ_l (γλ)^l δ_{t+l} over the real tokens,
R_t = A_t + V_t
"""

import torch

import ppo
from checklib import (
    LENGTHS,
    T,
    assert_close,
    call_keeping_inputs,
    junk_after_eos,
    prefix_mask,
    rand,
    tensor,
)

F64 = torch.float64


def definition(rewards, values, mask, gamma, lam):
    """A and R written out row by row in float64: no value after </s>, nothing after </s>."""
    advantages, returns = torch.zeros_like(rewards), torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        n = int(mask[b].sum())  # real tokens 0 .. n-1, the last one is </s>
        # V after </s> is 0: the reply has ended
        v = [values[b, t].item() for t in range(n)] + [0.0]
        deltas = [rewards[b, t].item() + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            advantages[b, t] = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
            returns[b, t] = advantages[b, t] + v[t]
    return advantages, returns


def batch(seed):
    """Random rewards and values on replies that end early, with junk after </s> (as a rollout never
    has, but a correct gae never reads it)."""
    mask = prefix_mask()
    rewards = junk_after_eos(rand((len(LENGTHS), T), seed), mask, seed + 1)
    values = junk_after_eos(rand((len(LENGTHS), T), seed + 2), mask, seed + 3)
    return rewards, values, mask


def call(rewards, values, mask, gamma, lam):
    out = ppo.gae(rewards.clone(), values.clone(), mask.clone(), gamma, lam)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise AssertionError(
            f"gae should return a pair (advantages, returns), got {type(out).__name__}"
        )
    return tensor(out[0], "advantages"), tensor(out[1], "returns")


def test_gae_returns_advantages_and_returns_of_shape_b_t():
    """gae returns a pair (advantages, returns), each of the rewards' shape (B, T)."""
    rewards, values, mask = batch(0)
    advantages, returns = call(rewards, values, mask, 1.0, 0.95)
    for name, x in (("advantages", advantages), ("returns", returns)):
        assert x.shape == rewards.shape, (
            f"{name} has shape {tuple(x.shape)}, expected {tuple(rewards.shape)}"
        )


def test_gae_leaves_its_inputs_unchanged():
    """gae changes none of its arguments in place (no `values *= mask`): the caller keeps the
    rollout's values for the value loss's clip and the statistics."""
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
    """At the last real token (</s>) the reply has ended: there is no V_{t+1}, so δ = r - V there
    (the value at the position after </s> must not be used), and nothing after </s> changes any
    advantage."""
    rewards, values, mask = batch(20)
    advantages, _ = call(rewards, values, mask, 1.0, 0.95)
    for b, n in enumerate(LENGTHS):
        if n:
            want = rewards[b, n - 1] - values[b, n - 1]
            assert_close(
                advantages[b, n - 1],
                want,
                f"advantages[{b}, {n - 1}] (the last real token of row {b})",
            )
    clean, _ = call(rewards * mask, values * mask, mask, 1.0, 0.95)
    assert_close(
        advantages, clean, "advantages with junk after </s>", expected="with zeros there they are"
    )


def test_gae_uses_lambda():
    """λ weighs the later TD errors: with λ = 0 the advantage is the TD error δ_t alone, with λ =
    0.5 the sum Σ_l (γλ)^l δ_{t+l} (not the λ = 1 return minus the value)."""
    rewards, values, mask = batch(30)
    advantages, _ = call(rewards, values, mask, 1.0, 0.0)
    assert_close(
        advantages, definition(rewards, values, mask, 1.0, 0.0)[0], "advantages with λ = 0"
    )
    advantages, _ = call(rewards, values, mask, 1.0, 0.5)
    assert_close(
        advantages, definition(rewards, values, mask, 1.0, 0.5)[0], "advantages with λ = 0.5"
    )


def test_gae_uses_gamma():
    """γ discounts the next value and the later TD errors: with γ = 0.5, λ = 1 the advantage is
    Σ_l 0.5^l r_{t+l} - V_t."""
    rewards, values, mask = batch(40)
    advantages, _ = call(rewards, values, mask, 0.5, 1.0)
    assert_close(
        advantages, definition(rewards, values, mask, 0.5, 1.0)[0], "advantages with γ = 0.5, λ = 1"
    )


def test_gae_returns_are_advantages_plus_values():
    """The returns (targets of the value head) are R_t = A_t + V_t on the real tokens."""
    rewards, values, mask = batch(50)
    advantages, returns = call(rewards, values, mask, 0.9, 0.8)
    assert_close(returns, (advantages + values) * mask, "returns")


def test_gae_matches_the_definition():
    """A_t = Σ_l (γλ)^l δ_{t+l} with δ_t = r_t + γ·V_{t+1}·m_{t+1} - V_t and R_t = A_t + V_t, for
    several γ and λ."""
    for seed, (gamma, lam) in enumerate([(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.3)]):
        rewards, values, mask = batch(100 + 10 * seed)
        advantages, returns = call(rewards, values, mask, gamma, lam)
        want_advantages, want_returns = definition(rewards, values, mask, gamma, lam)
        assert_close(advantages, want_advantages, f"advantages (γ = {gamma}, λ = {lam})")
        assert_close(returns, want_returns, f"returns (γ = {gamma}, λ = {lam})")
