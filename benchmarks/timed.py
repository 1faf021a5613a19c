"""Time one command and append the measurement to docs/bench/times.txt, which the README quotes.

    python benchmarks/timed.py tiny_busy -- python train.py --preset=tiny --out_dir=/tmp/tiny
    python benchmarks/timed.py tests_fast --note="idle" -- python -m pytest -q -m "not slow"

A line of times.txt is `name | seconds | load | date | cpu | note | command`: the 1-minute load
average before and after the command, the date in UTC, the CPU model from /proc/cpuinfo with its
core count, and a note on what else ran. The README shows each name's range over its lines; a name
without a line shows as not measured. Adding a measurement is adding a line (by hand or with this
script); the command's own output goes to the terminal as usual.
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

TIMES = Path(__file__).resolve().parent.parent / "docs" / "bench" / "times.txt"


def cpu_model():
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return f"{models[0] if models else 'unknown CPU'}, {os.cpu_count()} cores"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("name", help="what the README calls it: tiny_idle, tiny_busy, tests_full, ...")
    p.add_argument("--note", default="", help="what else ran on the machine meanwhile")
    if "--" not in sys.argv:
        p.error("give the command after --")
    cut = sys.argv.index("--")
    args = p.parse_args(sys.argv[1:cut])
    command = sys.argv[cut + 1 :]
    load_before = os.getloadavg()[0]
    start = time.time()
    code = subprocess.run(command).returncode
    seconds = time.time() - start
    load_after = os.getloadavg()[0]
    if code:
        sys.exit(f"exit code {code}: not recorded")
    date = time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime(start))
    data_dir = os.environ.get("EMPRL_DATA")
    shown = " ".join(command)
    if data_dir:  # the command as anyone can type it, not this machine's path
        shown = shown.replace(data_dir, "$EMPRL_DATA")
    fields = [
        args.name,
        f"{seconds:.1f}",
        f"{load_before:.2f} -> {load_after:.2f}",
        date,
        cpu_model(),
        args.note,
        shown,
    ]
    with open(TIMES, "a") as f:
        f.write(" | ".join(fields) + "\n")
    print(" | ".join(fields[:3]))


if __name__ == "__main__":
    main()
