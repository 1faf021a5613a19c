"""The ranges of lab/metrics.md: what each logged number was in the records' correct runs.

    python lab/metric_ranges.py            # print the two tables (markdown)
    python lab/metric_ranges.py --write    # put them into lab/metrics.md, between its markers

The correct runs are those check-run makes its bands from (lab/bands.py, correct_names(): the
records docs/runs/index.json marks in_bands, the base run's pipeline first). For each field of a PPO
log line: its minimum and maximum over every iteration of those runs, and over their last 20
iterations; for each number of the sft and emprl sections of results.json: its minimum and maximum
over those runs. A test (tests/test_lab.py) checks that lab/metrics.md holds what this prints.
"""

import argparse
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METRICS_MD = ROOT / "lab" / "metrics.md"
BEGIN, END = "<!-- ranges: python lab/metric_ranges.py --write -->", "<!-- end of ranges -->"
LAST = 20  # the last iterations of a run, where a healthy run has settled


def load_lab():
    spec = importlib.util.spec_from_file_location("lab_grader", ROOT / "lab" / "lab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def correct_runs(records_dir):
    """{name: run (lab.read_run)} of the correct records: the base run's pipeline, then the other
    pipelines."""
    lab = load_lab()
    records = lab.read_records(records_dir)
    return {name: records[name] for name in lab.correct_names(records)}


def number(x):
    return f"{x:.4g}"


def span(values):
    values = [
        v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
    ]
    if not values:
        return "nan"
    low, high = min(values), max(values)
    return number(low) if low == high else f"{number(low)} .. {number(high)}"


def tables(records_dir):
    """The markdown of the two range tables."""
    runs = correct_runs(records_dir)
    fields = [k for k in runs[next(iter(runs))]["log"][0] if k not in ("stage", "step")]
    lines = [
        f"Correct runs: {', '.join(runs)} (docs/runs).",
        "",
        f"| PPO log field | every iteration | last {LAST} iterations |",
        "|---|---|---|",
    ]
    for field in fields:
        every = [row.get(field) for run in runs.values() for row in run["log"]]
        last = [row.get(field) for run in runs.values() for row in run["log"][-LAST:]]
        lines.append(f"| `{field}` | {span(every)} | {span(last)} |")
    lines += ["", "| results.json | sft | emprl |", "|---|---|---|"]
    keys = list(runs[next(iter(runs))]["results"]["sft"])
    for key in keys:
        sft = [run["results"]["sft"].get(key) for run in runs.values()]
        emprl = [run["results"]["emprl"].get(key) for run in runs.values()]
        lines.append(f"| `{key}` | {span(sft)} | {span(emprl)} |")
    for key in ("emp_f1", "emp_f1_judge"):
        values = [run["results"]["difference"][key]["mean"] for run in runs.values()]
        lines.append(f"| `difference.{key}.mean` | | {span(values)} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"write the tables into {METRICS_MD}")
    parser.add_argument("--records", default=str(ROOT / "docs" / "runs"))
    args = parser.parse_args(argv)
    text = tables(args.records)
    if not args.write:
        print(text, end="")
        return 0
    doc = METRICS_MD.read_text(encoding="utf-8")
    if BEGIN not in doc or END not in doc:
        print(f"error: {METRICS_MD} lacks the markers {BEGIN} ... {END}", file=sys.stderr)
        return 1
    head, rest = doc.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    METRICS_MD.write_text(head + BEGIN + "\n" + text + END + tail, encoding="utf-8")
    print(f"wrote the ranges into {METRICS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
