"""The method glue in emprl.py: PPO on a real (tiny) T5 policy learns, stays put under a huge β, and
the iteration's invariants hold (ratio 1 before the first update, nothing after </s>, no gradient
into the reference). Metrics against hand computations."""

import contextlib
import math
import types

import pytest
import torch

import emprl
import ppo
from t5 import T5, T5Config

VOCAB = 32
GOOD = torch.arange(8, 16)  # the reward: fraction of reply tokens drawn from these ids


class SubsetReward:
    """Stands in for the empathy identifiers: the score of a reply is the fraction of its real
    tokens in GOOD."""

    def score(self, ctx, ctx_mask, replies, mask, levels, mechanisms=None):
        hit = torch.isin(replies, GOOD).float() * mask
        return hit.sum(1) / mask.sum(1).clamp(min=1)


def ppo_cfg(**kw):
    cfg = dict(
        algo="ppo",
        grpo_loss="reply",
        rloo_k=4,
        ppo_mini_batch_size=8,
        ppo_grad_accum=1,
        ppo_epochs=4,
        ppo_clip_range=0.2,
        ppo_vf_coef=0.1,
        ppo_lam=0.95,
        kl_min=0.0,
        kl_max=10.0,
        kl_estimator="k1",
        score_norm=True,
        whiten_rewards=True,
        ppo_temperature=1.0,
        ppo_min_new_tokens=3,
        ppo_max_new_tokens=8,
        ppo_dropout=False,
        reward_mechanisms="er,ip,ex",
    )
    cfg.update(kw)
    return types.SimpleNamespace(**cfg)


def setup(seed=0, lr=3e-3, beta=0.05):
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=4,
        dropout_rate=0.1,
    )
    ref = T5(config).eval().requires_grad_(False)
    policy = emprl.PolicyWithValue(T5(config))
    policy.model.load_state_dict(ref.state_dict())
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return policy, ref, opt, sched, ppo.KLController(beta, adaptive=False), ppo.RunningMoments()


def batch(n=16, seed=0, k=1):
    """n rollouts: n / k random contexts, each k times in a row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n // k, 6), generator=g).repeat_interleave(k, dim=0)
    ids[:, -1] = 1
    mask = torch.ones_like(ids)
    return dict(
        ctx=ids,
        ctx_mask=mask,
        ident_ctx=ids,
        ident_ctx_mask=mask,
        levels=torch.zeros(n, 3, dtype=torch.long),
    )


def train(steps, beta, seed=0, lr=3e-3, **kw):
    policy, ref, opt, sched, kl_ctl, moments = setup(seed, lr=lr, beta=beta)
    gen = torch.Generator().manual_seed(seed)
    cfg, history = ppo_cfg(**kw), []
    k = cfg.rloo_k if cfg.algo in ("rloo", "grpo") else 1
    for step in range(steps):
        stats, _ = emprl.ppo_iteration(
            policy,
            ref,
            SubsetReward(),
            opt,
            sched,
            kl_ctl,
            moments,
            batch(seed=step, k=k),
            cfg,
            _nullctx,
            gen,
        )
        history.append(stats)
    return history


def _nullctx():
    return contextlib.nullcontext()


@pytest.mark.slow
def test_ppo_learns_to_raise_the_reward_and_measured_kl_stays_nonnegative():
    """A tiny T5 learns to emit GOOD tokens: the mean score rises from ~25 % to near 100 %, while
    the unclamped KL estimate (sampled and scored under the same distribution) stays >= 0 on
    average."""
    hist = train(40, beta=0.05)
    first = hist[0]["score"]  # the untrained policy: about 8 / 32 of the tokens are GOOD
    last = sum(h["score"] for h in hist[-5:]) / 5
    assert first < 0.4, first
    assert last > 0.85, (first, last)
    assert sum(h["kl"] for h in hist) / len(hist) > -0.05


@pytest.mark.slow
def test_rloo_learns_to_raise_the_reward_without_a_value_head():
    """The same toy task with RLOO (4 replies per context, leave-one-out baseline): the score rises
    as with PPO, and the value head is never trained (it stays at its zero init)."""
    hist = train(40, beta=0.05, algo="rloo")
    first, last = hist[0]["score"], sum(h["score"] for h in hist[-5:]) / 5
    assert first < 0.4 and last > 0.85, (first, last)
    assert all(h["vf_loss"] == 0.0 for h in hist)


@pytest.mark.slow
@pytest.mark.parametrize("grpo_loss", ["reply", "token"])
def test_grpo_learns_to_raise_the_reward_with_its_kl_in_the_loss(grpo_loss):
    """GRPO (group-standardised scores, no value head, β·k3 in the loss) learns the toy task as PPO
    does, with its loss averaged per reply then over replies (DeepSeekMath) or over all tokens
    alike."""
    hist = train(40, beta=0.05, algo="grpo", grpo_loss=grpo_loss)
    first, last = hist[0]["score"], sum(h["score"] for h in hist[-5:]) / 5
    assert first < 0.4 and last > 0.85, (first, last)


def test_gradient_accumulation_makes_one_update_per_group_of_minibatches():
    """ppo_grad_accum=2 with 2 minibatches per epoch: one optimizer update per epoch (the authors'
    schedule: the rollouts of an iteration make one update per PPO epoch)."""
    policy, ref, opt, sched, kl_ctl, moments = setup()
    emprl.ppo_iteration(
        policy,
        ref,
        SubsetReward(),
        opt,
        sched,
        kl_ctl,
        moments,
        batch(),
        ppo_cfg(ppo_grad_accum=2),
        _nullctx,
        torch.Generator().manual_seed(0),
    )
    # 4 epochs x 1 update
    assert sched.last_epoch == 4 and opt.state_dict()["state"][0]["step"] == 4


@pytest.mark.slow
def test_huge_beta_keeps_the_policy_at_the_reference():
    """With β = 50 the KL penalty dominates: the score barely moves and the KL stays small.
    Raw rewards and no value loss here, so that score vs. KL is the only signal: whitening would
    rescale the huge penalty back to unit size, and a value head fitting returns of size β·KL shakes
    the shared trunk."""
    hist = train(40, beta=50.0, lr=1e-3, whiten_rewards=False, ppo_vf_coef=0.0)
    first = sum(h["score"] for h in hist[:5]) / 5
    last = sum(h["score"] for h in hist[-5:]) / 5
    assert abs(last - first) < 0.15, (first, last)
    assert sum(h["kl"] for h in hist[-10:]) / 10 < 1.0  # nats over the reply (β = 0.05 ends near 5)


def test_first_minibatch_ratio_is_one_and_nothing_is_clipped():
    """Before any update the recomputed log-probs equal the rollout's (no shift, padding, dropout or
    temperature mismatch): ratio 1 and clipfrac 0 on the first minibatch — even with dropout
    configured in the model."""
    policy, ref, opt, sched, kl_ctl, moments = setup()
    cfg = ppo_cfg(ppo_temperature=0.7)
    b = batch()
    roll = emprl.rollout(policy, ref, b, cfg, _nullctx)
    logits, values = policy(b["ctx"], b["ctx_mask"], policy.model.shift_right(roll["replies"]))
    lp = emprl.token_logprobs(
        emprl.scored_logits(logits, cfg.ppo_temperature, cfg.ppo_min_new_tokens),
        roll["replies"],
        roll["mask"],
    )
    adv = torch.randn_like(lp) * roll["mask"]
    _, stats = ppo.policy_loss(lp, roll["logprobs"], adv, roll["mask"], 0.2)
    assert abs(float(stats["ratio"]) - 1.0) < 1e-5
    assert float(stats["clipfrac"]) == 0.0
    # the same through the update loop: its first minibatch sees ratio 1
    roll.update(advantages=adv, returns=torch.zeros_like(adv))
    mb_stats, _ = emprl.ppo_update(
        policy,
        opt,
        sched,
        roll,
        b,
        ppo_cfg(ppo_temperature=0.7, ppo_epochs=1),
        _nullctx,
        torch.Generator().manual_seed(0),
    )
    assert abs(mb_stats[0]["ratio"] - 1.0) < 1e-5 and mb_stats[0]["clipfrac"] == 0.0


def test_rollout_masks_everything_after_eos_and_respects_min_length():
    """Reply masks end at the first </s>; log-probs and values are 0 after it; no </s> before
    min_new_tokens."""
    policy, ref, *_ = setup()
    cfg = ppo_cfg(ppo_min_new_tokens=3)
    roll = emprl.rollout(policy, ref, batch(), cfg, _nullctx)
    m = roll["mask"]
    assert (roll["logprobs"][m == 0] == 0).all() and (roll["values"][m == 0] == 0).all()
    assert (roll["ref_logprobs"][m == 0] == 0).all()
    assert (roll["replies"][:, :3] != 1).all()
    assert (m.sum(1) >= 3).all()


def test_reply_mask_ends_at_first_eos():
    ids = torch.tensor([[5, 6, 1, 0, 0], [5, 1, 7, 1, 0], [4, 4, 4, 4, 4], [0, 3, 1, 0, 0]])
    assert emprl.reply_mask(ids).tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0],
    ]


def test_reference_model_gets_no_gradient_from_a_ppo_iteration():
    """The frozen reference (and the reward model) never receive gradients; the policy does
    change."""
    policy, ref, opt, sched, kl_ctl, moments = setup()
    before = [p.clone() for p in ref.parameters()]
    pol_before = [p.clone() for p in policy.parameters()]
    emprl.ppo_iteration(
        policy,
        ref,
        SubsetReward(),
        opt,
        sched,
        kl_ctl,
        moments,
        batch(),
        ppo_cfg(),
        _nullctx,
        torch.Generator().manual_seed(0),
    )
    assert all(p.grad is None for p in ref.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, ref.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(pol_before, policy.parameters()))


def test_logged_entropy_is_that_of_the_policy_that_sampled_the_replies():
    """The iteration's `entropy` is the masked mean entropy of the rollout's τ-scaled, EOS-masked
    distribution, computed before any update (so it is finite although </s> has probability 0 before
    the minimum length)."""
    policy, ref, opt, sched, kl_ctl, moments = setup()
    policy2, ref2, *_ = setup()  # the same weights, kept as they are before the update
    cfg, b = ppo_cfg(ppo_temperature=0.7), batch()
    torch.manual_seed(3)
    stats, roll = emprl.ppo_iteration(
        policy,
        ref,
        SubsetReward(),
        opt,
        sched,
        kl_ctl,
        moments,
        b,
        cfg,
        _nullctx,
        torch.Generator().manual_seed(0),
    )
    assert math.isfinite(stats["entropy"]) and stats["entropy"] > 0
    torch.manual_seed(3)  # the same rollout again
    again = emprl.rollout(policy2, ref2, b, cfg, _nullctx)
    assert torch.equal(again["replies"], roll["replies"])
    with torch.no_grad():
        logits, _ = policy2(b["ctx"], b["ctx_mask"], policy2.model.shift_right(roll["replies"]))
    scored = emprl.scored_logits(logits, cfg.ppo_temperature, cfg.ppo_min_new_tokens)
    expected = ppo.masked_mean(ppo.entropy_from_logits(scored), roll["mask"]).item()
    assert stats["entropy"] == pytest.approx(expected, rel=1e-5)


def test_sft_loss_is_the_mean_token_cross_entropy():
    """sft_loss equals F.cross_entropy over the real target tokens (padding excluded)."""
    torch.manual_seed(0)
    model = T5(
        T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    ).eval()
    tgt = torch.tensor([[5, 6, 1, 0], [7, 8, 9, 1]])
    b = dict(
        ctx=torch.tensor([[3, 4, 1], [5, 1, 0]]),
        ctx_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]),
        tgt=tgt,
        tgt_mask=(tgt != 0).long(),
    )
    loss, n = emprl.sft_loss(model, b)
    logits = model(b["ctx"], b["ctx_mask"], model.shift_right(tgt))
    labels = tgt.reshape(-1).masked_fill(tgt.reshape(-1) == 0, -100)
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels)
    assert n == 7 and torch.allclose(loss, ref, atol=1e-6)


def test_distinct_n_and_bleu_against_hand_counts():
    hyps = [["i", "am", "sorry"], ["i", "am", "glad"]]
    assert emprl.distinct_n(hyps, 1) == pytest.approx(100 * 4 / 6)
    assert emprl.distinct_n(hyps, 2) == pytest.approx(100 * 3 / 4)
    refs = [["i", "am", "so", "sorry"], ["we", "are", "glad"]]
    b = emprl.corpus_bleu(hyps, refs)
    # unigram matches: 3 + 1 = 4 of 6; bigrams: 1 of 4; hyp length 6 < ref length 7 -> BP = e^(1 -
    # 7/6)
    bp = math.exp(1 - 7 / 6)
    assert b["bleu_1"] == pytest.approx(100 * bp * 4 / 6)
    assert b["bleu_2"] == pytest.approx(100 * bp * math.sqrt(4 / 6 * 1 / 4))
    assert b["bleu_3"] == 0.0  # no trigram matches


def test_majority_reference_predicts_the_most_frequent_training_level():
    train = torch.tensor([[0, 2, 0], [0, 2, 0], [1, 0, 2]]).numpy()
    test = torch.tensor([[0, 2, 0], [1, 0, 0]]).numpy()
    m = emprl.majority_reference(train, test)
    assert m["levels"] == [0, 2, 0]
    assert m["emp_f1_ex"] == pytest.approx(100.0)


# --------------------------------------------------------------------------------------------------
# intervals


def _outputs(levels, targets):
    return dict(levels=levels, targets=targets, judge_levels=levels, judge_targets=targets)


@pytest.mark.slow
def test_paired_bootstrap_is_zero_for_equal_models_and_brackets_a_real_difference():
    """Identical outputs: difference 0 with a [0, 0] interval. A model right on 30 % more contexts:
    the interval lies above 0 and holds the full-set difference; the same seed gives the same
    interval."""
    import numpy as np

    rng = np.random.default_rng(0)
    targets = rng.integers(0, 3, (400, 3))
    a = np.where(rng.random((400, 3)) < 0.4, targets, rng.integers(0, 3, (400, 3)))
    b = np.where(rng.random((400, 3)) < 0.7, targets, rng.integers(0, 3, (400, 3)))
    same = emprl.paired_bootstrap(_outputs(a, targets), _outputs(a, targets), n_resamples=200)
    assert same["emp_f1"] == {"mean": 0.0, "ci95": [0.0, 0.0]}
    d = emprl.paired_bootstrap(_outputs(a, targets), _outputs(b, targets), n_resamples=200)
    lo, hi = d["emp_f1"]["ci95"]
    assert 0 < lo <= d["emp_f1"]["mean"] <= hi and d == emprl.paired_bootstrap(
        _outputs(a, targets), _outputs(b, targets), n_resamples=200
    )


def test_first_ratio_is_one_up_to_rounding_under_bfloat16_autocast():
    """The rollout's scoring pass (no grad, whole batch) and the update's pass (grad, a minibatch)
    run the same attention code and float32 LM head, so under CPU bfloat16 autocast — the code a GPU
    runs — every token's first ratio is 1 up to rounding: |log ratio| < 1e-4 (measured 0 here;
    batches of other shapes may round differently on other CPUs; with no-grad fused attention in the
    scoring pass it was up to 0.03), and the first minibatch clips nothing."""
    policy, ref, opt, sched, kl_ctl, moments = setup()
    b, cfg = batch(), ppo_cfg(ppo_temperature=0.7, ppo_epochs=1)

    def bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    roll = emprl.rollout(policy, ref, b, cfg, bf16)
    mb = slice(0, 8)  # a minibatch: another batch shape than the scoring pass's
    with bf16():
        logits, _ = policy(
            b["ctx"][mb], b["ctx_mask"][mb], policy.model.shift_right(roll["replies"][mb])
        )
    lp = emprl.token_logprobs(
        emprl.scored_logits(logits.float(), cfg.ppo_temperature, cfg.ppo_min_new_tokens),
        roll["replies"][mb],
        roll["mask"][mb],
    )
    assert ((lp - roll["logprobs"][mb]) * roll["mask"][mb]).abs().max() < 1e-4
    roll.update(
        advantages=torch.randn_like(roll["logprobs"]) * roll["mask"],
        returns=torch.zeros_like(roll["mask"]),
    )
    mb_stats, _ = emprl.ppo_update(
        policy, opt, sched, roll, b, cfg, bf16, torch.Generator().manual_seed(0)
    )
    assert abs(mb_stats[0]["ratio"] - 1.0) < 1e-4 and mb_stats[0]["clipfrac"] == 0.0, mb_stats[0]


def test_a_minibatch_with_a_wild_ratio_is_weighted_zero_and_an_update_of_only_such_makes_no_step():
    """TRL's ratio threshold: a minibatch whose mean ratio exceeds 10 takes no part in the update.
    Its backward is zero-weighted, so that under torchrun every process still joins the gradient
    averaging; an optimizer update made of such minibatches only is not made at all (Adam would
    still move the weights on its momentum)."""
    policy, ref, opt, sched, kl_ctl, moments = setup()
    b, cfg = batch(), ppo_cfg(ppo_epochs=1)
    roll = emprl.rollout(policy, ref, b, cfg, _nullctx)
    roll.update(
        advantages=torch.randn_like(roll["logprobs"]) * roll["mask"],
        returns=torch.zeros_like(roll["values"]),
    )
    # the rollout policy 5 nats less likely: ratio e^5
    roll["logprobs"] = roll["logprobs"] - 5.0 * roll["mask"]
    before = [p.detach().clone() for p in policy.parameters()]
    stats, skipped = emprl.ppo_update(
        policy, opt, sched, roll, b, cfg, _nullctx, torch.Generator().manual_seed(0)
    )
    assert stats == [] and skipped == {"ratio": 2, "nonfinite": 0}  # 16 rollouts, minibatches of 8
    assert all(torch.equal(a, p) for a, p in zip(before, policy.parameters()))
    assert not opt.state and sched.last_epoch == 0


def test_a_wild_minibatch_whose_loss_is_infinite_leaves_the_kept_minibatches_update_intact():
    """With ppo_grad_accum = 2 an update sums two minibatches. When the second one's ratio
    overflows (ρ = ∞, so its loss is ∞), it is skipped with a zero-weighted backward; that backward
    must add exactly 0 to the gradients (0 · ∞ would be NaN and throw the kept minibatch's update
    away as non-finite): the update is made from the first minibatch alone."""
    policy, ref, opt, sched, kl_ctl, moments = setup()
    b = batch()
    cfg = ppo_cfg(ppo_epochs=1, ppo_grad_accum=2)
    roll = emprl.rollout(policy, ref, b, cfg, _nullctx)
    roll.update(
        advantages=torch.randn_like(roll["logprobs"]) * roll["mask"],
        returns=torch.zeros_like(roll["values"]),
    )
    order = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    second = order[8:]  # the minibatch ppo_update draws second with this generator
    roll["logprobs"][second] = -1e4 * roll["mask"][second]  # ρ = exp(log π + 1e4) = ∞
    before = [p.detach().clone() for p in policy.parameters()]
    stats, skipped = emprl.ppo_update(
        policy, opt, sched, roll, b, cfg, _nullctx, torch.Generator().manual_seed(0)
    )
    assert skipped == {"ratio": 1, "nonfinite": 0} and len(stats) == 1
    assert any(not torch.equal(a, p) for a, p in zip(before, policy.parameters()))
    assert all(torch.isfinite(p).all() for p in policy.parameters())


def test_the_value_head_is_zero_at_the_start():
    """V starts at 0 everywhere (zero-initialised head), so the first advantages are the whitened
    rewards themselves."""
    policy = setup()[0]
    _, values = policy(batch()["ctx"], batch()["ctx_mask"], torch.zeros(16, 3, dtype=torch.long))
    assert torch.equal(values, torch.zeros_like(values))
