"""Seconds per full PPO iteration of emprl, split into rollout and update, and peak memory.

One iteration = rollout of 32 replies of exactly 30 tokens from 64-token contexts (KV-cached
sampling from the full softmax at temperature 1, as the TRL baseline samples), policy + value +
reference log-probs, then 4 PPO epochs over minibatches of 8 with gradient accumulation 4 (one
optimizer update per epoch: the authors' TRL 0.9.6 schedule). The reward is a random score (the
identifiers are not part of the comparison). Each size runs in its own process so that its peak RSS
is its own.

    python benchmarks/bench_ppo.py                       # every size
    python benchmarks/bench_ppo.py --size=tiny --steps=2
    python benchmarks/bench_ppo.py --sizes=tiny,t5-small-gated \\
        --trl_python=/path/to/trl-env/bin/python
    # our bfloat16 autocast too
    python benchmarks/bench_ppo.py --sizes=t5-small-gated --dtypes=float32,bfloat16

Sizes: `t5-small-gated` is t5-small's dimensions with T5 v1.1's gated-GELU and untied embeddings
(89.5M parameters), the architecture of the TRL 0.9.6 figure below; `t5-small` is T5 v1.0 (ReLU,
tied, 60.5M); `cpu` is the `cpu` preset's 7.6M model. `--trl_python=PATH` also runs TRL 0.9.6's
PPOTrainer on the same work in that interpreter (benchmarks/trl_ppo.py; an environment with trl
0.9.6 and transformers 4.44.2, see docs/speed.md), one size after the other in the same run, and
prints both and the ratio. `--flush=ours` flushes float32 denormals to zero in ours only, as each
is run by its users (train.py flushes them, TRL does not); `--flush=both` in both
(docs/speed.md says why that matters for these random models); `--profile=N` also prints the N
costliest operators of ours.
"""

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import emprl  # noqa: E402
import ppo  # noqa: E402
import train  # noqa: E402
from t5 import T5, T5Config  # noqa: E402

SIZES = {
    "t5-small-gated": dict(
        vocab_size=32128,
        d_model=512,
        d_kv=64,
        d_ff=2048,
        num_layers=6,
        num_heads=8,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
    ),
    "t5-small": dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8),
    # the cpu preset's T5
    "cpu": dict(vocab_size=8000, d_model=256, d_kv=32, d_ff=1024, num_layers=3, num_heads=8),
    "tiny": dict(vocab_size=8000, d_model=128, d_kv=32, d_ff=512, num_layers=2, num_heads=4),
}


class RandomScore:
    def score(self, ctx, ctx_mask, replies, mask, levels, mechanisms=None):
        return torch.rand(replies.shape[0])


def one_size(size, steps, grad_accum, dtype="float32", profile=0):
    torch.manual_seed(0)
    config = T5Config(**SIZES[size])
    ref = T5(config).eval().requires_grad_(False)
    policy = emprl.PolicyWithValue(T5(config))
    policy.model.load_state_dict(ref.state_dict())
    opt = torch.optim.Adam(policy.parameters(), lr=1e-5, fused=True)  # as train.py makes it
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    # the authors' PPO schedule; replies sampled from the full softmax at τ = 1, as trl_ppo.py has
    # TRL sample them
    cfg = train.Config(
        ppo_grad_accum=grad_accum, ppo_min_new_tokens=30, ppo_max_new_tokens=30, ppo_temperature=1.0
    )
    ids = torch.randint(3, config.vocab_size, (32, 64))
    batch = dict(
        ctx=ids,
        ctx_mask=torch.ones_like(ids),
        ident_ctx=ids,
        ident_ctx_mask=torch.ones_like(ids),
        levels=torch.zeros(32, 3, dtype=torch.long),
    )
    gen = torch.Generator().manual_seed(0)
    autocast = contextlib.nullcontext
    if dtype == "bfloat16":  # the autocast train.py uses; the TRL baseline stays float32
        autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    times, parts = [], []
    for step in range(steps + 1):  # the first iteration warms up and is not counted
        t0 = time.perf_counter()
        roll = emprl.rollout(policy, ref, batch, cfg, autocast)
        t1 = time.perf_counter()
        stats, _ = emprl.ppo_iteration(
            policy,
            ref,
            RandomScore(),
            opt,
            sched,
            ppo.KLController(0.2, adaptive=False),
            ppo.RunningMoments(),
            batch,
            cfg,
            autocast,
            gen,
        )
        t2 = time.perf_counter()
        assert roll["replies"].shape[1] == 30
        if step:
            times.append(t2 - t1)
            parts.append(t1 - t0)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB
    updates = sched.last_epoch // (steps + 1)  # optimizer updates per iteration
    # the matmul FLOPs of one more iteration (counted, not timed)
    with FlopCounterMode(display=False) as counter:
        emprl.ppo_iteration(
            policy,
            ref,
            RandomScore(),
            opt,
            sched,
            ppo.KLController(0.2, adaptive=False),
            ppo.RunningMoments(),
            batch,
            cfg,
            autocast,
            gen,
        )
    if profile:  # where one more iteration's time goes, by operator and input shape
        with torch.profiler.profile(record_shapes=True) as prof:
            emprl.ppo_iteration(
                policy,
                ref,
                RandomScore(),
                opt,
                sched,
                ppo.KLController(0.2, adaptive=False),
                ppo.RunningMoments(),
                batch,
                cfg,
                autocast,
                gen,
            )
        for e in sorted(
            prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total
        )[:profile]:
            print(
                f"  {e.self_cpu_time_total / 1e6:6.2f} s {e.count:5d} calls  {e.key} "
                f"{e.input_shapes}"
            )
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    matmul_s = min(timed(lambda: a @ b) for _ in range(5))
    return dict(
        size=size,
        dtype=dtype,
        params_m=sum(p.numel() for p in ref.parameters()) / 1e6,
        seconds_per_step=min(times),
        rollout_seconds=min(parts),
        peak_rss_gb=peak_gb,
        threads=torch.get_num_threads(),
        updates=updates,
        tflop=counter.get_total_flops() / 1e12,
        matmul_gflops=2 * 2048**3 / matmul_s / 1e9,
    )


# the header's note on denormals, per --flush
FLUSHED = {
    "none": "\n",
    "ours": ", denormals flushed in ours only\n",
    "both": ", denormals flushed\n",
}


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", choices=list(SIZES))
    p.add_argument("--steps", type=int, default=2)
    p.add_argument(
        "--grad_accum", type=int, default=4, help="minibatches per optimizer update (authors: 4)"
    )
    p.add_argument("--sizes", default=",".join(SIZES), help="the sizes of the table, a comma list")
    p.add_argument(
        "--trl_python",
        default="",
        help="a Python with trl 0.9.6: time TRL's PPOTrainer beside ours",
    )
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument(
        "--dtypes", default="float32", help="ours in each of these (a comma list), one process each"
    )
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also print the N operators (by input shape) that took the most time in "
        "one more iteration",
    )
    p.add_argument(
        "--flush",
        default="none",
        choices=("none", "ours", "both"),
        help="where float32 denormals are flushed to zero: none, ours (as users run each: "
        "train.py flushes, TRL does not), or both",
    )
    args = p.parse_args()
    if args.size:
        torch.set_flush_denormal(args.flush != "none")  # first: before any matmul starts threads
        print(
            json.dumps(one_size(args.size, args.steps, args.grad_accum, args.dtype, args.profile))
        )
        return
    rows, trl = [], {}
    for size in args.sizes.split(","):
        for dtype in args.dtypes.split(","):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    f"--size={size}",
                    f"--steps={args.steps}",
                    f"--grad_accum={args.grad_accum}",
                    f"--dtype={dtype}",
                    f"--profile={args.profile}",
                    f"--flush={args.flush}",
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            *profile, result = out.rstrip().splitlines()
            rows.append(json.loads(result))
            if args.profile:
                print(
                    f"{size} {dtype}, the operators that took longest (self time, profiled):",
                    *profile,
                    sep="\n",
                )
        # the same work in TRL, right after ours (the machine's speed drifts over minutes)
        if args.trl_python:
            out = subprocess.run(
                [
                    args.trl_python,
                    str(Path(__file__).parent / "trl_ppo.py"),
                    json.dumps(SIZES[size]),
                    str(args.steps),
                    str(int(args.flush == "both")),
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            trl[size] = json.loads(out.strip().splitlines()[-1])
    print(
        f"torch {torch.__version__}, {rows[0]['threads']} threads, best of {args.steps} "
        "iterations, "
        f"{rows[0]['updates']} optimizer updates per iteration" + FLUSHED[args.flush]
    )
    print(
        "| model | dtype | params | s / PPO iteration | of which rollout | update | peak RSS | "
        "TFLOP / iteration | "
        "achieved / fp32 matmul rate |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rate = r["tflop"] * 1e3 / r["seconds_per_step"]
        print(
            f"| {r['size']} | {r['dtype']} | {r['params_m']:.1f}M | {r['seconds_per_step']:.2f} "
            "| "
            f"{r['rollout_seconds']:.2f} | "
            f"{r['seconds_per_step'] - r['rollout_seconds']:.2f} | {r['peak_rss_gb']:.2f} GB | "
            f"{r['tflop']:.2f} | "
            f"{rate:.0f} / {r['matmul_gflops']:.0f} GFLOP/s "
            f"({100 * rate / r['matmul_gflops']:.0f} %) |"
        )
    if trl:
        print(
            "\n| model | emprl s / iteration | TRL 0.9.6 s / iteration | TRL / emprl | emprl "
            "peak RSS | "
            "TRL peak RSS |"
        )
        print("|---|---|---|---|---|---|")
        for r in rows:
            if r["dtype"] != "float32":  # like for like: TRL runs in float32
                continue
            t = trl[r["size"]]
            print(
                f"| {r['size']} | {r['seconds_per_step']:.2f} | {t['seconds_per_step']:.2f} | "
                f"{t['seconds_per_step'] / r['seconds_per_step']:.2f}x | {r['peak_rss_gb']:.2f} "
                "GB | "
                f"{t['peak_rss_gb']:.2f} GB |"
            )


if __name__ == "__main__":
    main()
