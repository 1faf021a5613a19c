"""Time every stage of the `gpu` preset at a given model size, with random weights and random token
ids, and extrapolate the full preset's time. Runs on CUDA (the point) or on the CPU (for a quick
check).

    python benchmarks/bench_gpu.py --size=t5-base --device=cuda
    python benchmarks/bench_gpu.py --size=t5-small --device=cuda
    # under a minute; a test runs this
    python benchmarks/bench_gpu.py --size=tiny --device=cpu

Per stage: SFT steps/s at the preset's batch (8), identifier training steps/s, labelling and
evaluation examples/s, PPO seconds per iteration split into rollout and update, and the peak memory
(GPU memory on CUDA; on the CPU the process's peak RSS so far). Token lengths are drawn like ED's
(contexts 20-200 tokens, replies 5-40) and EPITOME's; the evaluation decodes 30 tokens per reply.
The extrapolation multiplies each rate by the work of the full `gpu` preset: 3 SFT epochs of 40,254
examples, the identifiers' epochs over ~2,300 EPITOME pairs per mechanism, labels of every ED split,
1,600 PPO iterations with their validations, and the test evaluation of the SFT and EmpRL models.
"""

import argparse
import contextlib
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
import emprl  # noqa: E402
import machine  # noqa: E402
import ppo  # noqa: E402
import reward  # noqa: E402
import train  # noqa: E402
from judge import Judge  # noqa: E402
from t5 import T5, T5Config  # noqa: E402

SIZES = {
    "t5-base": dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12),
    "t5-small": dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8),
    "tiny": dict(vocab_size=2000, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4),
}
ED = {"train": 40254, "valid": 5738, "test": 5259}
# per mechanism, the 75 / 5 split of 3,084 pairs
EPITOME_TRAIN_PAIRS, EPITOME_VALID_PAIRS = 2313, 154


def split(n, vocab, ctx=(20, 200), tgt=(5, 40), seed=0):
    rng = np.random.default_rng(seed)
    ids = lambda lo, hi: rng.integers(3, vocab, int(rng.integers(lo, hi))).tolist() + [1]  # noqa: E731
    out = dict(ctx=[ids(*ctx) for _ in range(n)], tgt=[ids(*tgt) for _ in range(n)])
    return dict(out, resp=out["tgt"], level=[int(x) for x in rng.integers(0, 3, n)])


class Clock:
    """Seconds and peak memory between start() and stop(); synchronises CUDA so that the time is the
    GPU's."""

    def __init__(self, device):
        self.device, self.seconds, self.peak_gib = device, 0.0, 0.0

    def start(self, reset_peak=True):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            if reset_peak:
                torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()

    def stop(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_gib = max(self.peak_gib, torch.cuda.max_memory_allocated() / 2**30)
        else:
            # the process's, Linux: KiB
            self.peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        self.seconds += time.perf_counter() - self.t0

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=list(SIZES), default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--steps", type=int, default=0, help="timed steps per stage (0: 20 on CUDA, 3 on the CPU)"
    )
    args = p.parse_args()
    device = torch.device(args.device)
    steps = args.steps or (20 if device.type == "cuda" else 3)
    cfg, _ = train.parse_args(["--preset=gpu"])
    dtype, why = machine.choose_dtype(cfg, device)
    autocast = contextlib.nullcontext
    if dtype == "bfloat16":
        autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    torch.backends.cuda.matmul.allow_tf32 = True
    config = T5Config(**SIZES[args.size], dropout_rate=0.1)
    torch.manual_seed(0)
    model = T5(config).to(device)
    n_params = sum(q.numel() for q in model.parameters())
    print(
        f"{args.size} ({n_params / 1e6:.1f}M parameters, random weights) on {device} "
        f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), {dtype} "
        f"({why}), "
        f"{steps} timed steps per stage, torch {torch.__version__}"
    )
    ed = split(max(64, cfg.ppo_batch_size * 2), config.vocab_size)
    rows = []  # (stage, seconds per unit, unit, peak GiB, units in the full preset)

    # SFT: forward + backward + fused AdamW step at batch 8
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    clock = Clock(device)
    for i in range(steps + 2):  # two warm-up steps, not timed
        clock.start() if i == 2 else None
        with autocast():
            loss, _ = emprl.sft_loss(
                model.train(), data.make_batch(ed, list(range(i, i + cfg.sft_batch_size)), device)
            )
        loss.backward()
        emprl.optimizer_step(model, opt)
    clock.stop()
    rows.append(
        (
            "sft",
            clock.seconds / steps,
            "step",
            clock.peak_gib,
            math.ceil(3 * ED["train"] / cfg.sft_batch_size),
        )
    )
    del opt

    # identifiers: both encoders from the model's, training steps at the preset's batch
    ident = reward.EmpathyIdentifier.from_t5(model).to(device)
    pairs = split(
        64, config.vocab_size, ctx=(20, cfg.ident_ctx_tokens), tgt=(5, cfg.ident_resp_tokens)
    )
    opt, clock = torch.optim.AdamW(ident.parameters(), lr=cfg.ident_lr), Clock(device)
    for i in range(steps + 2):
        clock.start() if i == 2 else None
        batch = data.make_batch(pairs, list(range(i, i + cfg.ident_batch_size)), device)
        with autocast():
            loss = torch.nn.functional.cross_entropy(
                reward.logits_of(ident.train(), batch), batch["level"]
            )
        loss.backward()
        emprl.optimizer_step(ident, opt)
    clock.stop()
    per_epoch = math.ceil(EPITOME_TRAIN_PAIRS / cfg.ident_batch_size) + math.ceil(
        EPITOME_VALID_PAIRS / cfg.eval_batch_size
    )
    rows.append(
        (
            "identifiers",
            clock.seconds / steps,
            "step",
            clock.peak_gib,
            3 * cfg.ident_epochs * per_epoch,
        )
    )
    del opt

    # labels: the three identifiers on (context, reply) pairs, batched by length
    identifiers = reward.Identifiers([ident, ident, ident]).to(device)
    n = steps * cfg.eval_batch_size
    lab = split(
        n, config.vocab_size, ctx=(20, cfg.ident_ctx_tokens), tgt=(5, cfg.ident_resp_tokens), seed=1
    )
    with Clock(device) as clock:
        emprl.identifier_levels(
            identifiers, lab["ctx"], lab["resp"], device, cfg.eval_batch_size, autocast
        )
    rows.append(("labels", clock.seconds / n, "example", clock.peak_gib, sum(ED.values())))

    # PPO: policy + value head, frozen reference, random-ish rewards from the identifiers
    ref = T5(config).to(device).eval().requires_grad_(False)
    policy = emprl.PolicyWithValue(model).to(device)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.ppo_lr, fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    kl_ctl, moments, gen = (
        ppo.KLController(0.2),
        ppo.RunningMoments(),
        torch.Generator().manual_seed(0),
    )
    pool = dict(
        ctx=ed["ctx"],
        ident_ctx=[c[-cfg.ident_ctx_tokens :] for c in ed["ctx"]],
        levels=np.zeros((len(ed["ctx"]), 3), dtype=np.int64),
    )
    ppo_steps, roll, whole = max(2, steps // 4), Clock(device), Clock(device)
    batch = data.make_batch(pool, list(range(cfg.ppo_batch_size)), device)
    for i in range(ppo_steps + 1):  # the first iteration warms up, not timed
        # a rollout alone, then a whole iteration (its own rollout, reward, GAE, 4 epochs of
        # updates)
        if i:
            roll.start()
            emprl.rollout(policy, ref, batch, cfg, autocast)
            roll.stop()
            whole.start(reset_peak=i == 1)
        emprl.ppo_iteration(
            policy, ref, identifiers, opt, sched, kl_ctl, moments, batch, cfg, autocast, gen
        )
        if i:
            whole.stop()
    rollout_s, update_s = roll.seconds / ppo_steps, (whole.seconds - roll.seconds) / ppo_steps
    rows.append(("ppo", whole.seconds / ppo_steps, "iteration", whole.peak_gib, cfg.ppo_steps))

    # evaluation: decode 30 tokens, label the replies, perplexity of the references
    n = steps * cfg.eval_batch_size // 2
    # the judge's cost only
    toy = (["so sorry", "what happened", "i see", "that is sad"] * 3, [0, 1, 2, 1] * 3)
    judge = Judge.fit({m: toy for m in data.MECHANISMS}, {m: toy for m in data.MECHANISMS})
    test = split(n, config.vocab_size, seed=2)
    with Clock(device) as clock:
        graders = emprl.Graders(identifiers, judge, _Tok())
        levels = np.zeros((n, 3), dtype=np.int64)
        emprl.evaluate(model, graders, dict(test, levels=levels), cfg, autocast)
    validations = (
        cfg.ppo_steps // cfg.ppo_eval_every * cfg.ppo_limit_valid + 1 * cfg.ppo_limit_valid
    )
    rows.append(
        ("eval", clock.seconds / n, "example", clock.peak_gib, 2 * ED["test"] + validations)
    )

    total = 0.0
    print("\n| stage | throughput | peak memory (GiB) | work in the full preset | extrapolated |")
    print("|---|---|---|---|---|")
    for stage, sec, unit, peak, units in rows:
        rate = f"{1 / sec:.2f} {unit}s/s" if sec < 1 else f"{sec:.2f} s/{unit}"
        if stage == "ppo":
            rate += f" (rollout {rollout_s:.2f} s, update {update_s:.2f} s)"
        total += sec * units
        print(f"| {stage} | {rate} | {peak:.2f} | {units:,} {unit}s | {sec * units / 60:.1f} min |")
    print(f"| **full `gpu` preset** | | | | **{total / 60:.1f} min** |")


class _Tok:
    """Decodes ids to a space-separated string of numbers (enough for Dist-n, length and BLEU)."""

    def decode(self, ids):
        ids = [int(i) for i in ids]
        return (
            " ".join(str(i) for i in ids[: ids.index(1)] if i > 2)
            if 1 in ids
            else " ".join(map(str, ids))
        )


if __name__ == "__main__":
    main()
