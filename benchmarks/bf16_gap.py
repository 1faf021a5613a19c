"""How far apart the sampled and the scored log-probs of a reply are, at t5-small size and PPO's
batch: the log-prob of each token as the cached one-token decoding step computed it (what
`generate` samples from) against the full teacher-forced pass (what PPO's ratios and KL use).

    python benchmarks/bf16_gap.py                      # seeds 0-6, bfloat16 and float32
    python benchmarks/bf16_gap.py --seeds=3 --dtypes=bfloat16

Both passes run the same attention code and a float32 LM head, so the gap is rounding alone:
matmuls of other shapes round differently (one token against the whole reply). Random weights, a
random context of 200 tokens per row (some rows padded), replies of 30 sampled tokens. Prints, per
dtype, the mean and the largest gap over all real tokens of every seed, and each seed's largest.
"""

import argparse
import platform
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from t5 import T5, T5Config  # noqa: E402

T5_SMALL = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8)


def gap(model, seed, dtype, batch=32, context=200, reply=30):
    """|sampled - scored| log-prob of every reply token (a flat tensor) for one random batch."""
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randint(2, T5_SMALL["vocab_size"], (batch, context), generator=g)
    mask = torch.ones(batch, context, dtype=torch.long)
    lengths = torch.randint(context // 4, context + 1, (batch,), generator=g)
    mask[torch.arange(context)[None, :] >= lengths[:, None]] = 0  # rows of several lengths
    autocast = nullcontext()
    if dtype == "bfloat16":
        autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    with torch.no_grad(), autocast:
        encoder_hidden = model.encoder(ctx, mask)
        cache = [{"self": {}, "cross": {}} for _ in model.decoder.block]
        token = torch.zeros(batch, 1, dtype=torch.long)
        tokens = []
        step_logprobs = []
        for _ in range(reply):  # T5.generate's loop, keeping the log-prob of each drawn token
            hidden = model.decoder(
                token, encoder_hidden=encoder_hidden, encoder_mask=mask, cache=cache
            )
            logp = model.lm_logits(hidden[:, -1]).log_softmax(-1)  # (B, V), float32
            token = torch.multinomial(logp.exp(), 1, generator=g)
            tokens.append(token)
            step_logprobs.append(logp.gather(-1, token))
        replies = torch.cat(tokens, 1)  # (B, T)
        sampled = torch.cat(step_logprobs, 1)
        scored = model(ctx, mask, model.shift_right(replies)).log_softmax(-1)  # (B, T, V)
    scored = scored.gather(-1, replies[..., None])[..., 0]
    return (sampled - scored).abs().flatten()


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=7)
    p.add_argument("--dtypes", default="bfloat16,float32")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = T5(T5Config(**T5_SMALL)).eval()
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    print(f"# {cpu}, {platform.machine()}, torch {torch.__version__}, threads")
    print(f"# {torch.get_num_threads()}, t5-small random weights, batch 32, context 200, reply 30")
    for dtype in args.dtypes.split(","):
        t0 = time.time()
        gaps = [gap(model, seed, dtype) for seed in range(args.seeds)]
        every = torch.cat(gaps)
        worst = ", ".join(f"{g.max().item():.2e}" for g in gaps)
        print(
            f"{dtype}: mean {every.mean().item():.2e}, max {every.max().item():.2e} over "
            f"{args.seeds} seeds ({every.numel()} tokens); per seed max: {worst} "
            f"({time.time() - t0:.0f} s)"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
