"""What each part of EmpRL buys: PPO/RLOO reruns of one finished `cpu` run, one row per change, and
their table.

Every row reuses the base run's tokenizer, SFT model, identifiers and labels (`--from_run`), so only
the RL stage and the evaluation run again. The base run itself is the EmpRL row.

    python train.py --preset=cpu --data_dir=$EMPRL_DATA --out_dir=runs/cpu        # the base run
    # every row not yet done
    python benchmarks/ablations.py run --base=runs/cpu --data_dir=$EMPRL_DATA
    python benchmarks/ablations.py run --base=runs/cpu --rows=no_kl,rloo          # some rows
    # markdown tables (+ --figure)
    python benchmarks/ablations.py report --base=runs/cpu

A row's run directory is runs/cpu_<row> beside the base; a finished row is skipped, an interrupted
one resumes. `--seed=1` runs the rows (and the base's PPO stage, as row `emprl`) with PPO seed 1
into runs/cpu_<row>_s1; `report` shows every row over the PPO seeds that have finished, and its
difference from the base run's PPO seeds (the same table as docs/ablations.md, which
`python benchmarks/records.py write` fills from the records listed in docs/runs/index.json).
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# row -> (what it changes, train.py overrides)
ROWS = {
    "emprl": ("the `cpu` preset as is", []),
    "no_er": ("the reward without ER", ["--reward_mechanisms=ip,ex"]),
    "no_ip": ("the reward without IP", ["--reward_mechanisms=er,ex"]),
    "no_ex": ("the reward without EX", ["--reward_mechanisms=er,ip"]),
    "no_kl": ("β = 0: no KL penalty", ["--init_kl_coef=0"]),
    "adaptive_kl": (
        "the paper's adaptive β (0.2, target 6, horizon 10,000)",
        ["--adaptive_kl=true", "--init_kl_coef=0.2", "--kl_target=6", "--kl_horizon=10000"],
    ),
    "k3": ("the k3 KL estimator", ["--kl_estimator=k3"]),
    "no_norm": (
        "no score normalisation, no reward whitening",
        ["--score_norm=false", "--whiten_rewards=false"],
    ),
    "rloo": ("RLOO, 4 replies per context, no value head", ["--algo=rloo", "--rloo_k=4"]),
    "grpo": (
        "GRPO, 4 replies per context, group-standardised scores, β·k3 in the loss",
        ["--algo=grpo", "--rloo_k=4"],
    ),
}


def row_dir(base, row, seed):
    if row == "emprl" and seed == 0:
        return base
    return base.parent / (f"{base.name}_{row}" + (f"_s{seed}" if seed else ""))


def run_rows(args):
    base = Path(args.base)
    for row in args.rows.split(","):
        out = row_dir(base, row, args.seed)
        if (out / "results.json").exists():
            print(f"{row}: done ({out})")
            continue
        cmd = [
            sys.executable,
            str(ROOT / "train.py"),
            f"--preset={args.preset}",
            f"--out_dir={out}",
            f"--from_run={base}",
            f"--ppo_seed={args.seed}",
            *ROWS[row][1],
        ]
        cmd += [f"--data_dir={args.data_dir}"] if args.data_dir else []
        print(f"{row}: {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.Popen(cmd, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS (Linux: KiB)
        if os.waitstatus_to_exitcode(status):
            sys.exit(
                f"{row} failed (exit code {os.waitstatus_to_exitcode(status)}); rerun to resume it"
            )
        (out / "peak_rss.json").write_text(json.dumps({"peak_rss_gb": usage.ru_maxrss / 2**20}))


def finished_dir(base, row, seed):
    """A finished row's directory: row_dir's, or for the base's own PPO seeds the record's name
    (docs/runs keeps runs/cpu_emprl_s1 as cpu_s1); None when neither has results.json."""
    for d in (
        row_dir(base, row, seed),
        base.parent / f"{base.name}_s{seed}" if row == "emprl" and seed else None,
    ):
        if d is not None and (d / "results.json").exists():
            return d
    return None


def row_seeds(base, row):
    """The PPO seeds of a row that have finished (results.json), in order."""
    found = {0} if finished_dir(base, row, 0) else set()
    prefixes = [f"{base.name}_{row}"] + ([base.name] if row == "emprl" else [])
    for prefix in prefixes:
        for d in base.parent.glob(f"{prefix}_s*"):
            tail = d.name[len(prefix) + 2 :]
            if tail.isdigit() and (d / "results.json").exists():
                found.add(int(tail))
    return sorted(found)


def samples(base, n=3):
    """Markdown: the first n test dialogues of results.json and every row's reply (PPO seed 0)."""
    found = {}
    for row in ROWS:
        d = finished_dir(base, row, 0)
        if d is not None:
            found[row] = json.loads((d / "results.json").read_text())["samples"]
    out = []
    for i, sample in enumerate(next(iter(found.values()), [])[:n]):
        replies = "\n".join(
            f"   - {row}: {s[i]['emprl']}" for row, s in found.items() if i < len(s)
        )
        out.append(
            f"{i + 1}. *{sample['context']}*\n   - human: {sample['reference']}\n"
            f"   - SFT: {sample['sft']}\n{replies}"
        )
    return "\n\n".join(out)


def report(args):
    """Every finished row over its PPO seeds, with its difference from the base run's PPO seeds:
    the table of docs/ablations.md, made by benchmarks/records.py from these run directories."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import records

    base = Path(args.base).resolve()
    records.RUNS = base.parent
    groups = {}
    for row in ROWS:
        names = [finished_dir(base, row, s).name for s in row_seeds(base, row)]
        if names:
            groups["ppo" if row == "emprl" else row] = names
    if not groups:
        sys.exit(f"no finished run at {base} or beside it")
    print(records.ablation_rows(groups))
    print("\nThe first test dialogues of results.json and every row's reply (PPO seed 0):\n")
    print(samples(base))
    if args.figure:
        runs = {row: row_dir(base, row, args.seed) for row in ROWS}
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "benchmarks" / "curves.py"),
                f"--out={args.figure}",
                *[f"{row}={d}" for row, d in runs.items() if (d / "log.jsonl").exists()],
            ],
            check=True,
        )


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=["run", "report"])
    p.add_argument(
        "--base", default="runs/cpu", help="the finished `cpu` run every row starts from"
    )
    p.add_argument("--rows", default=",".join(r for r in ROWS if r != "emprl"))
    p.add_argument("--seed", type=int, default=0, help="PPO seed of the rows")
    p.add_argument("--data_dir", default="")
    p.add_argument(
        "--preset", default="cpu", help="the base run's preset (tiny: to try the script in seconds)"
    )
    p.add_argument(
        "--figure", default="", help="report: also draw every row's curves into this PNG"
    )
    args = p.parse_args()
    if args.command == "run":
        run_rows(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
