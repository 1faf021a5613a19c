"""Seconds per full PPO iteration of emprl at TRL-comparable settings, and peak memory.

One iteration = rollout of 32 replies of exactly 30 tokens from 64-token contexts (KV-cached sampling),
policy + value + reference log-probs, then 4 epochs of minibatch-8 clipped updates. The reward is a
random score (the identifiers are not part of the comparison). Each size runs in its own process so that
its peak RSS is its own.

    python benchmarks/bench_ppo.py            # both sizes
    python benchmarks/bench_ppo.py --size=tiny --steps=3

For orientation (issue 5): TRL 0.9.6's PPOTrainer on AutoModelForSeq2SeqLMWithValueHead took about 25 s per
step (3.2 GB peak) at the t5-small size and 1.3 s at the tiny size on a 2-core machine of this kind.
"""
import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import emprl  # noqa: E402
import ppo  # noqa: E402
from t5 import T5, T5Config  # noqa: E402

SIZES = {
    "t5-small": dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8),
    "tiny": dict(vocab_size=8000, d_model=128, d_kv=32, d_ff=512, num_layers=2, num_heads=4),
}
TRL = {"t5-small": (25.0, 3.2), "tiny": (1.3, None)}  # seconds per step, peak GB (issue 5, same machine kind)


class RandomScore:
    def score(self, ctx_ids, ctx_mask, replies, mask, levels, mechanisms=None):
        return torch.rand(replies.shape[0])


def one_size(size, steps):
    torch.manual_seed(0)
    config = T5Config(**SIZES[size])
    ref = T5(config).eval().requires_grad_(False)
    policy = emprl.PolicyWithValue(T5(config))
    policy.model.load_state_dict(ref.state_dict())
    opt = torch.optim.Adam(policy.parameters(), lr=1e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    cfg = types.SimpleNamespace(batch_size=32, mini_batch_size=8, ppo_epochs=4, clip_range=0.2, clip_range_value=0.2,
                                vf_coef=0.1, gamma=1.0, lam=0.95, max_grad_norm=1.0, ratio_threshold=10.0, kl_min=0.0,
                                kl_max=10.0, score_norm=True, whiten_rewards=True, temperature=0.9,
                                min_new_tokens=30, max_new_tokens=30, ppo_dropout=False, kl_estimator='k1', reward_mechanisms=('er', 'ip', 'ex'))
    ids = torch.randint(3, config.vocab_size, (32, 64))
    batch = dict(ctx_ids=ids, ctx_mask=torch.ones_like(ids), ident_ctx_ids=ids, ident_ctx_mask=torch.ones_like(ids),
                 levels=torch.zeros(32, 3, dtype=torch.long))
    gen = torch.Generator().manual_seed(0)
    times, parts = [], []
    for step in range(steps + 1):  # the first iteration warms up and is not counted
        t0 = time.perf_counter()
        roll = emprl.rollout(policy, ref, batch, cfg, contextlib.nullcontext)
        t1 = time.perf_counter()
        stats, _ = emprl.ppo_iteration(policy, ref, RandomScore(), opt, sched, ppo.KLController(0.2, adaptive=False),
                                       ppo.RunningMoments(), batch, cfg, contextlib.nullcontext, gen)
        t2 = time.perf_counter()
        assert roll["replies"].shape[1] == 30
        if step:
            times.append(t2 - t1)
            parts.append(t1 - t0)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB
    return dict(size=size, params_m=sum(p.numel() for p in ref.parameters()) / 1e6, seconds_per_step=min(times),
                rollout_seconds=min(parts), peak_rss_gb=peak_gb, threads=torch.get_num_threads())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", choices=list(SIZES))
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    if args.size:
        print(json.dumps(one_size(args.size, args.steps)))
        return
    rows = []
    for size in SIZES:
        out = subprocess.run([sys.executable, __file__, f"--size={size}", f"--steps={args.steps}"], capture_output=True,
                             text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"torch {torch.__version__}, {rows[0]['threads']} threads, best of {args.steps} iterations\n")
    print("| model | params | s / PPO step (ours) | of which rollout | peak RSS | TRL 0.9.6 s / step | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        trl_s, trl_gb = TRL[r["size"]]
        print(f"| {r['size']} | {r['params_m']:.1f}M | {r['seconds_per_step']:.2f} | {r['rollout_seconds']:.2f} | "
              f"{r['peak_rss_gb']:.2f} GB | {trl_s} ({trl_gb or '?'} GB) | {trl_s / r['seconds_per_step']:.1f}x |")


if __name__ == "__main__":
    main()
