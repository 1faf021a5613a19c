"""Training curves of one or more runs from their log.jsonl: score, summed KL, β and validation Emp-F1 over the
RL iterations, one line per run. Needs matplotlib (not a dependency of the project: `pip install matplotlib`).

    python benchmarks/curves.py runs/cpu --out=curves.png
    python benchmarks/curves.py emprl=runs/cpu no_kl=runs/cpu_no_kl --out=docs/ablation_curves.png
"""
import argparse
import json
from pathlib import Path


def records(run):
    """The last record of every PPO iteration and of every validation (a resumed run logs some twice)."""
    recs = []
    for line in open(Path(run) / "log.jsonl"):
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            pass
    iterations = {r["step"]: r for r in recs if r.get("stage") == "ppo" and "score" in r}
    evals = {r["step"]: r for r in recs if r.get("stage") == "ppo_eval"}
    return [iterations[k] for k in sorted(iterations)], [evals[k] for k in sorted(evals)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run directories, optionally named: name=dir")
    p.add_argument("--out", default="curves.png")
    p.add_argument("--smooth", type=int, default=10, help="moving average over this many iterations")
    args = p.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    for spec in args.runs:
        name, _, run = spec.rpartition("=")
        iterations, evals = records(run)
        for ax, key in zip(axes, ("score", "kl", "beta")):
            y = [r[key] for r in iterations]
            y = [sum(y[max(0, i - args.smooth + 1):i + 1]) / len(y[max(0, i - args.smooth + 1):i + 1])
                 for i in range(len(y))]
            ax.plot([r["step"] for r in iterations], y, label=name or Path(run).name)
        axes[3].plot([r["step"] for r in evals], [r["emp_f1"] for r in evals], marker="o", label=name or Path(run).name)
    for ax, title in zip(axes, (f"score (mean of {args.smooth})", f"summed KL, nats (mean of {args.smooth})", "β",
                                "validation Emp-F1")):
        ax.set_title(title)
        ax.set_xlabel("iteration")
    axes[3].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
