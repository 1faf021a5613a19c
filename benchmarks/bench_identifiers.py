"""How good are the empathy identifiers? Test-split accuracy / macro-F1 / weighted-F1 per mechanism
on EPITOME.

Rows per mechanism (ER, IP, EX), all on the split of data.load_epitome_splits (75/5/20, seed 0):
- majority: the most frequent training level for every pair (what any classifier must beat);
- bag-of-words floor: class-balanced TF-IDF logistic regression on the response (unigrams + bigrams,
  L2 chosen on validation), numpy only (the floor a learned identifier should reach);
- identifier (scratch): reward.EmpathyIdentifier, random init, with and without class weights;
- identifier (init): the same with both encoders copied from a T5 checkpoint (--init=DIR, e.g. the
  SFT model; needs the tokenizer it was trained with, --spm=PATH).
Within each identifier pair, "*" marks the class-weight setting chosen on validation macro-F1.

    python benchmarks/bench_identifiers.py [--data=DIR] [--spm=PATH] [--init=DIR] [--epochs=5] \\
        [--lr=3e-4] ...
    # under bfloat16 autocast, as train.py trains them
    python benchmarks/bench_identifiers.py --dtype=bfloat16 ...
"""

import contextlib
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
import reward  # noqa: E402
import t5  # noqa: E402


@dataclass
class Args:
    data: str = ""  # data directory (default: data.default_data_dir(), i.e. env EMPRL_DATA)
    # SentencePiece model; default: train one on EPITOME + ED training texts into `cache`
    spm: str = ""
    cache: str = str(Path.home() / ".cache" / "emprl" / "bench")  # where the default tokenizer goes
    vocab_size: int = 8000  # of the default tokenizer
    init: str = ""  # T5 checkpoint directory whose encoder initialises the identifiers (extra rows)
    mechanisms: str = "er,ip,ex"
    ctx_len: int = 128  # context tokens kept (the most recent)
    resp_len: int = 64  # response tokens kept
    d_model: int = 256  # scratch identifier size (the `cpu` policy's encoder)
    num_layers: int = 3
    num_heads: int = 4
    d_kv: int = 64
    d_ff: int = 1024
    # maximum; early stopping on validation macro-F1 (best epochs were 3-7 in a 12-epoch sweep)
    epochs: int = 5
    patience: int = 2
    batch_size: int = 32
    lr: float = 3e-4  # scratch identifiers (1e-3 sometimes collapsed to the majority level)
    init_lr: float = 3e-4  # identifiers initialised from --init (1e-4 learnt too slowly)
    class_weights: str = "both"  # "both" (choose on validation) | "yes" | "no"
    seed: int = 0
    threads: int = 2
    device: str = "cpu"
    # float32 | bfloat16 (autocast for training and prediction, as train.py runs the stage)
    dtype: str = "float32"
    out: str = ""  # optional JSON file with every row


def parse_args(argv):
    args, types = Args(), {f.name: f.type for f in fields(Args)}
    for a in argv:
        key, sep, value = a.removeprefix("--").partition("=")
        if not a.startswith("--") or not sep or key not in types:
            sys.exit(
                f"bench_identifiers.py: bad argument {a!r}: use --key=value with key in "
                f"{sorted(types)}"
            )
        setattr(args, key, types[key](value))
    return args


# ------------------------------------------------------------------------------- bag-of-words floor

# the judge's terms: words and word bigrams (the judge is this floor, fit by L-BFGS)
from judge import ngrams  # noqa: E402


def tfidf_fit(texts, min_df=2):
    """Vocabulary (n-grams seen in >= min_df texts) and smoothed idf, as sklearn's
    TfidfVectorizer."""
    df = Counter(g for t in texts for g in set(ngrams(t)))
    terms = sorted(g for g, n in df.items() if n >= min_df)
    idf = np.log((1 + len(texts)) / (1 + np.array([df[g] for g in terms], dtype=np.float64))) + 1
    return {g: j for j, g in enumerate(terms)}, idf


def tfidf_transform(texts, vocab, idf):
    """Sparse rows as coordinate arrays (rows, cols, vals): raw counts x idf, each row
    L2-normalised."""
    rows, cols, vals = [], [], []
    for i, t in enumerate(texts):
        counts = Counter(vocab[g] for g in ngrams(t) if g in vocab)
        v = np.array([n * idf[j] for j, n in counts.items()])
        rows += [i] * len(counts)
        cols += list(counts)
        vals += list(v / max(np.linalg.norm(v), 1e-12))
    return (
        np.array(rows, dtype=np.int64),
        np.array(cols, dtype=np.int64),
        np.array(vals),
        len(texts),
    )


def matmul(X, W):
    """X W for sparse X (N, V) and dense W (V, C) -> (N, C)."""
    rows, cols, vals, n = X
    return np.stack(
        [np.bincount(rows, vals * W[cols, c], minlength=n) for c in range(W.shape[1])], axis=1
    )


def matmul_t(X, G, V):
    """X^T G for sparse X (N, V) and dense G (N, C) -> (V, C)."""
    rows, cols, vals, _ = X
    return np.stack(
        [np.bincount(cols, vals * G[rows, c], minlength=V) for c in range(G.shape[1])], axis=1
    )


def logreg_fit(X, y, V, l2, steps=500):
    """Multinomial logistic regression on sparse X (N, V), class-balanced sample weights, L2
    penalty, Nesterov gradient descent with step 1/L, L = 0.5 (largest eigenvalue of X^T diag(w) X)
    + l2 bounding the curvature."""
    n, C = len(y), reward.NUM_LEVELS
    w = (n / (C * np.maximum(np.bincount(y, minlength=C), 1)))[y] / n  # (N,) sums to 1 ("balanced")
    Y = np.eye(C)[y]  # (N, C)
    v = np.random.default_rng(0).standard_normal((V, 1))
    for _ in range(30):  # power iteration
        v = matmul_t(X, w[:, None] * matmul(X, v), V)
        lam = np.linalg.norm(v)
        v /= lam
    step = 1.0 / (0.5 * (lam + 1.0) + l2)  # +1: the bias acts as a constant feature of norm 1
    W, b = np.zeros((V, C)), np.zeros(C)
    W_prev, b_prev = W, b
    for t in range(1, steps + 1):
        mom = (t - 1) / (t + 2)  # Nesterov look-ahead
        Wl, bl = W + mom * (W - W_prev), b + mom * (b - b_prev)
        Z = matmul(X, Wl) + bl  # (N, C)
        P = np.exp(Z - Z.max(1, keepdims=True))
        P /= P.sum(1, keepdims=True)
        G = w[:, None] * (P - Y)  # (N, C) gradient of the weighted mean cross-entropy w.r.t. Z
        W_prev, b_prev = W, b
        W, b = Wl - step * (matmul_t(X, G, V) + l2 * Wl), bl - step * G.sum(0)
    return W, b


def bow_floor(train, valid, test, l2s=(1e-4, 1e-3, 1e-2)):
    """Fit on training responses; choose the L2 strength on validation macro-F1; predict test
    levels."""
    vocab, idf = tfidf_fit([r.response_post for r in train])
    X = {
        k: tfidf_transform([r.response_post for r in split], vocab, idf)
        for k, split in (("train", train), ("valid", valid), ("test", test))
    }
    y = {
        k: np.array([r.level for r in split])
        for k, split in (("train", train), ("valid", valid), ("test", test))
    }
    best = None
    for l2 in l2s:
        W, b = logreg_fit(X["train"], y["train"], len(vocab), l2)
        f1 = reward.classification_metrics(y["valid"], (matmul(X["valid"], W) + b).argmax(1))[
            "macro_f1"
        ]
        if best is None or f1 > best[0]:
            best = (f1, l2, W, b)
    f1, l2, W, b = best
    return {
        "valid_macro_f1": f1,
        "setting": f"l2={l2:g}",
        **reward.classification_metrics(y["test"], (matmul(X["test"], W) + b).argmax(1)),
    }


# -------------------------------------------------------------------------------------- identifiers


def load_tokenizer(args, data_dir, splits):
    if args.spm:
        return data.Tokenizer(args.spm)
    path = Path(args.cache).expanduser() / f"epitome_ed_unigram{args.vocab_size}.model"
    if path.exists():
        return data.Tokenizer(path)
    ed = data.load_empathetic_dialogues(data_dir / "empatheticdialogues" / "train.csv")
    texts = sorted({t for ex in ed for t in ex.context + [ex.target]})  # each ED utterance once
    texts += [t for r in splits["er"]["train"] for t in (r.seeker_post, r.response_post)]
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"training a {args.vocab_size}-piece tokenizer on {len(texts)} texts -> {path}")
    return data.Tokenizer.train(texts, path, vocab_size=args.vocab_size, seed=args.seed)


def run_identifier(args, make_model, lr, class_weights, ex, log_prefix):
    torch.manual_seed(args.seed)
    model = make_model()
    autocast = contextlib.nullcontext
    if args.dtype == "bfloat16":
        autocast = lambda: torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16)  # noqa: E731
    result = reward.train_identifier(
        model,
        ex["train"],
        ex["valid"],
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=lr,
        class_weights=class_weights,
        device=args.device,
        seed=args.seed,
        patience=args.patience,
        log=lambda s: print(f"  {log_prefix} {s}", flush=True),
        autocast=autocast,
    )
    logits = reward.predict(model, ex["test"], args.batch_size, args.device, autocast)
    return {
        "valid_macro_f1": result["valid"]["macro_f1"],
        "seconds": result["seconds"],
        "setting": f"cw={'yes' if class_weights else 'no'}, best epoch {result['best_epoch']}",
        **reward.classification_metrics(ex["test"]["level"], logits.argmax(-1)),
    }


def main(argv):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.init and not args.spm:
        sys.exit(
            "bench_identifiers.py: --init needs the tokenizer that checkpoint was trained "
            "with: pass --spm=PATH"
        )
    data_dir = data.ensure_data(Path(args.data) if args.data else data.default_data_dir())
    splits = data.load_epitome_splits(data_dir, seed=0)
    tok = load_tokenizer(args, data_dir, splits)
    config = t5.T5Config(
        vocab_size=tok.vocab_size,
        d_model=args.d_model,
        d_kv=args.d_kv,
        d_ff=args.d_ff,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        dropout_rate=0.1,
    )
    init = t5.T5.from_pretrained(args.init) if args.init else None
    if init is not None and init.config.vocab_size < tok.vocab_size:
        sys.exit(
            f"bench_identifiers.py: --init has vocab_size {init.config.vocab_size} < the "
            "tokenizer's "
            f"{tok.vocab_size}: pass the --spm the checkpoint was trained with"
        )
    weightings = {"both": (False, True), "yes": (True,), "no": (False,)}[args.class_weights]
    rows = []
    for mech in args.mechanisms.split(","):
        split = splits[mech]
        ex = {k: reward.epitome_examples(split[k], tok, args.ctx_len, args.resp_len) for k in split}
        y_train = np.array([r.level for r in split["train"]])
        counts = np.bincount(y_train, minlength=3)
        print(
            f"{mech}: train {len(split['train'])} valid {len(split['valid'])} test "
            f"{len(split['test'])}, "
            f"train levels {np.round(counts / counts.sum(), 3).tolist()}",
            flush=True,
        )
        majority = int(counts.argmax())
        rows.append(
            {
                "mech": mech,
                "model": "majority",
                "valid_macro_f1": float("nan"),
                "setting": f"level {majority}",
                "seconds": 0.0,
                **reward.classification_metrics(
                    [r.level for r in split["test"]], [majority] * len(split["test"])
                ),
            }
        )
        t0 = time.time()
        rows.append(
            {
                "mech": mech,
                "model": "bag-of-words floor",
                **bow_floor(split["train"], split["valid"], split["test"]),
            }
        )
        rows[-1]["seconds"] = time.time() - t0
        candidates = [("identifier (scratch)", lambda: reward.EmpathyIdentifier(config), args.lr)]
        if init is not None:
            candidates.append(
                ("identifier (init)", lambda: reward.EmpathyIdentifier.from_t5(init), args.init_lr)
            )
        for name, make_model, lr in candidates:
            group = [
                {
                    "mech": mech,
                    "model": name,
                    **run_identifier(args, make_model, lr, cw, ex, f"{mech} {name} cw={cw}"),
                }
                for cw in weightings
            ]
            max(group, key=lambda r: r["valid_macro_f1"])["setting"] += " *"
            rows.extend(group)
    print(
        "\n| mech | model | setting | valid macro-F1 | test acc | test macro-F1 | test "
        "weighted-F1 | train s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        valid = "-" if np.isnan(r["valid_macro_f1"]) else f"{r['valid_macro_f1']:.3f}"
        print(
            f"| {r['mech'].upper()} | {r['model']} | {r['setting']} | {valid} | {r['acc']:.3f} | "
            f"{r['macro_f1']:.3f} | {r['weighted_f1']:.3f} | {r['seconds']:.0f} |"
        )
    print(f"\ncommand: python benchmarks/bench_identifiers.py {' '.join(argv)}".rstrip())
    print(f"settings: {json.dumps(asdict(args))}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": asdict(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
