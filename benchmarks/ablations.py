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
into runs/cpu_<row>_s1; `report` shows every PPO seed that has finished. docs/ablations.md is
written from the records in docs/runs by `python benchmarks/records.py write`.
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


def ppo_log(out):
    """The run's PPO iteration lines (validation evaluations are separate lines)."""
    return [
        json.loads(line)
        for line in open(out / "log.jsonl")
        if line.startswith('{"stage": "ppo", "step"')
    ]


def median(values):
    values = sorted(values)
    return values[len(values) // 2] if values else float("nan")


def interval(d):
    return f"{d['mean']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]"


def parts(m, key):
    """Emp-F1 and its ER / IP / EX parts, by the identifiers (key "emp_f1") or the judge
    ("emp_f1_judge")."""
    return f"{m[key]:.2f} ({m[key + '_er']:.1f} / {m[key + '_ip']:.1f} / {m[key + '_ex']:.1f})"


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


def rows_table(base):
    """Markdown: one line per finished (row, PPO seed) with both labellers, the paired-bootstrap
    interval of the row over SFT (evaluation noise of that one run), what the identifiers cannot see
    (perplexity, distinct replies, length, the KL), and the median seconds per iteration."""
    base = Path(base)
    out = [
        "| row | PPO seed | what changes | Emp-F1 (ER / IP / EX) | − SFT [95 % CI] | judge "
        "(ER / IP / EX) | "
        "judge − SFT [95 % CI] | reward | PPL | distinct | length | summed KL, last 20 "
        "iterations | s / iteration |",
        "|---" * 13 + "|",
    ]
    sft = json.loads((base / "results.json").read_text())["sft"]
    out.append(
        f"| SFT | | no RL | {parts(sft, 'emp_f1')} | | {parts(sft, 'emp_f1_judge')} | | "
        f"{sft['reward']:.3f} | "
        f"{sft['ppl']:.1f} | {sft['unique_frac']:.2f} | {sft['length']:.1f} | 0 | |"
    )
    done = {
        (row, seed): finished_dir(base, row, seed) for row in ROWS for seed in row_seeds(base, row)
    }
    results = {k: json.loads((d / "results.json").read_text()) for k, d in done.items()}
    # records without environment.commit come from code before it was stored: named when newer
    # records are beside
    mixed = len({"commit" in r["environment"] for r in results.values()}) > 1
    for row, (what, _) in ROWS.items():
        seeds = row_seeds(base, row)
        if not seeds:
            out.append(f"| {row} | | {what} | not run |" + " |" * 9)
        for seed in seeds:
            out_dir, r = done[row, seed], results[row, seed]
            m, d, its = r["emprl"], r["difference"], ppo_log(out_dir)
            kl = sum(i["kl"] for i in its[-20:]) / max(len(its[-20:]), 1)
            tag = " (earlier code)" if mixed and "commit" not in r["environment"] else ""
            out.append(
                f"| {row} | {seed} | {what}{tag} | {parts(m, 'emp_f1')} | "
                f"{interval(d['emp_f1'])} | "
                f"{parts(m, 'emp_f1_judge')} | {interval(d['emp_f1_judge'])} | "
                f"{m['reward']:.3f} | "
                f"{m['ppl']:.1f} | {m['unique_frac']:.2f} | {m['length']:.1f} | {kl:.2f} | "
                f"{median(i['seconds'] for i in its if 'seconds' in i):.1f} |"
            )
    return "\n".join(out) + "\n"


def samples(base, n=3):
    """Markdown: the first n test dialogues of results.json and every row's reply (PPO seed 0)."""
    base = Path(base)
    found = {
        row: json.loads((row_dir(base, row, 0) / "results.json").read_text())["samples"]
        for row in ROWS
        if (row_dir(base, row, 0) / "results.json").exists()
    }
    out = []
    for i, sample in enumerate(found["emprl"][:n] if "emprl" in found else []):
        out.append(
            f"{i + 1}. *{sample['context']}*\n   - human: {sample['reference']}\n   - SFT: "
            f"{sample['sft']}\n"
            + "\n".join(f"   - {row}: {s[i]['emprl']}" for row, s in found.items())
        )
    return "\n\n".join(out) + "\n"


def report(args):
    """The rows table, mean and 95 % t interval over seeds for rows with several, and three
    dialogues' replies. docs/ablations.md holds the same, written from docs/runs by `python
    benchmarks/records.py write`."""
    base = Path(args.base)
    print(rows_table(base))
    print("Rows with several PPO seeds: mean [95 % Student-t interval over the n seeds]:\n")
    print("| row | n | Emp-F1 | − SFT | judge − SFT | PPL |")
    print("|---|---|---|---|---|---|")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from records import Stat, tint  # noqa: E402 (records imports this module)

    for row in ROWS:
        rs = [
            json.loads((finished_dir(base, row, s) / "results.json").read_text())
            for s in row_seeds(base, row)
        ]
        if len(rs) > 1:
            cols = [
                [r["emprl"]["emp_f1"] for r in rs],
                [r["difference"]["emp_f1"]["mean"] for r in rs],
                [r["difference"]["emp_f1_judge"]["mean"] for r in rs],
                [r["emprl"]["ppl"] for r in rs],
            ]
            cells = [
                tint(Stat(c), signed=signed) for c, signed in zip(cols, [False, True, True, False])
            ]
            print(f"| {row} | {len(rs)} | " + " | ".join(cells) + " |")
    print("\nThe first three test dialogues of results.json, every row's reply (PPO seed 0):\n")
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
