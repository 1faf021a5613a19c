"""Lab checks of ppo.value_loss: the clipped value loss.

V^clip = clip(V, V_old - c, V_old + c),   L_v = ½·mean_m(max((V - R)², (V^clip - R)²))
stats: vf_clipfrac = mean_m([(V^clip - R)² > (V - R)²])
mean_m(x) = Σ x·m / Σ m: m is the 0/1 reply mask, or non-negative weights
"""

import torch

import ppo
from checklib import (
    TOLERANCES,
    assert_any_size,
    assert_close,
    assert_detached,
    assert_dtype,
    call_keeping_inputs,
    conditions,
    convert,
    describe,
    draw_lengths,
    gradient,
    junk_after_eos,
    prefix_mask,
    rand,
    tensor,
    tolerance,
)

F64 = torch.float64
DEFINITION = "L_v = ½·mean_m(max((V - R)², (clip(V, V_old - c, V_old + c) - R)²))"

# The mistakes a message may name, each only when the loss is what it gives (recomputed).
CAUSES = {
    "half": "twice the definition's: the ½ is missing",
    "no_clip": "the clip is missing: it is ½·mean_m((V - R)²)",
    "min": "each token takes the smaller of the two errors (min), not the larger (max)",
    "clipped_only": "each token takes the clipped error (V^clip - R)² alone, not the larger of the "
    "two",
    "weights": "the weights are read as 0/1 (a mean over the tokens where the mask is not 0, e.g. "
    "x[mask.bool()].mean()): mean_m weighs each token by its mask",
}


def definition(values, old_values, returns, mask, clip_range_value=0.2, variant=""):
    """L_v and vf_clipfrac written out token by token in float64, means weighted by the mask.
    variant makes a mistake instead: "no_clip", "min", "clipped_only", "unweighted"."""
    losses = []
    clipped = []
    weights = []
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            w = mask[b, t].item()
            if w == 0:
                continue
            v = values[b, t].item()
            v_old = old_values[b, t].item()
            r = returns[b, t].item()
            v_clip = min(max(v, v_old - clip_range_value), v_old + clip_range_value)
            error = (v - r) ** 2
            error_clip = (v_clip - r) ** 2
            loss = {
                "no_clip": error,
                "min": min(error, error_clip),
                "clipped_only": error_clip,
            }.get(variant, max(error, error_clip))
            losses.append(loss)
            clipped.append(float(error_clip > error))
            weights.append(1.0 if variant == "unweighted" else w)

    def mean(xs):
        return sum(x * w for x, w in zip(xs, weights)) / sum(weights)

    return 0.5 * mean(losses), mean(clipped)


def ties(values, old_values, returns, mask, clip_range_value, rtol):
    """The weighted share of the tokens whose two errors agree within rtol: V inside the clip
    range, where V^clip = V. Whether such a token counts as clipped is decided by rounding once
    V^clip is computed in another way (V_old + clamp(V - V_old, -c, c)), so vf_clipfrac may differ
    by this much in float32 and bfloat16."""
    share = 0.0
    total = 0.0
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            v = values[b, t].item()
            v_old = old_values[b, t].item()
            r = returns[b, t].item()
            v_clip = min(max(v, v_old - clip_range_value), v_old + clip_range_value)
            error = (v - r) ** 2
            error_clip = (v_clip - r) ** 2
            share += mask[b, t].item() * (abs(error - error_clip) <= rtol * max(error, error_clip))
            total += mask[b, t].item()
    return share / total


def causes(values, old_values, returns, mask, clip_range_value=0.2):
    """(words, loss) of each mistake of CAUSES, on these inputs."""
    args = (values, old_values, returns, mask, clip_range_value)
    return [
        (CAUSES["half"], 2 * definition(*args)[0]),
        (CAUSES["no_clip"], definition(*args, "no_clip")[0]),
        (CAUSES["min"], definition(*args, "min")[0]),
        (CAUSES["clipped_only"], definition(*args, "clipped_only")[0]),
        (CAUSES["weights"], definition(*args, "unweighted")[0]),
    ]


def batch(seed, lengths=None, T=None, junk=(10.0, 50.0)):
    """Values that moved from V_old by up to about ±0.6 (past the clip range on many tokens), junk
    (scale, shift) after </s>; sizes drawn from seed unless given."""
    if lengths is None:
        lengths, T = draw_lengths(seed)
    mask = prefix_mask(lengths, T)
    old_values = rand(mask.shape, seed)
    values = old_values + 0.3 * rand(mask.shape, seed + 1)
    returns = rand(mask.shape, seed + 2, scale=2.0)
    return (
        junk_after_eos(values, mask, seed + 3, *junk),
        junk_after_eos(old_values, mask, seed + 4, *junk),
        junk_after_eos(returns, mask, seed + 5, *junk),
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


def test_value_loss_works_for_any_batch_size_and_reply_length():
    """Batches of 3 to 9 rows of up to 30 tokens (the tiny preset samples replies of up to 12
    tokens, the cpu preset up to 30) get the definition's loss and vf_clipfrac, as the batch of 5
    rows of 7 tokens does."""

    def compute(lengths, width):
        args = batch(80, lengths, width)
        loss, stats = call(*args)
        got = torch.stack([loss, tensor(stats["vf_clipfrac"], "stats['vf_clipfrac']")])
        return got, torch.tensor(definition(*args), dtype=F64)

    assert_any_size(compute, "the loss and vf_clipfrac", 90)


def test_value_loss_is_half_the_mean_squared_error_inside_the_clip_range():
    """When no value moved more than c from V_old, L_v = ½·mean((V - R)²) over the real tokens."""
    old_values = torch.zeros(1, 4, dtype=F64)
    values = torch.tensor([[0.1, -0.15, 0.0, 0.2]], dtype=F64)
    returns = torch.tensor([[1.0, -1.0, 2.0, 0.5]], dtype=F64)
    ones = torch.ones(1, 4, dtype=F64)
    loss, _ = call(values, old_values, returns, ones)
    assert_close(
        loss,
        0.5 * ((values - returns) ** 2).mean(),
        "the loss",
        causes=causes(values, old_values, returns, ones)[:1],
        definition="½·mean((V - R)²) inside the clip range",
    )


def test_value_loss_leaves_its_inputs_unchanged():
    """value_loss changes none of its arguments in place, with float64, float32 or bfloat16 inputs
    and int64, bool or float masks: the rollout's values and returns serve every minibatch of every
    epoch."""
    values, old_values, returns, mask = batch(60)
    call_keeping_inputs(
        ppo.value_loss, "values, old_values, returns, mask", values, old_values, returns, mask
    )


def test_value_loss_clips_the_value_update():
    """A value that moved more than c from V_old is charged the larger of its own error and that of
    V^clip = clip(V, V_old - c, V_old + c): towards the return (V_old = 0, V = 0.5, R = 1, c = 0.2)
    the clipped ½·(0.2 - 1)² = 0.32, not ½·(0.5 - 1)² = 0.125, so the value head may not jump far in
    one update; away from it (R = 0) its own ½·0.5² = 0.125, not ½·0.2² = 0.02. Each token in a
    batch of its own."""
    got = []
    stats = []
    want = []
    alternatives = {}
    for r in (1.0, 0.0):
        args = [torch.tensor([[x]], dtype=F64) for x in (0.5, 0.0, r, 1.0)]
        loss, s = call(*args)
        got.append(loss)
        stats.append(tensor(s["vf_clipfrac"], "stats['vf_clipfrac']"))
        want.append(definition(*args)[0])
        for words, value in causes(*args):
            alternatives.setdefault(words, []).append(value)
    assert_close(
        torch.stack(got),
        want,
        "the loss of one token moved towards the return (R = 1) and of one moved away (R = 0)",
        causes=list(alternatives.items()),
        definition=DEFINITION,
    )
    assert_close(
        torch.stack(stats), [1.0, 0.0], "stats['vf_clipfrac'] of the two (1: the clip binds)"
    )


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
        args = batch(seed)
        loss, stats = call(*args, clip_range_value)
        want, want_clipfrac = definition(*args, clip_range_value)
        assert_close(
            loss,
            want,
            f"the loss (c = {clip_range_value})",
            causes=causes(*args, clip_range_value),
            definition=DEFINITION,
        )
        assert_close(
            stats["vf_clipfrac"], want_clipfrac, f"stats['vf_clipfrac'] (c = {clip_range_value})"
        )


def definition_gradient(values, old_values, returns, mask, clip_range_value=0.2):
    """d L_v / d V written out token by token: (V - R)·m/Σm where (V - R)² is the larger error (V
    inside [V_old - c, V_old + c], where V^clip = V, included), 0 where the clipped error is the
    larger (V^clip is constant there)."""
    grad = torch.zeros_like(values)
    n = mask.sum().item()
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[b, t] == 0:
                continue
            v = values[b, t].item()
            v_old = old_values[b, t].item()
            r = returns[b, t].item()
            v_clip = min(max(v, v_old - clip_range_value), v_old + clip_range_value)
            if v_clip == v or (v - r) ** 2 > (v_clip - r) ** 2:
                grad[b, t] = (v - r) * mask[b, t].item() / n
    return grad


def test_the_value_head_gets_the_gradient_of_the_definition():
    """The gradient of L_v with respect to V is (V - R)/n on real tokens whose own error is the
    larger (V inside the clip range included), 0 where the clipped error is and after </s>: V is
    differentiable in both terms."""
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


def test_the_mask_may_be_weights():
    """The mask may be non-negative weights (the docstring allows them, as GRPO passes them to
    policy_loss): the loss and vf_clipfrac are the weighted means Σ x·m / Σ m, here with each
    reply's tokens weighing 1/n_reply, and the gradient (V - R)·m/Σm where V's own error is the
    larger."""
    values, old_values, returns, mask = batch(55)
    weights = mask / mask.sum(1, keepdim=True).clamp(min=1)
    loss, stats = call(values, old_values, returns, weights)
    want, want_clipfrac = definition(values, old_values, returns, weights)
    assert_close(
        loss,
        want,
        "the loss with per-reply weights as the mask",
        causes=causes(values, old_values, returns, weights)[-1:],
        definition="½·Σ_t m_t·max((V - R)², (V^clip - R)²) / Σ_t m_t",
    )
    unweighted = definition(values, old_values, returns, weights, variant="unweighted")[1]
    assert_close(
        stats["vf_clipfrac"],
        want_clipfrac,
        "stats['vf_clipfrac'] with per-reply weights as the mask",
        causes=[(CAUSES["weights"], unweighted)],
    )
    x = values.clone().requires_grad_(True)
    grad = gradient(ppo.value_loss(x, old_values, returns, weights)[0], x, "values")
    want = definition_gradient(values, old_values, returns, weights)
    assert_close(grad, want, "the gradient with respect to values, per-reply weights")


def test_value_loss_in_float32_and_bfloat16_with_integer_and_bool_masks():
    """In training's dtypes: values, old values and returns in float32 or bfloat16 with an int64
    mask (as emprl.reply_mask makes it), a bool or a float one, on batches of up to 30 tokens: the
    loss and vf_clipfrac in the inputs' dtype or float32, equal to the definition within that
    dtype's rounding (float32: 1e-5 relative; bfloat16: 3 % of the largest |value|; vf_clipfrac also
    by the share of tokens inside the clip range, whose two errors are equal), and in float32 the
    gradient too."""
    for i, (dtype, mask_dtype, lengths, width) in enumerate(conditions(800)):
        values, old_values, returns, mask = batch(800 + 10 * i, lengths, width, junk=(1.0, 3.0))
        values, old_values, returns = (x.to(dtype).to(F64) for x in (values, old_values, returns))
        x = convert(values, dtype).requires_grad_(True)
        loss, stats = ppo.value_loss(
            x, convert(old_values, dtype), convert(returns, dtype), mask.to(mask_dtype), 0.3
        )
        condition = describe(dtype, mask_dtype, lengths, width)
        want, want_clipfrac = definition(values, old_values, returns, mask, 0.3)
        tied = ties(values, old_values, returns, mask, 0.3, TOLERANCES[dtype][0])
        for name, got, w, slack in (
            ("the loss", loss, want, 0.0),
            ("vf_clipfrac", stats["vf_clipfrac"], want_clipfrac, tied),
        ):
            assert_dtype(got, name, dtype, mask_dtype)
            rtol, atol = tolerance(dtype, w)
            assert_close(got, w, f"{name} ({condition})", rtol, atol + slack, definition=DEFINITION)
        if dtype == torch.float32:
            grad = gradient(loss, x, f"values ({condition})")
            want = definition_gradient(values, old_values, returns, mask, 0.3)
            rtol, atol = tolerance(dtype, want)
            assert_close(
                grad, want, f"the gradient with respect to values ({condition})", rtol, atol
            )
