"""Lab checks of ppo.policy_loss: PPO's clipped surrogate and its statistics.

    ρ_t = exp(log π(a_t) - log π_old(a_t)),   L_pg = mean_m(max(-A_t·ρ_t, -A_t·clip(ρ_t, 1-c, 1+c)))
    stats: ratio = mean_m(ρ), clipfrac = mean_m([-A·clip(ρ) > -A·ρ]), approx_kl = ½·mean_m((log
    ρ)²),
           approx_kl_k3 = mean_m((ρ - 1) - log ρ)

π_old is the rollout policy (the log-probs recorded when the replies were sampled), π_ref the frozen
SFT model. They are different models: the ratio is against π_old, the KL penalty (step 2) against
π_ref.
"""

import math

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


def definition(logprobs, old_logprobs, advantages, mask, clip_range=0.2):
    """L_pg and the statistics written out token by token in float64."""
    losses, ratios, clipped, kl, kl3 = [], [], [], [], []
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[b, t] == 0:
                continue
            log_ratio = logprobs[b, t].item() - old_logprobs[b, t].item()
            rho, a = math.exp(log_ratio), advantages[b, t].item()
            unclipped, clip = -a * rho, -a * min(max(rho, 1 - clip_range), 1 + clip_range)
            losses.append(max(unclipped, clip))  # the pessimistic (larger) loss
            ratios.append(rho)
            clipped.append(float(clip > unclipped))
            kl.append(0.5 * log_ratio**2)
            kl3.append((rho - 1) - log_ratio)
    mean = lambda xs: sum(xs) / len(xs)
    return mean(losses), dict(
        ratio=mean(ratios), clipfrac=mean(clipped), approx_kl=mean(kl), approx_kl_k3=mean(kl3)
    )


# A rollout as the update sees it, after some PPO iterations: the reference model π_ref (the SFT
# model), the rollout policy π_old that sampled the replies (about half a nat away from π_ref), and
# the policy being updated π (a few hundredths of a nat from π_old on most tokens, past the clip
# range on some). Junk after </s>.
MASK = prefix_mask()
REF_LOGPROBS = -rand((len(LENGTHS), T), 0).abs() - 0.5
OLD_LOGPROBS = junk_after_eos(REF_LOGPROBS + 0.5 * rand((len(LENGTHS), T), 3), MASK, 2)
LOGPROBS = junk_after_eos(OLD_LOGPROBS + 0.15 * rand((len(LENGTHS), T), 1), MASK, 4)
ADVANTAGES = junk_after_eos(rand((len(LENGTHS), T), 5), MASK, 6)


def call(logprobs, old_logprobs, advantages, mask, clip_range=0.2):
    out = ppo.policy_loss(
        logprobs.clone(), old_logprobs.clone(), advantages.clone(), mask.clone(), clip_range
    )
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)):
        raise AssertionError("policy_loss should return a pair (loss, stats) with stats a dict")
    return out


def test_policy_loss_returns_a_scalar_loss_and_its_statistics():
    """policy_loss returns (loss, stats): a 0-dim loss tensor and stats with ratio, clipfrac,
    approx_kl and approx_kl_k3."""
    loss, stats = call(LOGPROBS, OLD_LOGPROBS, ADVANTAGES, MASK)
    assert tensor(loss, "loss").dim() == 0, (
        f"the loss should be a 0-dim tensor, it has shape {tuple(loss.shape)}"
    )
    missing = {"ratio", "clipfrac", "approx_kl", "approx_kl_k3"} - set(stats)
    assert not missing, f"stats lacks {sorted(missing)}"


def test_policy_loss_leaves_its_inputs_unchanged():
    """policy_loss changes none of its arguments in place: the rollout's log-probs and advantages
    serve every minibatch of every epoch."""
    call_keeping_inputs(
        ppo.policy_loss,
        "logprobs, old_logprobs, advantages, mask",
        LOGPROBS.clone(),
        OLD_LOGPROBS.clone(),
        ADVANTAGES.clone(),
        MASK.clone(),
    )


def test_padding_is_ignored():
    """The loss is a mean over real tokens only: what lies after </s> changes nothing."""
    loss, _ = call(LOGPROBS, OLD_LOGPROBS, ADVANTAGES, MASK)
    clean, _ = call(LOGPROBS * MASK, OLD_LOGPROBS * MASK, ADVANTAGES * MASK, MASK)
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
    loss, stats = call(OLD_LOGPROBS, OLD_LOGPROBS, ADVANTAGES, MASK)
    assert_close(stats["ratio"], 1.0, "stats['ratio']")
    assert_close(stats["clipfrac"], 0.0, "stats['clipfrac']")
    assert_close(loss, -(ADVANTAGES * MASK).sum() / MASK.sum(), "the loss before the first update")


def test_ratio_is_against_the_rollout_policy_not_the_reference_model():
    """ρ_t = π(a_t) / π_old(a_t) with π_old the rollout policy (old_logprobs), not the reference
    model: the loss, ratio and approx_kl follow old_logprobs, and differ from what the reference
    model's log-probs would give (checked with a clip range so wide that nothing is clipped: only
    the ratio matters)."""
    loss, stats = call(LOGPROBS, OLD_LOGPROBS, ADVANTAGES, MASK, clip_range=10.0)
    want, want_stats = definition(LOGPROBS, OLD_LOGPROBS, ADVANTAGES, MASK, clip_range=10.0)
    against_ref, ref_stats = definition(LOGPROBS, REF_LOGPROBS, ADVANTAGES, MASK, clip_range=10.0)
    # a check of this check: its data tells the rollout policy from the reference model
    assert (
        abs(want - against_ref) > 0.05
        and abs(want_stats["approx_kl"] - ref_stats["approx_kl"]) > 0.05
    )
    got, got_kl = (
        tensor(loss, "the loss").item(),
        tensor(stats["approx_kl"], "stats['approx_kl']").item(),
    )
    if abs(got - against_ref) < 1e-6 or abs(got_kl - ref_stats["approx_kl"]) < 1e-6:
        raise AssertionError(
            f"the loss is {got:.6g} and approx_kl {got_kl:.6g}: that is the "
            "ratio against the "
            "reference model's log-probs; against the rollout policy's they are "
            f"{want:.6g} and "
            f"{want_stats['approx_kl']:.6g}"
        )
    assert_close(loss, want, "the loss")
    assert_close(stats["ratio"], want_stats["ratio"], "stats['ratio']")


def test_approx_kl_is_half_the_mean_squared_log_ratio():
    """The statistics of the update: approx_kl = ½·mean_m((log π - log π_old)²) (mind the ½) and
    approx_kl_k3 = mean_m((ρ - 1) - log ρ), means over the real tokens."""
    _, stats = call(LOGPROBS, OLD_LOGPROBS, ADVANTAGES, MASK, clip_range=10.0)
    _, want = definition(LOGPROBS, OLD_LOGPROBS, ADVANTAGES, MASK, clip_range=10.0)
    got = tensor(stats["approx_kl"], "stats['approx_kl']").item()
    if abs(got - 2 * want["approx_kl"]) < 1e-9:
        raise AssertionError(
            f"stats['approx_kl'] is {got:.6g}, twice the definition's "
            f"{want['approx_kl']:.6g}: "
            f"the ½ is missing"
        )
    assert_close(stats["approx_kl"], want["approx_kl"], "stats['approx_kl']")
    assert_close(stats["approx_kl_k3"], want["approx_kl_k3"], "stats['approx_kl_k3']")


def test_clipping_is_pessimistic():
    """Each token takes the larger loss max(-A·ρ, -A·clip(ρ, 1-c, 1+c)): with A > 0 the gain stops
    at ρ = 1+c but a ρ below 1-c is not clipped; with A < 0 the other way round."""
    ratios = [0.7, 0.85, 1.0, 1.15, 1.3]
    logprobs = torch.tensor([ratios, ratios], dtype=F64).log()
    zeros, ones = torch.zeros(2, 5, dtype=F64), torch.ones(2, 5, dtype=F64)
    advantages = torch.tensor([[1.0] * 5, [-1.0] * 5], dtype=F64)
    loss, stats = call(logprobs, zeros, advantages, ones, clip_range=0.2)
    per_token = [[-0.7, -0.85, -1.0, -1.15, -1.2], [0.8, 0.85, 1.0, 1.15, 1.3]]
    assert_close(loss, torch.tensor(per_token, dtype=F64).mean(), "the loss")
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
    loss.backward()
    grad = logprobs.grad[0].tolist()
    assert grad[0] == 0 and grad[2] == 0, (
        f"the gradient of the clipped tokens 0 and 2 is {grad[0]:.3g}, {grad[2]:.3g}"
    )
    assert grad[1] != 0, "the unclipped token 1 gets no gradient"


def test_policy_loss_and_statistics_match_the_definition():
    """L_pg = mean_m(max(-A·ρ, -A·clip(ρ, 1-c, 1+c))) and ratio, clipfrac, approx_kl = ½·mean((log
    ρ)²), approx_kl_k3 = mean((ρ - 1) - log ρ), for clip ranges 0.2 and 0.1."""
    for clip_range in (0.2, 0.1):
        loss, stats = call(LOGPROBS, OLD_LOGPROBS, ADVANTAGES, MASK, clip_range)
        want, want_stats = definition(LOGPROBS, OLD_LOGPROBS, ADVANTAGES, MASK, clip_range)
        assert_close(loss, want, f"the loss (c = {clip_range})")
        for name, value in want_stats.items():
            assert_close(stats[name], value, f"stats['{name}'] (c = {clip_range})")


def definition_gradient(logprobs, old_logprobs, advantages, mask, clip_range=0.2):
    """d L_pg / d log π written out token by token: -A·ρ/n where the unclipped term -A·ρ is the
    larger (ρ inside [1-c, 1+c], where the two terms are equal, included), 0 where the clipped term
    is the larger (it is constant)."""
    grad = torch.zeros_like(logprobs)
    n = mask.sum().item()
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[b, t] == 0:
                continue
            rho, a = (
                math.exp(logprobs[b, t].item() - old_logprobs[b, t].item()),
                advantages[b, t].item(),
            )
            inside = 1 - clip_range <= rho <= 1 + clip_range
            if inside or -a * rho > -a * min(max(rho, 1 - clip_range), 1 + clip_range):
                grad[b, t] = -a * rho / n
    return grad


def loss_gradient(logprobs, old_logprobs, advantages, mask, clip_range=0.2):
    x = logprobs.clone().requires_grad_(True)
    loss, _ = call(x, old_logprobs, advantages, mask, clip_range)
    return gradient(loss, x, "logprobs")


def test_gradient_at_ratio_1_is_minus_the_advantage():
    """Before the first update (ρ = 1) the gradient of L_pg with respect to log π is -A_t/n on every
    real token (n real tokens) and 0 after </s>: ρ is differentiable in both terms of the max. A
    term computed on a detached ρ halves it here (torch.max splits a tie) and learning goes at half
    speed, with the same loss value."""
    grad = loss_gradient(OLD_LOGPROBS, OLD_LOGPROBS, ADVANTAGES, MASK)
    want = definition_gradient(OLD_LOGPROBS, OLD_LOGPROBS, ADVANTAGES, MASK)
    if torch.allclose(grad, want / 2, atol=1e-9):
        raise AssertionError(
            "the gradient with respect to logprobs at ρ = 1 is half the "
            "definition's: one term of "
            "the max gets no gradient (ρ detached there?)"
        )
    assert_close(grad, want, "the gradient with respect to logprobs at ρ = 1")


def test_gradient_on_the_clipped_and_unclipped_sides():
    """At ρ ≠ 1 the gradient of L_pg with respect to log π is -A·ρ/n where the unclipped term is the
    larger (ρ inside [1-c, 1+c], or outside on the side where clipping does not bind: A > 0 and ρ <
    1-c, A < 0 and ρ > 1+c) and 0 where the clipped term is: ratios 0.7 .. 1.3 with A = ±1, then
    random ones, clip ranges 0.2 and 0.1."""
    ratios = [0.7, 0.9, 1.1, 1.3]
    logprobs = torch.tensor([ratios, ratios], dtype=F64).log()
    zeros, ones = torch.zeros(2, 4, dtype=F64), torch.ones(2, 4, dtype=F64)
    advantages = torch.tensor([[1.0] * 4, [-1.0] * 4], dtype=F64)
    grad = loss_gradient(logprobs, zeros, advantages, ones)
    want = definition_gradient(logprobs, zeros, advantages, ones)
    # A > 0, ρ < 1 - c and A < 0, ρ > 1 + c: the unclipped term is the larger
    unclipped_side = [(0, 0), (1, 3)]
    if all(grad[i].item() == 0 for i in unclipped_side):
        raise AssertionError(
            "the gradient is 0 on the unclipped side (ρ = 0.7 with A = 1, ρ = "
            "1.3 with A = -1), "
            f"the definition gives {want[0, 0].item():.4g} and "
            f"{want[1, 3].item():.4g}: the "
            f"unclipped term -A·ρ gets no gradient (ρ detached there?)"
        )
    assert_close(
        grad, want, "the gradient with respect to logprobs (ratios 0.7, 0.9, 1.1, 1.3; A = ±1)"
    )
    for clip_range in (0.2, 0.1):
        grad = loss_gradient(LOGPROBS, OLD_LOGPROBS, ADVANTAGES, MASK, clip_range)
        want = definition_gradient(LOGPROBS, OLD_LOGPROBS, ADVANTAGES, MASK, clip_range)
        assert_close(
            grad, want, f"the gradient with respect to logprobs (random ρ, c = {clip_range})"
        )


def test_statistics_are_detached():
    """The statistics (ratio, clipfrac, approx_kl, approx_kl_k3) are detached 0-dim tensors: logged,
    never differentiated."""
    loss, stats = call(LOGPROBS.clone().requires_grad_(True), OLD_LOGPROBS, ADVANTAGES, MASK)
    assert_detached(stats)
