"""Lab checks of ppo.value_loss: the clipped value loss.

V^clip = clip(V, V_old - c, V_old + c),   L_v = ½·mean_m(max((V - R)², (V^clip - R)²))
stats: vf_clipfrac = mean_m([(V^clip - R)² > (V - R)²])
"""

import torch

import ppo
from checklib import (
    LENGTHS,
    T,
    assert_close,
    assert_detached,
    call_keeping_inputs,
    gradient,
    junk_after_eos,
    prefix_mask,
    rand,
    tensor,
)

F64 = torch.float64


def definition(values, old_values, returns, mask, clip_range_value=0.2):
    """L_v and vf_clipfrac written out token by token in float64."""
    losses, clipped = [], []
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[b, t] == 0:
                continue
            v, v_old, r = values[b, t].item(), old_values[b, t].item(), returns[b, t].item()
            v_clip = min(max(v, v_old - clip_range_value), v_old + clip_range_value)
            losses.append(max((v - r) ** 2, (v_clip - r) ** 2))
            clipped.append(float((v_clip - r) ** 2 > (v - r) ** 2))
    return 0.5 * sum(losses) / len(losses), sum(clipped) / len(clipped)


def batch(seed):
    """Values that moved from V_old by up to about ±0.6 (past the clip range on many tokens), junk
    after </s>."""
    mask = prefix_mask()
    old_values = rand((len(LENGTHS), T), seed)
    values = old_values + 0.3 * rand((len(LENGTHS), T), seed + 1)
    returns = rand((len(LENGTHS), T), seed + 2, scale=2.0)
    return (
        junk_after_eos(values, mask, seed + 3),
        junk_after_eos(old_values, mask, seed + 4),
        junk_after_eos(returns, mask, seed + 5),
        mask,
    )


def call(values, old_values, returns, mask, clip_range_value=0.2):
    out = ppo.value_loss(
        values.clone(), old_values.clone(), returns.clone(), mask.clone(), clip_range_value
    )
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)):
        raise AssertionError("value_loss should return a pair (loss, stats) with stats a dict")
    if "vf_clipfrac" not in out[1]:
        raise AssertionError("stats lacks 'vf_clipfrac'")
    return tensor(out[0], "the loss"), out[1]


def test_value_loss_is_half_the_mean_squared_error_inside_the_clip_range():
    """When no value moved more than c from V_old, L_v = ½·mean((V - R)²) over the real tokens (mind
    the ½)."""
    old_values = torch.zeros(1, 4, dtype=F64)
    values = torch.tensor([[0.1, -0.15, 0.0, 0.2]], dtype=F64)
    returns = torch.tensor([[1.0, -1.0, 2.0, 0.5]], dtype=F64)
    loss, _ = call(values, old_values, returns, torch.ones(1, 4, dtype=F64))
    assert_close(loss, 0.5 * ((values - returns) ** 2).mean(), "the loss")


def test_value_loss_leaves_its_inputs_unchanged():
    """value_loss changes none of its arguments in place: the rollout's values and returns serve
    every minibatch of every epoch."""
    values, old_values, returns, mask = batch(60)
    call_keeping_inputs(
        ppo.value_loss, "values, old_values, returns, mask", values, old_values, returns, mask
    )


def test_value_loss_clips_the_value_update():
    """A value that moved more than c from V_old *towards* the return is charged the error of V^clip
    = clip(V, V_old - c, V_old + c), the larger one: V_old = 0, V = 0.5, R = 1, c = 0.2 costs ½·(0.2
    - 1)² = 0.32, not ½·(0.5 - 1)² = 0.125 — the value head may not jump far in one update."""
    loss, stats = call(
        torch.tensor([[0.5]], dtype=F64),
        torch.zeros(1, 1, dtype=F64),
        torch.ones(1, 1, dtype=F64),
        torch.ones(1, 1, dtype=F64),
    )
    assert_close(loss, 0.32, "the loss")
    assert_close(stats["vf_clipfrac"], 1.0, "stats['vf_clipfrac']")


def test_value_loss_takes_the_larger_error():
    """A value that moved more than c *away from* the return keeps its own (larger) error: V_old =
    0, V = 0.5, R = 0, c = 0.2 costs ½·0.5² = 0.125 (max of the two errors, not min)."""
    loss, stats = call(
        torch.tensor([[0.5]], dtype=F64),
        torch.zeros(1, 1, dtype=F64),
        torch.zeros(1, 1, dtype=F64),
        torch.ones(1, 1, dtype=F64),
    )
    assert_close(loss, 0.125, "the loss")
    assert_close(stats["vf_clipfrac"], 0.0, "stats['vf_clipfrac']")


def test_padding_is_ignored():
    """The loss is a mean over real tokens only: what lies after </s> changes nothing."""
    values, old_values, returns, mask = batch(0)
    loss, _ = call(values, old_values, returns, mask)
    clean, _ = call(values * mask, old_values * mask, returns * mask, mask)
    assert_close(loss, clean, "the loss with junk after </s>", expected="with zeros there it is")


def test_value_loss_matches_the_definition():
    """L_v = ½·mean_m(max((V - R)², (clip(V, V_old ± c) - R)²)) and vf_clipfrac on random values,
    for c = 0.2 and 0.5."""
    for seed, clip_range_value in ((10, 0.2), (20, 0.5)):
        values, old_values, returns, mask = batch(seed)
        loss, stats = call(values, old_values, returns, mask, clip_range_value)
        want, want_clipfrac = definition(values, old_values, returns, mask, clip_range_value)
        assert_close(loss, want, f"the loss (c = {clip_range_value})")
        assert_close(
            stats["vf_clipfrac"], want_clipfrac, f"stats['vf_clipfrac'] (c = {clip_range_value})"
        )


def definition_gradient(values, old_values, returns, mask, clip_range_value=0.2):
    """d L_v / d V written out token by token: (V - R)/n where (V - R)² is the larger error (V
    inside [V_old - c, V_old + c], where V^clip = V, included), 0 where the clipped error is the
    larger (V^clip is constant there)."""
    grad = torch.zeros_like(values)
    n = mask.sum().item()
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[b, t] == 0:
                continue
            v, v_old, r = values[b, t].item(), old_values[b, t].item(), returns[b, t].item()
            v_clip = min(max(v, v_old - clip_range_value), v_old + clip_range_value)
            if v_clip == v or (v - r) ** 2 > (v_clip - r) ** 2:
                grad[b, t] = (v - r) / n
    return grad


def test_the_value_head_gets_the_gradient_of_the_definition():
    """The gradient of L_v with respect to V is (V - R)/n on real tokens whose own error is the
    larger (V inside the clip range included), 0 where the clipped error is and after </s>: V is
    differentiable in both terms. A loss computed on values.detach() has the right value and trains
    nothing: the value head never learns."""
    for seed, clip_range_value in ((30, 0.2), (40, 0.5)):
        values, old_values, returns, mask = batch(seed)
        x = values.clone().requires_grad_(True)
        loss, _ = ppo.value_loss(
            x, old_values.clone(), returns.clone(), mask.clone(), clip_range_value
        )
        grad = gradient(loss, x, "values")
        want = definition_gradient(values, old_values, returns, mask, clip_range_value)
        assert_close(grad, want, f"the gradient with respect to values (c = {clip_range_value})")


def test_statistics_are_detached():
    """The statistics (vf_clipfrac) are detached tensors: logged, never differentiated."""
    values, old_values, returns, mask = batch(50)
    _, stats = call(values.clone().requires_grad_(True), old_values, returns, mask)
    assert_detached(stats)
