"""How a run's test replies look to the identifiers: does the policy earn its reward by matching the
human reply's empathy levels, or by saying whatever the identifiers like? For each run (and the SFT
model of the first), on the first n ED test dialogues decoded as in the evaluation (its seed and
dtype): the share of each level the identifiers give the replies beside the share in the human
replies, accuracy per mechanism, the share of questions, and the most repeated replies.

    python benchmarks/replies.py runs/cpu runs/cpu_no_kl --n=1000
"""

import argparse
import collections
import json
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import emprl  # noqa: E402
from data import LEVELS, MECHANISMS  # noqa: E402
from t5 import T5  # noqa: E402


def describe(name, texts, levels, human):
    """Print one model's level shares against the human replies', its accuracy and its most repeated
    replies."""
    print(
        f"\n{name}: {len(set(texts)) / len(texts):.0%} distinct, "
        f"{np.mean([not t for t in texts]):.1%} empty, "
        f"{np.mean([t.endswith('?') for t in texts]):.0%} "
        f"end with '?', {np.mean([len(t.split()) for t in texts]):.1f} words split at spaces"
    )
    for m, mech in enumerate(MECHANISMS):
        share = lambda lv, m=m: " / ".join(
            f"{np.mean(lv[:, m] == k):.2f}" for k in range(len(LEVELS))
        )  # noqa: E731
        print(
            f"  {mech}: levels ({'/'.join(LEVELS)}) {share(levels)}   human {share(human)}   "
            f"accuracy {np.mean(levels[:, m] == human[:, m]):.2f}"
        )
    print(
        "  most repeated: "
        + " · ".join(f"{n}× “{t}”" for t, n in collections.Counter(texts).most_common(5))
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "runs", nargs="+", help="finished run directories (the first also gives the SFT model)"
    )
    p.add_argument("--n", type=int, default=1000, help="the first n test dialogues")
    p.add_argument("--seed", type=int, default=42, help="the decoding seed (the evaluation's)")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    for i, run in enumerate(map(Path, args.runs)):
        model, identifiers, tok, cfg, which = emprl.load_run(run)
        test = {k: v[: args.n] for k, v in torch.load(run / "encoded.pt")["test"].items()}
        human = torch.load(run / "labels.pt")["test"].numpy()[: args.n]
        ident_ctx = [c[-cfg["ident_ctx_tokens"] :] for c in test["ctx"]]
        # the dtype the run resolved (bfloat16 autocast or float32), as evaluated
        results = run / "results.json"
        dtype = (
            json.loads(results.read_text())["environment"]["dtype"]
            if results.exists()
            else cfg["dtype"]
        )
        autocast = (
            (lambda: torch.autocast("cpu", dtype=torch.bfloat16))
            if dtype == "bfloat16"
            else nullcontext
        )
        models = [(f"{run} SFT", T5.from_pretrained(run / "sft").eval())] if i == 0 else []
        for name, m in models + [(f"{run} {which}", model)]:
            replies = emprl.generate_replies(
                m, test["ctx"], "cpu", cfg["eval_batch_size"], args.seed, autocast
            )
            levels, _ = emprl.identifier_levels(
                identifiers, ident_ctx, replies, "cpu", cfg["eval_batch_size"], autocast
            )
            describe(name, [tok.decode(r) for r in replies], levels, human)


if __name__ == "__main__":
    main()
