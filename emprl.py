"""EmpRL, the method glue: a T5 policy with a value head, rollouts, the PPO iteration, SFT, evaluation.

The method (Ma et al., IEEE TAFFC 2025), in the order this file implements it:

    SFT        L_mle = -1/|y| Σ_t log π(y_t | y_<t, c)                          -> sft_loss
    rollout    ŷ ~ π(· | c) at temperature τ, 5..30 tokens                     -> rollout          (step 1)
    reward     r(c, ŷ) = Π_k p_k(y*_k | c, ŷ),  k ∈ {ER, IP, EX}               -> reward.Identifiers.score
               s = (r - mean_run) / (std_run + ε)                              -> ppo_iteration    (step 2)
               r_t = -β·kl_t (+ s at the last reply token),
               kl_t = clip(log π(ŷ_t) - log π_ref(ŷ_t), 0, kl_max)             -> ppo.kl_penalized_rewards
    GAE        A_t = Σ_l (γλ)^l δ_{t+l},  δ_t = r_t + γV_{t+1} - V_t            -> ppo.gae          (step 3)
    update     L = L_pg + c_v·L_v, clipped (PPO), epochs × minibatches         -> ppo_update       (step 4)
    β          β ← β·(1 + clip(KL/KL_target - 1, ±0.2)·B/horizon)              -> ppo.AdaptiveKLController
    evaluate   Emp-F1, Dist-n, BLEU-n, PPL, reward, length                     -> evaluate

Deviations from the authors' code (TRL 0.9.6), each because the prototype in METHOD.md broke without it:
- Rollouts sample the full softmax at temperature τ (no top-k), and every log-prob (policy, old policy,
  reference) is computed from the same τ-scaled logits with the same forced-minimum-length EOS mask, so the
  sampled distribution is exactly the scored one: the KL estimate is then a true KL estimate (>= 0 on
  average) and the first ratio is exactly 1. Evaluation still decodes like the authors (top-k 20, τ 0.9).
- Every reply token counts, the first included (TRL drops it for encoder-decoders).
- Dropout is off in the policy during rollouts and updates (`ppo_dropout`), so the ratio measures the
  policy change and not dropout noise; the value head is zero-initialised.
- The per-token KL penalty is clamped to [kl_min, kl_max] (see ppo.py).

Shapes: B batch, S context tokens, T reply tokens, D d_model, V vocab, M mechanisms.
"""
import json
import math
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import ppo
import reward
from t5 import T5, CheckpointError

# ----------------------------------------------------------------------------------------------------
# policy


class PolicyWithValue(nn.Module):
    """The T5 policy π and a value head V on its last decoder hidden state (TRL's ValueHead: dropout + linear)."""

    def __init__(self, model: T5, dropout: float = 0.1):
        super().__init__()
        self.model = model
        self.value_dropout = nn.Dropout(dropout)
        self.value_head = nn.Linear(model.config.d_model, 1)
        # zero init: V starts at 0 everywhere, so the first advantages are the (whitened) rewards themselves
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, ctx_ids, ctx_mask, reply_ids):
        """Teacher-forced pass over given replies -> logits (B, T, V) and values (B, T)."""
        enc = self.model.encode(ctx_ids, ctx_mask)  # (B, S, D)
        hidden = self.model.decode(self.model.shift_right(reply_ids), enc, ctx_mask)  # (B, T, D)
        values = self.value_head(self.value_dropout(hidden)).squeeze(-1)  # (B, T)
        return self.model.lm_logits(hidden), values


def reply_mask(ids, eos_id=1):
    """1 on every reply token up to and including the first </s>, 0 after it.  (B, T) -> (B, T)"""
    eos = (ids == eos_id).long()
    eos_before = eos.cumsum(1) - eos  # number of </s> strictly before each position
    return (eos_before == 0).long()


def scored_logits(logits, temperature=1.0, min_new_tokens=0, eos_id=1):
    """The distribution replies are sampled from: logits / τ, with </s> forbidden for the first
    `min_new_tokens` positions (as `T5.generate` does). Every log-prob of a sampled token goes through here."""
    logits = logits.float() / temperature
    if min_new_tokens > 0:
        logits = logits.clone()
        logits[:, :min_new_tokens, eos_id] = float("-inf")
    return logits


def token_logprobs(logits, labels, mask):
    """log p(labels_t) under logits, 0 where mask is 0.  (B, T, V), (B, T) -> (B, T)
    The one masked log-prob function: SFT's loss, PPO's ratios and KL, and PPL all use it."""
    logp = logits.float().log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return logp * mask


def sft_loss(model: T5, batch):
    """L_mle: mean token cross-entropy of the reference replies (teacher forcing). Returns (loss, n_tokens)."""
    logits = model(batch["ctx_ids"], batch["ctx_mask"], model.shift_right(batch["tgt_ids"]))  # (B, T, V)
    mask = batch["tgt_mask"]
    nll = -token_logprobs(logits, batch["tgt_ids"], mask).sum()
    n = mask.sum()
    return nll / n, n


# ----------------------------------------------------------------------------------------------------
# the PPO iteration: 1 rollout -> 2 reward -> 3 GAE -> 4 epochs x minibatches -> 5 statistics


@torch.no_grad()
def rollout(policy, ref_model, batch, cfg, autocast):
    """Step 1: sample one reply per context, then score it (no grad, dropout off) under the policy,
    the value head and the frozen reference, all with the same temperature-scaled logits."""
    policy.eval()
    ctx_ids, ctx_mask = batch["ctx_ids"], batch["ctx_mask"]
    with autocast():
        replies = policy.model.generate(
            ctx_ids, ctx_mask, max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens,
            do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0)  # (B, T)
        mask = reply_mask(replies)
        logits, values = policy(ctx_ids, ctx_mask, replies)
        ref_logits = ref_model(ctx_ids, ctx_mask, ref_model.shift_right(replies))
    logprobs = token_logprobs(scored_logits(logits, cfg.temperature, cfg.min_new_tokens), replies, mask)
    ref_logprobs = token_logprobs(scored_logits(ref_logits, cfg.temperature, cfg.min_new_tokens), replies, mask)
    return dict(replies=replies, mask=mask, logprobs=logprobs, ref_logprobs=ref_logprobs,
                values=values.float() * mask)


def ppo_update(policy, optimizer, scheduler, roll, batch, cfg, autocast, generator):
    """Step 4: `ppo_epochs` passes of shuffled minibatches of clipped policy + value updates.
    Returns per-minibatch statistics and the number of skipped minibatches."""
    policy.train(cfg.ppo_dropout)  # dropout off by default: the ratio should only see the update
    n = roll["replies"].shape[0]
    stats, skipped = [], {"ratio": 0, "nonfinite": 0}
    for _ in range(cfg.ppo_epochs):
        for idx in torch.randperm(n, generator=generator).split(cfg.mini_batch_size):
            idx = idx.to(roll["replies"].device)
            replies, mask = roll["replies"][idx], roll["mask"][idx]
            with autocast():
                logits, values = policy(batch["ctx_ids"][idx], batch["ctx_mask"][idx], replies)
            logits = scored_logits(logits, cfg.temperature, cfg.min_new_tokens)
            logprobs = token_logprobs(logits, replies, mask)
            pg_loss, pg_stats = ppo.policy_loss(logprobs, roll["logprobs"][idx], roll["advantages"][idx],
                                                mask, cfg.clip_range)
            vf_loss, vf_stats = ppo.value_loss(values.float() * mask, roll["values"][idx], roll["returns"][idx],
                                               mask, cfg.clip_range_value)
            if pg_stats["ratio"] > cfg.ratio_threshold:  # a wild minibatch (TRL's ratio_threshold): skip it
                skipped["ratio"] += 1
                continue
            loss = pg_loss + cfg.vf_coef * vf_loss  # L = L_pg + c_v L_v
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
            if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):  # never step on garbage
                skipped["nonfinite"] += 1
                continue
            optimizer.step()
            scheduler.step()
            entropy = ppo.masked_mean(ppo.entropy_from_logits(logits.detach()), mask)
            stats.append(dict(pg_loss=pg_loss.item(), vf_loss=vf_loss.item(), entropy=entropy.item(),
                              **{k: float(v) for k, v in {**pg_stats, **vf_stats}.items()}))
    return stats, skipped


def ppo_iteration(policy, ref_model, identifiers, optimizer, scheduler, kl_ctl, score_moments, batch, cfg,
                  autocast, generator):
    """One PPO iteration on a batch of contexts with target levels (steps 1-5). Returns (stats, rollout)."""
    t0 = time.time()
    # 1. rollout
    roll = rollout(policy, ref_model, batch, cfg, autocast)
    mask = roll["mask"]
    # 2. reward: empathy score r = Π_k p_k(y*_k | c, ŷ) on the last real token, -β·kl_t on every token
    with autocast():
        scores = identifiers.score(batch["ident_ctx_ids"], batch["ident_ctx_mask"], roll["replies"], mask,
                                   batch["levels"], mechanisms=cfg.reward_mechanisms).float()  # (B,)
    finite = torch.isfinite(scores)
    if not finite.all():  # a non-finite score must not reach the running moments or the update
        return {"nonfinite_scores": int((~finite).sum())}, roll
    score_moments.update(scores)
    norm_scores = ppo.normalize_scores(scores, score_moments) if cfg.score_norm else scores
    rewards = ppo.kl_penalized_rewards(norm_scores, roll["logprobs"], roll["ref_logprobs"], mask,
                                       kl_ctl.value, cfg.kl_min, cfg.kl_max, cfg.kl_estimator)  # (B, T)
    if cfg.whiten_rewards:
        rewards = ppo.masked_whiten(rewards, mask, shift_mean=False)
    # 3. GAE, then whitened advantages
    advantages, returns = ppo.gae(rewards, roll["values"], mask, cfg.gamma, cfg.lam)
    roll["advantages"] = ppo.masked_whiten(advantages, mask) * mask
    roll["returns"] = returns
    # 4. epochs x shuffled minibatches of clipped updates
    mb_stats, skipped = ppo_update(policy, optimizer, scheduler, roll, batch, cfg, autocast, generator)
    # 5. statistics (KL is the raw, unclamped estimate summed over the reply, as the controller expects)
    kl = ((roll["logprobs"] - roll["ref_logprobs"]) * mask).sum(1).mean().item()
    beta = kl_ctl.value
    kl_ctl.update(kl, cfg.batch_size)
    mean = lambda k: float(np.mean([s[k] for s in mb_stats])) if mb_stats else float("nan")
    stats = dict(score=scores.mean().item(), kl=kl, beta=beta, pg_loss=mean("pg_loss"), vf_loss=mean("vf_loss"),
                 approx_kl=mean("approx_kl"), clipfrac=mean("clipfrac"), vf_clipfrac=mean("vf_clipfrac"),
                 entropy=mean("entropy"), ratio=mean("ratio"),
                 explained_var=float(ppo.explained_variance(roll["values"], returns, mask)),
                 length=mask.sum(1).float().mean().item(), lr=scheduler.get_last_lr()[0],
                 skipped_ratio=skipped["ratio"], skipped_nonfinite=skipped["nonfinite"], seconds=time.time() - t0)
    return stats, roll


# ----------------------------------------------------------------------------------------------------
# evaluation


def words(text):
    """Lower-cased word and punctuation tokens, the unit of Dist-n, BLEU-n and reply length."""
    return re.findall(r"\w+|[^\w\s]", text.lower())


def distinct_n(replies, n):
    """Dist-n = distinct n-grams / all n-grams over the whole set, x 100."""
    grams = [tuple(w[i:i + n]) for w in replies for i in range(len(w) - n + 1)]
    return 100.0 * len(set(grams)) / max(len(grams), 1)


def corpus_bleu(hypotheses, references, max_n=4):
    """Corpus BLEU-1..max_n (one reference each, uniform weights over 1..n, brevity penalty), x 100."""
    match, total = np.zeros(max_n), np.zeros(max_n)
    hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references):
        hyp_len, ref_len = hyp_len + len(hyp), ref_len + len(ref)
        for n in range(1, max_n + 1):
            h = Counter(tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
            r = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
            match[n - 1] += sum(min(c, r[g]) for g, c in h.items())  # clipped n-gram matches
            total[n - 1] += max(len(hyp) - n + 1, 0)
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / max(hyp_len, 1))
    precisions = match / np.maximum(total, 1)
    out = {}
    for n in range(1, max_n + 1):
        p = precisions[:n]
        out[f"bleu_{n}"] = 100.0 * bp * (math.exp(np.mean(np.log(p))) if (p > 0).all() else 0.0)
    return out


def to_device(batch, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def make_batch(split, idx, device, levels=None):
    """Pad one batch of encoded examples. `split` holds lists of token ids: ctx, tgt, ident_ctx."""
    ctx_ids, ctx_mask = data.pad_batch([split["ctx"][i] for i in idx])
    tgt_ids, tgt_mask = data.pad_batch([split["tgt"][i] for i in idx])
    ident_ids, ident_mask = data.pad_batch([split["ident_ctx"][i] for i in idx])
    batch = dict(ctx_ids=ctx_ids, ctx_mask=ctx_mask, tgt_ids=tgt_ids, tgt_mask=tgt_mask,
                 ident_ctx_ids=ident_ids, ident_ctx_mask=ident_mask)
    if levels is not None:
        batch["levels"] = torch.as_tensor(np.asarray(levels)[idx], dtype=torch.long)
    return to_device(batch, device)


@torch.no_grad()
def perplexity(model, split, device, batch_size=64, autocast=torch.autocast):
    """PPL = exp(mean token cross-entropy of the reference replies), teacher forced."""
    model.eval()
    nll = n_tok = 0.0
    for idx in data.batch_indices([len(c) for c in split["ctx"]], batch_size, shuffle=False, seed=0, bucket=True):
        batch = make_batch(split, idx, device)
        with autocast():
            loss, n = sft_loss(model, batch)
        nll, n_tok = nll + loss.item() * n.item(), n_tok + n.item()
    return math.exp(nll / n_tok)


@torch.no_grad()
def generate_replies(model, split, device, batch_size, seed, autocast, top_k=20, temperature=0.9, max_new_tokens=30):
    """Decode like the authors (sampling, top-k 20, τ 0.9, <= 30 tokens) with a seeded generator.
    Returns padded reply ids in the split's order as a list of (T,) tensors."""
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    out = [None] * len(split["ctx"])
    for idx in data.batch_indices([len(c) for c in split["ctx"]], batch_size, shuffle=False, seed=0, bucket=True):
        batch = make_batch(split, idx, device)
        with autocast():
            ids = model.generate(batch["ctx_ids"], batch["ctx_mask"], max_new_tokens=max_new_tokens, do_sample=True,
                                 top_k=top_k, temperature=temperature, generator=gen)
        for i, row in zip(idx, ids.cpu()):
            out[i] = row
    return out


@torch.no_grad()
def identifier_levels(identifiers, split, replies, device, batch_size, autocast):
    """Levels (N, 3) and logits (N, 3, 3) the identifiers give each (context, reply) pair.
    Pairs are batched by length (less padding), results returned in the input order."""
    n = len(replies)
    replies = [r.tolist() if torch.is_tensor(r) else r for r in replies]
    logits = torch.empty(n, 3, 3)
    lengths = [len(split["ident_ctx"][i]) + len(replies[i]) for i in range(n)]
    for idx in data.batch_indices(lengths, batch_size, shuffle=False, seed=0, bucket=True):
        ctx_ids, ctx_mask = data.pad_batch([split["ident_ctx"][i] for i in idx])
        resp_ids, resp_mask = data.pad_batch([replies[i] for i in idx])
        resp_mask = reply_mask(resp_ids) * resp_mask
        with autocast():
            logits[idx] = identifiers(ctx_ids.to(device), ctx_mask.to(device), resp_ids.to(device),
                                      resp_mask.to(device)).float().cpu()  # (b, M, 3)
    return logits.argmax(-1).numpy(), logits


def evaluate(model, identifiers, tok, split, target_levels, device, cfg, autocast, n=None, seed=42):
    """All metrics of one model on (the first n examples of) a split. Returns (metrics, decoded replies)."""
    if n is not None:
        split = {k: v[:n] for k, v in split.items()}
        target_levels = target_levels[:n]
    replies = generate_replies(model, split, device, cfg.eval_batch_size, seed, autocast)
    replies = [r[: int(reply_mask(r[None]).sum())] for r in replies]  # drop padding after </s>
    levels, logits = identifier_levels(identifiers, split, replies, device, cfg.eval_batch_size, autocast)
    texts = [tok.decode(r.tolist()) for r in replies]
    hyp = [words(t) for t in texts]
    ref = [words(tok.decode(t)) for t in split["tgt"]]
    f1 = reward.emp_f1(levels, target_levels)
    metrics = dict(emp_f1=f1["emp_f1"], emp_f1_er=f1["er"], emp_f1_ip=f1["ip"], emp_f1_ex=f1["ex"],
                   acc_er=f1["acc_er"], acc_ip=f1["acc_ip"], acc_ex=f1["acc_ex"],
                   dist_1=distinct_n(hyp, 1), dist_2=distinct_n(hyp, 2), **corpus_bleu(hyp, ref),
                   ppl=perplexity(model, split, device, cfg.eval_batch_size, autocast),
                   reward=reward.reward_from_logits(logits, torch.as_tensor(target_levels)).mean().item(),
                   length=float(np.mean([len(h) for h in hyp])), unique_frac=len(set(texts)) / max(len(texts), 1))
    return metrics, texts


def majority_reference(train_levels, test_levels):
    """Emp-F1 of the constant predictor that always outputs each mechanism's most frequent training level."""
    train_levels = np.asarray(train_levels)
    majority = np.array([np.bincount(train_levels[:, m], minlength=3).argmax() for m in range(3)])
    f1 = reward.emp_f1(np.tile(majority, (len(test_levels), 1)), np.asarray(test_levels))
    return dict(emp_f1=f1["emp_f1"], emp_f1_er=f1["er"], emp_f1_ip=f1["ip"], emp_f1_ex=f1["ex"],
                levels=majority.tolist())


# ----------------------------------------------------------------------------------------------------
# a finished run: load it and reply


def load_run(run_dir, device="cpu"):
    """(policy T5, identifiers, tokenizer, config dict) of a run directory; the EmpRL policy when PPO has
    finished, else the SFT model."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise SystemExit(f"error: {run_dir} is not a run directory (no config.json); train one with `python train.py`")
    try:
        cfg = json.loads((run_dir / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SystemExit(f"error: {run_dir / 'config.json'} is damaged (not JSON); rerun train.py with this --out_dir")
    tok = data.Tokenizer(run_dir / "spiece.model")
    policy_dir = run_dir / "emprl" if (run_dir / "emprl" / "config.json").exists() else run_dir / "sft"
    model = T5.from_pretrained(policy_dir).to(device).eval()
    identifiers = reward.Identifiers.load(run_dir / "identifiers.pt", device=device)
    return model, identifiers, tok, cfg, policy_dir.name


def reply(model, identifiers, tok, turns, cfg, device="cpu", seed=None):
    """The model's reply to a dialogue (list of turns, oldest first) and the identifiers' levels for it."""
    ctx = data.encode_context(tok, turns, cfg["max_context_tokens"])
    ident_ctx = ctx[-cfg["ident_ctx_tokens"]:]
    ids, mask = data.pad_batch([ctx])
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    out = model.generate(ids.to(device), mask.to(device), max_new_tokens=30, do_sample=True, top_k=20,
                         temperature=0.9, generator=gen)[0]
    out = out[: int(reply_mask(out[None]).sum())]
    c_ids, c_mask = data.pad_batch([ident_ctx])
    r_ids, r_mask = data.pad_batch([out.tolist()])
    levels = identifiers(c_ids.to(device), c_mask.to(device), r_ids.to(device), r_mask.to(device))[0].argmax(-1)
    return tok.decode(out.tolist()), dict(zip(("ER", "IP", "EX"), levels.tolist()))


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
    except (CheckpointError, data.DataError) as e:  # a damaged run: the message names the file and what to do
        raise SystemExit(f"error: {e}")
    names = ["no", "weak", "strong"]
    show = lambda r, lv: print(f"{which}> {r}\n      [{' '.join(f'{k}={names[v]}' for k, v in lv.items())}]")
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
