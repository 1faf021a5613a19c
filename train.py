"""Train EmpRL end to end: tokenizer -> SFT -> identifiers -> labels -> PPO -> eval.

    python train.py                                    # preset `gpu` with CUDA, `cpu` without
    python train.py --preset=tiny --out_dir=runs/tiny  # any --key=value overrides a field of Config
    python train.py --preset=cpu --out_dir=runs/seed1 --from_run=runs/cpu --ppo_seed=1

This file reads top to bottom: the settings (Config, the presets), the six stages, then main. Every
stage writes its results into the run directory and is skipped when the command is rerun; SFT and
PPO resume from their last checkpoint. Every field of Config belongs to one stage and changes it and
every later one: a rerun with changed fields is refused, --from_run=DIR copies DIR's results of the
stages before. The run directory's bookkeeping is in rundir.py, the torchrun layer in machine.py.
"""

import dataclasses
import errno
import os
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
import machine
import ppo
import reward
import rundir
from judge import Judge
from machine import rank, shard
from rundir import RunError, copy, load_checkpoint, log, read, save_checkpoint, write
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


# --- the stages, in pipeline order; each reads what the earlier ones left in the run directory


def stage_tokenizer(cfg, run, env):
    """The tokenizer (the pretrained T5's or our own SentencePiece) and every ED split encoded."""
    limits = dict(train=cfg.limit_train, valid=cfg.limit_valid, test=cfg.limit_test)
    ed = {}
    for split, limit in limits.items():
        path = env["data_dir"] / "empatheticdialogues" / f"{split}.csv"
        ed[split] = data.load_empathetic_dialogues(path)[: limit or None]
    if cfg.pretrained:
        copy(Path(cfg.pretrained) / "spiece.model", run / "spiece.model")
    else:  # one role-tagged text per dialogue ("speaker:", "listener:" become pieces), and EPITOME
        texts = [data.format_context(ex.context + [ex.target]) for ex in ed["train"]]
        for rec in data.load_epitome(env["data_dir"] / "epitome" / data.EPITOME_FILES["er"]):
            texts += [rec.seeker_post, rec.response_post]
        data.Tokenizer.train(texts, run / "spiece.model", vocab_size=cfg.vocab_size, seed=cfg.seed)
    tok = data.Tokenizer(run / "spiece.model")
    encoded = {}
    for split, examples in ed.items():
        ctx = [data.encode_context(tok, ex.context, cfg.max_context_tokens) for ex in examples]
        tgt = [data.encode_target(tok, ex.target, cfg.max_target_tokens) for ex in examples]
        encoded[split] = dict(ctx=ctx, tgt=tgt)
    write(run / "encoded.pt", encoded)
    sizes = [len(e["ctx"]) for e in encoded.values()]
    print(f"data: ED train / valid / test examples {sizes}, vocab {tok.vocab_size}")


def build_model(cfg, vocab_size):
    """The pretrained T5, or a T5 of the config's sizes with random weights."""
    if cfg.pretrained:
        return T5.from_pretrained(cfg.pretrained)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=cfg.d_model,
        d_kv=cfg.d_model // cfg.num_heads,
        d_ff=cfg.d_ff,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        dropout_rate=cfg.dropout_rate,
    )
    return T5(config)


def stage_sft(cfg, run, env):
    """MLE on ED train; the model with the best validation perplexity is kept in run/sft."""
    device = env["device"]
    encoded = read(run / "encoded.pt")
    train = encoded["train"]
    valid = {k: v[: cfg.sft_limit_valid or None] for k, v in encoded["valid"].items()}
    lengths = [len(c) + len(t) for c, t in zip(train["ctx"], train["tgt"])]
    steps_per_epoch = -(-len(lengths) // cfg.sft_batch_size)
    total = max(1, int(cfg.sft_epochs * steps_per_epoch))
    torch.manual_seed(cfg.seed)  # before the random init
    model = build_model(cfg, read(run / "spiece.model", data.Tokenizer).vocab_size).to(device)
    size = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"sft: T5 of {size:.2f}M parameters, {total} steps")
    step_model = machine.data_parallel(model, env["world"], device)  # DDP's wrapper, or the model
    # fused: one kernel updates every parameter (the for-each default launches several per step)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.0, fused=True)
    sched = emprl.linear_schedule(opt, total, cfg.sft_warmup_steps)
    parts = dict(model=model, optimizer=opt, scheduler=sched)  # with the RNG: all a resume needs
    state = load_checkpoint(run / "sft_ckpt.pt", parts, device)
    if state is None:
        state = dict(step=0, best=float("inf"), nonfinite=0)
    bar = tqdm(
        total=total, initial=state["step"], desc="sft", dynamic_ncols=True, disable=rank() > 0
    )
    while state["step"] < total:
        epoch, pos = divmod(state["step"], steps_per_epoch)
        # an epoch's batch order is a function of (seed, epoch): a resumed run sees the same batches
        batches = data.batch_indices(
            lengths, cfg.sft_batch_size, shuffle=True, seed=cfg.seed + epoch, bucket=True
        )
        for idx in batches[pos:]:
            model.train()
            with env["autocast"]():
                batch = data.make_batch(train, shard(idx, env["world"]), device)
                loss, _ = emprl.sft_loss(step_model, batch)
            loss.backward()
            finite = emprl.optimizer_step(model, opt)
            sched.step()
            state["step"] += 1
            emprl.count_nonfinite(state, finite, cfg, "SFT steps")
            bar.update(1)
            if state["step"] % cfg.sft_eval_every == 0 or state["step"] == total:
                ppl = float("inf")  # validated once, on rank 0: the others' models are not saved
                if rank() == 0:
                    ppl = emprl.perplexity(
                        model, valid, device, cfg.eval_batch_size, env["autocast"]
                    )
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
                tqdm.write(f"sft {state['step']}/{total} | loss {loss.item():.3f} | ppl {ppl:.2f}")
                if ppl < state["best"]:  # keep the best model by validation perplexity
                    state["best"] = ppl
                    save_model(model, run / "sft")
                save_checkpoint(run / "sft_ckpt.pt", parts, state, device)
            if state["step"] == total:
                break
    print(f"sft: best validation perplexity {state['best']:.2f}")


def stage_identifiers(cfg, run, env):
    """ER, IP, EX trained on EPITOME; their test table beside the majority baseline; the judge."""
    device = env["device"]
    tok = read(run / "spiece.model", data.Tokenizer)
    splits = data.load_epitome_splits(env["data_dir"], seed=cfg.seed)
    models = []
    table = {}
    texts = {}  # {mechanism: {split: (reply texts, levels)}}: what the judge learns from
    for mech in data.MECHANISMS:
        recs = {s: splits[mech][s][: cfg.ident_limit_pairs or None] for s in splits[mech]}
        texts[mech] = {
            s: ([r.response_post for r in rs], [r.level for r in rs]) for s, rs in recs.items()
        }
        torch.manual_seed(
            cfg.seed
        )  # the heads' init is random: a rerun trains the same identifiers
        if cfg.ident_init == "scratch":
            model = reward.EmpathyIdentifier(build_model(cfg, tok.vocab_size).config)
        else:  # both encoders from a T5 that has read text: our SFT model, or the pretrained one
            t5 = (
                read(run / "sft") if cfg.ident_init == "sft" else T5.from_pretrained(cfg.pretrained)
            )
            model = reward.EmpathyIdentifier.from_t5(t5)
        table[mech] = reward.train_and_test(
            model.to(device), mech, recs, tok, cfg, device, env["autocast"], tqdm.write
        )
        log(run, dict(stage="identifiers", mechanism=mech, **table[mech]))
        models.append(model.cpu())
    reward.Identifiers(models).save(run / "identifiers")
    # the independent judge: another model family on the same EPITOME train split, in no reward
    split_texts = {s: {m: t[s] for m, t in texts.items()} for s in ("train", "valid", "test")}
    judge = Judge.fit(split_texts["train"], split_texts["valid"])
    for mech, scores in judge.test(split_texts["test"]).items():
        table[mech]["judge"] = scores
    write(run / "judge.pt", judge.state)
    write(run / "identifiers.json", table)


def stage_labels(cfg, run, env):
    """The identifiers label every ED target reply (cut as EPITOME responses are): the y* of the
    reward."""
    identifiers = read(run / "identifiers", reward.Identifiers.load).to(env["device"])
    labels = {}
    for split, enc in read(run / "encoded.pt").items():
        n = len(enc["ctx"])
        if split == "train" and cfg.label_limit_train:
            n = cfg.label_limit_train
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
    iterations (RLOO and GRPO: the same loop, another advantage)."""
    device = env["device"]
    tok = read(run / "spiece.model", data.Tokenizer)
    encoded = read(run / "encoded.pt")
    labels = read(run / "labels.pt")
    ctx = encoded["train"]["ctx"][: len(labels["train"])]  # the labelled contexts are the pool
    ident_ctx = [c[-cfg.ident_ctx_tokens :] for c in ctx]
    pool = dict(ctx=ctx, ident_ctx=ident_ctx, levels=labels["train"].numpy())
    ref_model = read(run / "sft").to(device).eval().requires_grad_(False)
    policy = emprl.PolicyWithValue(read(run / "sft"), cfg.dropout_rate).to(device)
    step_policy = machine.data_parallel(policy, env["world"], device)  # DDP's wrapper, or policy
    identifiers = read(run / "identifiers", reward.Identifiers.load).to(device)
    judge = Judge(read(run / "judge.pt"))
    minibatches = -(-cfg.ppo_batch_size // (cfg.ppo_mini_batch_size * cfg.ppo_grad_accum))
    updates = minibatches * cfg.ppo_epochs  # optimizer steps per iteration
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.ppo_lr, fused=True)
    sched = emprl.linear_schedule(opt, (cfg.ppo_lr_decay_steps or cfg.ppo_steps) * updates)
    kl_ctl = ppo.KLController(cfg.init_kl_coef, cfg.kl_target, cfg.kl_horizon, cfg.adaptive_kl)
    moments = ppo.RunningMoments()
    gen = emprl.generator(cfg.ppo_seed, device)  # the minibatch order
    torch.manual_seed(cfg.ppo_seed + rank())  # rollout sampling: each process draws its own
    parts = dict(
        policy=policy, optimizer=opt, scheduler=sched, kl_ctl=kl_ctl, moments=moments, generator=gen
    )

    graders = emprl.Graders(identifiers, judge, tok)
    valid = dict(encoded["valid"], levels=labels["valid"].numpy())

    def validate(model):  # once, on rank 0 (the others print nowhere and write nothing)
        if rank() > 0:
            return {}
        return emprl.evaluate(model, graders, valid, cfg, env["autocast"], cfg.ppo_limit_valid)[0]

    state = load_checkpoint(run / "ppo_ckpt.pt", parts, device)
    if state is None:  # the SFT model on the same validation subset, once: step 0 of the curves
        state = dict(step=0, nonfinite=0, sft_valid=validate(ref_model))
        log(run, dict(stage="ppo_eval", step=0, **state["sft_valid"]))
    bar = tqdm(total=cfg.ppo_steps, initial=state["step"], desc="ppo", disable=rank() > 0)
    # each process's share of an iteration (the global batch is the preset's)
    step_cfg = dataclasses.replace(cfg, ppo_mini_batch_size=cfg.ppo_mini_batch_size // env["world"])
    k = cfg.rloo_k if cfg.algo in ("rloo", "grpo") else 1  # rollouts per context
    while state["step"] < cfg.ppo_steps:
        # the contexts of iteration i: a seeded permutation of the pool per pass, consumed in order
        epoch, offset = divmod(state["step"] * cfg.ppo_batch_size // k, len(ctx))
        passes = [
            np.random.default_rng(cfg.ppo_seed + epoch + e).permutation(len(ctx)) for e in (0, 1)
        ]
        order = np.concatenate(passes)
        idx = np.repeat(order[offset : offset + cfg.ppo_batch_size // k], k).tolist()  # k in a row
        idx = shard(idx, env["world"])
        batch = data.make_batch(pool, idx, device)
        stats, roll = emprl.ppo_iteration(
            step_policy,
            ref_model,
            identifiers,
            opt,
            sched,
            kl_ctl,
            moments,
            batch,
            step_cfg,
            env["autocast"],
            gen,
        )
        if env["world"] > 1:  # β of every process, in the log: the global statistics keep it equal
            stats["beta_per_rank"] = machine.gather_objects(kl_ctl.value)
        state["step"] += 1
        bar.update(1)
        log(run, dict(stage="ppo", step=state["step"], **stats))
        tqdm.write(emprl.ppo_line(state["step"], cfg.ppo_steps, stats))
        bad = stats.get("nonfinite_scores", 0) + stats.get("skipped_nonfinite", 0)
        emprl.count_nonfinite(state, not bad, cfg, "PPO iterations")
        checkpoint = state["step"] % cfg.ppo_eval_every == 0 or state["step"] == cfg.ppo_steps
        if checkpoint and rank() == 0:
            for i in range(2):
                context = tok.decode(ctx[idx[i]])[-200:]
                tqdm.write(f"  context: {context}\n  reply:   {tok.decode(roll['replies'][i])}")
            metrics = validate(policy.model)
            log(run, dict(stage="ppo_eval", step=state["step"], **metrics))
            sft = state["sft_valid"]
            baseline = f" (sft {sft['emp_f1']:.2f}, judge {sft['emp_f1_judge']:.2f})"
            tqdm.write(emprl.eval_line(f"valid @{state['step']}", metrics) + baseline)
        if checkpoint:  # on every rank: each keeps its RNG
            save_checkpoint(run / "ppo_ckpt.pt", parts, state, device)
    save_model(policy.model, run / "emprl")


def stage_eval(cfg, run, env):
    """SFT and EmpRL on the ED test split, decoded like the authors; EmpRL - SFT with
    paired-bootstrap intervals; results.json and results.md."""
    t0 = time.time()
    device = env["device"]
    tok = read(run / "spiece.model", data.Tokenizer)
    labels = read(run / "labels.pt")
    test = read(run / "encoded.pt")["test"]
    identifiers = read(run / "identifiers", reward.Identifiers.load).to(device)
    graders = emprl.Graders(identifiers, Judge(read(run / "judge.pt")), tok)
    test = dict(test, levels=labels["test"].numpy())
    results = {}
    outputs = {}
    for name in ("sft", "emprl"):
        model = read(run / name).to(device)
        results[name], outputs[name] = emprl.evaluate(model, graders, test, cfg, env["autocast"])
        print(emprl.eval_line(f"test {name}", results[name]))
    results["majority"] = emprl.majority_reference(labels["train"].numpy(), labels["test"].numpy())
    results["difference"] = emprl.paired_bootstrap(
        outputs["sft"], outputs["emprl"], seed=cfg.eval_seed
    )
    results["environment"] = machine.environment(env)
    results["identifiers"] = read(run / "identifiers.json")
    results["config"] = dataclasses.asdict(cfg)
    results["time_s"] = {**rundir.finished_stages(run), "eval": time.time() - t0}
    results["n_test"] = len(test["ctx"])
    every = max(1, len(test["ctx"]) // 6)  # six samples spread over the test split
    results["samples"] = [
        dict(
            context=tok.decode(test["ctx"][i]),
            reference=tok.decode(test["tgt"][i]),
            sft=outputs["sft"]["texts"][i],
            emprl=outputs["emprl"]["texts"][i],
        )
        for i in range(0, len(test["ctx"]), every)
    ][:6]
    write(run / "results.json", results)
    atomic_write(run / "results.md", emprl.results_table(results).encode())


PIPELINE = {
    "tokenizer": stage_tokenizer,
    "sft": stage_sft,
    "identifiers": stage_identifiers,
    "labels": stage_labels,
    "ppo": stage_ppo,
    "eval": stage_eval,
}


# Config's fields come in groups, one per stage, in pipeline order; "run" fields change no result.
# A group starts at the field named here and ends where the next one starts.
FIRST_FIELD = {
    "run": "out_dir",
    "tokenizer": "seed",
    "sft": "dtype",
    "identifiers": "ident_init",
    "labels": "label_limit_train",
    "ppo": "ppo_steps",
    "eval": "eval_batch_size",
}


def stages_of_fields():
    """{field: stage} in Config's order; None for the "run" fields, which are compared in no run."""
    starts = {first: stage for stage, first in FIRST_FIELD.items()}
    stage_of = {}
    stage = None
    for field in dataclasses.fields(Config):
        stage = starts.get(field.name, stage)
        stage_of[field.name] = None if stage == "run" else stage
    return stage_of


STAGE_OF = stages_of_fields()
# the stages in pipeline order; each is done while stages.json lists it and these files exist
RESULTS = {
    "tokenizer": ["spiece.model", "encoded.pt"],
    "sft": ["sft/model.safetensors"],
    "identifiers": ["identifiers/model.safetensors", "identifiers.json", "judge.pt"],
    "labels": ["labels.pt"],
    "ppo": ["emprl/model.safetensors"],
    "eval": ["results.json", "results.md"],
}
STAGES = tuple(RESULTS)


# --------------------------------------------------------------------------------------------- main


def main(argv):
    """Run the pipeline; a user's mistake or a full disk is one `error:` line, Ctrl-C one line on
    how to resume, never a traceback."""
    resume = f"Resume with the same command: python train.py {shlex.join(argv)}"
    flushed = machine.denormals_flushed()  # restored at the end: a test may call main() in-process
    # under torchrun every process runs the same checks on the same files, so a user's mistake is
    # raised on every rank alike: rank 0 says it (the others only if still running 5 s later)
    speaks = int(os.environ.get("RANK", 0)) == 0
    try:
        try:
            run_pipeline(*parse_args(argv))
        finally:  # end the progress bars an exception left open: the message gets its own line
            for bar in list(getattr(tqdm, "_instances", ())):
                bar.close()
    except KeyboardInterrupt:  # every file is whole (atomic writes); SFT and PPO resume
        print(f"\ninterrupted; finished stages and the last checkpoint are kept. {resume}")
        sys.exit(130)
    except (RunError, data.DataError, CheckpointError, emprl.NonFiniteError) as e:
        if not speaks:  # torchrun stops every process once one exits: rank 0 first, to say why
            time.sleep(5)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except torch.distributed.DistError as e:  # torchrun: another process stopped
        if speaks:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"error: another process of the group stopped ({first_line})", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # the file system said no (a full disk, a permission): which file
        advice = ""
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            advice = "; free some space and rerun the same command"
        where = e.filename or "the run directory"
        print(f"error: {where}: {e.strerror or e}{advice}", file=sys.stderr)
        sys.exit(1)
    finally:  # after the message: a torn-down group makes the other processes fail loudly
        machine.stop()
        torch.set_flush_denormal(flushed)


def run_pipeline(cfg, preset):
    run = Path(cfg.out_dir)
    device = machine.choose_device(cfg)
    # before any matmul starts the CPU's thread pool: its threads copy the flag when they start
    flush = device.type == "cpu" and machine.flush_denormals()
    world, device = machine.start_processes(cfg, device)
    dtype, why = machine.from_rank_0(
        machine.choose_dtype(cfg, device)
    )  # a timing decides it on a CPU
    # what config.json keeps: a rerun or --from_run must resolve the same
    cfg = dataclasses.replace(cfg, dtype=dtype)
    torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls in TF32 where a GPU has it
    torch.backends.cudnn.allow_tf32 = True
    autocast = nullcontext
    if dtype == "bfloat16":
        autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    if cfg.pretrained and not (Path(cfg.pretrained) / "config.json").exists():
        raise RunError(
            f"--pretrained={cfg.pretrained} is not a T5 checkpoint directory: download "
            "config.json, model.safetensors and spiece.model (see the README) and pass their "
            "directory"
        )
    env = dict(device=device, dtype=dtype, autocast=autocast, world=world, flush_denormal=flush)
    env["code"] = rundir.code_version()  # the commit of the code this process loaded
    env["data_dir"] = None
    if rank() == 0:  # only rank 0 touches the run directory's settings, the data and the lock
        env["data_dir"] = data.ensure_data(cfg.data_dir or None)
        config = dataclasses.asdict(cfg)
        env["lock"] = rundir.open_run(run, config, STAGE_OF, RESULTS, preset)
        tf32 = machine.tf32_note(device, dtype)
        print(
            f"preset {preset} | device {device} | {dtype}{tf32} ({why}) | torch threads "
            f"{torch.get_num_threads()} | denormals flushed {flush} | processes {world} | run {run}"
        )
        print("config: " + ", ".join(f"{k}={v}" for k, v in config.items()))
    machine.barrier()  # the run directory is ready
    done = rundir.finished_stages(run)
    for stage in STAGES:
        if stage in done:
            print(f"[{stage}] done earlier ({done[stage]:.0f} s), skipped")
            continue
        if rank() > 0 and stage not in ("sft", "ppo"):  # rank 0's alone: the others wait for it
            done = machine.wait_for_stage(run, stage)
            continue
        print(f"[{stage}]")
        seconds = rundir.timed(run, stage, lambda: PIPELINE[stage](cfg, run, env))  # noqa: B023
        if device.type == "cuda":  # what the stage needed on the GPU
            peak = torch.cuda.max_memory_allocated() / 2**30
            print(f"[{stage}] {seconds:.0f} s, peak GPU memory {peak:.2f} GiB")
            torch.cuda.reset_peak_memory_stats()
    times = ", ".join(f"{k} {s:.0f}" for k, s in rundir.finished_stages(run).items())
    print((run / "results.md").read_text() + "seconds per stage: " + times)


# ------------------------------------------------------------------- settings: the command line


CHOICES = dict(
    dtype=("auto", "float32", "bfloat16"),
    ident_init=("sft", "pretrained", "scratch"),
    kl_estimator=("k1", "k3"),
    algo=("ppo", "rloo", "grpo"),
    grpo_loss=("reply", "token"),
)
BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


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
    preset = kv.pop("preset", "gpu" if gpu else "cpu")
    show_help = kv.pop("help", None)
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


def save_model(model, path):
    if rank() == 0:
        model.save_pretrained(path)


if __name__ == "__main__":
    main(sys.argv[1:])
