"""Train EmpRL end to end: tokenizer -> SFT -> identifiers -> labels -> PPO -> eval.

    python train.py                                    # preset `gpu` with CUDA, `cpu` without
    python train.py --preset=tiny --out_dir=runs/tiny  # any --key=value overrides a field of Config
    python train.py --preset=cpu --out_dir=runs/seed1 --from_run=runs/cpu --ppo_seed=1

Every stage writes its results into the run directory and is skipped when the command is rerun; SFT
and PPO resume from their last checkpoint. Every field of Config belongs to one stage
(FIELDS_OF_STAGE) and changes it and every later one: a rerun with changed fields is refused,
--from_run=DIR copies DIR's results of the stages before."""

import dataclasses
import datetime
import errno
import os
import platform
import shlex
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data
import emprl
import ppo
import reward
from judge import Judge
from rundir import (
    RunError,
    code_version,
    copy,
    hold,
    load_checkpoint,
    log,
    rank,
    read,
    remove,
    save_checkpoint,
    wait_for_stage,
    write,
)
from t5 import T5, CheckpointError, T5Config, atomic_write


@dataclasses.dataclass
class Config:
    # --- run: where and how; changes no result, never compared between runs
    out_dir: str = "runs/emprl"  # the run directory: results, checkpoints, log
    # ED + EPITOME; "" = $EMPRL_DATA, else ~/.cache/emprl/data (downloaded if absent)
    data_dir: str = ""
    # an earlier run directory whose still-valid stages are copied instead of recomputed
    from_run: str = ""
    device: str = "auto"  # auto | cpu | cuda
    # torchrun: how long a collective waits, e.g. for rank 0's checkpoint or download
    dist_timeout_min: int = 30
    # SFT steps or PPO iterations in a row with non-finite numbers before the run stops
    max_nonfinite: int = 20
    # --- tokenizer stage: data, vocabulary, the starting checkpoint
    seed: int = 1337  # tokenizer, model init, SFT data order, EPITOME split, identifiers
    # a HF T5 directory (config.json, model.safetensors, spiece.model); "" = ours from scratch
    pretrained: str = ""
    vocab_size: int = 8000  # our SentencePiece vocabulary (ignored with `pretrained`)
    max_context_tokens: int = 200  # context cut from the left (oldest tokens dropped)
    max_target_tokens: int = 50  # reference replies cut from the right
    limit_train: int = 0  # only the first N ED train examples (0 = all); for quick runs
    limit_valid: int = 0  # the same for ED valid
    limit_test: int = 0  # the same for ED test (0 = the full test split, as reported)
    # --- sft stage: the model (from-scratch sizes, ignored with `pretrained`) and its fine-tuning
    # auto (bfloat16 on a GPU that has it, else float32) | float32 | bfloat16; never float16
    dtype: str = "auto"
    d_model: int = 256  # heads of d_model / num_heads dimensions
    d_ff: int = 1024
    num_layers: int = 3  # blocks in the encoder and in the decoder
    num_heads: int = 8
    dropout_rate: float = 0.1
    sft_epochs: float = 3.0  # passes over ED train (fractions allowed)
    sft_batch_size: int = 8
    sft_lr: float = 1e-4  # AdamW, linear warm-up then linear decay to 0
    sft_warmup_steps: int = 0
    # steps between validation checks (the best model is kept) and checkpoints
    sft_eval_every: int = 1000
    sft_limit_valid: int = 1000  # validation examples per check (0 = all)
    # --- identifiers stage: ER, IP, EX trained on EPITOME
    ident_init: str = "sft"  # encoders start from: sft (our SFT encoder) | pretrained | scratch
    ident_ctx_tokens: int = 128  # identifier context: the last N context tokens
    ident_resp_tokens: int = 64  # identifier response cut
    ident_epochs: int = 6
    ident_batch_size: int = 32
    ident_lr: float = 1e-4
    ident_class_weights: bool = False  # inverse-frequency class weights in the loss
    ident_limit_pairs: int = 0  # only the first N EPITOME pairs of each split (0 = all); for tests
    # --- labels stage: the target levels y* of ED replies
    # label only the first N ED train targets (0 = all): PPO's context pool
    label_limit_train: int = 0
    # --- ppo stage
    ppo_steps: int = 200  # iterations, each of `ppo_batch_size` rollouts
    # ppo (value head + GAE) | rloo (leave-one-out baseline) | grpo (group-standardised scores)
    algo: str = "ppo"
    # GRPO's loss: reply (mean over each reply's tokens, then over replies) | token
    grpo_loss: str = "reply"
    # RLOO and GRPO: replies sampled per context (ppo_batch_size / rloo_k contexts an iteration)
    rloo_k: int = 4
    ppo_seed: int = 0  # rollouts and minibatch order; vary it to measure the spread
    ppo_batch_size: int = 32  # rollouts per iteration
    ppo_mini_batch_size: int = 8
    ppo_grad_accum: int = 1  # minibatches whose gradients make one optimizer update
    ppo_epochs: int = 4
    ppo_lr: float = 1e-5  # Adam, linear decay to 0 over ppo_lr_decay_steps iterations
    # 0 = ppo_steps (the authors decay over 3 passes of the data, evaluate earlier)
    ppo_lr_decay_steps: int = 0
    ppo_clip_range: float = 0.2  # ε of the clipped ratio
    ppo_vf_coef: float = 0.1
    ppo_lam: float = 0.95
    init_kl_coef: float = 0.2  # β at the start (0 = no KL penalty)
    adaptive_kl: bool = True  # Ziegler et al.'s controller; false = fixed β
    kl_target: float = 6.0  # nats summed over the reply
    kl_horizon: int = 10000
    # per-token KL: k1 = log π - log π_ref | k3 = (ρ-1) - log ρ (see ppo.py)
    kl_estimator: str = "k1"
    # per-token KL penalty clamped to [kl_min, kl_max] nats (non-negative and bounded)
    kl_min: float = 0.0
    kl_max: float = 10.0
    score_norm: bool = True  # normalise scores by their running mean / std
    whiten_rewards: bool = True  # scale-only whitening of the per-token rewards
    reward_mechanisms: str = "er,ip,ex"  # mechanisms in the reward; drop one for an ablation
    ppo_temperature: float = 0.9  # rollout temperature (the same τ scores every log-prob)
    ppo_min_new_tokens: int = 5
    ppo_max_new_tokens: int = 30
    ppo_dropout: bool = False  # dropout in the policy during PPO
    # iterations between validation evaluations, sample dialogues and checkpoints
    ppo_eval_every: int = 50
    ppo_limit_valid: int = 256  # validation examples per evaluation
    # --- eval stage
    eval_batch_size: int = 64  # also the batch of every other inference (validation, labels)
    eval_seed: int = 42  # decoding seed, as the authors


PRESETS = {
    # tests: a few hundred examples, a very small model; end to end in about ten seconds on 2 CPU
    # cores; float32 whatever the CPU, so that the tests see the same numbers on every machine
    "tiny": dict(
        dtype="float32",
        vocab_size=600,
        limit_train=400,
        limit_valid=64,
        limit_test=64,
        d_model=64,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        sft_epochs=1.0,
        sft_batch_size=16,
        sft_lr=1e-3,
        sft_eval_every=10,
        sft_limit_valid=64,
        ident_epochs=1,
        ident_ctx_tokens=64,
        ident_resp_tokens=32,
        ident_limit_pairs=200,
        ppo_steps=4,
        ppo_batch_size=8,
        ppo_mini_batch_size=4,
        ppo_epochs=2,
        ppo_max_new_tokens=12,
        ppo_eval_every=1,
        ppo_limit_valid=16,
        eval_batch_size=32,
    ),
    # the default without a GPU: full data, a small T5 from scratch, our own 8k SentencePiece
    # vocabulary (identifier settings from benchmarks/bench_identifiers.py; PPO's the stable setting
    # in docs/emprl.md)
    "cpu": dict(
        sft_epochs=2.0,
        sft_batch_size=32,
        sft_lr=1e-3,
        sft_warmup_steps=200,
        sft_eval_every=500,
        ident_init="scratch",
        ident_lr=3e-4,
        ident_class_weights=True,
        ident_epochs=5,
        label_limit_train=12000,
        ppo_steps=200,
        ppo_lr=3e-5,
        adaptive_kl=False,
        init_kl_coef=0.5,
    ),
    # the default with CUDA: the authors' settings (Config's defaults) on pretrained t5-base; PPO
    # makes 4 updates of 32 rollouts an iteration, lr decays over 3 passes of ED train (3,774
    # iterations), stopped at 1,600
    "gpu": dict(
        pretrained="models/t5-base",
        ident_init="pretrained",
        sft_eval_every=2000,
        ident_batch_size=16,
        ident_lr=2e-5,
        ppo_steps=1600,
        ppo_lr_decay_steps=3774,
        ppo_grad_accum=4,
    ),
    # a first real run on a 16 GB GPU or in a lab session: pretrained t5-small, one SFT epoch, fewer
    # iterations
    "small": dict(
        pretrained="models/t5-small",
        ident_init="pretrained",
        sft_epochs=1.0,
        sft_batch_size=32,
        sft_lr=3e-4,
        sft_eval_every=500,
        ident_lr=1e-4,
        ident_epochs=4,
        label_limit_train=12000,
        ppo_steps=400,
        ppo_grad_accum=4,
        ppo_lr=1e-5,
    ),
}

CHOICES = dict(
    dtype=("auto", "float32", "bfloat16"),
    ident_init=("sft", "pretrained", "scratch"),
    kl_estimator=("k1", "k3"),
    algo=("ppo", "rloo", "grpo"),
    grpo_loss=("reply", "token"),
)
BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
STAGES = ("tokenizer", "sft", "identifiers", "labels", "ppo", "eval")
# The stage each field belongs to: changing it changes that stage's results and every later stage's.
# "run" fields change no result and are never compared. A field of Config missing here, or named
# twice, stops the import.
FIELDS_OF_STAGE = {
    "run": "out_dir data_dir from_run device dist_timeout_min max_nonfinite",
    "tokenizer": "seed pretrained vocab_size max_context_tokens max_target_tokens limit_train "
    "limit_valid limit_test",
    "sft": "dtype d_model d_ff num_layers num_heads dropout_rate sft_epochs sft_batch_size "
    "sft_lr sft_warmup_steps "
    "sft_eval_every sft_limit_valid",
    "identifiers": "ident_init ident_ctx_tokens ident_resp_tokens ident_epochs ident_batch_size "
    "ident_lr "
    "ident_class_weights ident_limit_pairs",
    "labels": "label_limit_train",
    "ppo": "ppo_steps algo grpo_loss rloo_k ppo_seed ppo_batch_size ppo_mini_batch_size "
    "ppo_grad_accum ppo_epochs "
    "ppo_lr ppo_lr_decay_steps ppo_clip_range ppo_vf_coef ppo_lam init_kl_coef "
    "adaptive_kl kl_target "
    "kl_horizon kl_estimator kl_min kl_max score_norm whiten_rewards reward_mechanisms "
    "ppo_temperature "
    "ppo_min_new_tokens ppo_max_new_tokens ppo_dropout ppo_eval_every ppo_limit_valid",
    "eval": "eval_batch_size eval_seed",
}
# field -> stage
STAGE_OF = {name: stage for stage, names in FIELDS_OF_STAGE.items() for name in names.split()}
STAGE_OF.update({name: None for name in FIELDS_OF_STAGE["run"].split()})  # None: compared in no run
if sorted(" ".join(FIELDS_OF_STAGE.values()).split()) != sorted(
    f.name for f in dataclasses.fields(Config)
):
    raise AssertionError("FIELDS_OF_STAGE must name every field of Config exactly once")
# a stage is done while stages.json lists it and these files exist
RESULTS = {
    "tokenizer": ["spiece.model", "encoded.pt"],
    "sft": ["sft/model.safetensors"],
    "labels": ["labels.pt"],
    "identifiers": ["identifiers/model.safetensors", "identifiers.json", "judge.pt"],
    "ppo": ["emprl/model.safetensors"],
    "eval": ["results.json", "results.md"],
}


# ------------------------------------------------------------------------------------- command line


def parse_args(argv):
    """`--preset=NAME` first, then `--key=value` overrides, type-checked against Config's fields."""
    if positional := [a for a in argv if not a.startswith("--")]:
        raise RunError(
            f"unexpected argument {positional[0]!r}: use --key=value (see Config in train.py)"
        )
    # --flag = --flag=true
    kv = dict(arg[2:].split("=", 1) if "=" in arg else (arg[2:], "true") for arg in argv)
    # --device=cpu: the cpu preset
    gpu = torch.cuda.is_available() and kv.get("device", "auto") != "cpu"
    preset, show_help = kv.pop("preset", "gpu" if gpu else "cpu"), kv.pop("help", None)
    if preset not in PRESETS:
        raise RunError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    cfg = Config(**PRESETS[preset])
    for key, value in kv.items():
        if key not in STAGE_OF:
            raise RunError(f"unknown option --{key}: see the fields of Config in train.py")
        typ = type(getattr(cfg, key))
        try:
            setattr(cfg, key, BOOLS[value.lower()] if typ is bool else typ(value))
        except (KeyError, ValueError):
            raise RunError(f"--{key}={value}: expected {typ.__name__}") from None
    for key, choices in CHOICES.items():
        if getattr(cfg, key) not in choices:
            raise RunError(f"--{key}={getattr(cfg, key)}: use {' or '.join(choices)}")
    if not cfg.reward_mechanisms or set(cfg.reward_mechanisms.split(",")) - set(data.MECHANISMS):
        raise RunError(
            f"--reward_mechanisms={cfg.reward_mechanisms}: a comma list of "
            f"{','.join(data.MECHANISMS)}"
        )
    grouped = cfg.algo in ("rloo", "grpo")  # k replies per context
    if cfg.ppo_batch_size % cfg.ppo_mini_batch_size or (
        grouped and cfg.ppo_batch_size % cfg.rloo_k
    ):
        raise RunError(
            "--ppo_batch_size must be a multiple of --ppo_mini_batch_size (and of "
            "--rloo_k with RLOO/GRPO)"
        )
    if grouped and cfg.rloo_k < 2:
        raise RunError(
            f"--rloo_k={cfg.rloo_k}: {cfg.algo.upper()} needs at least 2 replies per context"
        )
    if show_help:  # --help: the settings this command line would run with, then stop
        print(
            f"{__doc__}\npreset {preset}: "
            f"{', '.join(f'{k}={v}' for k, v in dataclasses.asdict(cfg).items())}"
        )
        sys.exit(0)
    return cfg, preset


def choose_dtype(cfg, device):
    """(dtype, why). auto: bfloat16 autocast on a GPU that supports it, and on a CPU whose bfloat16
    matmuls run at least twice as fast as float32's (AVX512-BF16, AMX; docs/speed.md measures the
    `cpu` preset both ways), else float32. Never float16: T5 overflows in it."""
    if cfg.dtype != "auto":
        return cfg.dtype, "--dtype"
    if device.type == "cpu":
        speedup = bf16_matmul_speedup()
        if speedup >= 2.0:
            return "bfloat16", f"bfloat16 matmuls run {speedup:.1f}x float32's on this CPU"
        return "float32", f"bfloat16 matmuls run {speedup:.1f}x float32's on this CPU, under 2x"
    # emulated bfloat16 (V100, T4) is slow
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return "bfloat16", f"{torch.cuda.get_device_name(device)} supports bfloat16"
    return "float32", (
        f"{torch.cuda.get_device_name(device)} has no bfloat16 and T5 overflows in float16"
    )


def bf16_matmul_speedup(n=512, repeats=5):
    """Best-of-`repeats` time of a float32 n x n matmul over a bfloat16 one, on the CPU (a tenth of
    a second)."""
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b, best[dtype] = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype), float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best[dtype] = min(best[dtype], time.perf_counter() - t0)
    return best[torch.float32] / best[torch.bfloat16]


# --- the stages, in pipeline order; each reads what the earlier ones left in the run directory
# `run`


def stage_tokenizer(cfg, run, env):
    """The tokenizer (the pretrained T5's or our own SentencePiece) and every ED split encoded."""
    ed = {
        s: data.load_empathetic_dialogues(env["data_dir"] / "empatheticdialogues" / f"{s}.csv")[
            : limit or None
        ]
        for s, limit in (
            ("train", cfg.limit_train),
            ("valid", cfg.limit_valid),
            ("test", cfg.limit_test),
        )
    }
    if cfg.pretrained:
        copy(Path(cfg.pretrained) / "spiece.model", run / "spiece.model")
    # one role-tagged text per dialogue (so "speaker:"/"listener:" become pieces), plus EPITOME
    # posts
    else:
        texts = [data.format_context(ex.context + [ex.target]) for ex in ed["train"]]
        for rec in data.load_epitome(env["data_dir"] / "epitome" / data.EPITOME_FILES["er"]):
            texts += [rec.seeker_post, rec.response_post]
        data.Tokenizer.train(texts, run / "spiece.model", vocab_size=cfg.vocab_size, seed=cfg.seed)
    tok = data.Tokenizer(run / "spiece.model")
    encoded = {
        s: dict(
            ctx=[data.encode_context(tok, ex.context, cfg.max_context_tokens) for ex in examples],
            tgt=[data.encode_target(tok, ex.target, cfg.max_target_tokens) for ex in examples],
        )
        for s, examples in ed.items()
    }
    write(run / "encoded.pt", encoded)
    print(
        f"data: ED train / valid / test examples {[len(e['ctx']) for e in encoded.values()]}, "
        f"vocab {tok.vocab_size}"
    )


def build_model(cfg, vocab_size):
    if cfg.pretrained:
        return T5.from_pretrained(cfg.pretrained)
    return T5(
        T5Config(
            vocab_size=vocab_size,
            d_model=cfg.d_model,
            d_kv=cfg.d_model // cfg.num_heads,
            d_ff=cfg.d_ff,
            num_layers=cfg.num_layers,
            num_heads=cfg.num_heads,
            dropout_rate=cfg.dropout_rate,
        )
    )


def stage_sft(cfg, run, env):
    """MLE on ED train; the model with the best validation perplexity is kept in run/sft."""
    device, autocast, encoded = env["device"], env["autocast"], read(run / "encoded.pt")
    train, valid = (
        encoded["train"],
        {k: v[: cfg.sft_limit_valid or None] for k, v in encoded["valid"].items()},
    )
    lengths = [len(c) + len(t) for c, t in zip(train["ctx"], train["tgt"])]
    steps_per_epoch = -(-len(lengths) // cfg.sft_batch_size)
    total = max(1, int(cfg.sft_epochs * steps_per_epoch))
    torch.manual_seed(cfg.seed)  # before the random init
    model = build_model(cfg, read(run / "spiece.model", data.Tokenizer).vocab_size).to(device)
    print(
        f"sft: T5 of {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{total} steps"
    )
    # what the steps call: the model, or its DDP wrapper under torchrun
    step_model = data_parallel(model, env)
    # fused: one kernel updates every parameter (the for-each default launches several per step)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.0, fused=True)
    sched = linear_schedule(opt, total, cfg.sft_warmup_steps)
    # with the RNG, all that decides the steps to come
    parts = dict(model=model, optimizer=opt, scheduler=sched)
    state = load_checkpoint(run / "sft_ckpt.pt", parts) or dict(
        step=0, best=float("inf"), nonfinite=0
    )
    bar = tqdm(
        total=total, initial=state["step"], desc="sft", dynamic_ncols=True, disable=rank() > 0
    )
    while state["step"] < total:
        epoch, pos = divmod(state["step"], steps_per_epoch)
        # the batch order of an epoch is a function of (seed, epoch): a resumed run sees the same
        # batches
        batches = data.batch_indices(
            lengths, cfg.sft_batch_size, shuffle=True, seed=cfg.seed + epoch, bucket=True
        )
        for idx in batches[pos:]:
            model.train()
            with autocast():
                loss, _ = emprl.sft_loss(
                    step_model, data.make_batch(train, shard(idx, env["world"]), device)
                )
            loss.backward()
            finite = emprl.optimizer_step(model, opt)
            sched.step()
            state["step"] += 1
            count_nonfinite(state, finite, cfg, "SFT steps")
            bar.update(1)
            if state["step"] % cfg.sft_eval_every == 0 or state["step"] == total:
                ppl = (
                    emprl.perplexity(model, valid, device, cfg.eval_batch_size, autocast)
                    if rank() == 0
                    else float("inf")
                )  # validated once: the other ranks' models are never saved
                log(
                    run,
                    dict(
                        stage="sft",
                        step=state["step"],
                        epoch=state["step"] / steps_per_epoch,
                        loss=loss.item(),
                        valid_ppl=ppl,
                        lr=sched.get_last_lr()[0],
                        steps_per_s=bar.format_dict["rate"],
                    ),
                )
                tqdm.write(
                    f"sft {state['step']}/{total} | loss {loss.item():.3f} | valid ppl {ppl:.2f}"
                )
                if ppl < state["best"]:  # keep the best model by validation perplexity
                    state["best"] = ppl
                    save_model(model, run / "sft")
                save_checkpoint(run / "sft_ckpt.pt", parts, state)
            if state["step"] == total:
                break
    print(f"sft: best validation perplexity {state['best']:.2f}")


def stage_identifiers(cfg, run, env):
    """ER, IP, EX trained on EPITOME; their test table beside the majority baseline."""
    device, tok = env["device"], read(run / "spiece.model", data.Tokenizer)
    splits = data.load_epitome_splits(env["data_dir"], seed=cfg.seed)
    models, table, texts = [], {}, {}
    for mech in data.MECHANISMS:
        recs = {s: splits[mech][s][: cfg.ident_limit_pairs or None] for s in splits[mech]}
        texts[mech] = {
            s: ([r.response_post for r in rs], [r.level for r in rs]) for s, rs in recs.items()
        }
        # the heads' init is random: seeded, a rerun trains the same identifiers
        torch.manual_seed(cfg.seed)
        if cfg.ident_init == "scratch":
            model = reward.EmpathyIdentifier(build_model(cfg, tok.vocab_size).config)
        # both encoders from a T5 that has read text: our SFT model, or the pretrained checkpoint
        else:
            model = reward.EmpathyIdentifier.from_t5(
                read(run / "sft") if cfg.ident_init == "sft" else T5.from_pretrained(cfg.pretrained)
            )
        table[mech] = reward.train_and_test(
            model.to(device), mech, recs, tok, cfg, device, env["autocast"], tqdm.write
        )
        log(run, dict(stage="identifiers", mechanism=mech, **table[mech]))
        models.append(model.cpu())
    reward.Identifiers(models).save(run / "identifiers")
    # the independent judge: another model family on the same EPITOME train split, never part of any
    # reward
    judge = Judge.fit(
        {m: t["train"] for m, t in texts.items()}, {m: t["valid"] for m, t in texts.items()}
    )
    for mech, scores in judge.test({m: t["test"] for m, t in texts.items()}).items():
        table[mech]["judge"] = scores
    write(run / "judge.pt", judge.state)
    write(run / "identifiers.json", table)


def stage_labels(cfg, run, env):
    """The identifiers label every ED target reply (cut as EPITOME responses are): the y* of the
    reward."""
    identifiers, labels = read(run / "identifiers", reward.Identifiers.load).to(env["device"]), {}
    for split, enc in read(run / "encoded.pt").items():
        n = cfg.label_limit_train if split == "train" and cfg.label_limit_train else len(enc["ctx"])
        ctx = [c[-cfg.ident_ctx_tokens :] for c in enc["ctx"][:n]]
        tgt = [data.cut_target(t, cfg.ident_resp_tokens) for t in enc["tgt"][:n]]
        levels, _ = emprl.identifier_levels(
            identifiers, ctx, tgt, env["device"], cfg.eval_batch_size, env["autocast"]
        )
        labels[split] = torch.as_tensor(levels)
        counts = {
            m: np.bincount(levels[:, i], minlength=3).tolist()
            for i, m in enumerate(data.MECHANISMS)
        }
        print(f"labels {split}: level counts (no/weak/strong) {counts}")
        log(run, dict(stage="labels", split=split, counts=counts))
    write(run / "labels.pt", labels)


def stage_ppo(cfg, run, env):
    """Policy + value head from the SFT model, a frozen reference copy, the empathy reward; PPO
    iterations."""
    device, autocast, tok = (
        env["device"],
        env["autocast"],
        read(run / "spiece.model", data.Tokenizer),
    )
    encoded, labels = read(run / "encoded.pt"), read(run / "labels.pt")
    # the labelled train examples are the context pool
    ctx = encoded["train"]["ctx"][: len(labels["train"])]
    pool = dict(
        ctx=ctx, ident_ctx=[c[-cfg.ident_ctx_tokens :] for c in ctx], levels=labels["train"].numpy()
    )
    ref_model = read(run / "sft").to(device).eval().requires_grad_(False)
    policy = emprl.PolicyWithValue(read(run / "sft"), cfg.dropout_rate).to(device)
    # what the updates call: the policy, or its DDP wrapper
    step_policy = data_parallel(policy, env)
    identifiers = read(run / "identifiers", reward.Identifiers.load).to(device)
    # per iteration
    updates = (
        -(-cfg.ppo_batch_size // (cfg.ppo_mini_batch_size * cfg.ppo_grad_accum)) * cfg.ppo_epochs
    )
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.ppo_lr, fused=True)
    sched = linear_schedule(opt, (cfg.ppo_lr_decay_steps or cfg.ppo_steps) * updates)
    kl_ctl = ppo.KLController(
        cfg.init_kl_coef, cfg.kl_target, cfg.kl_horizon, adaptive=cfg.adaptive_kl
    )
    # gen: minibatch order
    moments, gen = ppo.RunningMoments(), emprl.generator(cfg.ppo_seed, device)
    torch.manual_seed(cfg.ppo_seed + rank())  # rollout sampling: each process draws its own
    parts = dict(
        policy=policy, optimizer=opt, scheduler=sched, kl_ctl=kl_ctl, moments=moments, generator=gen
    )

    judge = Judge(read(run / "judge.pt"))

    # once, on rank 0 (the others print nowhere and write nothing): {} on the others
    def validate(model):
        return (
            {}
            if rank() > 0
            else emprl.evaluate(
                model,
                identifiers,
                judge,
                tok,
                encoded["valid"],
                labels["valid"].numpy(),
                device,
                cfg,
                autocast,
                n=cfg.ppo_limit_valid,
                seed=cfg.eval_seed,
            )[0]
        )

    state = load_checkpoint(run / "ppo_ckpt.pt", parts)
    # the SFT model on the same validation subset, once: iteration 0 of the curves
    if state is None:
        state = dict(step=0, nonfinite=0, sft_valid=validate(ref_model))
        log(run, dict(stage="ppo_eval", step=0, **state["sft_valid"]))
    bar = tqdm(
        total=cfg.ppo_steps,
        initial=state["step"],
        desc="ppo",
        dynamic_ncols=True,
        disable=rank() > 0,
    )
    # each process's share of an iteration (the global batch is the preset's): its contexts and
    # minibatches
    step_cfg = dataclasses.replace(cfg, ppo_mini_batch_size=cfg.ppo_mini_batch_size // env["world"])
    k = cfg.rloo_k if cfg.algo in ("rloo", "grpo") else 1  # rollouts per context
    while state["step"] < cfg.ppo_steps:
        # the contexts of iteration i: a seeded permutation of the pool per pass, consumed in order
        epoch, offset = divmod(state["step"] * cfg.ppo_batch_size // k, len(ctx))
        order = np.concatenate(
            [np.random.default_rng(cfg.ppo_seed + epoch + e).permutation(len(ctx)) for e in (0, 1)]
        )
        # each context k times in a row
        idx = np.repeat(order[offset : offset + cfg.ppo_batch_size // k], k).tolist()
        idx = shard(idx, env["world"])
        stats, roll = emprl.ppo_iteration(
            step_policy,
            ref_model,
            identifiers,
            opt,
            sched,
            kl_ctl,
            moments,
            data.make_batch(pool, idx, device),
            step_cfg,
            autocast,
            gen,
        )
        # β of every process, in the log: the global-batch statistics keep them equal
        if env["world"] > 1:
            stats["beta_per_rank"] = [None] * env["world"]
            torch.distributed.all_gather_object(stats["beta_per_rank"], kl_ctl.value)
        state["step"] += 1
        bar.update(1)
        log(run, dict(stage="ppo", step=state["step"], **stats))
        tqdm.write(emprl.ppo_line(state["step"], cfg.ppo_steps, stats))
        bad = stats.get("nonfinite_scores", 0) + stats.get("skipped_nonfinite", 0)
        count_nonfinite(state, not bad, cfg, "PPO iterations")
        if (
            state["step"] % cfg.ppo_eval_every == 0 or state["step"] == cfg.ppo_steps
        ) and rank() == 0:
            for i in range(2):
                tqdm.write(
                    f"  context: {tok.decode(ctx[idx[i]])[-200:]}\n  reply:   "
                    f"{tok.decode(roll['replies'][i])}"
                )
            m, sft = validate(policy.model), state["sft_valid"]
            log(run, dict(stage="ppo_eval", step=state["step"], **m))
            tqdm.write(
                emprl.eval_line(f"valid @{state['step']}", m)
                + f" (sft {sft['emp_f1']:.2f}, judge {sft['emp_f1_judge']:.2f})"
            )
        # every rank: its RNG is kept
        if state["step"] % cfg.ppo_eval_every == 0 or state["step"] == cfg.ppo_steps:
            save_checkpoint(run / "ppo_ckpt.pt", parts, state)
    save_model(policy.model, run / "emprl")


def stage_eval(cfg, run, env):
    """SFT and EmpRL on the ED test split, decoded like the authors; EmpRL - SFT with
    paired-bootstrap intervals; results.json and results.md."""
    t0, tok, labels = (
        time.time(),
        read(run / "spiece.model", data.Tokenizer),
        read(run / "labels.pt"),
    )
    test, identifiers = (
        read(run / "encoded.pt")["test"],
        read(run / "identifiers", reward.Identifiers.load),
    )
    judge = Judge(read(run / "judge.pt"))
    results, outputs = {}, {}
    for name in ("sft", "emprl"):
        results[name], outputs[name] = emprl.evaluate(
            read(run / name).to(env["device"]),
            identifiers.to(env["device"]),
            judge,
            tok,
            test,
            labels["test"].numpy(),
            env["device"],
            cfg,
            env["autocast"],
            seed=cfg.eval_seed,
        )
        print(emprl.eval_line(f"test {name}", results[name]))
    results["majority"] = emprl.majority_reference(labels["train"].numpy(), labels["test"].numpy())
    results["difference"] = emprl.paired_bootstrap(
        outputs["sft"], outputs["emprl"], seed=cfg.eval_seed
    )
    results["environment"] = dict(
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        device=str(env["device"]),
        dtype=env["dtype"],
        machine=platform.machine(),
        python=platform.python_version(),
        flush_denormal=env["flush_denormal"],
        **env["code"],
    )
    results.update(
        identifiers=read(run / "identifiers.json"),
        config=dataclasses.asdict(cfg),
        time_s={**read(run / "stages.json"), "eval": time.time() - t0},
        n_test=len(test["ctx"]),
    )
    results["samples"] = [
        dict(
            context=tok.decode(test["ctx"][i]),
            reference=tok.decode(test["tgt"][i]),
            sft=outputs["sft"]["texts"][i],
            emprl=outputs["emprl"]["texts"][i],
        )
        for i in range(0, len(test["ctx"]), max(1, len(test["ctx"]) // 6))
    ][:6]
    write(run / "results.json", results)
    atomic_write(run / "results.md", emprl.results_table(results).encode())


# the pipeline: each stage's function, in order
PIPELINE = {
    "tokenizer": stage_tokenizer,
    "sft": stage_sft,
    "identifiers": stage_identifiers,
    "labels": stage_labels,
    "ppo": stage_ppo,
    "eval": stage_eval,
}


# --------------------------------------------------------------------------------------------- main


def run_pipeline(cfg, preset):
    run = Path(cfg.out_dir)
    device, world = start_processes(cfg)
    dtype, why = choose_dtype(cfg, device)
    if world > 1:  # every rank takes rank 0's choice (a timing decides it on the CPU)
        box = [(dtype, why)]
        torch.distributed.broadcast_object_list(box, src=0)
        dtype, why = box[0]
    # what config.json keeps: a rerun or --from_run must resolve the same
    cfg = dataclasses.replace(cfg, dtype=dtype)
    # float32 on GPUs with TF32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    # Ampere and newer
    tf32 = " with TF32 matmuls" if device.type == "cuda" and dtype == "float32" else ""
    # denormal float32 numbers are flushed to 0 on the CPU: they slow matmuls many times and change
    # no result here
    flush = device.type == "cpu" and torch.set_flush_denormal(True)
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if dtype == "bfloat16"
        else nullcontext
    )
    if cfg.pretrained and not (Path(cfg.pretrained) / "config.json").exists():
        raise RunError(
            f"--pretrained={cfg.pretrained} is not a T5 checkpoint directory: download "
            "config.json, "
            "model.safetensors and spiece.model (see the README) and pass their "
            "directory"
        )
    env = dict(
        device=device,
        dtype=dtype,
        autocast=autocast,
        world=world,
        data_dir=None,
        flush_denormal=flush,
        # the commit of the code this process loaded, not of the checkout at the end
        code=code_version(),
    )
    if rank() == 0:  # only rank 0 touches the run directory's settings, the data and the lock
        env["data_dir"], env["lock"] = (
            data.ensure_data(cfg.data_dir or None),
            open_run(cfg, run, preset),
        )
        print(
            f"preset {preset} | device {device} | {dtype}{tf32} ({why}) | torch threads "
            f"{torch.get_num_threads()}"
            f" | denormals flushed {flush} | processes {world} | run {run}"
        )
        print("config: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()))
    if world > 1:
        torch.distributed.barrier()  # the run directory is ready
    done = read(run / "stages.json") if (run / "stages.json").exists() else {}
    for stage in STAGES:
        if stage in done:
            print(f"[{stage}] done earlier ({done[stage]:.0f} s), skipped")
            continue
        # a stage of rank 0 alone: the others wait for it
        if rank() > 0 and stage not in ("sft", "ppo"):
            done = wait_for_stage(run, stage)
            continue
        print(f"[{stage}]")
        # the machine's 1-minute load average, at the start and the end
        t0, load = time.time(), os.getloadavg()[0]
        PIPELINE[stage](cfg, run, env)
        done[stage] = time.time() - t0
        write(run / "stages.json", done)
        log(
            run,
            dict(
                stage="timing",
                name=stage,
                seconds=done[stage],
                threads=torch.get_num_threads(),
                load_1min=[load, os.getloadavg()[0]],
            ),
        )
        if rank() == 0:  # finished: its results supersede the checkpoint
            (run / f"{stage}_ckpt.pt").unlink(missing_ok=True)
        if device.type == "cuda":  # what the stage needed on the GPU
            print(
                f"[{stage}] {done[stage]:.0f} s, peak GPU memory "
                f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
            )
            torch.cuda.reset_peak_memory_stats()
    print(
        (run / "results.md").read_text()
        + "seconds per stage: "
        + ", ".join(f"{k} {s:.0f}" for k, s in done.items())
    )


def open_run(cfg, run, preset):
    """Rank 0: lock the run directory, refuse changed settings, reuse --from_run's stages, write
    config.json, and drop a stage whose result was deleted with every stage after it. Returns the
    lock (held while it lives)."""
    if run.exists() and not run.is_dir():
        raise RunError(f"--out_dir={run} is a file; give a directory")
    run.mkdir(parents=True, exist_ok=True)
    lock = hold(run)
    changed, first = (
        changed_fields(read(run / "config.json"), cfg)
        if (run / "config.json").exists()
        else ({}, 0)
    )
    if changed:
        raise RunError(
            f"{run} was made with other settings ({'; '.join(changed.values())}); use "
            "a new --out_dir, "
            f"with --from_run={run} to reuse its stages before '{first}'"
        )
    if cfg.from_run and not (run / "stages.json").exists():
        reuse_stages(cfg, run, Path(cfg.from_run))
    write(run / "config.json", dataclasses.asdict(cfg))
    log(run, dict(stage="config", preset=preset, **dataclasses.asdict(cfg)))
    done = read(run / "stages.json") if (run / "stages.json").exists() else {}
    for i, stage in enumerate(STAGES):
        # a result was deleted
        if stage in done and not all((run / f).exists() for f in RESULTS[stage]):
            print(f"[{stage}] a result is missing: redoing '{stage}' and the stages after it")
            for later in STAGES[i:]:  # they were built on it: results and checkpoints go
                done.pop(later, None)
                for name in {Path(f).parts[0] for f in RESULTS[later]} | {f"{later}_ckpt.pt"}:
                    remove(run / name)
            write(run / "stages.json", done)
            break
    return lock


# ------------------------------------------------------- several processes: torchrun, data-parallel


def start_processes(cfg):
    """(device, number of processes). Under `torchrun --nproc_per_node=N` each process joins the
    group (NCCL on CUDA, one GPU each; gloo on the CPU) and takes 1/N of every SFT batch and PPO
    iteration, so that the global batch is the preset's. Only rank 0 prints and writes."""
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    )
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return device, 1
    for name in ("sft_batch_size", "ppo_batch_size", "ppo_mini_batch_size"):
        if getattr(cfg, name) % world:
            raise RunError(
                f"--{name}={getattr(cfg, name)} does not divide among {world} "
                "processes: the global "
                f"batch is kept, so choose a multiple of {world}"
            )
    if cfg.algo != "ppo" and (cfg.ppo_batch_size // world) % cfg.rloo_k:
        raise RunError(
            f"--algo={cfg.algo}: each of the {world} processes needs whole groups of "
            "rloo_k="
            f"{cfg.rloo_k} replies; make ppo_batch_size a multiple of "
            f"{world * cfg.rloo_k}"
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        timeout=datetime.timedelta(minutes=cfg.dist_timeout_min),
    )
    if rank() > 0:  # one voice: the others' prints go nowhere (their errors still reach stderr)
        sys.stdout = open(os.devnull, "w")
    return device, world


def shard(idx, world):
    """This rank's contiguous share of a global batch's example indices (RLOO and GRPO groups stay
    whole). A short last batch of an epoch may give a rank one example fewer, or, with fewer
    examples than ranks, its last one."""
    n = -(-len(idx) // world)
    return idx[rank() * n : (rank() + 1) * n] or idx[-1:]


def data_parallel(model, env):
    """The model wrapped for data-parallel steps under torchrun (gradients averaged across processes
    during backward), or the model itself in one process. Every process starts from rank 0's
    weights."""
    if env["world"] == 1:
        return model
    device_ids = [env["device"].index] if env["device"].type == "cuda" else None
    wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    # each process its own dropout masks from here on
    torch.manual_seed(torch.initial_seed() + rank())
    return wrapped


def save_model(model, path):
    if rank() == 0:
        model.save_pretrained(path)


def main(argv):
    resume = f"Resume with the same command: python train.py {shlex.join(argv)}"
    try:
        try:
            run_pipeline(*parse_args(argv))
        # end the progress bars an exception left open, so the message below gets its own line
        finally:
            for bar in list(getattr(tqdm, "_instances", ())):
                bar.close()
            # torchrun: leave the process group (NCCL warns otherwise)
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
    # Ctrl-C: every file is whole (atomic writes); SFT and PPO go on from their checkpoint
    except KeyboardInterrupt:
        print(f"\ninterrupted; finished stages and the last checkpoint are kept. {resume}")
        sys.exit(130)
    except (RunError, data.DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    # the file system said no (a full disk, a permission): which file, without a traceback
    except OSError as e:
        advice = (
            "; free some space and rerun the same command"
            if e.errno in (errno.ENOSPC, errno.EDQUOT)
            else ""
        )
        print(
            f"error: {e.filename or 'the run directory'}: {e.strerror or e}{advice}",
            file=sys.stderr,
        )
        sys.exit(1)


# -------------------------------------------------------- the run directory: settings, reuse, files


def changed_fields(old, cfg):
    """{field: "field: old -> new"} for the fields outside the run section that differ from an
    earlier config, and the first stage they belong to (None if none)."""
    changed = {
        k: f"{k}: {old.get(k)} -> {v}"
        for k, v in dataclasses.asdict(cfg).items()
        if STAGE_OF[k] and old.get(k) != v
    }
    return changed, min((STAGE_OF[k] for k in changed), key=STAGES.index, default=None)


def reuse_stages(cfg, run, source):
    """Copy an earlier run's results of the finished stages before the first changed one; done here,
    same times."""
    if not (source / "stages.json").exists():
        raise RunError(f"--from_run={source}: not a run directory (no stages.json)")
    (changed, first), source_done = (
        changed_fields(read(source / "config.json"), cfg),
        read(source / "stages.json"),
    )
    done = {}
    for stage in STAGES[: STAGES.index(first) if first else None]:
        if stage not in source_done or not all((source / f).exists() for f in RESULTS[stage]):
            break
        for name in {Path(f).parts[0] for f in RESULTS[stage]}:  # a file, or a model directory
            copy(source / name, run / name)
        done[stage] = source_done[stage]
    write(run / "stages.json", done)
    print(
        f"--from_run={source}: reusing {', '.join(done) or 'nothing'} "
        f"({'; '.join(changed.values()) or 'no change'})"
    )


def count_nonfinite(state, finite, cfg, what):
    """The one counter of non-finite updates: `max_nonfinite` in a row stop the run instead of
    training on garbage."""
    state["nonfinite"] = 0 if finite else state["nonfinite"] + 1
    if state["nonfinite"] >= cfg.max_nonfinite:
        raise RunError(
            f"{state['nonfinite']} {what} in a row with non-finite losses, rewards or "
            "gradients: the run "
            "is diverging (lower the learning rate, or use --dtype=float32; on Ampere "
            "or newer GPUs its "
            f"matmuls run in TF32)"
        )


def linear_schedule(optimizer, total_steps, warmup_steps=0):
    def f(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, 1.0 - (step - warmup_steps) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


if __name__ == "__main__":
    main(sys.argv[1:])
