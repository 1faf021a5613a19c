"""Lab checks of ppo.policy_loss: PPO's clipped surrogate and its statistics.

    ρ_t = exp(log π(a_t) - log π_old(a_t)),   L_pg = mean_m(max(-A_t·ρ_t, -A_t·clip(ρ_t, 1-c, 1+c)))
    stats: ratio = mean_m(ρ), clipfrac = mean_m([-A·clip(ρ) > -A·ρ]),
           approx_kl = ½·mean_m((log ρ)²), approx_kl_k3 = mean_m((ρ - 1) - log ρ)
    mean_m(x) = Σ x·m / Σ m: m is the 0/1 reply mask, or GRPO's per-reply weights m_t / n_reply

π_old is the rollout policy (the log-probs recorded when the replies were sampled), π_ref the frozen
SFT model. They are different models: the ratio is against π_old, the KL penalty (step 2) against
π_ref.
"""

import math

import torch

import ppo
from checklib import (
    LENGTHS,
    TOLERANCES,
    T,
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
DEFINITION = "L_pg = mean_m(max(-A·ρ, -A·clip(ρ, 1-c, 1+c))), ρ = exp(log π - log π_old)"
STATS = ("ratio", "clipfrac", "approx_kl", "approx_kl_k3")

# The mistakes a message may name, each only when the output is what it gives (recomputed).
CAUSES = {
    "reference": "that is the ratio against the reference model's log-probs; the ratio is against "
    "the rollout policy's, old_logprobs",
    "inverted": "the ratio is inverted: π_old / π",
    "half": "twice the definition's: the ½ is missing",
    "optimistic": "each token takes the smaller of the two terms (min): the clip must take the "
    "larger loss (max), the pessimistic one",
    "dual_clip": "the loss of a token with A < 0 is capped at 3·|A|: that is dual-clip PPO, whose "
    "cap this loss does not have",
    "weights": "the weights are read as 0/1 (a mean over the tokens where the mask is not 0, e.g. "
    "x[mask.bool()].mean()): mean_m weighs each token by its mask, and GRPO passes per-reply "
    "weights as the mask",
    "half_gradient": "half the definition's: one term of the max gets no gradient (ρ detached "
    "there?)",
    "unclipped_side": "0 on the unclipped side: the unclipped term -A·ρ gets no gradient (ρ "
    "detached there?)",
}


def definition(logprobs, old_logprobs, advantages, mask, clip_range=0.2, variant=""):
    """L_pg and the statistics written out token by token in float64: means weighted by the mask
    (0/1 or weights). variant makes a mistake instead: "min" (optimistic clip), "dual" (A < 0 capped
    at 3·|A|), "unweighted" (weights read as 0/1)."""
    losses = []
    ratios = []
    clipped = []
    kl = []
    kl3 = []
    weights = []
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            w = mask[b, t].item()
            if w == 0:
                continue
            log_ratio = logprobs[b, t].item() - old_logprobs[b, t].item()
            rho = math.exp(log_ratio)
            a = advantages[b, t].item()
            unclipped = -a * rho
            clip = -a * min(max(rho, 1 - clip_range), 1 + clip_range)
            loss = max(unclipped, clip)  # the pessimistic (larger) loss
            if variant == "min":
                loss = min(unclipped, clip)
            if variant == "dual" and a < 0:
                loss = min(loss, -3 * a)
            losses.append(loss)
            ratios.append(rho)
            clipped.append(float(clip > unclipped))
            kl.append(0.5 * log_ratio**2)
            kl3.append((rho - 1) - log_ratio)
            weights.append(1.0 if variant == "unweighted" else w)

    def mean(xs):
        return sum(x * w for x, w in zip(xs, weights)) / sum(weights)

    return mean(losses), dict(
        ratio=mean(ratios), clipfrac=mean(clipped), approx_kl=mean(kl), approx_kl_k3=mean(kl3)
    )


def ties(logprobs, old_logprobs, advantages, mask, clip_range, rtol):
    """The weighted share of the tokens whose two terms -A·ρ and -A·clip(ρ) agree within rtol (ρ
    inside the clip range): whether such a token counts as clipped is decided by rounding once
    clip(ρ) is computed in another way, so clipfrac may differ by this much in float32 and
    bfloat16."""
    share = 0.0
    total = 0.0
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            rho = math.exp(logprobs[b, t].item() - old_logprobs[b, t].item())
            a = advantages[b, t].item()
            unclipped = -a * rho
            clip = -a * min(max(rho, 1 - clip_range), 1 + clip_range)
            near = abs(unclipped - clip) <= rtol * max(abs(unclipped), abs(clip))
            share += mask[b, t].item() * near
            total += mask[b, t].item()
    return share / total


def rollout(seed, lengths=None, T=None, junk=(10.0, 50.0)):
    """A rollout as the update sees it, after some PPO iterations: the reference model's log-probs
    (the SFT model), the rollout policy's π_old that sampled the replies (about half a nat away from
    π_ref), the policy being updated π (a few hundredths of a nat from π_old on most tokens, past
    the clip range on some), advantages and the mask; junk (scale, shift) after </s>; sizes drawn
    from seed unless given. -> (ref_logprobs, old_logprobs, logprobs, advantages, mask)"""
    if lengths is None:
        lengths, T = draw_lengths(seed)
    mask = prefix_mask(lengths, T)
    ref_logprobs = -rand(mask.shape, seed).abs() - 0.5
    old_logprobs = junk_after_eos(
        ref_logprobs + 0.5 * rand(mask.shape, seed + 3), mask, seed + 2, *junk
    )
    logprobs = junk_after_eos(
        old_logprobs + 0.15 * rand(mask.shape, seed + 1), mask, seed + 4, *junk
    )
    advantages = junk_after_eos(rand(mask.shape, seed + 5), mask, seed + 6, *junk)
    return ref_logprobs, old_logprobs, logprobs, advantages, mask


def call(logprobs, old_logprobs, advantages, mask, clip_range=0.2):
    out = ppo.policy_loss(
        logprobs.clone(), old_logprobs.clone(), advantages.clone(), mask.clone(), clip_range
    )
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)):
        raise AssertionError("policy_loss should return a pair (loss, stats) with stats a dict")
    missing = set(STATS) - set(out[1])
    if missing:
        raise AssertionError(f"stats lacks {sorted(missing)}")
    return out


def test_policy_loss_works_for_any_batch_size_and_reply_length():
    """Batches of 3 to 9 rows of up to 30 tokens (the tiny preset samples replies of up to 12
    tokens, the cpu preset up to 30) get the definition's loss and statistics, as the batch of 5
    rows of 7 tokens does."""

    def compute(lengths, width):
        _, old, new, advantages, mask = rollout(80, lengths, width)
        loss, stats = call(new, old, advantages, mask)
        got = torch.stack([tensor(loss, "the loss")] + [tensor(stats[k], k) for k in STATS])
        want, want_stats = definition(new, old, advantages, mask)
        return got, torch.tensor([want] + [want_stats[k] for k in STATS], dtype=F64)

    assert_any_size(compute, "the loss, ratio, clipfrac, approx_kl and approx_kl_k3", 90)


def test_policy_loss_returns_a_scalar_loss_and_its_statistics():
    """policy_loss returns (loss, stats): a 0-dim loss tensor and stats with ratio, clipfrac,
    approx_kl and approx_kl_k3."""
    _, old, new, advantages, mask = rollout(0, LENGTHS, T)
    loss, stats = call(new, old, advantages, mask)
    assert tensor(loss, "loss").dim() == 0, (
        f"the loss should be a 0-dim tensor, it has shape {tuple(loss.shape)}"
    )


def test_policy_loss_leaves_its_inputs_unchanged():
    """policy_loss changes none of its arguments in place, with float64, float32 or bfloat16 inputs
    and int64, bool or float masks: the rollout's log-probs and advantages serve every minibatch of
    every epoch."""
    _, old, new, advantages, mask = rollout(70, junk=(1.0, 3.0))
    call_keeping_inputs(
        ppo.policy_loss, "logprobs, old_logprobs, advantages, mask", new, old, advantages, mask
    )


def test_padding_is_ignored():
    """The loss is a mean over real tokens only: what lies after </s> changes nothing."""
    _, old, new, advantages, mask = rollout(10)
    loss, _ = call(new, old, advantages, mask)
    clean, _ = call(new * mask, old * mask, advantages * mask, mask)
    assert_close(
        loss,
        tensor(clean, "loss"),
        "the loss with junk after </s>",
        expected="with zeros there it is",
    )


def test_ratio_is_1_before_the_first_update():
    """Before the first update π = π_old (logprobs = old_logprobs): ρ = 1 on every token, nothing is
    clipped and L_pg = -mean(A) — the ratio compares the policy with itself at sampling time, not
    with anything else."""
    _, old, _, advantages, mask = rollout(20)
    loss, stats = call(old, old, advantages, mask)
    assert_close(stats["ratio"], 1.0, "stats['ratio']")
    assert_close(stats["clipfrac"], 0.0, "stats['clipfrac']")
    assert_close(loss, -(advantages * mask).sum() / mask.sum(), "the loss before the first update")


def test_ratio_is_against_the_rollout_policy_not_the_reference_model():
    """ρ_t = π(a_t) / π_old(a_t) with π_old the rollout policy (old_logprobs), not the reference
    model: the loss, ratio and approx_kl follow old_logprobs (checked with a clip range so wide
    that nothing is clipped: only the ratio matters)."""
    ref, old, new, advantages, mask = rollout(38)
    loss, stats = call(new, old, advantages, mask, clip_range=10.0)
    want, want_stats = definition(new, old, advantages, mask, clip_range=10.0)
    against_ref, ref_stats = definition(new, ref, advantages, mask, clip_range=10.0)
    inverted, _ = definition(old, new, advantages, mask, clip_range=10.0)
    # a check of this check: its data tells the rollout policy from the reference model
    assert (
        abs(want - against_ref) > 0.05
        and abs(want_stats["approx_kl"] - ref_stats["approx_kl"]) > 0.05
    )
    got = tensor(loss, "the loss").item()
    got_kl = tensor(stats["approx_kl"], "stats['approx_kl']").item()
    if abs(got - against_ref) < 1e-6 or abs(got_kl - ref_stats["approx_kl"]) < 1e-6:
        raise AssertionError(
            f"the loss is {got:.6g} and approx_kl {got_kl:.6g}, against the rollout policy's "
            f"log-probs they are {want:.6g} and {want_stats['approx_kl']:.6g}: "
            f"{CAUSES['reference']}"
        )
    assert_close(
        loss,
        want,
        "the loss (c = 10: nothing clipped)",
        causes=[(CAUSES["inverted"], inverted)],
        definition=DEFINITION,
    )
    assert_close(stats["ratio"], want_stats["ratio"], "stats['ratio']", definition="mean_m(ρ)")


def test_approx_kl_is_half_the_mean_squared_log_ratio():
    """The statistics of the update: approx_kl = ½·mean_m((log π - log π_old)²) and approx_kl_k3 =
    mean_m((ρ - 1) - log ρ), means over the real tokens."""
    _, old, new, advantages, mask = rollout(40)
    _, stats = call(new, old, advantages, mask, clip_range=10.0)
    _, want = definition(new, old, advantages, mask, clip_range=10.0)
    assert_close(
        stats["approx_kl"],
        want["approx_kl"],
        "stats['approx_kl']",
        causes=[(CAUSES["half"], 2 * want["approx_kl"])],
        definition="½·mean_m((log π - log π_old)²)",
    )
    assert_close(
        stats["approx_kl_k3"],
        want["approx_kl_k3"],
        "stats['approx_kl_k3']",
        definition="mean_m((ρ - 1) - log ρ)",
    )


def test_clipping_is_pessimistic():
    """Each token takes the larger loss max(-A·ρ, -A·clip(ρ, 1-c, 1+c)): with A > 0 the gain stops
    at ρ = 1+c but a ρ below 1-c is not clipped; with A < 0 the other way round."""
    ratios = [0.7, 0.85, 1.0, 1.15, 1.3]
    logprobs = torch.tensor([ratios, ratios], dtype=F64).log()
    zeros = torch.zeros(2, 5, dtype=F64)
    ones = torch.ones(2, 5, dtype=F64)
    advantages = torch.tensor([[1.0] * 5, [-1.0] * 5], dtype=F64)
    loss, stats = call(logprobs, zeros, advantages, ones, clip_range=0.2)
    per_token = [[-0.7, -0.85, -1.0, -1.15, -1.2], [0.8, 0.85, 1.0, 1.15, 1.3]]
    optimistic, _ = definition(logprobs, zeros, advantages, ones, 0.2, "min")
    assert_close(
        loss,
        torch.tensor(per_token, dtype=F64).mean(),
        "the loss (ratios 0.7 .. 1.3, A = ±1, c = 0.2)",
        causes=[(CAUSES["optimistic"], optimistic)],
        definition=DEFINITION,
    )
    assert_close(
        stats["clipfrac"],
        2 / 10,
        "stats['clipfrac'] (the fraction of tokens whose clipped loss is larger)",
    )


def test_clipped_tokens_get_no_gradient():
    """A token whose clipped loss is the larger one gets no gradient: the update stops pushing
    it."""
    logprobs = torch.tensor(
        [[math.log(1.3), math.log(1.1), math.log(0.7)]], dtype=F64, requires_grad=True
    )
    loss, _ = ppo.policy_loss(
        logprobs,
        torch.zeros(1, 3, dtype=F64),
        torch.tensor([[1.0, 1.0, -1.0]], dtype=F64),
        torch.ones(1, 3, dtype=F64),
    )
    grad = gradient(loss, logprobs, "logprobs")[0].tolist()
    assert grad[0] == 0 and grad[2] == 0, (
        f"the gradient of the clipped tokens 0 and 2 (ρ = 1.3 with A = 1, ρ = 0.7 with A = -1) is "
        f"{grad[0]:.3g}, {grad[2]:.3g}, the definition gives 0 and 0"
    )
    assert grad[1] != 0, "the unclipped token 1 gets no gradient"


def test_policy_loss_and_statistics_match_the_definition():
    """L_pg = mean_m(max(-A·ρ, -A·clip(ρ, 1-c, 1+c))) and ratio, clipfrac, approx_kl = ½·mean((log
    ρ)²), approx_kl_k3 = mean((ρ - 1) - log ρ), for clip ranges 0.2 and 0.1."""
    _, old, new, advantages, mask = rollout(50)
    for clip_range in (0.2, 0.1):
        loss, stats = call(new, old, advantages, mask, clip_range)
        want, want_stats = definition(new, old, advantages, mask, clip_range)
        assert_close(loss, want, f"the loss (c = {clip_range})", definition=DEFINITION)
        for name, value in want_stats.items():
            assert_close(stats[name], value, f"stats['{name}'] (c = {clip_range})")


def definition_gradient(logprobs, old_logprobs, advantages, mask, clip_range=0.2):
    """d L_pg / d log π written out token by token: -A·ρ·m/Σm where the unclipped term -A·ρ is the
    larger (ρ inside [1-c, 1+c], where the two terms are equal, included), 0 where the clipped term
    is the larger (it is constant)."""
    grad = torch.zeros_like(logprobs)
    n = mask.sum().item()
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[b, t] == 0:
                continue
            rho = math.exp(logprobs[b, t].item() - old_logprobs[b, t].item())
            a = advantages[b, t].item()
            inside = 1 - clip_range <= rho <= 1 + clip_range
            if inside or -a * rho > -a * min(max(rho, 1 - clip_range), 1 + clip_range):
                grad[b, t] = -a * rho * mask[b, t].item() / n
    return grad


def loss_gradient(logprobs, old_logprobs, advantages, mask, clip_range=0.2):
    x = logprobs.clone().requires_grad_(True)
    loss, _ = call(x, old_logprobs, advantages, mask, clip_range)
    return gradient(loss, x, "logprobs")


def test_gradient_at_ratio_1_is_minus_the_advantage():
    """Before the first update (ρ = 1) the gradient of L_pg with respect to log π is -A_t/n on every
    real token (n real tokens) and 0 after </s>: ρ is differentiable in both terms of the max."""
    _, old, _, advantages, mask = rollout(60)
    grad = loss_gradient(old, old, advantages, mask)
    want = definition_gradient(old, old, advantages, mask)
    assert_close(
        grad,
        want,
        "the gradient with respect to logprobs at ρ = 1",
        causes=[(CAUSES["half_gradient"], want / 2)],
        definition="-A_t·m_t/Σm",
    )


def test_gradient_on_the_clipped_and_unclipped_sides():
    """At ρ ≠ 1 the gradient of L_pg with respect to log π is -A·ρ/n where the unclipped term is the
    larger (ρ inside [1-c, 1+c], or outside on the side where clipping does not bind: A > 0 and ρ <
    1-c, A < 0 and ρ > 1+c) and 0 where the clipped term is: ratios 0.7 .. 1.3 with A = ±1, then
    random ones, clip ranges 0.2 and 0.1."""
    ratios = [0.7, 0.9, 1.1, 1.3]
    logprobs = torch.tensor([ratios, ratios], dtype=F64).log()
    zeros = torch.zeros(2, 4, dtype=F64)
    ones = torch.ones(2, 4, dtype=F64)
    advantages = torch.tensor([[1.0] * 4, [-1.0] * 4], dtype=F64)
    grad = loss_gradient(logprobs, zeros, advantages, ones)
    want = definition_gradient(logprobs, zeros, advantages, ones)
    # A > 0, ρ < 1 - c and A < 0, ρ > 1 + c: the unclipped term is the larger
    if grad[0, 0].item() == 0 and grad[1, 3].item() == 0:
        raise AssertionError(
            "the gradient at ρ = 0.7 with A = 1 and at ρ = 1.3 with A = -1 is 0 and 0, the "
            f"definition gives {want[0, 0].item():.4g} and {want[1, 3].item():.4g}: "
            f"{CAUSES['unclipped_side']}"
        )
    assert_close(
        grad, want, "the gradient with respect to logprobs (ratios 0.7, 0.9, 1.1, 1.3; A = ±1)"
    )
    _, old, new, advantages, mask = rollout(61)
    for clip_range in (0.2, 0.1):
        grad = loss_gradient(new, old, advantages, mask, clip_range)
        want = definition_gradient(new, old, advantages, mask, clip_range)
        assert_close(
            grad, want, f"the gradient with respect to logprobs (random ρ, c = {clip_range})"
        )


FAR_RATIOS = (0.02, 0.1, 0.5, 2.0, 5.0, 30.0)
FAR_ADVANTAGES = (1.0, -1.0, 2.5, -0.7)


def test_ratios_far_outside_the_clip_range():
    """Tokens whose ρ lies far outside [1-c, 1+c] (ρ from 0.02 to 30, c = 0.3), with A > 0 and A <
    0, each in a batch of its own: the loss of each is max(-A·ρ, -A·clip(ρ, 1-c, 1+c)), unbounded
    for A < 0 as ρ grows, and its gradient -A·ρ where the unclipped term is the larger, 0 where the
    clipped one is."""
    got = []
    want = []
    grad = []
    want_grad = []
    dual = []
    for a in FAR_ADVANTAGES:
        for rho in FAR_RATIOS:
            logprobs = torch.tensor([[math.log(rho) - 1.0]], dtype=F64)
            old = torch.full((1, 1), -1.0, dtype=F64)
            advantages = torch.full((1, 1), a, dtype=F64)
            mask = torch.ones(1, 1, dtype=F64)
            x = logprobs.clone().requires_grad_(True)
            loss, _ = call(x, old, advantages, mask, clip_range=0.3)
            got.append(tensor(loss, "the loss"))
            want.append(definition(logprobs, old, advantages, mask, 0.3)[0])
            dual.append(definition(logprobs, old, advantages, mask, 0.3, "dual")[0])
            grad.append(gradient(loss, x, "logprobs")[0, 0])
            want_grad.append(definition_gradient(logprobs, old, advantages, mask, 0.3)[0, 0])
    shape = (len(FAR_ADVANTAGES), len(FAR_RATIOS))
    what = (
        f"the loss of one token with A = {FAR_ADVANTAGES} (rows) and ρ = {FAR_RATIOS} (columns), "
        "c = 0.3"
    )
    assert_close(
        torch.stack(got).view(shape),
        torch.tensor(want, dtype=F64).view(shape),
        what,
        causes=[(CAUSES["dual_clip"], torch.tensor(dual, dtype=F64).view(shape))],
        definition=DEFINITION,
    )
    assert_close(
        torch.stack(grad).view(shape),
        torch.stack(want_grad).view(shape),
        f"the gradient with respect to logprobs of {what[4:]}",
    )


def test_statistics_are_detached():
    """The statistics (ratio, clipfrac, approx_kl, approx_kl_k3) are detached 0-dim tensors: logged,
    never differentiated."""
    _, old, new, advantages, mask = rollout(62)
    _, stats = call(new.clone().requires_grad_(True), old, advantages, mask)
    assert_detached(stats)


def per_reply_weights(mask):
    """GRPO's mask (emprl.ppo_update, grpo_loss="reply"): each reply's tokens weigh 1/n_reply, so
    mean_m is the mean over replies of each reply's mean."""
    return mask / mask.sum(1, keepdim=True).clamp(min=1)


def test_the_mask_may_be_grpo_per_reply_weights():
    """GRPO passes per-reply weights as the mask, m_t = 1/n on the n tokens of a reply: the loss and
    the statistics are the weighted means Σ x·m / Σ m (each reply counts once, whatever its
    length), and the gradient -A·ρ·m/Σm where the unclipped term is the larger."""
    _, old, new, advantages, mask = rollout(63)
    weights = per_reply_weights(mask)
    loss, stats = call(new, old, advantages, weights, 0.2)
    want, want_stats = definition(new, old, advantages, weights, 0.2)
    unweighted, unweighted_stats = definition(new, old, advantages, weights, 0.2, "unweighted")
    assert_close(
        loss,
        want,
        "the loss with per-reply weights as the mask",
        causes=[(CAUSES["weights"], unweighted)],
        definition="Σ_t m_t·max(-A·ρ, -A·clip(ρ)) / Σ_t m_t",
    )
    for name in STATS:
        assert_close(
            stats[name],
            want_stats[name],
            f"stats['{name}'] with per-reply weights as the mask",
            causes=[(CAUSES["weights"], unweighted_stats[name])],
            definition="Σ_t m_t·x_t / Σ_t m_t",
        )
    grad = loss_gradient(new, old, advantages, weights, 0.2)
    want = definition_gradient(new, old, advantages, weights, 0.2)
    assert_close(grad, want, "the gradient with respect to logprobs, per-reply weights")


def test_policy_loss_in_float32_and_bfloat16_with_integer_and_bool_masks():
    """In training's dtypes: log-probs and advantages in float32 or bfloat16 with an int64 mask (as
    emprl.reply_mask makes it), a bool or a float one, on batches of up to 30 tokens: the loss and
    statistics in the inputs' dtype or float32, equal to the definition within that dtype's rounding
    (float32: 1e-5 relative; bfloat16: 3 % of the largest |value|, for approx_kl_k3 of mean_m |log
    ρ|; clipfrac also by the share of tokens inside the clip range, whose two terms are equal), and
    in float32 the gradient too."""
    for i, (dtype, mask_dtype, lengths, width) in enumerate(conditions(700)):
        _, old, new, advantages, mask = rollout(700 + 10 * i, lengths, width, junk=(1.0, 3.0))
        old, new, advantages = (x.to(dtype).to(F64) for x in (old, new, advantages))
        x = convert(new, dtype).requires_grad_(True)
        out = ppo.policy_loss(
            x, convert(old, dtype), convert(advantages, dtype), mask.to(mask_dtype), 0.25
        )
        condition = describe(dtype, mask_dtype, lengths, width)
        want, want_stats = definition(new, old, advantages, mask, 0.25)
        assert_dtype(out[0], "the loss", dtype, mask_dtype)
        rtol, atol = tolerance(dtype, want)
        assert_close(out[0], want, f"the loss ({condition})", rtol, atol, definition=DEFINITION)
        tied = ties(new, old, advantages, mask, 0.25, TOLERANCES[dtype][0])
        log_ratio = ((new - old) * mask).abs().sum() / mask.sum()  # the terms of approx_kl_k3
        scale = {"ratio": 1.0, "clipfrac": 1.0, "approx_kl": None, "approx_kl_k3": log_ratio}
        for name in STATS:
            assert_dtype(out[1][name], f"stats['{name}']", dtype, mask_dtype)
            rtol, atol = tolerance(dtype, want_stats[name], scale[name])
            assert_close(
                out[1][name],
                want_stats[name],
                f"stats['{name}'] ({condition})",
                rtol,
                atol + (tied if name == "clipfrac" else 0.0),
            )
        if dtype == torch.float32:
            grad = gradient(out[0], x, f"logprobs ({condition})")
            want = definition_gradient(new, old, advantages, mask, 0.25)
            rtol, atol = tolerance(dtype, want)
            assert_close(
                grad, want, f"the gradient with respect to logprobs ({condition})", rtol, atol
            )
