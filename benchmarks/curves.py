"""Training curves of one or more runs from their log.jsonl, one line per run, one panel per
quantity over the RL iterations: by default the rollouts' score, the summed KL, β and validation
Emp-F1 (by the identifiers, the reward's own models); `--panels=score,emp_f1,emp_f1_judge` sets the
proxy beside the independent judge. Needs matplotlib (optional, not a dependency of the project:
`pip install matplotlib`).

    python benchmarks/curves.py runs/cpu --out=curves.png
    python benchmarks/curves.py emprl=runs/cpu no_kl=runs/cpu_no_kl --out=docs/ablation_curves.png
    python benchmarks/curves.py emprl=runs/cpu no_kl=runs/cpu_no_kl \\
        --panels=score,emp_f1,emp_f1_judge --out=o.png
    # every variant of a pipeline of docs/runs/index.json, its lowest PPO seed each
    python benchmarks/curves.py --pipeline=cpu --out=docs/ablation_curves.png
"""

import argparse
import json
from pathlib import Path


def records(run):
    """The last record of every PPO iteration and of every validation (a resumed run logs some
    twice)."""
    recs = []
    for line in open(Path(run) / "log.jsonl"):
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            pass
    iterations = {r["step"]: r for r in recs if r.get("stage") == "ppo" and "score" in r}
    evals = {r["step"]: r for r in recs if r.get("stage") == "ppo_eval"}
    return [iterations[k] for k in sorted(iterations)], [evals[k] for k in sorted(evals)]


TITLES = {
    "score": "rollout reward (proxy)",
    "kl": "summed KL to SFT, nats",
    "beta": "β",
    "emp_f1": "validation Emp-F1 by the identifiers",
    "emp_f1_judge": "validation Emp-F1 by the judge",
    "reward": "validation reward",
}
# logged every iteration (smoothed); the others at validations
PER_ITERATION = ("score", "kl", "beta")


def of_pipeline(name):
    """name=dir for every variant of a pipeline in docs/runs/index.json (its lowest PPO seed)."""
    runs = Path(__file__).resolve().parent.parent / "docs" / "runs"
    records = json.loads((runs / "index.json").read_text())["records"]
    first = {}
    for record, r in sorted(records.items(), key=lambda kv: -kv[1]["ppo_seed"]):
        if r["pipeline"] == name:
            first[r["variant"]] = f"{r['variant']}={runs / record}"
    if not first:
        raise SystemExit(f"--pipeline: docs/runs/index.json has no pipeline {name!r}")
    return [first[v] for v in sorted(first, key=lambda v: (v != "ppo", v))]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="*", help="run directories, optionally named: name=dir")
    p.add_argument(
        "--pipeline", default="", help="draw every variant of this pipeline of docs/runs"
    )
    p.add_argument("--out", default="curves.png")
    p.add_argument(
        "--smooth", type=int, default=10, help="moving average over this many iterations"
    )
    p.add_argument(
        "--panels", default="score,kl,beta,emp_f1", help=f"a comma list of {', '.join(TITLES)}"
    )
    args = p.parse_args()
    runs = args.runs + (of_pipeline(args.pipeline) if args.pipeline else [])
    if not runs:
        p.error("give run directories or --pipeline")
    panels = args.panels.split(",")
    if set(panels) - set(TITLES):
        raise SystemExit(
            f"--panels: unknown {sorted(set(panels) - set(TITLES))}; choose from "
            f"{', '.join(TITLES)}"
        )
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(
            "curves.py draws with matplotlib, an optional extra: pip install matplotlib"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 3.6), squeeze=False)
    for spec in runs:
        name, _, run = spec.rpartition("=")
        iterations, evals = records(run)
        for ax, key in zip(axes[0], panels):
            if key in PER_ITERATION:
                y = [r[key] for r in iterations]
                y = [
                    sum(y[max(0, i - args.smooth + 1) : i + 1])
                    / len(y[max(0, i - args.smooth + 1) : i + 1])
                    for i in range(len(y))
                ]
                ax.plot([r["step"] for r in iterations], y, label=name or Path(run).name)
            else:
                pts = [(r["step"], r[key]) for r in evals if key in r]
                ax.plot(
                    [s for s, _ in pts],
                    [v for _, v in pts],
                    marker="o",
                    label=name or Path(run).name,
                )
    for ax, key in zip(axes[0], panels):
        smoothed = f" (mean of {args.smooth})" if key in PER_ITERATION else ""
        ax.set_title(TITLES[key] + smoothed, fontsize=9)
        ax.set_xlabel("iteration")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
