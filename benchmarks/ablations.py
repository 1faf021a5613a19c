"""What each part of EmpRL buys: PPO/RLOO reruns of one finished `cpu` run, one row per change, and their table.

Every row reuses the base run's tokenizer, SFT model, identifiers and labels (`--from_run`), so only the RL stage
and the evaluation run again (15-25 minutes a row at one thread, with another row on the second core). The base
run itself is the EmpRL row.

    python train.py --preset=cpu --data_dir=$EMPRL_DATA --out_dir=runs/cpu        # the base run (~1.5 h)
    python benchmarks/ablations.py run --base=runs/cpu --data_dir=$EMPRL_DATA     # every row not yet done
    python benchmarks/ablations.py run --base=runs/cpu --rows=no_kl,rloo          # some rows
    python benchmarks/ablations.py report --base=runs/cpu                         # markdown tables (+ --figure)

A row's run directory is runs/cpu_<row> beside the base; a finished row is skipped, an interrupted one resumes.
`--seed=1` runs the rows (and the base's PPO stage, as row `emprl`) with PPO seed 1 into runs/cpu_<row>_s1;
`report` shows PPO seeds 0 to 2.
"""
import argparse
import json
import os
import statistics
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


def ppo_log(out):
    """The run's PPO iteration lines (validation evaluations are separate lines)."""
    return [json.loads(line) for line in open(out / "log.jsonl") if line.startswith('{"stage": "ppo", "step"')]


def median(values):
    values = sorted(values)
    return values[len(values) // 2] if values else float("nan")


def interval(d):
    return f"{d['mean']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]"


def parts(m, key):
    """Emp-F1 and its ER / IP / EX parts, by the identifiers (key "emp_f1") or the judge ("emp_f1_judge")."""
    return f"{m[key]:.2f} ({m[key + '_er']:.1f} / {m[key + '_ip']:.1f} / {m[key + '_ex']:.1f})"


def report(args):
    """Markdown: one line per finished (row, PPO seed) with both labellers, the paired-bootstrap interval of the
    row over SFT, what the identifiers cannot see (perplexity, distinct replies, length, the KL), and the median
    seconds per iteration; then mean ± SD for rows with several seeds, and every row's replies to three dialogues."""
    base = Path(args.base)
    print("| row | PPO seed | what changes | Emp-F1 (ER / IP / EX) | − SFT [95 % CI] | judge (ER / IP / EX) | "
          "judge − SFT [95 % CI] | reward | PPL | distinct | length | summed KL, last 20 iterations | s / iteration |")
    print("|---" * 13 + "|")
    sft = json.loads((base / "results.json").read_text())["sft"]
    print(f"| SFT | | no RL | {parts(sft, 'emp_f1')} | | {parts(sft, 'emp_f1_judge')} | | {sft['reward']:.3f} | "
          f"{sft['ppl']:.1f} | {sft['unique_frac']:.2f} | {sft['length']:.1f} | 0 | |")
    finished = {}  # row -> [results.json of each finished seed]
    for row, (what, _) in ROWS.items():
        for seed in (0, 1, 2):
            out = row_dir(base, row, seed)
            if not (out / "results.json").exists():
                if seed == 0:
                    print(f"| {row} | | {what} | not run |" + " |" * 9)
                continue
            r = json.loads((out / "results.json").read_text())
            finished.setdefault(row, []).append(r)
            m, d, its = r["emprl"], r["difference"], ppo_log(out)
            kl = sum(i["kl"] for i in its[-20:]) / max(len(its[-20:]), 1)
            print(f"| {row} | {seed} | {what} | {parts(m, 'emp_f1')} | {interval(d['emp_f1'])} | "
                  f"{parts(m, 'emp_f1_judge')} | {interval(d['emp_f1_judge'])} | {m['reward']:.3f} | {m['ppl']:.1f} | "
                  f"{m['unique_frac']:.2f} | {m['length']:.1f} | {kl:.2f} | "
                  f"{median(i['seconds'] for i in its if 'seconds' in i):.1f} |")
    print("\nRows with several PPO seeds, mean ± SD over the n seeds:\n")
    print("| row | n | Emp-F1 | − SFT | judge − SFT | PPL |")
    print("|---|---|---|---|---|---|")
    for row, rs in finished.items():
        if len(rs) > 1:
            cols = [[r["emprl"]["emp_f1"] for r in rs], [r["difference"]["emp_f1"]["mean"] for r in rs],
                    [r["difference"]["emp_f1_judge"]["mean"] for r in rs], [r["emprl"]["ppl"] for r in rs]]
            print(f"| {row} | {len(rs)} | " + " | ".join(f"{statistics.mean(c):{sign}.2f} ± {statistics.stdev(c):.2f}"
                                                          for c, sign in zip(cols, ["", "+", "+", ""])) + " |")
    print("\nThe first three test dialogues of results.json, every row's reply (PPO seed 0):")
    samples = {row: rs[0]["samples"] for row, rs in finished.items()}
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
