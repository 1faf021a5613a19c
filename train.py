"""Train EmpRL end to end: data -> SFT -> identifiers -> labels -> PPO -> evaluation.

    python train.py                       # preset `gpu` with CUDA, `cpu` without
    python train.py --preset=tiny --out_dir=runs/tiny
    python train.py --preset=cpu --ppo_seed=2 --out_dir=runs/cpu_seed2

Every stage writes its results into the run directory (`--out_dir`) and is skipped when rerun; SFT and PPO
resume from their last checkpoint. Ctrl-C saves a checkpoint and exits. Any `--key=value` overrides a
field of `Config`.
"""
import dataclasses
import errno
import io
import json
import os
import random
import shlex
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data
import emprl
import ppo
import reward
from t5 import T5, T5Config, CheckpointError


@dataclass
class Config:
    # data
    data_dir: str = ""  # ED + EPITOME directory; "" = $EMPRL_DATA or ~/.cache/emprl/data (downloaded if absent)
    out_dir: str = "runs/emprl"  # the run directory: checkpoints, logs, results
    vocab_size: int = 8000  # SentencePiece vocabulary when training our own (ignored with `pretrained`)
    max_context_tokens: int = 200  # context cut from the left (oldest tokens dropped)
    max_target_tokens: int = 50  # reference replies cut from the right
    limit_train: int = 0  # use only the first N ED train examples (0 = all); for quick runs
    limit_valid: int = 0  # same for ED valid
    limit_test: int = 0  # same for ED test (0 = the full test split, as reported)
    # model
    pretrained: str = ""  # HF T5 checkpoint dir (config.json, model.safetensors, spiece.model); "" = from scratch
    d_model: int = 256  # from-scratch sizes below are ignored with `pretrained`
    d_kv: int = 32
    d_ff: int = 1024
    num_layers: int = 3  # encoder layers
    num_decoder_layers: int = 3
    num_heads: int = 8
    feed_forward_proj: str = "relu"  # relu (T5 v1.0) | gated-gelu (v1.1 / FLAN)
    dropout_rate: float = 0.1
    # sft
    sft_epochs: float = 3.0  # passes over ED train (fractions allowed)
    sft_batch_size: int = 8
    sft_lr: float = 1e-4  # AdamW, linear warmup then linear decay to 0
    sft_warmup_steps: int = 0
    sft_weight_decay: float = 0.0
    sft_eval_every: int = 1000  # steps between validation-loss checks (best checkpoint kept)
    sft_valid_n: int = 1000  # validation examples per check (0 = all)
    # reward (empathy identifiers)
    ident_init: str = "sft"  # encoders start from: sft (our SFT encoder) | pretrained | scratch
    ident_ctx_tokens: int = 128  # identifier context: the last N context tokens
    ident_resp_tokens: int = 64  # identifier response cut
    ident_epochs: int = 6
    ident_batch_size: int = 32
    ident_lr: float = 1e-4
    ident_class_weights: bool = False  # inverse-frequency class weights in the identifier loss
    ident_patience: int = 2  # epochs without validation macro-F1 gain before stopping
    epitome_limit: int = 0  # use only the first N EPITOME pairs per split (0 = all); for tests
    label_train_limit: int = 0  # label only the first N ED train targets (0 = all); PPO draws contexts from them
    reward_mechanisms: str = "er,ip,ex"  # mechanisms in the reward; drop one for the ablation
    # ppo
    ppo_steps: int = 200  # PPO iterations, each on `batch_size` contexts
    ppo_seed: int = 0  # seed of the PPO stage (rollouts, minibatch order); vary it to measure the spread
    batch_size: int = 32  # rollouts per iteration
    mini_batch_size: int = 8
    ppo_epochs: int = 4
    ppo_lr: float = 1e-5  # Adam, linear decay to 0 over the run
    clip_range: float = 0.2  # ε of the clipped ratio
    clip_range_value: float = 0.2  # value clipping around the old values
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    max_grad_norm: float = 1.0
    ratio_threshold: float = 10.0  # skip a minibatch whose mean ratio is above this
    init_kl_coef: float = 0.2  # β at the start (0 = no KL penalty)
    adaptive_kl: bool = True  # Ziegler et al. controller; False = fixed β
    kl_target: float = 6.0  # nats summed over the reply
    kl_horizon: int = 10000
    kl_estimator: str = "k1"  # per-token KL: k1 = log π - log π_ref (TRL's) | k3 = (ρ-1) - log ρ (see ppo.py)
    kl_min: float = 0.0  # per-token KL penalty clamped to [kl_min, kl_max] nats (non-negative and bounded)
    kl_max: float = 10.0
    score_norm: bool = True  # normalise scores by their running mean / std
    whiten_rewards: bool = True  # scale-only whitening of the per-token rewards
    temperature: float = 0.9  # rollout temperature (the same τ scores every log-prob)
    min_new_tokens: int = 5
    max_new_tokens: int = 30
    ppo_dropout: bool = False  # dropout in the policy during PPO
    ppo_eval_every: int = 50  # iterations between validation evaluations
    ppo_eval_n: int = 256  # validation examples per evaluation
    sample_every: int = 50  # iterations between printed sample dialogues
    save_every: int = 10  # iterations between checkpoints
    # eval
    eval_batch_size: int = 64
    eval_seed: int = 42  # decoding seed, as the authors
    # system
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16; never float16
    max_nonfinite: int = 20  # consecutive skipped non-finite updates before the run stops
    force: bool = False  # reuse a run directory made with different settings (stages they affect rerun)


PRESETS = {
    # tests: a few hundred examples, a very small model; end to end in about a minute on 2 CPU cores
    "tiny": dict(vocab_size=600, limit_train=400, limit_valid=64, limit_test=64, epitome_limit=200,
                 d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
                 sft_epochs=1.0, sft_batch_size=16, sft_lr=1e-3, sft_eval_every=10, sft_valid_n=64,
                 ident_epochs=1, ident_ctx_tokens=64, ident_resp_tokens=32, ppo_steps=4, batch_size=8,
                 mini_batch_size=4, ppo_epochs=2, max_new_tokens=12, ppo_eval_every=2, ppo_eval_n=16,
                 sample_every=2, save_every=1, eval_batch_size=32),
    # the default without a GPU: full data, a small T5 from scratch, our own 8k SentencePiece vocabulary
    # (identifier settings from benchmarks/bench_identifiers.py; PPO's from the prototype in METHOD.md)
    "cpu": dict(sft_epochs=2.0, sft_batch_size=32, sft_lr=1e-3, sft_warmup_steps=200, sft_eval_every=500,
                ident_init="scratch", ident_lr=3e-4, ident_class_weights=True, ident_epochs=5,
                label_train_limit=12000, ppo_steps=200, ppo_lr=3e-5, adaptive_kl=False, init_kl_coef=0.5),
    # the default with CUDA: the authors' settings on pretrained t5-base
    "gpu": dict(pretrained="t5-base", ident_init="pretrained", sft_epochs=3.0, sft_batch_size=8, sft_lr=1e-4,
                sft_eval_every=2000, ident_batch_size=16, ident_lr=2e-5, ppo_steps=1000, ppo_lr=1e-5),
}

STAGES = ("tokenizer", "sft", "identifiers", "labels", "ppo", "eval")
# The first stage whose result each field changes; fields not listed change no result (paths, logging, force).
_FIRST_STAGE = {
    **{f: "tokenizer" for f in ("vocab_size", "max_context_tokens", "max_target_tokens", "limit_train",
                                "limit_valid", "limit_test", "pretrained", "ident_ctx_tokens")},
    **{f: "sft" for f in ("d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
                          "feed_forward_proj", "dropout_rate", "seed", "dtype", "max_nonfinite")},
    "epitome_limit": "identifiers", "ident_resp_tokens": "identifiers", "label_train_limit": "labels",
    **{f: "ppo" for f in ("batch_size", "mini_batch_size", "clip_range", "clip_range_value", "vf_coef", "gamma",
                          "lam", "max_grad_norm", "ratio_threshold", "init_kl_coef", "adaptive_kl", "kl_target",
                          "kl_horizon", "kl_estimator", "kl_min", "kl_max", "score_norm", "whiten_rewards", "temperature",
                          "min_new_tokens", "max_new_tokens", "reward_mechanisms")},
    "eval_batch_size": "eval", "eval_seed": "eval",
}
for _f in dataclasses.fields(Config):
    for _prefix, _stage in (("sft_", "sft"), ("ident_", "identifiers"), ("ppo_", "ppo")):
        if _f.name.startswith(_prefix) and _f.name not in _FIRST_STAGE:
            _FIRST_STAGE[_f.name] = _stage
for _f in ("ppo_eval_every", "ppo_eval_n", "sample_every", "save_every"):  # logging only
    _FIRST_STAGE.pop(_f, None)


# ----------------------------------------------------------------------------------------------------
# command line


def parse_args(argv):
    """`--preset=NAME` first, then `--key=value` overrides, type-checked against Config's fields."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    kv = {}
    for arg in argv:
        if not arg.startswith("--"):
            raise RunError(f"unexpected argument {arg!r}: use --key=value (see Config in train.py)")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            value = "true"  # --force
        kv[key] = value
    preset = kv.pop("preset", "gpu" if torch.cuda.is_available() else "cpu")
    if preset not in PRESETS:
        raise RunError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    cfg = Config(**PRESETS[preset])
    for key, value in kv.items():
        if key not in fields:
            raise RunError(f"unknown option --{key}: see the fields of Config in train.py")
        typ = type(getattr(cfg, key))
        try:
            if typ is bool:
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError
                value = value.lower() in ("1", "true", "yes")
            else:
                value = typ(value)
        except ValueError:
            raise RunError(f"--{key}={value}: expected {typ.__name__}") from None
        setattr(cfg, key, value)
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        raise RunError(f"--dtype={cfg.dtype}: use auto, float32 or bfloat16 (float16 overflows in T5)")
    if cfg.ident_init not in ("sft", "pretrained", "scratch"):
        raise RunError(f"--ident_init={cfg.ident_init}: use sft, pretrained or scratch")
    bad = set(cfg.reward_mechanisms.split(",")) - set(data.MECHANISMS)
    if bad or not cfg.reward_mechanisms:
        raise RunError(f"--reward_mechanisms={cfg.reward_mechanisms}: a comma list of {','.join(data.MECHANISMS)}")
    if cfg.batch_size % cfg.mini_batch_size:
        raise RunError("--batch_size must be a multiple of --mini_batch_size")
    return cfg, preset


# ----------------------------------------------------------------------------------------------------
# stages


def stage_tokenizer(cfg, run, data_dir):
    """1. data: the tokenizer (pretrained T5's or our own SentencePiece) and every ED split encoded."""
    if cfg.pretrained:
        shutil.copyfile(Path(cfg.pretrained) / "spiece.model", run / "spiece.model")
    elif not (run / "spiece.model").exists():
        examples = data.load_empathetic_dialogues(data_dir / "empatheticdialogues" / "train.csv")
        if cfg.limit_train:
            examples = examples[: cfg.limit_train]
        # one role-tagged text per dialogue prefix (so "speaker:"/"listener:" become pieces), plus EPITOME posts
        texts = [data.format_context(ex.context + [ex.target]) for ex in examples]
        for rec in data.load_epitome(data_dir / "epitome" / data.EPITOME_FILES["er"]):
            texts += [rec.seeker_post, rec.response_post]
        data.Tokenizer.train(texts, run / "spiece.model", vocab_size=cfg.vocab_size, seed=cfg.seed)
    tok = data.Tokenizer(run / "spiece.model")
    encoded = {}
    for split, limit in (("train", cfg.limit_train), ("valid", cfg.limit_valid), ("test", cfg.limit_test)):
        examples = data.load_empathetic_dialogues(data_dir / "empatheticdialogues" / f"{split}.csv")
        examples = examples[:limit] if limit else examples
        ctx = [data.encode_context(tok, ex.context, cfg.max_context_tokens) for ex in examples]
        encoded[split] = dict(ctx=ctx, tgt=[data.encode_target(tok, ex.target, cfg.max_target_tokens) for ex in examples],
                              ident_ctx=[c[-cfg.ident_ctx_tokens:] for c in ctx])
    save_torch(run / "encoded.pt", encoded)


def build_model(cfg, vocab_size):
    if cfg.pretrained:
        return T5.from_pretrained(cfg.pretrained)
    return T5(T5Config(vocab_size=vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff,
                       num_layers=cfg.num_layers, num_decoder_layers=cfg.num_decoder_layers, num_heads=cfg.num_heads,
                       feed_forward_proj=cfg.feed_forward_proj, dropout_rate=cfg.dropout_rate,
                       tie_word_embeddings=True))


def guarded_step(loss, model, optimizer, max_norm, counter, cfg):
    """Backward + clipped step, skipped when the loss or gradient is not finite; too many in a row stops the run."""
    optimizer.zero_grad(set_to_none=True)
    if torch.isfinite(loss):
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        if torch.isfinite(grad_norm):
            optimizer.step()
            counter["consecutive"] = 0
            return True
    counter["total"] += 1
    counter["consecutive"] += 1
    if counter["consecutive"] >= cfg.max_nonfinite:
        raise RunError(f"{counter['consecutive']} non-finite losses/gradients in a row: the run is diverging "
                       f"(lower the learning rate, or use --dtype=float32)")
    return False


def stage_sft(cfg, run, env, log):
    """4. SFT: MLE on ED train; the checkpoint with the best validation loss is kept in run/sft."""
    encoded, device, autocast = env["encoded"], env["device"], env["autocast"]
    train, valid = encoded["train"], encoded["valid"]
    if cfg.sft_valid_n:
        valid = {k: v[: cfg.sft_valid_n] for k, v in valid.items()}
    lengths = [len(c) + len(t) for c, t in zip(train["ctx"], train["tgt"])]
    steps_per_epoch = len(data.batch_indices(lengths, cfg.sft_batch_size, shuffle=False, seed=0))
    total = max(1, int(cfg.sft_epochs * steps_per_epoch))
    seed_everything(cfg.seed)  # before the random init: torch seeds itself randomly at start-up
    model = build_model(cfg, env["tok"].vocab_size).to(device)
    # fused: one kernel updates every parameter (the for-each default launches several per step)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=cfg.sft_weight_decay, fused=True)
    sched = linear_schedule(opt, total, cfg.sft_warmup_steps)
    state = dict(step=0, best=float("inf"), nonfinite=dict(total=0, consecutive=0))
    ckpt_path = run / "sft_ckpt.pt"
    if ckpt_path.exists():  # resume: weights, optimizer, schedule, RNG, position in the data
        ck = load_torch(ckpt_path)  # on the CPU: RNG states must be CPU tensors; load_state_dict moves the rest
        model.load_state_dict(ck["model"]), opt.load_state_dict(ck["optimizer"]), sched.load_state_dict(ck["scheduler"])
        state = ck["state"]
        set_rng_state(ck["rng"])
        print(f"sft: resuming at step {state['step']}/{total}")

    def checkpoint():
        save_torch(ckpt_path, dict(model=model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                                   state=state, rng=rng_state()))

    def validate():
        return emprl.perplexity(model, valid, device, cfg.eval_batch_size, autocast)

    bar = tqdm(total=total, initial=state["step"], desc="sft", dynamic_ncols=True)
    t_tokens = time.time()
    n_tokens = 0
    while state["step"] < total:
        epoch, pos = divmod(state["step"], steps_per_epoch)
        # the batch order of an epoch is a function of (seed, epoch): a resumed run sees the same batches
        batches = data.batch_indices(lengths, cfg.sft_batch_size, shuffle=True, seed=cfg.seed + epoch, bucket=True)
        for idx in batches[pos:]:
            model.train()
            batch = emprl.make_batch(train, idx, device)
            with autocast():
                loss, n = emprl.sft_loss(model, batch)
            ok = guarded_step(loss, model, opt, 1.0, state["nonfinite"], cfg)
            sched.step()
            state["step"] += 1
            n_tokens += int(n)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{sched.get_last_lr()[0]:.1e}")
            last = state["step"] == total
            if state["step"] % cfg.sft_eval_every == 0 or last:
                ppl = validate()
                tok_s = n_tokens / (time.time() - t_tokens)
                rec = dict(stage="sft", step=state["step"], epoch=state["step"] / steps_per_epoch, loss=loss.item(),
                           valid_ppl=ppl, lr=sched.get_last_lr()[0], tokens_per_s=tok_s, skipped=state["nonfinite"]["total"])
                log(rec)
                tqdm.write(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()))
                if ppl < state["best"]:  # keep the best checkpoint by validation loss
                    state["best"] = ppl
                    model.save_pretrained(run / "sft")
                checkpoint()
            elif _STOP["requested"]:
                checkpoint()
            if _STOP["requested"]:
                raise Interrupted(f"sft step {state['step']}")
            if last:
                break
    bar.close()
    print(f"sft: best validation perplexity {state['best']:.2f}")


def load_identifiers(path, device):
    """The frozen identifiers of a run; a damaged file gets the run's one-line advice."""
    try:
        return reward.Identifiers.load(path, device).eval()
    except CheckpointError as e:
        raise damaged(path.parent, path.name, str(e).split(": ", 1)[-1]) from None


def stage_identifiers(cfg, run, env, log):
    """2. identifiers: ER, IP, EX trained on EPITOME; their test table beside the majority baseline."""
    device, tok = env["device"], env["tok"]
    splits = data.load_epitome_splits(env["data_dir"], seed=cfg.seed)
    models, table = [], {}
    for mech in data.MECHANISMS:
        ex = {s: reward.epitome_examples(splits[mech][s][: cfg.epitome_limit or None], tok, cfg.ident_ctx_tokens,
                                            cfg.ident_resp_tokens) for s in splits[mech]}
        seed_everything(cfg.seed)  # the heads' init is random: seeded, a rerun trains the same identifiers
        if cfg.ident_init == "scratch":
            base = build_model(cfg, tok.vocab_size)
            model = reward.EmpathyIdentifier(base.config)
        else:  # start both encoders from a T5 that has read text: our SFT model, or the pretrained checkpoint
            base = load_t5(run, "sft") if cfg.ident_init == "sft" else T5.from_pretrained(cfg.pretrained)
            model = reward.EmpathyIdentifier.from_t5(base)
        model.to(device)
        t0 = time.time()
        print(f"identifier {mech}: {len(ex['train'])} train / {len(ex['valid'])} valid / {len(ex['test'])} test pairs | "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
        hist = reward.train_identifier(model, ex["train"], ex["valid"], epochs=cfg.ident_epochs,
                                       batch_size=cfg.ident_batch_size, lr=cfg.ident_lr,
                                       class_weights=cfg.ident_class_weights, device=device, seed=cfg.seed,
                                       patience=cfg.ident_patience, log=tqdm.write)
        y = np.array([e[2] for e in ex["test"]])
        pred = reward.predict(model, ex["test"], cfg.eval_batch_size, device).argmax(-1)
        majority = np.full_like(y, np.bincount([e[2] for e in ex["train"]], minlength=3).argmax())
        table[mech] = dict(**reward.classification_metrics(y, pred),
                           majority=reward.classification_metrics(y, majority), seconds=time.time() - t0,
                           epochs_run=len(hist.get("history", [])) if isinstance(hist, dict) else None)
        log(dict(stage="identifiers", mechanism=mech, **table[mech]))
        models.append(model.cpu())
    identifiers = reward.Identifiers(models)
    identifiers.save(run / "identifiers.pt")
    write_json(run / "identifiers.json", table)


def print_identifier_table(table):
    print("| mechanism | accuracy | macro-F1 | weighted-F1 | majority acc | majority macro-F1 |")
    print("|---|---|---|---|---|---|")
    for mech, m in table.items():
        print(f"| {mech.upper()} | {m['acc']:.3f} | {m['macro_f1']:.3f} | {m['weighted_f1']:.3f} | "
              f"{m['majority']['acc']:.3f} | {m['majority']['macro_f1']:.3f} |")


def stage_labels(cfg, run, env, log):
    """3. label every ED target reply with the identifiers' levels (the y* of the reward)."""
    identifiers = load_identifiers(run / "identifiers.pt", env["device"])
    labels = {}
    for split, enc in env["encoded"].items():
        if split == "train" and cfg.label_train_limit:  # the PPO context pool; 200 x 32 contexts need ~6k
            enc = {k: v[: cfg.label_train_limit] for k, v in enc.items()}
        tgt = [t[: cfg.ident_resp_tokens - 1] + [t[-1]] if len(t) > cfg.ident_resp_tokens else t for t in enc["tgt"]]
        levels, _ = emprl.identifier_levels(identifiers, enc, tgt, env["device"], cfg.eval_batch_size, env["autocast"])
        labels[split] = torch.as_tensor(levels)
        dist = {m: np.bincount(levels[:, i], minlength=3).tolist() for i, m in enumerate(data.MECHANISMS)}
        print(f"labels {split}: level counts (no/weak/strong) {dist}")
        log(dict(stage="labels", split=split, counts=dist))
    save_torch(run / "labels.pt", labels)


def stage_ppo(cfg, run, env, log):
    """5. PPO: policy + value head from the SFT model, frozen reference, the empathy reward."""
    device, autocast, encoded = env["device"], env["autocast"], env["encoded"]
    levels = env["labels"]["train"].numpy()
    train = {k: v[: len(levels)] for k, v in encoded["train"].items()}  # the labelled train examples
    ref_model = load_t5(run, "sft").to(device).eval().requires_grad_(False)
    policy = emprl.PolicyWithValue(load_t5(run, "sft"), cfg.dropout_rate).to(device)
    identifiers = load_identifiers(run / "identifiers.pt", device).requires_grad_(False)
    n_updates = cfg.ppo_steps * cfg.ppo_epochs * (cfg.batch_size // cfg.mini_batch_size)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.ppo_lr, fused=True)
    sched = linear_schedule(opt, n_updates)
    kl_ctl = (ppo.AdaptiveKLController(cfg.init_kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
              else ppo.FixedKLController(cfg.init_kl_coef))
    moments = ppo.RunningMoments()
    gen = torch.Generator().manual_seed(cfg.ppo_seed)
    state = dict(step=0, nonfinite=0, sft_valid=None)
    ckpt_path = run / "ppo_ckpt.pt"
    if ckpt_path.exists():
        ck = load_torch(ckpt_path)  # on the CPU: RNG states must be CPU tensors; load_state_dict moves the rest
        policy.load_state_dict(ck["policy"]), opt.load_state_dict(ck["optimizer"]), sched.load_state_dict(ck["scheduler"])
        kl_ctl.load_state_dict(ck["kl_ctl"]), moments.load_state_dict(ck["moments"])
        gen.set_state(ck["generator"])
        set_rng_state(ck["rng"])
        state = ck["state"]
        print(f"ppo: resuming at iteration {state['step']}/{cfg.ppo_steps}")
    else:
        seed_everything(cfg.ppo_seed)

    def checkpoint():
        save_torch(ckpt_path, dict(policy=policy.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                                   kl_ctl=kl_ctl.state_dict(), moments=moments.state_dict(), generator=gen.get_state(),
                                   rng=rng_state(), state=state))

    valid, valid_levels = encoded["valid"], env["labels"]["valid"].numpy()
    if state["sft_valid"] is None:  # the SFT model on the same validation subset, once, as the reference line
        state["sft_valid"], _ = emprl.evaluate(ref_model, identifiers, env["tok"], valid, valid_levels, device, cfg,
                                               autocast, n=cfg.ppo_eval_n, seed=cfg.eval_seed)
        print(eval_line("valid sft", state["sft_valid"]))
    n_train = len(train["ctx"])
    cfg_run = dataclasses.replace(cfg)
    cfg_run.reward_mechanisms = tuple(cfg.reward_mechanisms.split(","))
    bar = tqdm(total=cfg.ppo_steps, initial=state["step"], desc="ppo", dynamic_ncols=True)
    while state["step"] < cfg.ppo_steps:
        # contexts of iteration i: a seeded permutation of the train split per pass, consumed in order
        start = state["step"] * cfg.batch_size
        epoch, offset = divmod(start, n_train)
        order = np.random.default_rng(cfg.ppo_seed + epoch).permutation(n_train)
        idx = np.concatenate([order, np.random.default_rng(cfg.ppo_seed + epoch + 1).permutation(n_train)])
        idx = idx[offset: offset + cfg.batch_size].tolist()
        batch = emprl.make_batch(train, idx, device, levels)
        stats, roll = emprl.ppo_iteration(policy, ref_model, identifiers, opt, sched, kl_ctl, moments, batch,
                                          cfg_run, autocast, gen)
        state["step"] += 1
        bar.update(1)
        bad = "nonfinite_scores" in stats or stats.get("skipped_nonfinite", 0) > 0
        state["nonfinite"] = state["nonfinite"] + 1 if bad else 0
        log(dict(stage="ppo", step=state["step"], **stats))
        if "score" in stats:
            tqdm.write(ppo_line(state["step"], cfg.ppo_steps, stats))
        if bad:
            tqdm.write(f"ppo {state['step']:>4}/{cfg.ppo_steps} | non-finite: {stats.get('nonfinite_scores', 0)} "
                       f"scores (whole update skipped), {stats.get('skipped_nonfinite', 0)} minibatch updates skipped")
        if state["nonfinite"] >= cfg.max_nonfinite:
            raise RunError(f"{state['nonfinite']} PPO iterations in a row with non-finite rewards or gradients: "
                           f"stopping instead of training on garbage (lower --ppo_lr, or use --dtype=float32)")
        if state["step"] % cfg.sample_every == 0:
            for i in range(2):
                ctx = env["tok"].decode(train["ctx"][idx[i]])
                tqdm.write(f"  context: {ctx[-200:]}\n  reply:   {env['tok'].decode(roll['replies'][i].tolist())}")
        if state["step"] % cfg.ppo_eval_every == 0 or state["step"] == cfg.ppo_steps:
            m, _ = emprl.evaluate(policy.model, identifiers, env["tok"], valid, valid_levels, device, cfg, autocast,
                                  n=cfg.ppo_eval_n, seed=cfg.eval_seed)
            log(dict(stage="ppo_eval", step=state["step"], **m))
            tqdm.write(eval_line(f"valid emprl@{state['step']}", m) + f"   (sft {state['sft_valid']['emp_f1']:.2f})")
        if state["step"] % cfg.save_every == 0 or state["step"] == cfg.ppo_steps or _STOP["requested"]:
            checkpoint()
        if _STOP["requested"]:
            raise Interrupted(f"ppo iteration {state['step']}")
    bar.close()
    policy.model.save_pretrained(run / "emprl")
    plot_curves(run)


def ppo_line(step, total, s):
    keys = [("score", ".3f"), ("kl", ".3f"), ("beta", ".3f"), ("pg_loss", ".4f"), ("vf_loss", ".4f"),
            ("approx_kl", ".4f"), ("clipfrac", ".3f"), ("explained_var", ".3f"), ("length", ".1f"), ("seconds", ".1f")]
    return f"ppo {step:>4}/{total} | " + " | ".join(f"{k} {s[k]:{fmt}}" for k, fmt in keys)


def eval_line(name, m):
    return (f"{name}: emp_f1 {m['emp_f1']:.2f} (er {m['emp_f1_er']:.1f} ip {m['emp_f1_ip']:.1f} ex {m['emp_f1_ex']:.1f})"
            f" | reward {m['reward']:.3f} | dist_2 {m['dist_2']:.1f} | ppl {m['ppl']:.1f} | length {m['length']:.1f}"
            f" | unique {m['unique_frac']:.2f}")


def plot_curves(run):
    """ppo_curves.png: score, KL, β and validation Emp-F1 over PPO iterations (only if matplotlib is installed)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    recs = []
    for line in open(run / "log.jsonl"):
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill (the log is appended to, not written atomically)
            pass
    # a resumed run redoes the iterations after its last checkpoint: keep the last record of each step
    ppo_recs = list({r["step"]: r for r in recs if r.get("stage") == "ppo" and "score" in r}.values())
    evals = list({r["step"]: r for r in recs if r.get("stage") == "ppo_eval"}.values())
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
    for ax, key in zip(axes[:3], ("score", "kl", "beta")):
        ax.plot([r["step"] for r in ppo_recs], [r[key] for r in ppo_recs])
        ax.set_title(key), ax.set_xlabel("PPO iteration")
    axes[3].plot([r["step"] for r in evals], [r["emp_f1"] for r in evals], marker="o")
    axes[3].set_title("validation Emp-F1"), axes[3].set_xlabel("PPO iteration")
    fig.tight_layout()
    tmp = run / "ppo_curves.png.tmp"
    fig.savefig(tmp, format="png", dpi=90)
    os.replace(tmp, run / "ppo_curves.png")


def stage_eval(cfg, run, env, log):
    """6. SFT and EmpRL on the ED test split, decoded like the authors; results.json and results.md."""
    t0 = time.time()
    device, autocast, tok = env["device"], env["autocast"], env["tok"]
    test, test_levels = env["encoded"]["test"], env["labels"]["test"].numpy()
    identifiers = load_identifiers(run / "identifiers.pt", device)
    results, texts = {}, {}
    for name in ("sft", "emprl"):
        model = load_t5(run, name).to(device)
        results[name], texts[name] = emprl.evaluate(model, identifiers, tok, test, test_levels, device, cfg, autocast,
                                                    seed=cfg.eval_seed)
        print(eval_line(f"test {name}", results[name]))
    results["majority"] = emprl.majority_reference(env["labels"]["train"].numpy(), test_levels)
    results["identifiers"] = read_json(run / "identifiers.json")
    results["config"] = dataclasses.asdict(cfg)
    results["time_s"] = {**read_json(run / "stages.json", {}), "eval": time.time() - t0}
    results["n_test"] = len(test["ctx"])
    samples = [dict(context=tok.decode(test["ctx"][i]), reference=tok.decode(test["tgt"][i]), sft=texts["sft"][i],
                    emprl=texts["emprl"][i]) for i in range(0, len(test["ctx"]), max(1, len(test["ctx"]) // 6))][:6]
    results["samples"] = samples
    write_json(run / "results.json", results)
    data.write_atomic(run / "results.md", results_markdown(results).encode())


def results_markdown(results):
    rows = [("SFT", results["sft"]), ("EmpRL", results["emprl"]), ("majority level", results["majority"])]
    cols = ["emp_f1", "emp_f1_er", "emp_f1_ip", "emp_f1_ex", "reward", "dist_1", "dist_2", "bleu_1", "bleu_2",
            "bleu_3", "bleu_4", "ppl", "length", "unique_frac"]
    out = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, m in rows:
        out.append(f"| {name} | " + " | ".join(f"{m[c]:.2f}" if c in m else "" for c in cols) + " |")
    out += ["", "| context | reference | SFT | EmpRL |", "|---|---|---|---|"]
    esc = lambda s: s.replace("|", "\\|").replace("\n", " ")
    for s in results["samples"]:
        out.append(f"| {esc(s['context'][-160:])} | {esc(s['reference'])} | {esc(s['sft'])} | {esc(s['emprl'])} |")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------------
# main


HF_FILES = ("config.json", "model.safetensors", "spiece.model")


def download_pretrained(name):
    """A HuggingFace hub T5 (e.g. t5-base) as a local directory under ~/.cache/emprl/, downloaded once."""
    dest = Path(os.environ.get("EMPRL_CACHE", Path.home() / ".cache" / "emprl")) / name.replace("/", "--")
    for f in HF_FILES:
        if not (dest / f).exists():
            url = f"https://huggingface.co/{name}/resolve/main/{f}"
            print(f"downloading {url}")
            try:
                data.download(url, dest / f)
            except (OSError, data.DataError) as e:
                raise RunError(f"--pretrained={name}: not a directory, and downloading {url} failed ({e}); "
                               f"download {', '.join(HF_FILES)} into a directory and pass its path") from None
    return dest


def run_pipeline(cfg, preset):
    run = Path(cfg.out_dir)
    check_run_dir(cfg, run)
    run.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dtype == "bfloat16" and device.type == "cuda"
                else nullcontext)
    if cfg.pretrained and not Path(cfg.pretrained).is_dir():
        cfg.pretrained = str(download_pretrained(cfg.pretrained))
    data_dir = data.ensure_data(Path(cfg.data_dir) if cfg.data_dir else data.default_data_dir())
    write_json(run / "config.json", dataclasses.asdict(cfg))
    log = Logger(run)
    log(dict(stage="config", preset=preset, **dataclasses.asdict(cfg)))
    print(f"preset {preset} | device {device} | dtype {dtype} | torch threads {torch.get_num_threads()} | run {run}")
    print("config: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()))
    done = read_json(run / "stages.json", {})
    for i, name in enumerate(STAGES):  # a deleted result: redo the stage that made it, and what was built on it
        missing = [f for f in STAGE_RESULTS[name] if not (run / f).exists()]
        if name in done and missing:
            print(f"[{name}] {', '.join(missing)} missing: redoing '{name}' and the stages after it")
            drop_stages(run, done, i)
            break
    env = dict(device=device, autocast=autocast, data_dir=data_dir)

    def stage(name, fn):
        if name in done:
            print(f"[{name}] done earlier ({done[name]:.0f} s), skipped")
            return None
        if _STOP["requested"]:  # Ctrl-C between two stages
            raise Interrupted(f"the start of stage '{name}'")
        print(f"[{name}]")
        _STOP["stage"] = name
        t0 = time.time()
        out = fn(cfg, run, env, log)
        done[name] = time.time() - t0
        write_json(run / "stages.json", done)
        if device.type == "cuda":  # what the stage needed on the GPU
            peak = torch.cuda.max_memory_allocated() / 2**30
            print(f"[{name}] {done[name]:.0f} s, peak GPU memory {peak:.2f} GiB")
            log(dict(stage=name, seconds=done[name], peak_gpu_gib=peak))
            torch.cuda.reset_peak_memory_stats()
        if _STOP["requested"]:  # Ctrl-C after the stage's last checkpoint
            raise Interrupted(f"the end of stage '{name}'")
        return out

    stage("tokenizer", lambda c, r, e, l: stage_tokenizer(c, r, data_dir))
    try:
        env["tok"] = data.Tokenizer(run / "spiece.model")
    except data.DataError as e:
        raise damaged(run, "spiece.model", str(e).split(": ", 1)[-1].split(";")[0]) from None
    env["encoded"] = load_torch(run / "encoded.pt")
    n = {s: len(v["ctx"]) for s, v in env["encoded"].items()}
    print(f"data: ED train {n['train']} / valid {n['valid']} / test {n['test']} examples | vocab {env['tok'].vocab_size}")
    stage("sft", stage_sft)
    sft_params = sum(p.numel() for p in load_t5(run, "sft").parameters())
    print(f"models: policy T5 {sft_params / 1e6:.2f}M parameters + a linear value head; reference: a frozen "
          f"copy of the SFT model")
    stage("identifiers", stage_identifiers)
    print_identifier_table(read_json(run / "identifiers.json"))  # the test table, whether just made or not
    stage("labels", stage_labels)
    env["labels"] = load_torch(run / "labels.pt")
    stage("ppo", stage_ppo)
    stage("eval", stage_eval)
    print((run / "results.md").read_text())
    print("time per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in read_json(run / "stages.json").items()))


def main(argv):
    signal.signal(signal.SIGINT, _on_sigint)
    resume = f"Resume with the same command: python train.py {shlex.join(argv)}"
    try:
        try:
            cfg, preset = parse_args(argv)
            run_pipeline(cfg, preset)
        finally:  # end the progress bars an exception left open, so the message below gets its own line
            for bar in list(getattr(tqdm, "_instances", ())):
                bar.close()
    except Interrupted as e:
        print(f"interrupted at {e}; checkpoint saved. {resume}")
        sys.exit(130)
    except KeyboardInterrupt:  # a second Ctrl-C, or one in a stage without checkpoints: nothing is half-written
        print(f"\ninterrupted in stage '{_STOP['stage'] or 'start-up'}'; finished stages and checkpoints are kept. "
              f"{resume}")
        sys.exit(130)
    except (RunError, data.DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # the file system said no: which file and why, without a traceback
        where = e.filename or "the run directory"
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            print(f"error: no space left on the device while writing {where}; free some space and "
                  f"rerun the same command (finished stages and checkpoints are kept)", file=sys.stderr)
        else:
            print(f"error: {where}: {e.strerror or e}", file=sys.stderr)
        sys.exit(1)


# ----------------------------------------------------------------------------------------------------
# the run directory: errors, settings, stage outputs, damaged files


class RunError(Exception):
    """A user-facing failure: printed as one line, no traceback."""


class Interrupted(Exception):
    pass


def check_run_dir(cfg, run):
    """Refuse to reuse a run directory made with settings that change results, unless --force; with
    --force, drop the outputs of every stage from the first affected one on."""
    if run.exists() and not run.is_dir():
        raise RunError(f"--out_dir={run} is a file; give a directory")
    saved = run / "config.json"
    if not saved.exists():
        return
    old = read_json(saved)
    new = dataclasses.asdict(cfg)
    diff = sorted(k for k in _FIRST_STAGE if k in old and old[k] != new[k])
    if not diff:
        return
    if not cfg.force:
        raise RunError(f"{run} was made with different settings ({', '.join(f'{k}: {old[k]} -> {new[k]}' for k in diff)}); "
                       f"use a new --out_dir, or --force to rerun the stages they affect")
    first = min(STAGES.index(_FIRST_STAGE[k]) for k in diff)
    drop_stages(run, read_json(run / "stages.json", {}), first)
    print(f"--force: rerunning from stage '{STAGES[first]}' ({', '.join(diff)} changed)")


STAGE_OUTPUTS = {"tokenizer": ["spiece.model", "encoded.pt"], "sft": ["sft", "sft_ckpt.pt"],
                 "identifiers": ["identifiers.pt", "identifiers.json"], "labels": ["labels.pt"],
                 "ppo": ["emprl", "ppo_ckpt.pt", "ppo_curves.png"], "eval": ["results.json", "results.md"]}
# what later stages read: a stage counts as done only while these exist
STAGE_RESULTS = {"tokenizer": ["spiece.model", "encoded.pt"], "sft": ["sft/config.json", "sft/model.safetensors"],
                 "identifiers": ["identifiers.pt", "identifiers.json"], "labels": ["labels.pt"],
                 "ppo": ["emprl/config.json", "emprl/model.safetensors"], "eval": ["results.json", "results.md"]}


def drop_stages(run, done, first):
    """Forget stage number `first` and every later one, deleting their outputs (checkpoints included), so
    they rerun from their beginning: they were computed from what is being redone."""
    for stage in STAGES[first:]:
        done.pop(stage, None)
        for name in STAGE_OUTPUTS[stage]:
            p = run / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    write_json(run / "stages.json", done)


def damaged(run, name, why):
    """The error for a damaged file `name` of the run directory: which file, why, and how to go on."""
    stage = next((s for s, outs in STAGE_OUTPUTS.items() if Path(name).parts[0] in outs), None)
    if name == "config.json":
        then = "this run's settings are then not compared with the earlier ones"
    elif name == "stages.json":
        then = "every stage is then redone, SFT and PPO from their last checkpoints"
    elif name.endswith("_ckpt.pt"):
        then = f"stage '{stage}' then restarts from its beginning"
    else:
        then = f"stage '{stage}' and the stages after it are then redone"
    return RunError(f"{run / name} is damaged ({why}): delete it and rerun the same command; {then}")


# ----------------------------------------------------------------------------------------------------
# small utilities: atomic files, logging, interruption


def write_json(path, obj):
    data.write_atomic(Path(path), json.dumps(obj, indent=1).encode())


def read_json(path, default=None):
    path = Path(path)
    if not path.exists():
        return default
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise damaged(path.parent, path.name, "not JSON") from None
    if not isinstance(obj, dict):  # every JSON file of a run directory holds one object
        raise damaged(path.parent, path.name, f"a JSON {type(obj).__name__}, not an object")
    return obj


def save_torch(path, obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    data.write_atomic(Path(path), buf.getvalue())


def load_torch(path, device="cpu"):
    """A .pt file of the run directory. weights_only: tensors and plain containers only, so a tampered
    file cannot run code while it is unpickled."""
    path = Path(path)
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated, corrupt or tampered with: say which file and what to do
        raise damaged(path.parent, path.name, type(e).__name__) from None


def load_t5(run, name):
    """The T5 saved in run/name (sft or emprl)."""
    try:
        return T5.from_pretrained(run / name)
    except CheckpointError as e:
        raise damaged(run, name, str(e)) from None


class Logger:
    def __init__(self, run):
        self.path = run / "log.jsonl"

    def __call__(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


_STOP = {"requested": False, "stage": None}
CHECKPOINTED = ("sft", "ppo")  # the stages that save checkpoints as they go


def _on_sigint(signum, frame):
    # the other stages have nothing to save (every file is written whole, at its end): they stop at once
    if _STOP["requested"] or _STOP["stage"] not in CHECKPOINTED:  # a second Ctrl-C: leave now
        raise KeyboardInterrupt
    _STOP["requested"] = True
    print("\nCtrl-C: saving a checkpoint at the next safe point (Ctrl-C again to quit at once)", flush=True)


def rng_state():
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return dict(torch=torch.get_rng_state(), numpy=dict(keys=keys.tolist(), pos=pos, has_gauss=has_gauss, gauss=gauss),
                python=random.getstate()[1], cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else None)


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state(("MT19937", np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate((3, tuple(s["python"]), None))
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def linear_schedule(optimizer, total_steps, warmup_steps=0):
    def f(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, 1.0 - (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


if __name__ == "__main__":
    main(sys.argv[1:])
