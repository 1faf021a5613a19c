"""Train EmpRL end to end: tokenizer -> SFT -> identifiers -> labels -> PPO -> eval.

    python train.py                                    # preset `gpu` with CUDA, `cpu` without
    python train.py --preset=tiny --out_dir=runs/tiny
    python train.py --preset=cpu --out_dir=runs/seed1 --from_run=runs/cpu --ppo_seed=1

Every stage writes its results into the run directory (--out_dir) and is skipped when the command is rerun;
SFT and PPO resume from their last periodic checkpoint. Any `--key=value` overrides a field of Config.

The fields of Config are declared in pipeline order, one section per stage, and a field belongs to the stage of
its section: changing it changes that stage's results and everything after it. So a rerun in the same
directory with changed fields is refused, and `--from_run=DIR` starts a new run that copies DIR's results of
every stage before the first one a changed field belongs to (a new PPO seed reuses tokenizer, SFT model,
identifiers and labels; a new decoding seed reuses the EmpRL model too).
"""
import dataclasses
import errno
import io
import json
import os
import shlex
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data
import emprl
import ppo
import reward
from t5 import T5, T5Config, CheckpointError, atomic_write


@dataclass
class Config:
    # --- run: where and how; changes no result, never compared between runs
    out_dir: str = "runs/emprl"  # the run directory: results, checkpoints, log
    data_dir: str = ""  # ED + EPITOME; "" = $EMPRL_DATA, else ~/.cache/emprl/data (downloaded if absent)
    from_run: str = ""  # an earlier run directory whose still-valid stages are copied instead of recomputed
    device: str = "auto"  # auto | cpu | cuda
    max_nonfinite: int = 20  # SFT steps or PPO iterations in a row with non-finite numbers before the run stops
    # --- tokenizer stage: data, vocabulary, the starting checkpoint
    seed: int = 1337  # tokenizer, model init, SFT data order, EPITOME split, identifiers
    pretrained: str = ""  # HF T5 dir or hub name (t5-base): its weights and spiece.model; "" = ours from scratch
    vocab_size: int = 8000  # our SentencePiece vocabulary (ignored with `pretrained`)
    max_context_tokens: int = 200  # context cut from the left (oldest tokens dropped)
    max_target_tokens: int = 50  # reference replies cut from the right
    limit_train: int = 0  # only the first N ED train examples (0 = all); for quick runs
    limit_valid: int = 0  # the same for ED valid
    limit_test: int = 0  # the same for ED test (0 = the full test split, as reported)
    # --- sft stage: the model (from-scratch sizes, ignored with `pretrained`) and its fine-tuning
    dtype: str = "auto"  # auto (bfloat16 on a GPU that has it, else float32) | float32 | bfloat16; never float16
    d_model: int = 256  # heads of d_model / num_heads dimensions
    d_ff: int = 1024
    num_layers: int = 3  # encoder blocks
    num_decoder_layers: int = 3
    num_heads: int = 8
    feed_forward_proj: str = "relu"  # relu (T5 v1.0) | gated-gelu (v1.1 / FLAN)
    dropout_rate: float = 0.1
    sft_epochs: float = 3.0  # passes over ED train (fractions allowed)
    sft_batch_size: int = 8
    sft_lr: float = 1e-4  # AdamW, linear warm-up then linear decay to 0
    sft_warmup_steps: int = 0
    sft_weight_decay: float = 0.0
    sft_eval_every: int = 1000  # steps between validation checks (the best model is kept) and checkpoints
    sft_limit_valid: int = 1000  # validation examples per check (0 = all)
    # --- identifiers stage: ER, IP, EX trained on EPITOME
    ident_init: str = "sft"  # encoders start from: sft (our SFT encoder) | pretrained | scratch
    ident_ctx_tokens: int = 128  # identifier context: the last N context tokens
    ident_resp_tokens: int = 64  # identifier response cut
    ident_epochs: int = 6
    ident_batch_size: int = 32
    ident_lr: float = 1e-4
    ident_class_weights: bool = False  # inverse-frequency class weights in the loss
    ident_patience: int = 2  # epochs without validation macro-F1 gain before stopping
    ident_limit_pairs: int = 0  # only the first N EPITOME pairs of each split (0 = all); for tests
    # --- labels stage: the target levels y* of ED replies
    label_limit_train: int = 0  # label only the first N ED train targets (0 = all): PPO's context pool
    # --- ppo stage
    ppo_steps: int = 200  # PPO iterations, each on `ppo_batch_size` contexts
    ppo_seed: int = 0  # rollouts and minibatch order; vary it to measure the spread
    ppo_batch_size: int = 32  # rollouts per iteration
    ppo_mini_batch_size: int = 8
    ppo_grad_accum: int = 1  # minibatches whose gradients make one optimizer update
    ppo_epochs: int = 4
    ppo_lr: float = 1e-5  # Adam, linear decay to 0 over the run
    ppo_clip_range: float = 0.2  # ε of the clipped ratio
    ppo_clip_range_value: float = 0.2  # value clipping around the old values
    ppo_vf_coef: float = 0.1
    ppo_gamma: float = 1.0
    ppo_lam: float = 0.95
    ppo_max_grad_norm: float = 1.0
    ppo_ratio_threshold: float = 10.0  # skip a minibatch whose mean ratio is above this
    init_kl_coef: float = 0.2  # β at the start (0 = no KL penalty)
    adaptive_kl: bool = True  # Ziegler et al.'s controller; false = fixed β
    kl_target: float = 6.0  # nats summed over the reply
    kl_horizon: int = 10000
    kl_estimator: str = "k1"  # per-token KL: k1 = log π - log π_ref | k3 = (ρ-1) - log ρ (see ppo.py)
    kl_min: float = 0.0  # per-token KL penalty clamped to [kl_min, kl_max] nats (non-negative and bounded)
    kl_max: float = 10.0
    score_norm: bool = True  # normalise scores by their running mean / std
    whiten_rewards: bool = True  # scale-only whitening of the per-token rewards
    reward_mechanisms: str = "er,ip,ex"  # mechanisms in the reward; drop one for an ablation
    ppo_temperature: float = 0.9  # rollout temperature (the same τ scores every log-prob)
    ppo_min_new_tokens: int = 5
    ppo_max_new_tokens: int = 30
    ppo_dropout: bool = False  # dropout in the policy during PPO
    ppo_eval_every: int = 50  # iterations between validation evaluations (and printed sample dialogues)
    ppo_limit_valid: int = 256  # validation examples per evaluation
    ppo_save_every: int = 10  # iterations between checkpoints
    # --- eval stage
    eval_batch_size: int = 64  # also the batch of every other inference (validation, labels)
    eval_seed: int = 42  # decoding seed, as the authors


PRESETS = {
    # tests: a few hundred examples, a very small model; end to end in about ten seconds on 2 CPU cores
    "tiny": dict(vocab_size=600, limit_train=400, limit_valid=64, limit_test=64, ident_limit_pairs=200,
                 d_model=64, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
                 sft_epochs=1.0, sft_batch_size=16, sft_lr=1e-3, sft_eval_every=10, sft_limit_valid=64,
                 ident_epochs=1, ident_ctx_tokens=64, ident_resp_tokens=32, ppo_steps=4, ppo_batch_size=8,
                 ppo_mini_batch_size=4, ppo_epochs=2, ppo_max_new_tokens=12, ppo_eval_every=2, ppo_limit_valid=16,
                 ppo_save_every=1, eval_batch_size=32),
    # the default without a GPU: full data, a small T5 from scratch, our own 8k SentencePiece vocabulary
    # (identifier settings from benchmarks/bench_identifiers.py; PPO's the stable setting in docs/method.md)
    "cpu": dict(sft_epochs=2.0, sft_batch_size=32, sft_lr=1e-3, sft_warmup_steps=200, sft_eval_every=500,
                ident_init="scratch", ident_lr=3e-4, ident_class_weights=True, ident_epochs=5,
                label_limit_train=12000, ppo_steps=200, ppo_lr=3e-5, adaptive_kl=False, init_kl_coef=0.5),
    # the default with CUDA: the authors' settings on pretrained t5-base
    "gpu": dict(pretrained="t5-base", ident_init="pretrained", sft_epochs=3.0, sft_batch_size=8, sft_lr=1e-4,
                sft_eval_every=2000, ident_batch_size=16, ident_lr=2e-5, ppo_steps=1000, ppo_lr=1e-5),
}

STAGES = ("tokenizer", "sft", "identifiers", "labels", "ppo", "eval")
SECTIONS = {"seed": "tokenizer", "dtype": "sft", "ident_init": "identifiers", "label_limit_train": "labels",
            "ppo_steps": "ppo", "eval_batch_size": "eval"}  # the first field of each stage's section
STAGE_OF, _stage = {}, None  # field -> the stage of its section (None: the run section)
for _field in dataclasses.fields(Config):
    _stage = STAGE_OF[_field.name] = SECTIONS.get(_field.name, _stage)
# What each stage leaves for the later ones; a stage counts as done while stages.json lists it and these exist.
RESULTS = {"tokenizer": ["spiece.model", "encoded.pt"], "sft": ["sft/model.safetensors"],
           "identifiers": ["identifiers/model.safetensors", "identifiers.json"], "labels": ["labels.pt"],
           "ppo": ["emprl/model.safetensors"], "eval": ["results.json", "results.md"]}


# ----------------------------------------------------------------------------------------------------
# command line


def parse_args(argv):
    """`--preset=NAME` first, then `--key=value` overrides, type-checked against Config's fields."""
    kv = {}
    for arg in argv:
        if not arg.startswith("--"):
            raise RunError(f"unexpected argument {arg!r}: use --key=value (see Config in train.py)")
        key, eq, value = arg[2:].partition("=")
        kv[key] = value if eq else "true"  # --flag is --flag=true
    preset = kv.pop("preset", "gpu" if torch.cuda.is_available() else "cpu")
    if preset not in PRESETS:
        raise RunError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    cfg = Config(**PRESETS[preset])
    for key, value in kv.items():
        if key not in STAGE_OF:
            raise RunError(f"unknown option --{key}: see the fields of Config in train.py")
        typ = type(getattr(cfg, key))
        try:
            if typ is bool and value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            setattr(cfg, key, value.lower() in ("1", "true", "yes") if typ is bool else typ(value))
        except ValueError:
            raise RunError(f"--{key}={value}: expected {typ.__name__}") from None
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        raise RunError(f"--dtype={cfg.dtype}: use auto, float32 or bfloat16 (float16 overflows in T5)")
    if cfg.ident_init not in ("sft", "pretrained", "scratch"):
        raise RunError(f"--ident_init={cfg.ident_init}: use sft, pretrained or scratch")
    if not cfg.reward_mechanisms or set(cfg.reward_mechanisms.split(",")) - set(data.MECHANISMS):
        raise RunError(f"--reward_mechanisms={cfg.reward_mechanisms}: a comma list of {','.join(data.MECHANISMS)}")
    if cfg.ppo_batch_size % cfg.ppo_mini_batch_size:
        raise RunError("--ppo_batch_size must be a multiple of --ppo_mini_batch_size")
    return cfg, preset


def choose_dtype(cfg, device):
    """(dtype, why): bfloat16 autocast on a GPU that supports it, else float32; never float16 (T5 overflows)."""
    if cfg.dtype != "auto":
        return cfg.dtype, "--dtype"
    if device.type != "cuda":
        return "float32", "the CPU computes in float32"
    name = torch.cuda.get_device_name(device)
    if torch.cuda.is_bf16_supported():
        return "bfloat16", f"{name} supports bfloat16"
    return "float32", f"{name} has no bfloat16, and float16 overflows in T5 (TF32 matmuls where the GPU has them)"


# ----------------------------------------------------------------------------------------------------
# the stages, in pipeline order; each reads what the earlier ones left in the run directory `run`


def stage_tokenizer(cfg, run, env):
    """The tokenizer (the pretrained T5's or our own SentencePiece) and every ED split encoded."""
    if cfg.pretrained:
        shutil.copyfile(Path(cfg.pretrained) / "spiece.model", run / "spiece.model")
    else:
        examples = data.load_empathetic_dialogues(env["data_dir"] / "empatheticdialogues" / "train.csv")
        # one role-tagged text per dialogue prefix (so "speaker:"/"listener:" become pieces), plus EPITOME posts
        texts = [data.format_context(ex.context + [ex.target]) for ex in examples[: cfg.limit_train or None]]
        for rec in data.load_epitome(env["data_dir"] / "epitome" / data.EPITOME_FILES["er"]):
            texts += [rec.seeker_post, rec.response_post]
        data.Tokenizer.train(texts, run / "spiece.model", vocab_size=cfg.vocab_size, seed=cfg.seed)
    tok = data.Tokenizer(run / "spiece.model")
    encoded = {}
    for split, limit in (("train", cfg.limit_train), ("valid", cfg.limit_valid), ("test", cfg.limit_test)):
        examples = data.load_empathetic_dialogues(env["data_dir"] / "empatheticdialogues" / f"{split}.csv")
        examples = examples[: limit or None]
        encoded[split] = dict(ctx=[data.encode_context(tok, ex.context, cfg.max_context_tokens) for ex in examples],
                              tgt=[data.encode_target(tok, ex.target, cfg.max_target_tokens) for ex in examples])
    save_torch(run / "encoded.pt", encoded)
    print(f"data: ED train {len(encoded['train']['ctx'])} / valid {len(encoded['valid']['ctx'])} / test "
          f"{len(encoded['test']['ctx'])} examples | vocab {tok.vocab_size}")


def build_model(cfg, vocab_size):
    if cfg.pretrained:
        return T5.from_pretrained(cfg.pretrained)
    return T5(T5Config(vocab_size=vocab_size, d_model=cfg.d_model, d_kv=cfg.d_model // cfg.num_heads, d_ff=cfg.d_ff,
                       num_layers=cfg.num_layers, num_decoder_layers=cfg.num_decoder_layers, num_heads=cfg.num_heads,
                       feed_forward_proj=cfg.feed_forward_proj, dropout_rate=cfg.dropout_rate))


def stage_sft(cfg, run, env):
    """MLE on ED train; the model with the best validation perplexity is kept in run/sft."""
    device, autocast, encoded = env["device"], env["autocast"], read(run / "encoded.pt")
    train, valid = encoded["train"], {k: v[: cfg.sft_limit_valid or None] for k, v in encoded["valid"].items()}
    lengths = [len(c) + len(t) for c, t in zip(train["ctx"], train["tgt"])]
    steps_per_epoch = -(-len(lengths) // cfg.sft_batch_size)
    total = max(1, int(cfg.sft_epochs * steps_per_epoch))
    torch.manual_seed(cfg.seed)  # before the random init
    model = build_model(cfg, read(run / "spiece.model", data.Tokenizer).vocab_size).to(device)
    print(f"sft: T5 of {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    # fused: one kernel updates every parameter (the for-each default launches several per step)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=cfg.sft_weight_decay, fused=True)
    sched = linear_schedule(opt, total, cfg.sft_warmup_steps)
    state = dict(step=0, best=float("inf"), nonfinite=0)
    if (run / "sft_ckpt.pt").exists():  # resume: weights, optimizer, schedule, RNG, position in the data
        ck = read(run / "sft_ckpt.pt")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        set_rng_state(ck["rng"])
        state = ck["state"]
        print(f"sft: resuming at step {state['step']}/{total}")
    bar = tqdm(total=total, initial=state["step"], desc="sft", dynamic_ncols=True)
    t0, n_tokens = time.time(), 0
    while state["step"] < total:
        epoch, pos = divmod(state["step"], steps_per_epoch)
        # the batch order of an epoch is a function of (seed, epoch): a resumed run sees the same batches
        for idx in data.batch_indices(lengths, cfg.sft_batch_size, shuffle=True, seed=cfg.seed + epoch, bucket=True)[pos:]:
            model.train()
            with autocast():
                loss, n = emprl.sft_loss(model, data.make_batch(train, idx, device))
            loss.backward()
            finite = emprl.optimizer_step(model, opt, 1.0)
            sched.step()
            state["step"] += 1
            count_nonfinite(state, finite, cfg, "SFT steps")
            n_tokens += int(n)
            bar.update(1)
            if state["step"] % cfg.sft_eval_every == 0 or state["step"] == total:
                ppl = emprl.perplexity(model, valid, device, cfg.eval_batch_size, autocast)
                rec = dict(stage="sft", step=state["step"], epoch=state["step"] / steps_per_epoch, loss=loss.item(),
                           valid_ppl=ppl, lr=sched.get_last_lr()[0], tokens_per_s=n_tokens / (time.time() - t0))
                log(run, rec)
                tqdm.write(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()))
                if ppl < state["best"]:  # keep the best model by validation perplexity
                    state["best"] = ppl
                    model.save_pretrained(run / "sft")
                save_torch(run / "sft_ckpt.pt", dict(model=model.state_dict(), optimizer=opt.state_dict(),
                                                     scheduler=sched.state_dict(), rng=rng_state(), state=state))
            if state["step"] == total:
                break
    bar.close()
    print(f"sft: best validation perplexity {state['best']:.2f}")


def stage_identifiers(cfg, run, env):
    """ER, IP, EX trained on EPITOME; their test table beside the majority baseline."""
    device, tok = env["device"], read(run / "spiece.model", data.Tokenizer)
    splits = data.load_epitome_splits(env["data_dir"], seed=cfg.seed)
    models, table = [], {}
    for mech in data.MECHANISMS:
        ex = {s: reward.epitome_examples(splits[mech][s][: cfg.ident_limit_pairs or None], tok, cfg.ident_ctx_tokens,
                                         cfg.ident_resp_tokens) for s in splits[mech]}
        torch.manual_seed(cfg.seed)  # the heads' init is random: seeded, a rerun trains the same identifiers
        if cfg.ident_init == "scratch":
            model = reward.EmpathyIdentifier(build_model(cfg, tok.vocab_size).config)
        else:  # both encoders from a T5 that has read text: our SFT model, or the pretrained checkpoint
            model = reward.EmpathyIdentifier.from_t5(read(run / "sft") if cfg.ident_init == "sft" else
                                                     T5.from_pretrained(cfg.pretrained))
        model.to(device)
        t0 = time.time()
        print(f"identifier {mech}: {len(ex['train']['level'])} train / {len(ex['valid']['level'])} valid / "
              f"{len(ex['test']['level'])} test pairs | {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
        hist = reward.train_identifier(model, ex["train"], ex["valid"], epochs=cfg.ident_epochs,
                                       batch_size=cfg.ident_batch_size, lr=cfg.ident_lr,
                                       class_weights=cfg.ident_class_weights, device=device, seed=cfg.seed,
                                       patience=cfg.ident_patience, log=tqdm.write)
        y = np.array(ex["test"]["level"])
        pred = reward.predict(model, ex["test"], cfg.eval_batch_size, device, env["autocast"]).argmax(-1)
        majority = np.full_like(y, np.bincount(ex["train"]["level"], minlength=3).argmax())
        table[mech] = dict(**reward.classification_metrics(y, pred), seconds=time.time() - t0,
                           majority=reward.classification_metrics(y, majority), epochs_run=len(hist["history"]) - 1)
        log(run, dict(stage="identifiers", mechanism=mech, **table[mech]))
        models.append(model.cpu())
    reward.Identifiers(models).save(run / "identifiers")
    write_json(run / "identifiers.json", table)


def stage_labels(cfg, run, env):
    """The identifiers label every ED target reply (cut as EPITOME responses are): the y* of the reward."""
    identifiers, labels = read(run / "identifiers", reward.Identifiers.load).to(env["device"]), {}
    for split, enc in read(run / "encoded.pt").items():
        n = cfg.label_limit_train if split == "train" and cfg.label_limit_train else len(enc["ctx"])
        ctx = [c[-cfg.ident_ctx_tokens:] for c in enc["ctx"][:n]]
        tgt = [data.cut_target(t, cfg.ident_resp_tokens) for t in enc["tgt"][:n]]
        levels, _ = emprl.identifier_levels(identifiers, ctx, tgt, env["device"], cfg.eval_batch_size, env["autocast"])
        labels[split] = torch.as_tensor(levels)
        counts = {m: np.bincount(levels[:, i], minlength=3).tolist() for i, m in enumerate(data.MECHANISMS)}
        print(f"labels {split}: level counts (no/weak/strong) {counts}")
        log(run, dict(stage="labels", split=split, counts=counts))
    save_torch(run / "labels.pt", labels)


def stage_ppo(cfg, run, env):
    """Policy + value head from the SFT model, a frozen reference copy, the empathy reward; PPO iterations."""
    device, autocast, tok = env["device"], env["autocast"], read(run / "spiece.model", data.Tokenizer)
    encoded, labels = read(run / "encoded.pt"), read(run / "labels.pt")
    levels = labels["train"].numpy()
    ctx = encoded["train"]["ctx"][: len(levels)]  # the labelled train examples are the context pool
    pool = dict(ctx=ctx, ident_ctx=[c[-cfg.ident_ctx_tokens:] for c in ctx], levels=levels)
    valid, valid_levels = encoded["valid"], labels["valid"].numpy()
    ref_model = read(run / "sft").to(device).eval().requires_grad_(False)
    policy = emprl.PolicyWithValue(read(run / "sft"), cfg.dropout_rate).to(device)
    identifiers = read(run / "identifiers", reward.Identifiers.load).to(device)
    n_updates = cfg.ppo_steps * cfg.ppo_epochs * -(-cfg.ppo_batch_size // (cfg.ppo_mini_batch_size * cfg.ppo_grad_accum))
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.ppo_lr, fused=True)
    sched = linear_schedule(opt, n_updates)
    kl_ctl = (ppo.AdaptiveKLController(cfg.init_kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
              else ppo.FixedKLController(cfg.init_kl_coef))
    moments, gen = ppo.RunningMoments(), torch.Generator().manual_seed(cfg.ppo_seed)
    state = dict(step=0, nonfinite=0, sft_valid=None)
    torch.manual_seed(cfg.ppo_seed)
    if (run / "ppo_ckpt.pt").exists():  # resume: everything that decides the iterations still to come
        ck = read(run / "ppo_ckpt.pt")
        for obj, key in ((policy, "policy"), (opt, "optimizer"), (sched, "scheduler"), (kl_ctl, "kl_ctl"),
                         (moments, "moments")):
            obj.load_state_dict(ck[key])
        gen.set_state(ck["generator"])
        set_rng_state(ck["rng"])
        state = ck["state"]
        print(f"ppo: resuming at iteration {state['step']}/{cfg.ppo_steps}")

    def evaluate(model):
        return emprl.evaluate(model, identifiers, tok, valid, valid_levels, device, cfg, autocast,
                              n=cfg.ppo_limit_valid, seed=cfg.eval_seed)[0]
    if state["sft_valid"] is None:  # the SFT model on the same validation subset, once, as the reference line
        state["sft_valid"] = evaluate(ref_model)
        print(eval_line("valid sft", state["sft_valid"]))
    bar = tqdm(total=cfg.ppo_steps, initial=state["step"], desc="ppo", dynamic_ncols=True)
    while state["step"] < cfg.ppo_steps:
        # the contexts of iteration i: a seeded permutation of the pool per pass, consumed in order
        epoch, offset = divmod(state["step"] * cfg.ppo_batch_size, len(ctx))
        order = np.concatenate([np.random.default_rng(cfg.ppo_seed + epoch + k).permutation(len(ctx)) for k in (0, 1)])
        idx = order[offset: offset + cfg.ppo_batch_size].tolist()
        stats, roll = emprl.ppo_iteration(policy, ref_model, identifiers, opt, sched, kl_ctl, moments,
                                          data.make_batch(pool, idx, device), cfg, autocast, gen)
        state["step"] += 1
        bar.update(1)
        log(run, dict(stage="ppo", step=state["step"], **stats))
        if "score" in stats:
            tqdm.write(ppo_line(state["step"], cfg.ppo_steps, stats))
        finite = "nonfinite_scores" not in stats and stats["skipped_nonfinite"] == 0
        if not finite:
            tqdm.write(f"ppo {state['step']:>4}/{cfg.ppo_steps} | non-finite: {stats.get('nonfinite_scores', 0)} "
                       f"scores (whole update skipped), {stats.get('skipped_nonfinite', 0)} updates skipped")
        count_nonfinite(state, finite, cfg, "PPO iterations")
        if state["step"] % cfg.ppo_eval_every == 0 or state["step"] == cfg.ppo_steps:
            for i in range(2):
                tqdm.write(f"  context: {tok.decode(ctx[idx[i]])[-200:]}\n  reply:   {tok.decode(roll['replies'][i])}")
            m = evaluate(policy.model)
            log(run, dict(stage="ppo_eval", step=state["step"], **m))
            tqdm.write(eval_line(f"valid emprl@{state['step']}", m) + f"   (sft {state['sft_valid']['emp_f1']:.2f})")
        if state["step"] % cfg.ppo_save_every == 0 or state["step"] == cfg.ppo_steps:
            save_torch(run / "ppo_ckpt.pt", dict(policy=policy.state_dict(), optimizer=opt.state_dict(),
                                                 scheduler=sched.state_dict(), kl_ctl=kl_ctl.state_dict(),
                                                 moments=moments.state_dict(), generator=gen.get_state(),
                                                 rng=rng_state(), state=state))
    bar.close()
    policy.model.save_pretrained(run / "emprl")


def ppo_line(step, total, s):
    keys = [("score", ".3f"), ("kl", ".3f"), ("beta", ".3f"), ("pg_loss", ".4f"), ("vf_loss", ".4f"),
            ("approx_kl", ".4f"), ("clipfrac", ".3f"), ("explained_var", ".3f"), ("length", ".1f"), ("seconds", ".1f")]
    return f"ppo {step:>4}/{total} | " + " | ".join(f"{k} {s[k]:{fmt}}" for k, fmt in keys)


def eval_line(name, m):
    return (f"{name}: emp_f1 {m['emp_f1']:.2f} (er {m['emp_f1_er']:.1f} ip {m['emp_f1_ip']:.1f} ex {m['emp_f1_ex']:.1f})"
            f" | reward {m['reward']:.3f} | dist_2 {m['dist_2']:.1f} | ppl {m['ppl']:.1f} | length {m['length']:.1f}"
            f" | unique {m['unique_frac']:.2f}")


def stage_eval(cfg, run, env):
    """SFT and EmpRL on the ED test split, decoded like the authors; results.json and results.md."""
    t0, tok, labels = time.time(), read(run / "spiece.model", data.Tokenizer), read(run / "labels.pt")
    test, test_levels = read(run / "encoded.pt")["test"], labels["test"].numpy()
    identifiers = read(run / "identifiers", reward.Identifiers.load).to(env["device"])
    results, texts = {}, {}
    for name in ("sft", "emprl"):
        results[name], texts[name] = emprl.evaluate(read(run / name).to(env["device"]), identifiers, tok, test,
                                                    test_levels, env["device"], cfg, env["autocast"], seed=cfg.eval_seed)
        print(eval_line(f"test {name}", results[name]))
    results["majority"] = emprl.majority_reference(labels["train"].numpy(), test_levels)
    results.update(identifiers=read_json(run / "identifiers.json"), config=dataclasses.asdict(cfg),
                   time_s={**read_json(run / "stages.json"), "eval": time.time() - t0}, n_test=len(test["ctx"]))
    every = max(1, len(test["ctx"]) // 6)
    results["samples"] = [dict(context=tok.decode(test["ctx"][i]), reference=tok.decode(test["tgt"][i]),
                               sft=texts["sft"][i], emprl=texts["emprl"][i]) for i in range(0, len(test["ctx"]), every)][:6]
    write_json(run / "results.json", results)
    atomic_write(run / "results.md", results_markdown(results).encode())


def results_markdown(results):
    cols = ["emp_f1", "emp_f1_er", "emp_f1_ip", "emp_f1_ex", "reward", "dist_1", "dist_2", "bleu_1", "bleu_2",
            "bleu_3", "bleu_4", "ppl", "length", "unique_frac"]
    out = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, m in (("SFT", results["sft"]), ("EmpRL", results["emprl"]), ("majority level", results["majority"])):
        out.append(f"| {name} | " + " | ".join(f"{m[c]:.2f}" if c in m else "" for c in cols) + " |")
    out += ["", "| identifier | accuracy | macro-F1 | weighted-F1 | majority acc | majority macro-F1 |", "|---" * 6 + "|"]
    for mech, m in results["identifiers"].items():
        out.append(f"| {mech.upper()} | {m['acc']:.3f} | {m['macro_f1']:.3f} | {m['weighted_f1']:.3f} | "
                   f"{m['majority']['acc']:.3f} | {m['majority']['macro_f1']:.3f} |")
    out += ["", "| context | reference | SFT | EmpRL |", "|---|---|---|---|"]
    for s in results["samples"]:
        cells = [s["context"][-160:], s["reference"], s["sft"], s["emprl"]]
        out.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------------
# main


def run_pipeline(cfg, preset):
    run = Path(cfg.out_dir)
    if run.exists() and not run.is_dir():
        raise RunError(f"--out_dir={run} is a file; give a directory")
    check_settings(cfg, run)
    run.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else torch.device(cfg.device)
    dtype, why = choose_dtype(cfg, device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # float32 on GPUs with TF32
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if dtype == "bfloat16" else nullcontext
    if cfg.pretrained and not Path(cfg.pretrained).is_dir():
        cfg.pretrained = str(download_pretrained(cfg.pretrained))
    env = dict(device=device, autocast=autocast, data_dir=data.ensure_data(cfg.data_dir or None))
    if cfg.from_run and not (run / "stages.json").exists():
        reuse_stages(cfg, run, Path(cfg.from_run))
    write_json(run / "config.json", dataclasses.asdict(cfg))
    log(run, dict(stage="config", preset=preset, **dataclasses.asdict(cfg)))
    print(f"preset {preset} | device {device} | {dtype} ({why}) | torch threads {torch.get_num_threads()} | run {run}")
    print("config: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()))
    done = read_json(run / "stages.json") if (run / "stages.json").exists() else {}
    for i, stage in enumerate(STAGES):
        if stage in done and not all((run / f).exists() for f in RESULTS[stage]):  # a result was deleted
            print(f"[{stage}] a result is missing: redoing '{stage}' and the stages after it")
            forget_stages(run, done, i)
        if stage in done:
            print(f"[{stage}] done earlier ({done[stage]:.0f} s), skipped")
            continue
        print(f"[{stage}]")
        t0 = time.time()
        globals()[f"stage_{stage}"](cfg, run, env)
        done[stage] = time.time() - t0
        write_json(run / "stages.json", done)
        (run / f"{stage}_ckpt.pt").unlink(missing_ok=True)  # finished: its results supersede the checkpoint
        if device.type == "cuda":  # what the stage needed on the GPU
            peak = torch.cuda.max_memory_allocated() / 2**30
            print(f"[{stage}] {done[stage]:.0f} s, peak GPU memory {peak:.2f} GiB")
            log(run, dict(stage=stage, seconds=done[stage], peak_gpu_gib=peak))
            torch.cuda.reset_peak_memory_stats()
    print((run / "results.md").read_text())
    print("time per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in done.items()))


def main(argv):
    resume = f"Resume with the same command: python train.py {shlex.join(argv)}"
    try:
        try:
            run_pipeline(*parse_args(argv))
        finally:  # end the progress bars an exception left open, so the message below gets its own line
            for bar in list(getattr(tqdm, "_instances", ())):
                bar.close()
    except KeyboardInterrupt:  # Ctrl-C: every file is whole (atomic writes); SFT and PPO go on from their checkpoint
        print(f"\ninterrupted; finished stages and the last checkpoint are kept. {resume}")
        sys.exit(130)
    except (RunError, data.DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # the file system said no: which file and why, without a traceback
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            print(f"error: no space left on the device while writing {e.filename}; free some space and rerun "
                  f"the same command (finished stages and checkpoints are kept)", file=sys.stderr)
        else:
            print(f"error: {e.filename or 'the run directory'}: {e.strerror or e}", file=sys.stderr)
        sys.exit(1)


# ----------------------------------------------------------------------------------------------------
# the run directory: settings, reuse, damaged files, small helpers


class RunError(Exception):
    """A user-facing failure: printed as one line, no traceback."""


def changed_fields(old, new):
    """The fields (outside the run section) whose values differ between two configs, as "name: old -> new"."""
    return {k: f"{k}: {old.get(k)} -> {new[k]}" for k in new if STAGE_OF.get(k) and old.get(k) != new[k]}


def check_settings(cfg, run):
    """Refuse to continue a run directory made with settings that change results."""
    if not (run / "config.json").exists():
        return
    changed = changed_fields(read_json(run / "config.json"), dataclasses.asdict(cfg))
    if changed:
        first = STAGES[min(STAGES.index(STAGE_OF[k]) for k in changed)]
        raise RunError(f"{run} was made with other settings ({'; '.join(changed.values())}); use a new --out_dir, "
                       f"with --from_run={run} to reuse its stages before '{first}'")


def reuse_stages(cfg, run, source):
    """Copy from an earlier run the results of its finished stages that come before the first stage a changed
    field belongs to; they are recorded done here with their original times."""
    if not (source / "config.json").exists():
        raise RunError(f"--from_run={source}: not a run directory (no config.json)")
    changed = changed_fields(read_json(source / "config.json"), dataclasses.asdict(cfg))
    first = min([STAGES.index(STAGE_OF[k]) for k in changed] + [len(STAGES)])
    source_done = read_json(source / "stages.json") if (source / "stages.json").exists() else {}
    done = {}
    for stage in STAGES[:first]:
        if stage not in source_done or not all((source / f).exists() for f in RESULTS[stage]):
            break
        for name in {Path(f).parts[0] for f in RESULTS[stage]}:  # a file, or a model directory
            copy = shutil.copytree if (source / name).is_dir() else shutil.copyfile
            copy(source / name, run / name)
        done[stage] = source_done[stage]
    write_json(run / "stages.json", done)
    print(f"--from_run={source}: reusing {', '.join(done) or 'nothing'} "
          f"({'; '.join(changed.values()) or 'no field'} changed)")


def forget_stages(run, done, first):
    """Forget stage number `first` and every later one, deleting their results and checkpoints."""
    for stage in STAGES[first:]:
        done.pop(stage, None)
        for name in {Path(f).parts[0] for f in RESULTS[stage]} | {f"{stage}_ckpt.pt"}:
            shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink(missing_ok=True)
    write_json(run / "stages.json", done)


def read(path, load=None):
    """A file or model directory of the run, read by `load` (default: load_torch, or T5.from_pretrained for a
    directory); a damaged one stops the run with one line saying which and what to do."""
    path = Path(path)
    load = load or (T5.from_pretrained if path.suffix == "" else load_torch)
    try:
        return load(path)
    except ValueError as e:  # a CheckpointError, DataError or JSONDecodeError
        raise RunError(f"{path} is damaged ({str(e).removeprefix(f'{path}: ')}): delete it and rerun the same "
                       f"command; the stage that wrote it is redone") from None


def load_torch(path):
    """torch.load with weights_only (tensors and plain containers only: a tampered file cannot run code), on the
    CPU (RNG states must be CPU tensors; load_state_dict moves the rest)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # missing, truncated, corrupt or tampered with
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__})") from None


def save_torch(path, obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, buf.getvalue())


def read_json(path):
    """A JSON object of the run directory (config.json, stages.json, identifiers.json)."""
    def load(path):
        obj = json.loads(path.read_text())
        if not isinstance(obj, dict):
            raise ValueError(f"a JSON {type(obj).__name__}, not an object")
        return obj
    return read(path, load)


def write_json(path, obj):
    atomic_write(path, json.dumps(obj, indent=1).encode())


def log(run, record):
    """Append one record to log.jsonl (append-only: a line cut short by a kill is skipped when read)."""
    with open(run / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def count_nonfinite(state, finite, cfg, what):
    """The one counter of non-finite updates: `max_nonfinite` in a row stop the run instead of training on garbage."""
    state["nonfinite"] = 0 if finite else state["nonfinite"] + 1
    if state["nonfinite"] >= cfg.max_nonfinite:
        raise RunError(f"{state['nonfinite']} {what} in a row with non-finite losses, rewards or gradients: the run "
                       f"is diverging (lower the learning rate, or use --dtype=float32)")


def rng_state():
    """The RNG streams the stages draw from: torch's (dropout, sampling, init) and CUDA's."""
    return dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def linear_schedule(optimizer, total_steps, warmup_steps=0):
    def f(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, 1.0 - (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


def download_pretrained(name):
    """A HuggingFace hub T5 (e.g. t5-base) as a local directory under ~/.cache/emprl/, downloaded once."""
    dest = Path(os.environ.get("EMPRL_CACHE", Path.home() / ".cache" / "emprl")) / name.replace("/", "--")
    for f in ("config.json", "model.safetensors", "spiece.model"):
        if not (dest / f).exists():
            url = f"https://huggingface.co/{name}/resolve/main/{f}"
            print(f"downloading {url}")
            try:
                atomic_write(dest / f, data.fetch(url))
            except data.DataError as e:
                raise RunError(f"--pretrained={name}: not a directory, and {e}; download config.json, "
                               f"model.safetensors and spiece.model into a directory and pass its path") from None
    return dest


if __name__ == "__main__":
    main(sys.argv[1:])
