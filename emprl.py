"""EmpRL, the method glue: a T5 policy with a value head, rollouts, the PPO iteration, SFT, eval.

The method (Ma et al., IEEE TAFFC 2025), in the order this file implements it (each line: the
equation, then where it is computed):

    SFT       L_mle = -1/|y| Σ_t log π(y_t | y_<t, c)               sft_loss, optimizer_step
    rollout   ŷ ~ π(· | c) at temperature τ, 5..30 tokens          rollout (step 1)
    reward    r(c, ŷ) = Π_k p_k(y*_k | c, ŷ),  k ∈ {ER, IP, EX}    reward.Identifiers.score
              s = (r - mean_run) / (std_run + ε)                   ppo_iteration (step 2)
              r_t = -β·kl_t (+ s at the last reply token),
              kl_t = clip(log π(ŷ_t) - log π_ref(ŷ_t), 0, kl_max)  ppo.kl_penalized_rewards
    GAE       A_t = Σ_l (γλ)^l δ_{t+l},  δ_t = r_t + γV_{t+1} - V_t ppo.gae (step 3)
     or RLOO  A_i = R_i - mean_{j≠i} R_j,  R_i = s_i - β Σ_t kl_t,
              k replies a context                                  ppo.rloo_advantages
     or GRPO  A_i = (s_i - mean_j s_j) / (std_j s_j + ε),
              and β·k3_t in the loss                               ppo.grpo_advantages
    update    L = L_pg + c_v·L_v, clipped (PPO), epochs × minibatches   ppo_update (step 4)
    β         β ← β·(1 + clip(KL/KL_target - 1, ±0.2)·B/horizon)   ppo.KLController
    evaluate  Emp-F1, Dist-n, BLEU-n, PPL, reward, length          evaluate

Deviations from the authors' code (TRL 0.9.6); each one a fix for a failure seen without it
(docs/emprl.md):
- Rollouts sample the full softmax at temperature τ (no top-k), and every log-prob (sampling,
  policy, old policy, reference) comes from the same attention code, a float32 LM head and the same
  τ-scaled, EOS-masked logits: the sampled distribution is the scored one up to rounding, the KL
  estimate is a true KL estimate (>= 0 on average) and the first ratio is 1 up to rounding. Matmuls
  of other shapes round differently: at t5-small size and PPO's batch, sampled and scored log-probs
  differed by 4.8e-7 nats a token on average (3.2e-6 at most) in float32, and by 6.1e-4 (9.1e-3 at
  most) under bfloat16, over 7 seeds on one CPU (benchmarks/bf16_gap.py; tests/test_t5.py bounds
  them). Evaluation still decodes like the authors (top-k 20, τ 0.9).
- Every reply token counts, the first included (TRL drops it for encoder-decoders).
- Dropout is off in the policy during rollouts and updates (`ppo_dropout`), so the ratio measures
  the policy change and not dropout noise; the value head is zero-initialised.
- The per-token KL penalty is clamped to [kl_min, kl_max] (see ppo.py).

Shapes: B batch, S context tokens, T reply tokens, D d_model, V vocab, M mechanisms.
"""

import json
import math
import re
import sys
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn

import data
import machine
import ppo
import reward
from judge import Judge
from t5 import T5, CheckpointError

# the authors' test decoding
EVAL_DECODING = dict(do_sample=True, top_k=20, temperature=0.9, max_new_tokens=30)
# TRL's defaults, which the authors kept: value clip range (= the ratio's), the mean ratio above
# which a minibatch is skipped, the gradient-norm clip (SFT's too), and γ (a reply's reward is not
# discounted)
VALUE_CLIP = 0.2
RATIO_THRESHOLD = 10.0
MAX_GRAD_NORM = 1.0
GAMMA = 1.0


# ------------------------------------------------------------------------------------------- policy


class PolicyWithValue(nn.Module):
    """The T5 policy π and a value head V on its last decoder hidden state (TRL's ValueHead: dropout
    + linear). Under bfloat16 autocast the head's linear layer runs in bfloat16, so values come
    rounded to 8 significant bits (steps of 0.0156 at |V| of 2-4). Rollout and update round alike;
    a float32 head would change every recorded bfloat16 run, so it stays as it is."""

    def __init__(self, model: T5, dropout: float = 0.1):
        super().__init__()
        self.model = model
        self.value_dropout = nn.Dropout(dropout)
        self.value_head = nn.Linear(model.config.d_model, 1)
        # zero init: V starts at 0, so the first advantages are the (whitened) rewards themselves
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, ctx, ctx_mask, decoder_input_ids):
        """Teacher-forced pass, like T5.forward -> logits (B, T, V) and values (B, T)."""
        hidden = self.model.decoder_states(ctx, ctx_mask, decoder_input_ids)  # (B, T, D)
        values = self.value_head(self.value_dropout(hidden)).squeeze(-1)  # (B, T)
        return self.model.lm_logits(hidden), values


def generator(seed, device="cpu"):
    """A seeded random generator on the device whose draws it makes (a CUDA sampler needs a CUDA
    generator)."""
    return torch.Generator(device=device).manual_seed(seed)


def reply_mask(ids, eos_id=1):
    """1 on every reply token up to and including the first </s>, 0 after it.  (B, T) -> (B, T)"""
    eos = (ids == eos_id).long()
    eos_before = eos.cumsum(1) - eos  # number of </s> strictly before each position
    return (eos_before == 0).long()


def scored_logits(logits, temperature=1.0, min_new_tokens=0, eos_id=1):
    """The distribution replies are sampled from: logits / τ, with </s> forbidden for the first
    `min_new_tokens` positions (as `T5.generate` does). Every log-prob of a sampled token goes
    through here."""
    logits = logits.float()
    if temperature != 1.0:  # x / 1 would only copy
        logits = logits / temperature
    if min_new_tokens > 0:
        forbid = torch.zeros_like(logits[0])  # (T, V)
        forbid[:min_new_tokens, eos_id] = float("-inf")
        logits = logits + forbid  # not in place: the backward pass passes the gradient on uncopied
    return logits


def token_logprobs(logits, labels, mask):
    """log p(labels_t) under logits, 0 where mask is 0.  (B, T, V), (B, T) -> (B, T)
    The one masked log-prob function: SFT's loss, PPO's ratios and KL, and PPL all use it."""
    logp = logits.float().log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return logp * mask


def sft_loss(model: T5, batch):
    """L_mle: mean token cross-entropy of the reference replies (teacher forcing). Returns (loss,
    n_tokens)."""
    decoder_input = machine.unwrap(model).shift_right(batch["tgt"])
    logits = model(batch["ctx"], batch["ctx_mask"], decoder_input)  # (B, T, V)
    mask = batch["tgt_mask"]
    nll = -token_logprobs(logits, batch["tgt"], mask).sum()
    n = mask.sum()
    return nll / n, n


class NonFiniteError(Exception):
    """Training diverged: too many updates in a row had non-finite numbers."""


def optimizer_step(model, optimizer, max_grad_norm=MAX_GRAD_NORM):
    """Clip the gradient norm and step, unless the gradient is not finite (a NaN or ∞ loss makes it
    so): then the weights stay as they are and False is returned. The one guard between a bad number
    and the weights."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    finite = bool(torch.isfinite(grad_norm))
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return finite


def count_nonfinite(state, finite, cfg, what):
    """The one counter of non-finite updates: `max_nonfinite` in a row stop the run instead of
    training on garbage."""
    state["nonfinite"] = 0 if finite else state["nonfinite"] + 1
    if state["nonfinite"] >= cfg.max_nonfinite:
        raise NonFiniteError(
            f"{state['nonfinite']} {what} in a row with non-finite losses, rewards or gradients: "
            "the run is diverging (lower the learning rate, or use --dtype=float32)"
        )


def linear_schedule(optimizer, total_steps, warmup_steps=0):
    """The learning rate rises linearly over warmup_steps, then falls linearly to 0 at total_steps
    (SFT's and PPO's schedule)."""

    def f(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, 1.0 - (step - warmup_steps) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


# --------------------------------------------------------------------------------------------------
# the PPO iteration: 1 rollout -> 2 reward -> 3 GAE -> 4 epochs x minibatches -> 5 statistics


@torch.no_grad()
def rollout(policy, ref_model, batch, cfg, autocast):
    """Step 1: sample one reply per context, then score it (no grad, dropout off) under the policy,
    the value head and the frozen reference, all with the same τ-scaled logits; and the entropy each
    token was drawn with (for step 5)."""
    policy.eval()
    ctx = batch["ctx"]
    ctx_mask = batch["ctx_mask"]
    with autocast():
        replies = policy.model.generate(
            ctx,
            ctx_mask,
            max_new_tokens=cfg.ppo_max_new_tokens,
            do_sample=True,
            min_new_tokens=cfg.ppo_min_new_tokens,
            temperature=cfg.ppo_temperature,
        )
        mask = reply_mask(replies)
        decoder_input = policy.model.shift_right(replies)
        logits, values = policy(ctx, ctx_mask, decoder_input)
        ref_logits = ref_model(ctx, ctx_mask, decoder_input)
    logits = scored_logits(logits, cfg.ppo_temperature, cfg.ppo_min_new_tokens)  # (B, T, V)
    ref_logprobs = token_logprobs(
        scored_logits(ref_logits, cfg.ppo_temperature, cfg.ppo_min_new_tokens), replies, mask
    )
    return dict(
        replies=replies,
        mask=mask,
        logprobs=token_logprobs(logits, replies, mask),
        ref_logprobs=ref_logprobs,
        values=values.float() * mask,
        entropy=ppo.entropy_from_logits(logits),
    )


def minibatch_loss(policy, roll, batch, idx, cfg, autocast, kl_coef=0.0):
    """The loss of one minibatch of rollouts (their indices idx) under the current policy:
    L = L_pg + c_v·L_v (+ β·k3 for GRPO), and its statistics (detached 0-dim tensors).

    GRPO's default loss averages each reply's tokens, then the replies (DeepSeekMath): the policy
    loss and the KL term get per-reply weights 1/|y_i| as their mask (grpo_loss="token": every token
    alike)."""
    replies = roll["replies"][idx]
    mask = roll["mask"][idx]
    weight = mask
    if cfg.algo == "grpo" and cfg.grpo_loss == "reply":
        weight = mask / mask.sum(1, keepdim=True).clamp(min=1)
    with autocast():
        decoder_input = machine.unwrap(policy).model.shift_right(replies)
        logits, values = policy(batch["ctx"][idx], batch["ctx_mask"][idx], decoder_input)
    logits = scored_logits(logits, cfg.ppo_temperature, cfg.ppo_min_new_tokens)
    logprobs = token_logprobs(logits, replies, mask)
    old_logprobs = roll["logprobs"][idx]
    advantages = roll["advantages"][idx]
    pg_loss, pg_stats = ppo.policy_loss(
        logprobs, old_logprobs, advantages, weight, cfg.ppo_clip_range
    )
    values = values.float() * mask
    returns = roll["returns"][idx]
    vf_loss, vf_stats = ppo.value_loss(values, roll["values"][idx], returns, mask, VALUE_CLIP)
    vf_coef = cfg.ppo_vf_coef if cfg.algo == "ppo" else 0.0  # RLOO and GRPO have no value head
    loss = pg_loss + vf_coef * vf_loss  # L = L_pg + c_v L_v
    if kl_coef:  # GRPO: + β mean_m((π_ref/π - 1) - log(π_ref/π)), unclamped
        kl = ppo.per_token_kl(logprobs, roll["ref_logprobs"][idx], mask, None, None, "k3")
        loss = loss + kl_coef * ppo.masked_mean(kl, weight)
    stats = dict(pg_loss=pg_loss.detach(), vf_loss=vf_loss.detach(), **pg_stats, **vf_stats)
    return loss, stats


def zero_backward(policy):
    """A backward pass that adds exactly 0 to every gradient: a skipped minibatch still joins the
    gradient averaging of torchrun. (0 · loss would not do: when the loss is ∞, 0 · ∞ is NaN.)"""
    (0.0 * sum(p.sum() for p in policy.parameters())).backward()


def ppo_update(policy, optimizer, scheduler, roll, batch, cfg, autocast, generator, kl_coef=0.0):
    """Step 4: `ppo_epochs` passes over shuffled minibatches (order drawn from `generator`, on its
    device) of clipped policy + value losses; the gradients of `ppo_grad_accum` minibatches make one
    optimizer update. Returns per-minibatch statistics (0-dim tensors) and the counts of skipped
    minibatches and updates. A minibatch whose mean ratio exceeds RATIO_THRESHOLD (TRL's) gets a
    zero-weighted backward (every process still joins the gradient averaging); an update of only
    such minibatches is not made. kl_coef > 0 (GRPO) adds kl_coef · k3_t against the reference to
    the loss."""
    policy.train(cfg.ppo_dropout)  # dropout off by default: the ratio should only see the update
    n = roll["replies"].shape[0]
    stats = []
    skipped = {"ratio": 0, "nonfinite": 0}
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(n, generator=generator, device=generator.device)
        minibatches = order.split(cfg.ppo_mini_batch_size)
        kept = 0  # minibatches of the current update that count
        for i, idx in enumerate(minibatches):
            idx = idx.to(roll["replies"].device)
            last = (i + 1) % cfg.ppo_grad_accum == 0 or i + 1 == len(minibatches)  # a step follows
            # torchrun: gradients are averaged across processes on an update's last minibatch only
            sync = nullcontext()
            if hasattr(policy, "no_sync") and not last:
                sync = policy.no_sync()
            with sync:
                loss, mb_stats = minibatch_loss(policy, roll, batch, idx, cfg, autocast, kl_coef)
                wild = bool(machine.all_mean(mb_stats["ratio"]) > RATIO_THRESHOLD)  # alike on all
                if wild:
                    zero_backward(policy)
                    skipped["ratio"] += 1
                else:
                    (loss / cfg.ppo_grad_accum).backward()
                    stats.append(mb_stats)
                    kept += 1
            if not last:
                continue
            if not kept:  # every minibatch of this update was wild: no step (Adam has momentum)
                optimizer.zero_grad(set_to_none=True)
            elif optimizer_step(policy, optimizer, MAX_GRAD_NORM):
                scheduler.step()
            else:  # a non-finite gradient: optimizer_step left the weights as they were
                skipped["nonfinite"] += 1
            kept = 0
    return stats, skipped


def ppo_iteration(
    policy, ref_model, identifiers, optimizer, scheduler, kl_ctl, moments, batch, cfg, autocast, gen
):
    """One iteration on a batch of contexts with their target levels: steps 1-5 of the module
    docstring, in order. `moments` are the scores' running moments, `gen` draws the minibatch order.
    Returns (statistics, rollout); the statistics of an iteration whose scores are not finite say
    only that.

    algo="rloo" or "grpo": the batch holds rloo_k copies of each context in a row and step 3 is RLOO
    or GRPO instead of GAE. Step 4 is the same clipped update with a per-token ratio, every token of
    a reply sharing its reply's advantage, so the three differ only in their advantage estimate, and
    in where GRPO puts the KL: into the loss as β·k3 per token (averaged like the policy loss), not
    into the reward. An adaptive β moves by the summed k1 KL of step 5 under every algo (GRPO's loss
    uses k3). Under torchrun the score moments, whitenings and that KL are the global batch's (every
    process holds the same β); the other statistics are this process's."""
    t0 = time.time()
    # 1. rollout: replies, their log-probs under π and π_ref, and V, all from the same logits
    roll = rollout(machine.unwrap(policy), ref_model, batch, cfg, autocast)
    mask = roll["mask"]

    # 2. reward: the empathy score r = Π_k p_k(y*_k | c, ŷ), normalised by its running moments,
    #    lands on the last reply token; -β·kl_t on every token
    mechanisms = cfg.reward_mechanisms.split(",")
    ctx = batch["ident_ctx"]
    with autocast():
        scores = identifiers.score(
            ctx, batch["ident_ctx_mask"], roll["replies"], mask, batch["levels"], mechanisms
        )
    scores = scores.float()  # (B,)
    all_scores = machine.all_gather(scores)  # the global batch's under torchrun
    finite = torch.isfinite(all_scores)
    if not finite.all():  # a non-finite score must not reach the running moments or the update
        return {"nonfinite_scores": int((~finite).sum())}, roll
    moments.update(all_scores)
    norm_scores = ppo.normalize_scores(scores, moments) if cfg.score_norm else scores
    rewards = ppo.kl_penalized_rewards(
        norm_scores,
        roll["logprobs"],
        roll["ref_logprobs"],
        mask,
        kl_ctl.value,
        cfg.kl_min,
        cfg.kl_max,
        cfg.kl_estimator,
    )  # (B, T)

    # 3. advantages: GAE on the per-token rewards (scale-whitened), RLOO on each reply's summed
    #    reward R = s - β Σ_t kl_t (both then whitened over the batch), or GRPO on the scores alone
    #    (already standardised within each context's group; its KL is in the loss). RLOO and GRPO
    #    have no value head to train: its loss gets weight 0 in step 4.
    returns = roll["values"]
    if cfg.algo == "rloo":
        advantages = ppo.rloo_advantages(rewards.sum(1), cfg.rloo_k)[:, None] * mask  # (B, T)
    elif cfg.algo == "grpo":
        advantages = ppo.grpo_advantages(norm_scores, cfg.rloo_k)[:, None] * mask  # (B, T)
    else:
        if cfg.whiten_rewards:
            rewards = ppo.masked_whiten(rewards, mask, shift_mean=False, total=machine.all_sum)
        advantages, returns = ppo.gae(rewards, roll["values"], mask, GAMMA, cfg.ppo_lam)
    if cfg.algo != "grpo":
        advantages = ppo.masked_whiten(advantages, mask, total=machine.all_sum) * mask
    roll["advantages"] = advantages
    roll["returns"] = returns

    # 4. epochs x shuffled minibatches of clipped policy (and value) updates
    kl_coef = kl_ctl.value if cfg.algo == "grpo" else 0.0  # GRPO's KL term in the loss
    mb_stats, skipped = ppo_update(
        policy, optimizer, scheduler, roll, batch, cfg, autocast, gen, kl_coef
    )

    # 5. statistics; the KL is the raw, unclamped estimate summed over the reply (over the global
    #    batch), as the β controller expects; the entropy is the sampling policy's
    kl = machine.all_gather(((roll["logprobs"] - roll["ref_logprobs"]) * mask).sum(1)).mean().item()
    entropy = ppo.masked_mean(roll["entropy"], mask).item()
    stats = dict(score=all_scores.mean().item(), kl=kl, beta=kl_ctl.value, entropy=entropy)
    kl_ctl.update(kl, len(all_scores))
    for key in ("pg_loss", "vf_loss", "approx_kl", "clipfrac", "vf_clipfrac", "ratio"):
        values = [s[key] for s in mb_stats]
        stats[key] = torch.stack(values).float().mean().item() if values else float("nan")
    stats["ratio_first"] = mb_stats[0]["ratio"].item() if mb_stats else float("nan")  # ≈ 1
    stats["explained_var"] = float(ppo.explained_variance(roll["values"], returns, mask))
    stats["length"] = mask.sum(1).float().mean().item()
    stats["lr"] = scheduler.get_last_lr()[0]
    stats["skipped_ratio"] = skipped["ratio"]
    stats["skipped_nonfinite"] = skipped["nonfinite"]
    stats["seconds"] = time.time() - t0
    return stats, roll


# --------------------------------------------------------------------------------------- evaluation


def words(text):
    """Lower-cased word and punctuation tokens, the unit of Dist-n, BLEU-n and reply length."""
    return re.findall(r"\w+|[^\w\s]", text.lower())


def distinct_n(replies, n):
    """Dist-n = distinct n-grams / all n-grams over the whole set, x 100."""
    grams = [tuple(w[i : i + n]) for w in replies for i in range(len(w) - n + 1)]
    return 100.0 * len(set(grams)) / max(len(grams), 1)


def corpus_bleu(hypotheses, references, max_n=4):
    """Corpus BLEU-1..max_n (one reference each, uniform weights over 1..n, brevity penalty), x
    100."""
    match = np.zeros(max_n)
    total = np.zeros(max_n)
    hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references):
        hyp_len = hyp_len + len(hyp)
        ref_len = ref_len + len(ref)
        for n in range(1, max_n + 1):
            h = Counter(tuple(hyp[i : i + n]) for i in range(len(hyp) - n + 1))
            r = Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
            match[n - 1] += sum(min(c, r[g]) for g, c in h.items())  # clipped n-gram matches
            total[n - 1] += max(len(hyp) - n + 1, 0)
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / max(hyp_len, 1))
    precisions = match / np.maximum(total, 1)
    out = {}
    for n in range(1, max_n + 1):
        p = precisions[:n]
        out[f"bleu_{n}"] = 100.0 * bp * (math.exp(np.mean(np.log(p))) if (p > 0).all() else 0.0)
    return out


@torch.no_grad()
def perplexity(model, split, device, batch_size=64, autocast=nullcontext):
    """PPL = exp(mean token cross-entropy of the reference replies), teacher forced."""
    model.eval()
    split = {"ctx": split["ctx"], "tgt": split["tgt"]}
    nll = 0.0
    n_tok = 0.0
    for idx in data.batch_indices(
        [len(c) for c in split["ctx"]], batch_size, shuffle=False, seed=0, bucket=True
    ):
        with autocast():
            loss, n = sft_loss(model, data.make_batch(split, idx, device))
        nll = nll + loss.item() * n.item()
        n_tok = n_tok + n.item()
    return math.exp(nll / n_tok)


@torch.no_grad()
def generate_replies(model, ctx, device, batch_size, seed, autocast):
    """Replies decoded like the authors (EVAL_DECODING) with a seeded generator: for each context,
    its reply ids up to and including </s>."""
    model.eval()
    gen = generator(seed, device)

    def generate(idx):
        batch = data.make_batch({"ctx": ctx}, idx, device)
        with autocast():
            return model.generate(
                batch["ctx"], batch["ctx_mask"], generator=gen, **EVAL_DECODING
            ).cpu()

    replies = data.in_input_order(generate, [len(c) for c in ctx], batch_size)
    # padding after </s> dropped
    return [r[: int(reply_mask(r[None]).sum())].tolist() for r in replies]


def identifier_levels(identifiers, ctx, replies, device, batch_size, autocast=nullcontext):
    """Levels (N, 3) and logits (N, 3, 3) that the identifiers give each (context, reply) pair."""
    logits = torch.from_numpy(
        reward.predict(identifiers, {"ctx": ctx, "resp": replies}, batch_size, device, autocast)
    )
    return logits.argmax(-1).numpy(), logits


class Graders(NamedTuple):
    """What grades a model's replies: the identifiers (the reward's models), the independent judge,
    and the tokenizer that turns reply ids into the text the judge and BLEU read."""

    identifiers: reward.Identifiers
    judge: Judge
    tokenizer: data.Tokenizer


def evaluate(model, graders, split, cfg, autocast=nullcontext, n=None):
    """All metrics of one model on (the first n examples of) a split {"ctx", "tgt", "levels"}: the
    contexts, the human replies and their levels y*. Returns (metrics, per-example outputs: the
    decoded replies and the levels that the identifiers and the judge give them and the human
    replies)."""
    device = next(model.parameters()).device
    if n is not None:
        split = {k: v[:n] for k, v in split.items()}
    target_levels = np.asarray(split["levels"])
    identifiers, judge, tok = graders
    # the replies, decoded like the authors, and their levels by the identifiers
    replies = generate_replies(
        model, split["ctx"], device, cfg.eval_batch_size, cfg.eval_seed, autocast
    )
    ident_ctx = [c[-cfg.ident_ctx_tokens :] for c in split["ctx"]]
    levels, logits = identifier_levels(
        identifiers, ident_ctx, replies, device, cfg.eval_batch_size, autocast
    )
    texts = [tok.decode(r) for r in replies]
    references = [tok.decode(t) for t in split["tgt"]]
    out = dict(texts=texts, levels=levels, targets=target_levels)
    # the judge labels both the replies and the human replies (it never saw the identifiers' labels)
    out["judge_levels"] = judge.levels(texts)
    out["judge_targets"] = judge.levels(references)
    # Emp-F1: agreement of the replies' levels with the human replies', by each labeller [E3]
    f1 = reward.emp_f1(levels, target_levels)
    f1_judge = reward.emp_f1(out["judge_levels"], out["judge_targets"])
    metrics = dict(emp_f1=f1["emp_f1"], emp_f1_er=f1["er"], emp_f1_ip=f1["ip"], emp_f1_ex=f1["ex"])
    metrics.update(acc_er=f1["acc_er"], acc_ip=f1["acc_ip"], acc_ex=f1["acc_ex"])
    metrics["emp_f1_judge"] = f1_judge["emp_f1"]
    for mech in ("er", "ip", "ex"):
        metrics[f"emp_f1_judge_{mech}"] = f1_judge[mech]
    # the text itself: diversity, overlap with the human reply, fluency, length
    hyp = [words(t) for t in texts]
    ref = [words(t) for t in references]
    metrics["dist_1"] = distinct_n(hyp, 1)
    metrics["dist_2"] = distinct_n(hyp, 2)
    metrics.update(corpus_bleu(hyp, ref))
    metrics["ppl"] = perplexity(model, split, device, cfg.eval_batch_size, autocast)
    # the reward itself [R1], as PPO saw it, on these replies
    rewards = reward.reward_from_logits(logits, torch.as_tensor(target_levels))
    metrics["reward"] = rewards.mean().item()
    metrics["length"] = float(np.mean([len(h) for h in hyp]))
    metrics["unique_frac"] = len(set(texts)) / max(len(texts), 1)
    return metrics, out


def paired_bootstrap(outputs_a, outputs_b, n_resamples=1000, seed=0):
    """EmpRL minus SFT with a 95 % interval: the test contexts are resampled with replacement, the
    same contexts for both models (paired), and Emp-F1 recomputed on each resample. Per labeller
    (identifiers, judge): {"emp_f1": {"mean": d, "ci95": [lo, hi]}, "emp_f1_judge": ...}; d is the
    difference on the full test set, [lo, hi] the 2.5 and 97.5 percentiles of the resampled
    differences."""
    n = len(outputs_a["levels"])
    rng = np.random.default_rng(seed)
    resamples = [np.arange(n)] + [rng.integers(0, n, n) for _ in range(n_resamples)]
    out = {}
    for key, levels, targets in (
        ("emp_f1", "levels", "targets"),
        ("emp_f1_judge", "judge_levels", "judge_targets"),
    ):
        d = np.array(
            [
                reward.emp_f1(outputs_b[levels][i], outputs_b[targets][i])["emp_f1"]
                - reward.emp_f1(outputs_a[levels][i], outputs_a[targets][i])["emp_f1"]
                for i in resamples
            ]
        )
        out[key] = dict(
            mean=float(d[0]),
            ci95=[float(np.percentile(d[1:], 2.5)), float(np.percentile(d[1:], 97.5))],
        )
    return out


def majority_reference(train_levels, test_levels):
    """Emp-F1 of the constant predictor that always outputs each mechanism's most frequent training
    level."""
    train_levels = np.asarray(train_levels)
    majority = np.array([np.bincount(train_levels[:, m], minlength=3).argmax() for m in range(3)])
    f1 = reward.emp_f1(np.tile(majority, (len(test_levels), 1)), np.asarray(test_levels))
    return dict(
        emp_f1=f1["emp_f1"],
        emp_f1_er=f1["er"],
        emp_f1_ip=f1["ip"],
        emp_f1_ex=f1["ex"],
        levels=majority.tolist(),
    )


# the columns of results.md (and of the README's results table)
RESULT_COLUMNS = (
    "emp_f1 emp_f1_er emp_f1_ip emp_f1_ex emp_f1_judge reward dist_1 dist_2 bleu_1 bleu_2 bleu_3 "
    "bleu_4 ppl length unique_frac"
).split()


def results_table(results):
    """The markdown table of a run's results.json: SFT, EmpRL, the majority constant, and EmpRL -
    SFT with the paired-bootstrap 95 % interval."""
    cols = RESULT_COLUMNS
    out = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    rows = dict(SFT=results["sft"], EmpRL=results["emprl"])
    rows["majority level"] = results["majority"]
    for name, m in rows.items():
        cells = [f"{m[c]:.2f}" if c in m else "" for c in cols]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    diff = {}
    for key, d in results["difference"].items():
        diff[key] = f"{d['mean']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]"
    out.append("| EmpRL − SFT [95 % CI] | " + " | ".join(diff.get(c, "") for c in cols) + " |")
    return "\n".join(out) + "\n"


# one PPO iteration's log line: the keys in a fixed order
PPO_LINE = (
    "ppo {step:>4}/{total} | score {score:.3f} | kl {kl:.3f} | beta {beta:.3f} | pg_loss "
    "{pg_loss:.4f} | vf_loss {vf_loss:.4f} | approx_kl {approx_kl:.4f} | clipfrac {clipfrac:.3f} | "
    "explained_var {explained_var:.3f} | length {length:.1f} | seconds {seconds:.1f}"
)


def ppo_line(step, total, s):
    """The log line of a PPO iteration (or what went non-finite)."""
    if "nonfinite_scores" in s:
        return f"ppo {step:>4}/{total} | {s['nonfinite_scores']} non-finite scores: update skipped"
    line = PPO_LINE.format(step=step, total=total, **s)
    if s["skipped_nonfinite"]:
        line += f" | {s['skipped_nonfinite']} non-finite updates skipped"
    return line


def eval_line(name, m):
    """The log line of an evaluation."""
    return (
        f"{name}: emp_f1 {m['emp_f1']:.2f} (er {m['emp_f1_er']:.1f} ip {m['emp_f1_ip']:.1f} "
        f"ex {m['emp_f1_ex']:.1f}) | judge {m['emp_f1_judge']:.2f} | reward {m['reward']:.3f} | "
        f"dist_2 {m['dist_2']:.1f} | ppl {m['ppl']:.1f} | length {m['length']:.1f} | "
        f"unique {m['unique_frac']:.2f}"
    )


# --------------------------------------------------------------------------------------------------
# a finished run: load it and reply


def load_run(run_dir, device="cpu"):
    """(policy T5, identifiers, tokenizer, config dict, "emprl" or "sft") of a run directory: the
    EmpRL policy once PPO has finished, else the SFT model. A missing or damaged file raises
    CheckpointError or DataError."""
    run_dir = Path(run_dir)
    try:
        cfg = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{run_dir / 'config.json'}: not a run's settings ({type(e).__name__}); give the "
            "--out_dir of a `python train.py` run"
        ) from None
    tok = data.Tokenizer(run_dir / "spiece.model")
    which = "emprl" if (run_dir / "emprl" / "config.json").exists() else "sft"
    model = T5.from_pretrained(run_dir / which).to(device).eval()
    return model, reward.Identifiers.load(run_dir / "identifiers", device), tok, cfg, which


def reply(model, identifiers, tok, turns, cfg, device="cpu", seed=None):
    """The model's reply to a dialogue (list of turns, oldest first) and the identifiers' levels for
    it."""
    ctx = data.encode_context(tok, turns, cfg["max_context_tokens"])
    gen = generator(seed, device) if seed is not None else None
    batch = data.make_batch({"ctx": [ctx]}, [0], device)
    out = model.generate(batch["ctx"], batch["ctx_mask"], generator=gen, **EVAL_DECODING)[0]
    out = out[: int(reply_mask(out[None]).sum())].tolist()
    levels, _ = identifier_levels(identifiers, [ctx[-cfg["ident_ctx_tokens"] :]], [out], device, 1)
    return tok.decode(out), dict(zip(("ER", "IP", "EX"), levels[0].tolist()))


def main(argv):
    import argparse

    p = argparse.ArgumentParser(description="Reply to a message with a trained EmpRL model.")
    p.add_argument("--run", required=True, help="run directory written by train.py")
    p.add_argument("--interactive", action="store_true", help="chat in a loop (empty line to quit)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("message", nargs="?", help="what the speaker says")
    args = p.parse_args(argv)
    if not args.interactive and not args.message:
        p.error("give a message, or --interactive")
    torch.set_grad_enabled(False)
    try:
        model, identifiers, tok, cfg, which = load_run(args.run)
    except (CheckpointError, data.DataError) as e:  # a damaged run: the message names the file
        print(
            f"error: {e}; rerun `python train.py` with this --out_dir to rebuild it",
            file=sys.stderr,
        )
        sys.exit(1)

    if cfg.get("limit_train"):  # a quick run on a slice of the data, such as --preset=tiny
        print(
            f"note: this run learnt from {cfg['limit_train']} dialogues only (a test run such as "
            "--preset=tiny): its replies are gibberish by design. A real model comes from `python "
            "train.py --preset=cpu` (see the README's quick start for how long it takes) or from a "
            "GPU preset.",
            file=sys.stderr,
        )

    def show(text, levels):
        named = " ".join(f"{k}={data.LEVELS[v]}" for k, v in levels.items())
        print(f"{which}> {text}\n      [{named}]")

    if not args.interactive:
        show(*reply(model, identifiers, tok, [args.message], cfg, seed=args.seed))
        return
    turns = []
    while True:
        try:
            msg = input("you> ").strip()
        except EOFError:
            break
        if not msg:
            break
        turns.append(msg)
        text, levels = reply(model, identifiers, tok, turns, cfg, seed=args.seed)
        show(text, levels)
        turns.append(text)


if __name__ == "__main__":
    main(sys.argv[1:])
