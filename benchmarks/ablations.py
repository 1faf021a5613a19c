"""What each part of EmpRL buys: PPO/RLOO reruns of one finished `cpu` run, one row per change, and their table.

Every row reuses the base run's tokenizer, SFT model, identifiers and labels (`--from_run`), so only the RL stage
and the evaluation run again (about 12 minutes a row on 2 CPU cores). The base run itself is the EmpRL row.

    python train.py --preset=cpu --data_dir=$EMPRL_DATA --out_dir=runs/cpu        # the base run (~40 min)
    python benchmarks/ablations.py run --base=runs/cpu --data_dir=$EMPRL_DATA     # every row not yet done
    python benchmarks/ablations.py run --base=runs/cpu --rows=no_kl,rloo          # some rows
    python benchmarks/ablations.py report --base=runs/cpu                         # markdown table + figure

A row's run directory is runs/cpu_<row> beside the base; a finished row is skipped, an interrupted one resumes.
`--seed=1` runs the rows (and the base's PPO stage, as row `emprl`) with PPO seed 1 into runs/cpu_<row>_s1.
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
    "adaptive_kl": ("the paper's adaptive β (0.2, target 6, horizon 10,000)",
                    ["--adaptive_kl=true", "--init_kl_coef=0.2", "--kl_target=6", "--kl_horizon=10000"]),
    "k3": ("the k3 KL estimator", ["--kl_estimator=k3"]),
    "no_norm": ("no score normalisation, no reward whitening", ["--score_norm=false", "--whiten_rewards=false"]),
    "rloo": ("RLOO, 4 replies per context, no value head", ["--algo=rloo", "--rloo_k=4"]),
    "grpo": ("GRPO, 4 replies per context, group-standardised scores, β·k3 in the loss",
             ["--algo=grpo", "--rloo_k=4"]),
}
COLUMNS = ["emp_f1", "emp_f1_judge", "emp_f1_er", "emp_f1_ip", "emp_f1_ex", "reward", "dist_2", "ppl", "length",
           "unique_frac"]


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
        cmd = [sys.executable, str(ROOT / "train.py"), f"--preset={args.preset}", f"--out_dir={out}",
               f"--from_run={base}", f"--ppo_seed={args.seed}", *ROWS[row][1]]
        cmd += [f"--data_dir={args.data_dir}"] if args.data_dir else []
        print(f"{row}: {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.Popen(cmd, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS (Linux: KiB)
        if os.waitstatus_to_exitcode(status):
            sys.exit(f"{row} failed (exit code {os.waitstatus_to_exitcode(status)}); rerun to resume it")
        (out / "peak_rss.json").write_text(json.dumps({"peak_rss_gb": usage.ru_maxrss / 2**20}))


def ppo_seconds(out):
    """Median seconds per RL iteration from the run's log (validation evaluations not included)."""
    recs = [json.loads(line) for line in open(out / "log.jsonl") if line.startswith('{"stage": "ppo", "step"')]
    secs = sorted(r["seconds"] for r in recs if "seconds" in r)
    return secs[len(secs) // 2] if secs else float("nan")


def report(args):
    base = Path(args.base)
    print("| row | what changes | " + " | ".join(COLUMNS) + " | s / iteration | peak RSS GB |")
    print("|---" * (len(COLUMNS) + 4) + "|")
    sft = json.loads((base / "results.json").read_text())["sft"]
    print("| SFT | no RL | " + " | ".join(f"{sft[c]:.2f}" for c in COLUMNS) + " | | |")
    emp_f1 = {}  # (row, seed) -> test Emp-F1
    for row, (what, _) in ROWS.items():
        for seed in (0, 1):
            path = row_dir(base, row, seed) / "results.json"
            if path.exists():
                emp_f1[row, seed] = json.loads(path.read_text())["emprl"]["emp_f1"]
        out = row_dir(base, row, args.seed)
        if not (out / "results.json").exists():
            print(f"| {row} | {what} | " + " | ".join("" for _ in COLUMNS) + " | not run | |")
            continue
        m = {"emp_f1_judge": float("nan"), **json.loads((out / "results.json").read_text())["emprl"]}
        # the base run was not started by this script (no peak RSS, other threads): time its seed-1 rerun instead
        timed = row_dir(base, row, 1) if out == base and (row_dir(base, row, 1) / "peak_rss.json").exists() else out
        rss = (timed / "peak_rss.json").exists() and json.loads((timed / "peak_rss.json").read_text())["peak_rss_gb"]
        print(f"| {row} | {what} | " + " | ".join(f"{m[c]:.2f}" for c in COLUMNS) +
              f" | {ppo_seconds(timed):.1f} | {f'{rss:.2f}' if rss else '?'} |")
    print("\nEmp-F1 by PPO seed (a second seed runs where seed 0 lies within 1.5 of EmpRL's):\n")
    print("| row | seed 0 | seed 1 | mean | difference of the seeds | mean − EmpRL's mean |")
    print("|---|---|---|---|---|---|")
    ref = [emp_f1[k] for k in (("emprl", 0), ("emprl", 1)) if k in emp_f1]
    for row in ROWS:
        f1 = [emp_f1[row, s] for s in (0, 1) if (row, s) in emp_f1]
        if not f1:
            continue
        todo = len(f1) == 1 and ref and abs(f1[0] - ref[0]) <= 1.5
        seeds = [f"{emp_f1[row, s]:.2f}" if (row, s) in emp_f1 else ("to run" if todo else "") for s in (0, 1)]
        spread = f"{abs(f1[0] - f1[1]):.2f}" if len(f1) == 2 else ""
        gap = f"{sum(f1) / len(f1) - sum(ref) / len(ref):+.2f}" if ref and row != "emprl" else ""
        print(f"| {row} | {seeds[0]} | {seeds[1]} | {sum(f1) / len(f1):.2f} | {spread} | {gap} |")
    samples = {row: json.loads((row_dir(base, row, args.seed) / "results.json").read_text())["samples"]
               for row in ROWS if (row_dir(base, row, args.seed) / "results.json").exists()}
    print("\nThe first three test dialogues of results.json, every row's reply:")
    for i, sample in enumerate(samples["emprl"][:3] if "emprl" in samples else []):
        print(f"\n{i + 1}. *{sample['context']}*\n   - human: {sample['reference']}\n   - SFT: {sample['sft']}")
        print("\n".join(f"   - {row}: {s[i]['emprl']}" for row, s in samples.items()))
    if args.figure:
        runs = {row: row_dir(base, row, args.seed) for row in ROWS}
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "curves.py"), f"--out={args.figure}",
                        *[f"{row}={d}" for row, d in runs.items() if (d / "log.jsonl").exists()]], check=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=["run", "report"])
    p.add_argument("--base", default="runs/cpu", help="the finished `cpu` run every row starts from")
    p.add_argument("--rows", default=",".join(r for r in ROWS if r != "emprl"))
    p.add_argument("--seed", type=int, default=0, help="PPO seed of the rows")
    p.add_argument("--data_dir", default="")
    p.add_argument("--preset", default="cpu", help="the base run's preset (tiny: to try the script in seconds)")
    p.add_argument("--figure", default="", help="report: also draw every row's curves into this PNG")
    args = p.parse_args()
    if args.command == "run":
        run_rows(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
