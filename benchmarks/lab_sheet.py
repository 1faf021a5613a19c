"""Run every command of the lab sheet (lab/README.md) as written, in order, and write a transcript.

    # in a fresh clone, with EMPRL_DATA set
    python benchmarks/lab_sheet.py --out=sheet.txt
    # only the `cpu` preset's train.py commands
    python benchmarks/lab_sheet.py --only=train --out=train.txt
    # everything else, once those runs are there
    python benchmarks/lab_sheet.py --skip=train --out=rest.txt

Each fenced block of the sheet is read as the student would type it: a ```bash block line by line (a
heredoc `python - <<'EOF'` ... `EOF` as one command, continuation lines joined), a ```python block
as one script given to `python -`. The setup block (venv, pip) is not run: it is what made the
interpreter that runs this. The transcript opens with a header (--note: what ran where, and what
else ran on the machine; the date, the CPU and OMP_NUM_THREADS), then gives, per command, its exit
status, its wall time, the 1-minute load average before and after it, and the last lines of its
output (and any OUT OF RANGE, FAIL or "this run is the record" line above them); the script exits 1
when a command exited non-zero (which can be the right outcome: `check-run` exits 1 on a run it
flags). A train.py command whose --out_dir already holds a results.json is not run again (train.py
would only say so): the transcript says so and gives that run's own time. A command that reads a run
directory which does not exist (its train.py command was not run) is not run either, and the
transcript says which. The `export EMPRL_DATA=...` line is not run: its path is a placeholder, and
the EMPRL_DATA this script is started with is what the commands see. With --solve, the student copy
made by `lab.py new` gets this repository's reward.py and ppo.py, as if every blank had been written
correctly, so that `check` runs through to its training check.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"```(bash|python)\n(.*?)```", re.S)


def commands(sheet):
    """The sheet's commands in order: (kind, text), kind "bash" or "python"."""
    out = []
    for lang, body in FENCE.findall(sheet):
        if "python -m venv" in body:  # the setup block
            continue
        if lang == "python":
            out.append(("python", body))
            continue
        lines, i = body.splitlines(), 0
        while i < len(lines):
            line = lines[i]
            if not line.strip() or line.lstrip().startswith("#"):
                i += 1
                continue
            if "<<'EOF'" in line:  # a heredoc: up to its EOF line
                j = lines.index("EOF", i)
                out.append(("bash", "\n".join(lines[i : j + 1])))
                i = j + 1
                continue
            while line.endswith("\\"):
                i += 1
                line = line[:-1] + lines[i].strip()
            out.append(("bash", line))
            i += 1
    return out


def out_dir(cmd):
    m = re.search(r"--out_dir=(\S+)", cmd)
    return Path(m.group(1)) if m else None


def header(note):
    """The transcript's first lines: what ran where (note), when, on which CPU and threads."""
    cpu = [
        ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")
    ]
    threads = os.environ.get("OMP_NUM_THREADS", "torch's default")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    machine = f"{cpu[0] if cpu else 'CPU unknown'}, {os.cpu_count()} cores"
    load = f"1-minute load {os.getloadavg()[0]:.2f}"
    return [f"# {ln}" for ln in note.splitlines()] + [
        f"# {when}, {machine}, OMP_NUM_THREADS={threads}, {load}"
    ]


def run(kind, text, timeout):
    t0 = time.time()
    if kind == "python":
        p = subprocess.run(
            [sys.executable, "-"], input=text, capture_output=True, text=True, timeout=timeout
        )
    else:
        p = subprocess.run(["bash", "-c", text], capture_output=True, text=True, timeout=timeout)
    return p.returncode, time.time() - t0, (p.stdout + p.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sheet", default=str(ROOT / "lab" / "README.md"))
    ap.add_argument("--out", required=True, help="the transcript to write")
    ap.add_argument("--only", choices=["train"], help="run only the train.py commands")
    ap.add_argument("--skip", choices=["train"], help="run all but the train.py commands")
    ap.add_argument(
        "--solve",
        action="store_true",
        help="fill the student copy's blanks with the repository's code",
    )
    ap.add_argument(
        "--tail", type=int, default=6, help="lines of each command's output kept (default 6)"
    )
    ap.add_argument("--timeout", type=int, default=7200, help="seconds per command")
    ap.add_argument("--note", default="", help="the header: what ran where, and what else ran")
    args = ap.parse_args()
    lines, failed, skipped = header(args.note), 0, 0
    for kind, text in commands(Path(args.sheet).read_text()):
        # the long ones, not tiny
        is_train = kind == "bash" and text.startswith("python train.py --preset=cpu")
        if (args.only == "train" and not is_train) or (args.skip == "train" and is_train):
            continue
        if text.startswith("export EMPRL_DATA="):
            continue
        lines.append(f"$ {text}" if kind == "bash" else "$ python - <<'EOF'\n" + text + "EOF")
        d = out_dir(text) if is_train else None
        needed = [
            Path(r)
            for r in re.findall(r"runs/\w+", text)
            if Path(r) != d and "--out_dir=" + r not in text
        ]
        missing = [str(r) for r in needed if not r.exists()]
        if missing and not args.only:
            lines.append(
                f"[not run: {', '.join(missing)} {'does' if len(missing) == 1 else 'do'} "
                "not exist here "
                "(the train.py command that makes "
                f"{'it' if len(missing) == 1 else 'them'} was not run)]"
            )
            skipped += 1
            continue
        if d is not None and (d / "results.json").exists():
            t = json.loads((d / "results.json").read_text())["time_s"]
            # a row reuses the earlier stages
            own = ("ppo", "eval") if "--from_run" in text else tuple(t)
            lines.append(
                f"[not run again: {d}/results.json exists; that run took "
                f"{sum(t[k] for k in own) / 60:.0f} "
                f"min]"
            )
            continue
        load = os.getloadavg()[0]
        try:
            rc, seconds, output = run(kind, text, args.timeout)
        except subprocess.TimeoutExpired:
            rc, seconds, output = "timeout", args.timeout, ""
        load = f"load {load:.2f} -> {os.getloadavg()[0]:.2f}"
        failed += rc != 0
        new = re.match(r"python lab/lab.py new (\S+)", text)
        if new and args.solve and rc == 0:
            for f in ("reward.py", "ppo.py"):
                shutil.copy(ROOT / f, Path(new.group(1)) / f)
            output += (
                f"\n[--solve: copied this repository's reward.py and ppo.py into {new.group(1)}]"
            )
        out = [ln[:200] for ln in output.replace("\r", "\n").splitlines() if ln.strip()]
        verdicts = [
            ln
            for ln in out[: -args.tail]
            if ln.startswith(("OUT OF RANGE", "FAIL", "this run is the record"))
        ]
        kept = verdicts + out[-args.tail :]  # the last lines, and any verdict line above them
        lines += [f"[exit {rc}, {seconds:.1f} s, {load}]"] + ["  " + ln for ln in kept]
        print("\n".join(lines[-len(kept) - 2 :]), flush=True)
        Path(args.out).write_text("\n".join(lines) + "\n")
    summary = (
        f"{failed} command(s) exited non-zero" if failed else "every command run exited 0"
    ) + (f"; {skipped} not run for want of a run directory" if skipped else "")
    Path(args.out).write_text("\n".join(lines + [summary]) + "\n")
    print(summary)
    sys.exit(1 if failed or skipped else 0)


if __name__ == "__main__":
    main()
