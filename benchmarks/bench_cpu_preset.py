"""The `cpu` preset's speed per stage as a newcomer runs it (torch's default threads), for one or
more checkouts of this repository, alternated so that the machine's drift hits each alike.

    python benchmarks/bench_cpu_preset.py --code=before:/path/to/old/checkout,after:. --rounds=2

Each run is `python train.py --preset=cpu` on the full data with shortened stages (a tenth of an SFT
epoch, one identifier epoch, 1,024 labelled contexts, 8 PPO iterations, 256 test examples): the
settings change how long each stage runs, not how fast its steps go. Prints, per run, SFT steps per
second, seconds per identifier epoch, labels per second, seconds per PPO iteration (the mean of
iterations 2-8; the first includes warm-up) and the test evaluation's seconds, with the machine's
load average at the start.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHORT = [
    "--preset=cpu",
    "--sft_epochs=0.1",
    "--ident_epochs=1",
    "--label_limit_train=1024",
    "--ppo_steps=8",
    "--ppo_eval_every=8",
    "--ppo_limit_valid=64",
    "--limit_test=256",
]


def one_run(code, data_dir, out):
    """Run the shortened pipeline in checkout `code`; returns its speeds per stage."""
    load = os.getloadavg()[0]
    cmd = [sys.executable, "train.py", *SHORT, f"--out_dir={out}", f"--data_dir={data_dir}"]
    subprocess.run(cmd, cwd=code, check=True, capture_output=True, text=True)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    seconds = {r["name"]: r["seconds"] for r in log if r["stage"] == "timing"}
    config = log[0]
    sft_steps = max(r["step"] for r in log if r["stage"] == "sft")
    ppo = [r["seconds"] for r in log if r["stage"] == "ppo"][1:]
    labelled = sum(sum(r["counts"]["er"]) for r in log if r["stage"] == "labels")
    return dict(
        load=load,
        dtype=config["dtype"],
        sft_steps_per_s=sft_steps / seconds["sft"],
        ident_s_per_epoch=seconds["identifiers"] / 3,  # three identifiers, one epoch each
        labels_per_s=labelled / seconds["labels"],
        ppo_s_per_iteration=sum(ppo) / len(ppo),
        eval_s=seconds["eval"],
    )


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--code", default="current:.", help="name:checkout pairs, comma-separated")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--data_dir", default=os.environ.get("EMPRL_DATA", ""))
    args = p.parse_args(argv)
    codes = [pair.split(":", 1) for pair in args.code.split(",")]
    print(
        "| round | code | dtype | load | SFT steps/s | s / identifier epoch | labels/s | "
        "s / PPO iteration | eval s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(1, args.rounds + 1):
            for name, code in codes:
                t0 = time.time()
                r = one_run(Path(code).resolve(), args.data_dir, Path(tmp) / f"{name}{round_}")
                print(
                    f"| {round_} | {name} | {r['dtype']} | {r['load']:.2f} | "
                    f"{r['sft_steps_per_s']:.2f} | {r['ident_s_per_epoch']:.0f} | "
                    f"{r['labels_per_s']:.0f} | {r['ppo_s_per_iteration']:.2f} | "
                    f"{r['eval_s']:.0f} |",
                    flush=True,
                )
                print(f"  ({name}, round {round_}: {time.time() - t0:.0f} s in all)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
