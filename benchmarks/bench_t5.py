"""Speed of t5.py against transformers' T5ForConditionalGeneration on the same random t5-small-sized
model.

Measures, in one run on the same machine (fp32, CPU unless --device says otherwise):
  * training throughput: forward + backward + AdamW step, batch 16, 128 source / 32 target tokens,
    dropout on;
  * sampling throughput: generate with KV cache, batch 32, 128 source tokens, exactly 30 new tokens
    (min_new_tokens=30 on both), top_k 20; tokens/s counts new tokens, encoder time included;
  * the machine's fp32 matmul rate, so that training can be stated as a fraction of it:
    6 * parameters * tokens per step / rate (the usual forward + backward FLOP estimate). For T5 it
    overcounts: the embedding table costs no matmul and the decoder and LM head see only the 32
    target tokens, so a fast implementation can exceed 100 %.
Ours and transformers alternate, and each figure is the best of --repeats, which damps (but does not
remove) noise from other processes sharing the CPU.

    python benchmarks/bench_t5.py            # a few minutes on 2 cores
    python benchmarks/bench_t5.py --device cuda
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from t5 import T5, T5Config  # noqa: E402


def matmul_gflops(device, n=2048, reps=5):
    """Best-of-reps fp32 rate of an n x n @ n x n matmul, GFLOP/s (2 n^3 FLOP each)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(reps + 2):
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--repeats", type=int, default=3, help="timed repetitions per measurement (best is kept)"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--threads", type=int, default=0, help="CPU threads (0: torch's default, one per core)"
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers  # benchmark-only dependency

    device = torch.device(args.device)
    torch.manual_seed(0)
    config = T5Config()  # t5-small sizes: V 32128, D 512, 6 + 6 layers, H 8, F 2048, relu, tied
    ours = T5(config).to(device)
    with tempfile.TemporaryDirectory() as d:  # the very same random weights in transformers
        ours.save_pretrained(d)
        hf = transformers.T5ForConditionalGeneration.from_pretrained(d).to(device)
    n_params = sum(p.numel() for p in ours.parameters())  # a tied lm_head counted once
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads, "
        f"device {device}; model {n_params / 1e6:.1f}M parameters"
    )
    rate = matmul_gflops(device)
    print(f"fp32 matmul: {rate:.0f} GFLOP/s")

    # ---- training: forward + backward + AdamW, batch 16, 128 source / 32 target tokens ----
    B, S, T = 16, 128, 32
    g = torch.Generator().manual_seed(1)
    src = torch.randint(3, config.vocab_size, (B, S), generator=g).to(device)
    src_mask = torch.ones_like(src)
    src_mask[B // 2 :, S - 40 :] = 0  # half the rows padded, as real batches are
    labels = torch.randint(3, config.vocab_size, (B, T), generator=g).to(device)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-5)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-5)

    def step_ours():
        logits = ours(src, src_mask, ours.shift_right(labels))
        F.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_hf():
        hf(input_ids=src, attention_mask=src_mask, labels=labels).loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)

    ours.train()
    hf.train()
    train = {"ours": float("inf"), "hf": float("inf")}
    for r in range(args.repeats + 1):  # the first round is warm-up (allocator, AdamW state)
        for name, fn in (("ours", step_ours), ("hf", step_hf)):
            t = timed(fn, device)
            if r > 0:
                train[name] = min(train[name], t)
    train_tps = {k: B * (S + T) / v for k, v in train.items()}
    flops_per_step = 6 * n_params * B * (S + T)
    for k in ("ours", "hf"):
        print(
            f"train  {k:4s}: {train[k]:6.2f} s/step  {train_tps[k]:7.0f} tokens/s  "
            f"{flops_per_step / train[k] / 1e9 / rate:5.1%} of matmul rate"
        )

    # ---- sampling with cache: batch 32, 128 source tokens, 30 new tokens, top_k 20 ----
    B, S, N = 32, 128, 30
    src = torch.randint(3, config.vocab_size, (B, S), generator=g).to(device)
    src_mask = torch.ones_like(src)
    ours.eval()
    hf.eval()
    sample = {
        "ours": lambda: ours.generate(
            src, src_mask, max_new_tokens=N, min_new_tokens=N, do_sample=True, top_k=20
        ),
        "hf": lambda: hf.generate(
            input_ids=src,
            attention_mask=src_mask,
            max_new_tokens=N,
            min_new_tokens=N,
            do_sample=True,
            top_k=20,
            temperature=1.0,
        ),
    }
    best = {"ours": float("inf"), "hf": float("inf")}
    with torch.no_grad():
        for name in sample:  # warm-up; also check that both really produce N tokens
            out = sample[name]()
            assert out.shape[1] - (name == "hf") == N, (name, out.shape)
        for _ in range(args.repeats):
            for name in sample:
                best[name] = min(best[name], timed(sample[name], device))
    sample_tps = {k: B * N / v for k, v in best.items()}
    for k in ("ours", "hf"):
        print(f"sample {k:4s}: {best[k]:6.2f} s/call  {sample_tps[k]:7.0f} new tokens/s")

    print(
        f"ours / transformers: training {train_tps['ours'] / train_tps['hf']:.2f}x, "
        f"sampling {sample_tps['ours'] / sample_tps['hf']:.2f}x"
    )


if __name__ == "__main__":
    main()
