"""Tests for reward.py: the reward [R1], Emp-F1 [E1-E3], the identifier and its training."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import reward
import t5
from judge import Judge


def tiny_config(vocab_size=64, **kw):
    kw = {
        "d_model": 32,
        "d_kv": 8,
        "d_ff": 64,
        "num_layers": 1,
        "num_heads": 4,
        "dropout_rate": 0.1,
        **kw,
    }
    return t5.T5Config(vocab_size=vocab_size, **kw)


def random_batch(gen, B=4, S=9, T=6, vocab=64):
    """Random ids in [3, vocab) with right padding of different lengths: ctx (B, S), resp (B, T),
    masks."""
    ctx, resp = (
        torch.randint(3, vocab, (B, S), generator=gen),
        torch.randint(3, vocab, (B, T), generator=gen),
    )
    ctx_len, resp_len = torch.tensor([S, S - 3, 2, S - 1])[:B], torch.tensor([T, 1, T - 2, 3])[:B]
    ctx_mask = (torch.arange(S)[None, :] < ctx_len[:, None]).long()  # (B, S)
    resp_mask = (torch.arange(T)[None, :] < resp_len[:, None]).long()  # (B, T)
    return ctx * ctx_mask, ctx_mask, resp * resp_mask, resp_mask


# --------------------------------------------------------------------------------------- the reward

LOGITS = torch.tensor(
    [
        [[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [-3.0, 1.0, 4.0]],
        [[0.0, 0.0, 0.0], [10.0, -10.0, 0.0], [1.0, 2.0, 3.0]],
    ]
)  # (B=2, M=3, C=3)
TARGETS = torch.tensor([[0, 2, 1], [1, 0, 2]])  # (B, M)


def softmax_prob(row, level):
    return math.exp(row[level]) / sum(math.exp(x) for x in row)


def test_reward_is_product_of_target_probabilities_in_unit_interval():
    """[R1]: r = prod_k p_k(y*_k), computed by hand from fixed logits; equals exp(-sum CE); lies in
    (0, 1]."""
    r = reward.reward_from_logits(LOGITS, TARGETS)
    for b in range(2):
        expected = math.prod(
            softmax_prob(LOGITS[b, k].tolist(), TARGETS[b, k].item()) for k in range(3)
        )
        assert r[b].item() == pytest.approx(expected, rel=1e-5)
    # (B, M)
    ce = F.cross_entropy(LOGITS.reshape(-1, 3), TARGETS.reshape(-1), reduction="none").view(2, 3)
    torch.testing.assert_close(r, torch.exp(-ce.sum(-1)))  # the authors' form
    assert r.shape == (2,) and bool(((r > 0) & (r <= 1)).all())
    certain = torch.tensor([[[50.0, -50.0, -50.0]] * 3])  # every target level has probability ~1
    assert reward.reward_from_logits(
        certain, torch.zeros(1, 3, dtype=torch.long)
    ).item() == pytest.approx(1.0)


def test_dropping_a_mechanism_drops_its_factor():
    """Ablation: leaving out IP divides the reward by exactly p_IP(y*_IP)."""
    full = reward.reward_from_logits(LOGITS, TARGETS)
    keep = [0, 2]  # ER, EX
    without_ip = reward.reward_from_logits(LOGITS[:, keep], TARGETS[:, keep])
    p_ip = torch.tensor(
        [softmax_prob(LOGITS[b, 1].tolist(), TARGETS[b, 1].item()) for b in range(2)]
    )
    torch.testing.assert_close(full, without_ip * p_ip)


def make_identifiers(seed=0, config=None):
    torch.manual_seed(seed)
    config = config or tiny_config()
    return reward.Identifiers([reward.EmpathyIdentifier(config) for _ in data.MECHANISMS])


def test_identifiers_score_matches_reward_of_their_logits_and_respects_mechanisms():
    """score() = reward_from_logits(forward()) on the chosen mechanisms; targets are always given as
    (B, 3)."""
    ids = make_identifiers()
    batch = random_batch(torch.Generator().manual_seed(1))
    targets = torch.tensor([[0, 1, 2], [2, 2, 0], [1, 0, 0], [0, 0, 1]])
    logits = ids(*batch)  # (B, 3, C)
    assert logits.shape == (4, 3, reward.NUM_LEVELS)
    torch.testing.assert_close(
        ids.score(*batch, targets), reward.reward_from_logits(logits, targets)
    )
    r_er_ex = ids.score(*batch, targets, mechanisms=("er", "ex"))
    torch.testing.assert_close(
        r_er_ex, reward.reward_from_logits(logits[:, [0, 2]], targets[:, [0, 2]])
    )
    with pytest.raises(ValueError, match="unknown mechanism"):
        ids(*batch, mechanisms=("er", "empathy"))


def test_no_gradient_flows_into_identifiers():
    """The identifiers are frozen: no parameter needs a gradient, a parent's .train() keeps them in
    eval mode (deterministic reward), and backward through a loss that uses the reward leaves every
    .grad None."""
    ids = make_identifiers()
    policy = torch.nn.Linear(4, 1)  # stands in for the policy that the reward trains
    parent = torch.nn.ModuleDict({"policy": policy, "identifiers": ids})
    parent.train()
    assert not ids.training and not any(m.training for m in ids.modules())
    assert not any(p.requires_grad for p in ids.parameters())
    batch = random_batch(torch.Generator().manual_seed(2))
    targets = torch.zeros(4, 3, dtype=torch.long)
    r = ids.score(*batch, targets)
    assert not r.requires_grad
    torch.testing.assert_close(r, ids.score(*batch, targets))  # no dropout: the same reward twice
    logp = policy(torch.randn(4, 4)).squeeze(-1)  # (B,)
    (-(r * logp).mean() - ids(*batch).sum() * 0).backward()  # even a loss on raw identifier logits
    assert policy.weight.grad is not None
    assert all(p.grad is None for p in ids.parameters())


# ------------------------------------------------------------------------------------------- Emp-F1


def test_weighted_f1_matches_hand_computation_with_classes_absent_from_one_side():
    """[E1, E2] on small vectors; level 2 never predicted, level 1 predicted but never true."""
    y_true = [0, 0, 0, 2, 2]
    y_pred = [0, 1, 0, 0, 1]
    # level 0: TP 2, FP 1, FN 1 -> F1 = 4/6; level 1: TP 0 (FP 2) -> 0, support 0; level 2: TP 0 ->
    # 0, support 2
    m = reward.classification_metrics(y_true, y_pred)
    assert m["acc"] == pytest.approx(2 / 5)
    assert m["weighted_f1"] == pytest.approx((3 * 4 / 6 + 0 * 0 + 2 * 0) / 5)
    # labels present in either side: 0, 1, 2
    assert m["macro_f1"] == pytest.approx((4 / 6 + 0 + 0) / 3)
    # a level absent from both sides does not count in the macro average
    m = reward.classification_metrics([0, 1, 1], [0, 1, 0])
    f1_0, f1_1 = 2 * 1 / (2 * 1 + 1 + 0), 2 * 1 / (2 * 1 + 0 + 1)
    assert m["macro_f1"] == pytest.approx((f1_0 + f1_1) / 2)
    assert m["weighted_f1"] == pytest.approx((1 * f1_0 + 2 * f1_1) / 3)


def test_emp_f1_is_mean_of_per_mechanism_weighted_f1_times_100():
    """[E3]: weights are the supports of the *target* levels; also per-mechanism accuracy."""
    target = np.array([[0, 0, 0], [0, 2, 0], [1, 2, 0], [1, 0, 2]])  # (N, 3)
    generated = np.array([[0, 0, 0], [1, 2, 0], [1, 2, 0], [1, 2, 0]])
    out = reward.emp_f1(generated, target)
    # level 0: TP 1 FP 0 FN 1 -> 2/3; level 1: TP 2 FP 1 -> 4/5
    er = (2 * (2 / 3) + 2 * (4 / 5)) / 4
    ip = (2 * (2 / 3) + 2 * (4 / 5)) / 4  # level 0: TP 1 FN 1 -> 2/3; level 2: TP 2 FP 1 -> 4/5
    ex = (3 * (6 / 7) + 1 * 0) / 4  # level 0: TP 3 FP 1 -> 6/7; level 2 never predicted -> 0
    assert out["er"] == pytest.approx(100 * er) and out["ip"] == pytest.approx(100 * ip)
    assert out["ex"] == pytest.approx(100 * ex)
    assert out["emp_f1"] == pytest.approx(100 * (er + ip + ex) / 3)
    assert (out["acc_er"], out["acc_ip"], out["acc_ex"]) == pytest.approx((75.0, 75.0, 75.0))
    assert reward.emp_f1(target, target)["emp_f1"] == pytest.approx(100.0)


# ----------------------------------------------------------------------------------- the identifier


def test_masked_pooling_ignores_padding():
    """Adding padding columns to context and reply, or batching with longer rows, does not change
    the logits."""
    torch.manual_seed(0)
    model = reward.EmpathyIdentifier(tiny_config()).eval()
    ctx, ctx_mask, resp, resp_mask = random_batch(torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = model(ctx, ctx_mask, resp, resp_mask)  # (B, C)
        pad = lambda x, n: F.pad(x, (0, n))  # n more padding columns (id 0, mask 0)
        padded = model(pad(ctx, 5), pad(ctx_mask, 5), pad(resp, 7), pad(resp_mask, 7))
        row = 1  # alone, cut to its own lengths
        s, t = int(ctx_mask[row].sum()), int(resp_mask[row].sum())
        one = slice(row, row + 1)
        alone = model(ctx[one, :s], ctx_mask[one, :s], resp[one, :t], resp_mask[one, :t])
    torch.testing.assert_close(padded, base, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone[0], base[row], atol=1e-5, rtol=1e-5)


def test_from_t5_copies_the_encoder_into_two_independent_stacks():
    torch.manual_seed(0)
    model = t5.T5(tiny_config())
    ident = reward.EmpathyIdentifier.from_t5(model)
    for stack in (ident.context_encoder, ident.response_encoder):
        for (name, p), q in zip(stack.state_dict().items(), model.encoder.state_dict().values()):
            torch.testing.assert_close(p, q, msg=name)
    with torch.no_grad():
        # training one encoder leaves the other alone
        next(ident.context_encoder.parameters()).add_(1.0)
    torch.testing.assert_close(
        next(ident.response_encoder.parameters()), next(model.encoder.parameters())
    )


def cue_word_examples(n, seed, vocab=40):
    """Synthetic task: level 1 if the reply contains word 3, level 2 if it contains word 4, else
    0."""
    rng = np.random.default_rng(seed)
    out = dict(ctx=[], resp=[], level=[])
    for _ in range(n):
        level = int(rng.integers(3))
        resp = list(rng.integers(5, vocab, size=int(rng.integers(3, 10))))
        if level:
            resp[int(rng.integers(len(resp)))] = 2 + level
        ctx = list(rng.integers(5, vocab, size=int(rng.integers(3, 12))))
        out["ctx"].append([int(x) for x in ctx] + [1])
        out["resp"].append([int(x) for x in resp] + [1])
        out["level"].append(level)
    return out


def test_identifier_learns_cue_word_task():
    """A separable synthetic task is learnt to > 95 % held-out accuracy in a few seconds on CPU."""
    torch.manual_seed(0)
    model = reward.EmpathyIdentifier(tiny_config(vocab_size=40, dropout_rate=0.0))
    train, valid = cue_word_examples(600, seed=0), cue_word_examples(200, seed=1)
    result = reward.train_identifier(
        model,
        train,
        valid,
        epochs=5,
        batch_size=32,
        lr=3e-3,
        class_weights=False,
        device="cpu",
        seed=0,
        patience=5,
        log=lambda s: None,
    )
    logits = reward.predict(model, valid, batch_size=64, device="cpu")
    assert logits.shape == (200, 3)
    acc = reward.classification_metrics(valid["level"], logits.argmax(-1))["acc"]
    assert acc > 0.95, result["history"]
    assert result["valid"]["acc"] == pytest.approx(acc)  # the best state was loaded back


def test_tiny_training_on_real_epitome_improves_validation_loss(real_data_dir, tmp_path):
    """The real ER file: 300 pairs, a small tokenizer, 3 epochs; validation cross-entropy goes
    down."""
    records = data.load_epitome(real_data_dir / "epitome" / data.EPITOME_FILES["er"])[:360]
    tok = data.Tokenizer.train(
        [t for r in records for t in (r.seeker_post, r.response_post)],
        tmp_path / "tok.model",
        vocab_size=800,
    )
    examples = reward.epitome_examples(records, tok, ctx_len=64, resp_len=32)
    assert all(
        c[-1] == r[-1] == tok.eos_id and len(c) <= 64
        for c, r in zip(examples["ctx"], examples["resp"])
    )
    first, rest = ({k: v[s] for k, v in examples.items()} for s in (slice(300), slice(300, None)))
    torch.manual_seed(0)
    model = reward.EmpathyIdentifier(tiny_config(vocab_size=tok.vocab_size))
    result = reward.train_identifier(
        model,
        first,
        rest,
        epochs=3,
        batch_size=32,
        lr=1e-3,
        class_weights=False,
        device="cpu",
        seed=0,
        patience=3,
        log=lambda s: None,
    )
    losses = [h["valid_loss"] for h in result["history"]]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0], losses


def test_identifiers_save_load_round_trip_and_damaged_file(tmp_path):
    """Saved identifiers (safetensors, like a T5 checkpoint) score exactly as before; a damaged file
    raises CheckpointError naming the directory."""
    ids = make_identifiers(seed=3)
    ids.save(tmp_path / "identifiers")
    loaded = reward.Identifiers.load(tmp_path / "identifiers")
    batch = random_batch(torch.Generator().manual_seed(4))
    targets = torch.tensor([[0, 1, 2], [2, 2, 0], [1, 0, 0], [0, 0, 1]])
    torch.testing.assert_close(loaded.score(*batch, targets), ids.score(*batch, targets))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    weights = tmp_path / "identifiers" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(t5.CheckpointError, match="identifiers"):
        reward.Identifiers.load(tmp_path / "identifiers")
    with pytest.raises(t5.CheckpointError, match="missing"):
        reward.Identifiers.load(tmp_path / "missing")


# ---------------------------------------------------------------------------------------- the judge


def test_judge_features_are_l2_normalised_tfidf_of_words_and_bigrams():
    """[J1] by hand: counts of the known terms times their idf, divided by the row's norm; unknown
    terms drop."""
    terms = ["so", "so sorry", "sorry"]
    idf = torch.tensor([1.0, 2.0, 3.0])
    judge = Judge({"er": dict(terms=terms, idf=idf)})
    x = judge.features("er", ["So sorry, so SORRY!", "nothing known", "sorry"]).to_dense()  # (3, V)
    # "so" x2, "so sorry" x2, "sorry" x2 ("sorry so" unknown)
    raw = torch.tensor([2 * 1.0, 2 * 2.0, 2 * 3.0])
    assert torch.allclose(x[0], raw / raw.norm())
    assert torch.equal(x[1], torch.zeros(3)) and torch.allclose(x[2], torch.tensor([0.0, 0.0, 1.0]))


def test_judge_learns_cue_words_for_each_mechanism_and_survives_a_save():
    """Each mechanism's regression finds its own cue (held-out texts labelled right), and the state
    written as a run file (weights-only torch.save) gives the same levels back."""
    import io

    rng = np.random.default_rng(0)
    filler = ["the", "a", "day", "went", "it", "was", "ok", "my", "cat", "work"]
    cues = {"er": ["sad", "awful"], "ip": ["understand", "feel"], "ex": ["why", "how"]}

    def split(n):
        texts, levels = [], {m: [] for m in cues}
        for _ in range(n):
            words, lv = list(rng.choice(filler, 5)), {m: int(rng.integers(0, 3)) for m in cues}
            for m, (weak, strong) in cues.items():
                words += [] if lv[m] == 0 else [weak] if lv[m] == 1 else [strong, strong]
                levels[m].append(lv[m])
            texts.append(" ".join(rng.permutation(words)))
        return {m: (texts, levels[m]) for m in cues}

    train, valid, test = split(300), split(60), split(100)
    judge = Judge.fit(train, valid)
    got = judge.levels(test["er"][0])  # (N, 3)
    for i, m in enumerate(data.MECHANISMS):
        assert (got[:, i] == np.array(test[m][1])).mean() > 0.9, m
    buf = io.BytesIO()
    torch.save(judge.state, buf)
    buf.seek(0)
    again = Judge(torch.load(buf, weights_only=True))
    assert np.array_equal(again.levels(test["er"][0]), got)
