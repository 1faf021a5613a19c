"""The empathy reward of EmpRL: identifiers, their training, Emp-F1 and the reward.

One identifier per communication mechanism k in {ER, IP, EX} (three separate models, Sharma et al.
2020) reads a context c and a reply y and predicts its empathy level 0 = no, 1 = weak, 2 = strong:

    [I1] h_c = Enc_c(c)                                     (B, S, D)  context encoder (T5 stack)
    [I2] h_y = Enc_y(y)                                     (B, T, D)  response encoder (T5 stack)
    [I3] a = softmax(h_y W_q (h_c W_k)^T / sqrt(D) + mask_c) h_c W_v W_o
                                                            (B, T, D)  the reply attends to context
    [I4] z = h_y + dropout(a)                               (B, T, D)  residual
    [I5] u = sum_t m_t z_t / sum_t m_t                      (B, D)     mean over real reply tokens
    [I6] p_k(. | c, y) = softmax(W_2 dropout(tanh(W_1 u)))  (B, C)

Trained with cross-entropy on EPITOME, they label every human reply y* of EmpatheticDialogues once,
y*_k = argmax p_k(. | c, y*). The reward of a sampled reply y_hat: the probability of the human
reply's levels,

    [R1] r(c, y_hat) = prod_k p_k(y*_k | c, y_hat) = exp(-sum_k CE_k)   in (0, 1]

Emp-F1 compares the levels of generated and target replies, per mechanism, with the support-weighted
F1 (sklearn's average="weighted": the weights n_c are counts of level c among the *target* levels):

    [E1] F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c)   (0 when TP_c = 0)
    [E2] F1_k = sum_c n_c F1_c / sum_c n_c        over levels present in either side
    [E3] Emp-F1 = 100 (F1_ER + F1_IP + F1_EX) / 3

The independent judge that grades replies beside the identifiers, and never enters a reward, is in
judge.py.

Deviations from the authors' code:
- The attention scores are scaled by 1/sqrt(D) (standard dot-product attention; their single head is
  nn.MultiheadAttention-like). Only the residual after the attention gets dropout.
- Class imbalance: `train_identifier(class_weights=True)` weights the cross-entropy by inverse level
  frequency; whether to use it is measured on validation (benchmarks/bench_identifiers.py).
- EPITOME seeker posts become a one-turn dialogue (data.encode_context), so the identifier sees the
  same role-tagged format as the ED contexts it labels later; contexts keep their most recent
  tokens.
Shapes: B batch, S context tokens, T reply tokens, D d_model, C empathy levels (3), M mechanisms (<=
3). Masks: 1 = real token.
"""

import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import t5

NUM_LEVELS = len(data.LEVELS)  # C: 0 = no, 1 = weak, 2 = strong communication of the mechanism


class EmpathyIdentifier(nn.Module):
    """Predicts one mechanism's empathy level of a reply given its context: logits (B, C)."""

    def __init__(self, config, dropout=0.1):
        super().__init__()
        self.config = config
        d = config.d_model
        # Two separate encoders, each with its own embedding: the seeker's post and the reply are
        # different kinds of text, and the authors (after Sharma et al.) keep them apart.
        self.context_encoder = t5.T5Stack(
            config, is_decoder=False, embed_tokens=nn.Embedding(config.vocab_size, d)
        )
        self.response_encoder = t5.T5Stack(
            config, is_decoder=False, embed_tokens=nn.Embedding(config.vocab_size, d)
        )
        for stack in (self.context_encoder, self.response_encoder):
            # T5's initialisation, and its embedding table is N(0, 1)
            t5.init_weights(stack, config)
            nn.init.normal_(stack.embed_tokens.weight, std=1.0)
        # One attention head, the reply's states as queries over the context's states [I3].
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Sequential(
            nn.Linear(d, d // 2), nn.Tanh(), nn.Dropout(dropout), nn.Linear(d // 2, NUM_LEVELS)
        )

    @classmethod
    def from_t5(cls, t5_model, dropout=0.1):
        """Both encoders start as copies of a trained T5's encoder (with its embedding); attention
        and head random."""
        model = cls(t5_model.config, dropout)
        model.context_encoder.load_state_dict(t5_model.encoder.state_dict())
        model.response_encoder.load_state_dict(t5_model.encoder.state_dict())
        return model

    def forward(self, ctx_ids, ctx_mask, resp_ids, resp_mask):
        h_c = self.context_encoder(ctx_ids, attention_mask=ctx_mask)  # (B, S, D)  [I1]
        h_y = self.response_encoder(resp_ids, attention_mask=resp_mask)  # (B, T, D)  [I2]
        # (B, T, D), (B, S, D), (B, S, D)
        q = self.q(h_y)
        k = self.k(h_c)
        v = self.v(h_c)
        scores = q @ k.transpose(1, 2) / math.sqrt(q.size(-1))  # (B, T, S)
        # Padding in the context gets no attention. (Padding in the reply is dropped by the pooling
        # below.)
        # (B, T, S)
        scores = scores.masked_fill(ctx_mask[:, None, :] == 0, torch.finfo(scores.dtype).min)
        a = self.o(scores.softmax(dim=-1) @ v)  # (B, T, D)  [I3]
        z = h_y + self.dropout(a)  # (B, T, D)  [I4]
        m = resp_mask.unsqueeze(-1).to(z.dtype)  # (B, T, 1)
        u = (z * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)  # (B, D)  [I5]
        return self.head(u)  # (B, C) logits  [I6]


def reward_from_logits(logits, targets):
    """Reward [R1]: product over mechanisms of the probability of the target level. logits (B, M,
    C), targets (B, M).

    prod_k softmax(l_k)[y*_k] = exp(sum_k log_softmax(l_k)[y*_k]) = exp(-(CE_ER + CE_IP + CE_EX)),
    the authors' form. Leaving a mechanism out (ablation) = leaving its column out of both
    arguments. Inputs unchanged."""
    probs = logits.float().softmax(dim=-1)  # (B, M, C)
    p_target = probs.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)  # (B, M)
    return p_target.prod(dim=-1)  # (B,)  [R1]


class Identifiers(nn.Module):
    """The three trained identifiers (ER, IP, EX), frozen: no gradients, always in eval mode (no
    dropout), so the reward is a deterministic function of (context, reply, target levels)."""

    def __init__(self, models):
        super().__init__()
        if len(models) != len(data.MECHANISMS):
            raise ValueError(
                f"Identifiers needs {len(data.MECHANISMS)} models in the order "
                f"{data.MECHANISMS}, "
                f"got {len(models)}"
            )
        self.models = nn.ModuleList(models)  # in the order data.MECHANISMS = (er, ip, ex)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        # A parent's .train() must not switch dropout back on: the reward would become noisy.
        return super().train(False)

    def forward(self, ctx_ids, ctx_mask, resp_ids, resp_mask, mechanisms=data.MECHANISMS):
        """Logits (B, M, C) of the chosen mechanisms, in the order given; one batch, three models in
        turn."""
        unknown = [m for m in mechanisms if m not in data.MECHANISMS]
        if unknown:
            raise ValueError(f"unknown mechanism(s) {unknown}: choose from {data.MECHANISMS}")
        return torch.stack(
            [
                self.models[data.MECHANISMS.index(m)](ctx_ids, ctx_mask, resp_ids, resp_mask)
                for m in mechanisms
            ],
            dim=1,
        )  # (B, M, C)

    def save(self, path):
        """A directory like a T5 checkpoint: config.json (the encoders' T5Config) and
        model.safetensors."""
        t5.save_safetensors(self.state_dict(), Path(path) / "model.safetensors")
        t5.atomic_write(
            Path(path) / "config.json", json.dumps(asdict(self.models[0].config)).encode()
        )

    @classmethod
    def load(cls, path, device="cpu"):
        """Identifiers written by `save`; a missing or damaged file is a CheckpointError naming
        it."""
        try:
            config = t5.T5Config.from_dict(json.loads((Path(path) / "config.json").read_text()))
            ids = cls([EmpathyIdentifier(config) for _ in data.MECHANISMS])
            # strict: names and shapes
            ids.load_state_dict(t5.load_safetensors(Path(path) / "model.safetensors"))
        except (OSError, ValueError, TypeError, RuntimeError) as e:
            raise t5.CheckpointError(
                f"{path}: not loadable identifiers ({type(e).__name__}: {str(e)[:200]})"
            ) from None
        return ids.to(device)

    @torch.no_grad()
    def score(self, ctx_ids, ctx_mask, resp_ids, resp_mask, targets, mechanisms=data.MECHANISMS):
        """Reward (B,) [R1] for replies resp_ids (ending with </s>, as in training) with target
        levels (B, 3)."""
        logits = self(ctx_ids, ctx_mask, resp_ids, resp_mask, mechanisms)  # (B, M, C)
        columns = [data.MECHANISMS.index(m) for m in mechanisms]
        return reward_from_logits(logits, targets[:, columns])  # (B,)


# --------------------------------------------------------------------------------------------------
# Metrics (numpy only: sklearn is not a dependency)


def classification_metrics(y_true, y_pred):
    """Accuracy, macro-F1 and support-weighted F1 (sklearn semantics [E1, E2]), as fractions in [0,
    1]."""
    y_true = np.asarray(y_true).ravel()
    y_pred = np.asarray(y_pred).ravel()
    labels = np.union1d(y_true, y_pred)  # sklearn averages over the labels present in either side
    f1 = []
    support = []
    for c in labels:
        tp = np.sum((y_pred == c) & (y_true == c))
        fp = np.sum((y_pred == c) & (y_true != c))
        fn = np.sum((y_pred != c) & (y_true == c))
        # [E1]; = 2PR/(P+R), 0 where undefined
        f1.append(2 * tp / (2 * tp + fp + fn) if tp > 0 else 0.0)
        support.append(np.sum(y_true == c))
    f1 = np.array(f1, dtype=float)
    support = np.array(support, dtype=float)
    return {
        "acc": float(np.mean(y_true == y_pred)) if len(y_true) else 0.0,
        "macro_f1": float(f1.mean()) if len(f1) else 0.0,
        # [E2]
        "weighted_f1": float((f1 * support).sum() / support.sum()) if support.sum() > 0 else 0.0,
    }


def emp_f1(generated_levels, target_levels):
    """Emp-F1 [E3] and per-mechanism weighted F1 and accuracy (x 100) of levels (N, 3) in the order
    ER, IP, EX."""
    generated_levels = np.asarray(generated_levels)
    target_levels = np.asarray(target_levels)
    out = {}
    for j, mech in enumerate(data.MECHANISMS):
        # weights = target supports
        m = classification_metrics(target_levels[:, j], generated_levels[:, j])
        out[mech] = 100 * m["weighted_f1"]
        out[f"acc_{mech}"] = 100 * m["acc"]
    out["emp_f1"] = float(np.mean([out[mech] for mech in data.MECHANISMS]))
    return out


# --------------------------------------------------------------------------------------------------
# Training the identifiers on EPITOME


def epitome_examples(records, tok, ctx_len=128, resp_len=64):
    """EPITOME records -> a split {ctx, resp, level}: the seeker post as a one-turn context (its
    most recent ctx_len tokens), the response cut to resp_len tokens; both end with </s>."""
    return dict(
        ctx=[data.encode_context(tok, [r.seeker_post], ctx_len) for r in records],
        resp=[data.encode_target(tok, r.response_post, resp_len) for r in records],
        level=[r.level for r in records],
    )


def logits_of(model, batch):
    """One identifier's logits (B, C), or Identifiers' (B, M, C), for a batch of data.make_batch."""
    return model(batch["ctx"], batch["ctx_mask"], batch["resp"], batch["resp_mask"])


@torch.no_grad()
def predict(model, split, batch_size, device, autocast=nullcontext):
    """Logits (N, C) of one identifier, or (N, M, C) of Identifiers, for a split {ctx, resp[,
    level]}, in its order (eval mode, no gradient, batched by length)."""
    model.eval()

    def logits(idx):
        with autocast():
            return logits_of(model, data.make_batch(split, idx, device)).float().cpu()

    rows = data.in_input_order(
        logits, [len(c) + len(r) for c, r in zip(split["ctx"], split["resp"])], batch_size
    )
    return torch.stack(rows).numpy() if rows else np.zeros((0, NUM_LEVELS), dtype=np.float32)


def train_identifier(
    model,
    train,
    valid,
    *,
    epochs,
    batch_size,
    lr,
    class_weights,
    device,
    seed,
    patience=3,
    log=print,
    autocast=nullcontext,
):
    """Train one identifier with cross-entropy and AdamW on splits {ctx, resp, level}, forward
    passes under `autocast` (the run's: the identifiers are trained and selected in the dtype they
    later label and reward in).

    Keeps the state with the best validation macro-F1 (the mean over levels: rare levels count as
    much as "no"), stops after `patience` epochs without improvement, and loads the best state into
    the model. Returns {"best_epoch", "valid" (metrics at the best epoch), "history" (one dict per
    epoch; epoch 0 is the untrained model), "seconds"}."""
    torch.manual_seed(seed)
    model.to(device)
    levels = np.array(train["level"])
    counts = np.bincount(levels, minlength=NUM_LEVELS)
    # Class imbalance (EX: 84 % "no", IP: 4 % "weak"): class_weights=True weights each level by N /
    # (C n_c), so every level counts equally, as in macro-F1, at the price of less calibrated
    # probabilities; chosen on validation.
    weight = (
        torch.tensor(len(levels) / (NUM_LEVELS * np.maximum(counts, 1)), dtype=torch.float32)
        if class_weights
        else None
    )
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    y_valid = np.array(valid["level"])
    # Bucketing by context length (the larger part of the cost) keeps padding small; batches are
    # shuffled.
    lengths = [len(c) for c in train["ctx"]]

    def evaluate(epoch, train_loss, seconds):
        logits = predict(model, valid, batch_size, device, autocast)  # (N, C), float32
        # unweighted
        loss = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y_valid)).item()
        return {
            "epoch": epoch,
            "train_loss": train_loss,
            "valid_loss": loss,
            **classification_metrics(y_valid, logits.argmax(-1)),
            "seconds": seconds,
        }

    t_start = time.time()
    history = [evaluate(0, float("nan"), 0.0)]
    best = history[0]
    best_state = None
    since_best = 0
    for epoch in range(1, epochs + 1):
        t0 = time.time()
        model.train()
        total = 0.0
        n = 0
        for idx in data.batch_indices(
            lengths, batch_size, shuffle=True, seed=seed + epoch, bucket=True
        ):
            batch = data.make_batch(train, idx, device)
            with autocast():
                loss = F.cross_entropy(
                    logits_of(model, batch),
                    batch["level"],  # logits (B, C)
                    weight=None if weight is None else weight.to(device),
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            total = total + loss.item() * len(idx)
            n = n + len(idx)
        stats = evaluate(epoch, total / max(n, 1), time.time() - t0)
        history.append(stats)
        improved = stats["macro_f1"] > best["macro_f1"] or best_state is None
        if improved:
            best = stats
            since_best = 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            since_best += 1
        log(
            f"epoch {epoch} | train loss {stats['train_loss']:.3f} | valid loss "
            f"{stats['valid_loss']:.3f} | "
            f"acc {stats['acc']:.3f} | macro-F1 {stats['macro_f1']:.3f} | {stats['seconds']:.1f} s"
            + (" *" if improved else "")
        )
        if since_best >= patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return {
        "best_epoch": best["epoch"],
        "valid": best,
        "history": history,
        "seconds": time.time() - t_start,
    }


def train_and_test(model, name, records, tok, cfg, device, autocast=nullcontext, log=print):
    """Train one identifier on EPITOME records {train, valid, test} with the run's ident_* settings
    (validation patience 2), then score it on test beside the majority level: its row of
    identifiers.json, printed."""
    t0 = time.time()
    ex = {
        s: epitome_examples(r, tok, cfg.ident_ctx_tokens, cfg.ident_resp_tokens)
        for s, r in records.items()
    }
    hist = train_identifier(
        model,
        ex["train"],
        ex["valid"],
        epochs=cfg.ident_epochs,
        batch_size=cfg.ident_batch_size,
        lr=cfg.ident_lr,
        class_weights=cfg.ident_class_weights,
        device=device,
        seed=cfg.seed,
        patience=2,
        log=log,
        autocast=autocast,
    )
    y = np.array(ex["test"]["level"])
    pred = predict(model, ex["test"], cfg.eval_batch_size, device, autocast).argmax(-1)
    majority = np.full_like(y, np.bincount(ex["train"]["level"], minlength=NUM_LEVELS).argmax())
    row = dict(
        **classification_metrics(y, pred),
        seconds=time.time() - t0,
        majority=classification_metrics(y, majority),
        epochs_run=len(hist["history"]) - 1,
    )
    print(
        f"identifier {name} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
        "parameters, train / valid / "
        f"test pairs {' / '.join(str(len(e['level'])) for e in ex.values())}): test macro-F1 "
        f"{row['macro_f1']:.3f}, majority level {row['majority']['macro_f1']:.3f}"
    )
    return row
