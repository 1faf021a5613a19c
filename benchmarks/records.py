"""Run records: the small files of a finished run kept in the repository, and the README's table made from one.

Every number that the README and docs/ quote from a run traces to a record in docs/runs/<name>/: the run's
results.json, identifiers.json and log.jsonl (its settings, one line per SFT check, identifier, PPO iteration
and validation), no weights; the paths of the run section (out_dir, data_dir, from_run) are cut to their last
part. The README's results table is generated from docs/runs/cpu/results.json, and a test fails when the two
disagree.

    python benchmarks/records.py save runs/cpu docs/runs/cpu      # keep a finished run's record
    python benchmarks/records.py table docs/runs/cpu/results.json # print the table of a record
    python benchmarks/records.py readme                           # rewrite the README's table from docs/runs/cpu
    python benchmarks/records.py compare docs/runs/cpu docs/runs/cpu_s1 docs/runs/cpu_s2   # rows, mean ± SD
"""
import argparse
import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import emprl  # noqa: E402

FILES = ("results.json", "identifiers.json", "log.jsonl")
PATH_FIELDS = ("out_dir", "data_dir", "from_run")  # the run section's paths: kept as their last part only
README_RECORD = ROOT / "docs" / "runs" / "cpu" / "results.json"
BEGIN = "<!-- results table: `python benchmarks/records.py readme` writes it from docs/runs/cpu/results.json -->"
END = "<!-- end of results table -->"


def readme_table(readme_text):
    """The generated block of the README (between BEGIN and END), or None."""
    if BEGIN not in readme_text or END not in readme_text:
        return None
    return readme_text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def cut_paths(text):
    """The run section's paths kept as their last part ("/home/me/runs/cpu" -> "cpu"): where things lay on one
    machine, which no result depends on."""
    for field in PATH_FIELDS:
        text = re.sub(rf'"{field}": "([^"]*)"', lambda m: f'"{field}": "{Path(m.group(1)).name}"', text)
    return text


def compare(record_dirs):
    """One row per record: SFT and EmpRL Emp-F1 by the identifiers (the proxy) and by the judge, their differences
    with the paired-bootstrap interval, PPL and the share of distinct replies; then mean ± SD over the records."""
    keys = [("sft", "emp_f1"), ("emprl", "emp_f1"), ("difference", "emp_f1"), ("sft", "emp_f1_judge"),
            ("emprl", "emp_f1_judge"), ("difference", "emp_f1_judge"), ("emprl", "ppl"), ("emprl", "unique_frac")]
    print("| record | SFT Emp-F1 | EmpRL Emp-F1 | EmpRL − SFT [95 % CI] | SFT judge | EmpRL judge | "
          "judge: EmpRL − SFT [95 % CI] | EmpRL PPL | EmpRL distinct |")
    print("|---" * (len(keys) + 1) + "|")
    values = {k: [] for k in keys}
    for d in record_dirs:
        r = json.loads((Path(d) / "results.json").read_text())
        cells = []
        for model, key in keys:
            if model == "difference":
                diff = r["difference"][key]
                values[model, key].append(diff["mean"])
                cells.append(f"{diff['mean']:+.2f} [{diff['ci95'][0]:+.2f}, {diff['ci95'][1]:+.2f}]")
            else:
                values[model, key].append(r[model][key])
                cells.append(f"{r[model][key]:.2f}")
        print(f"| {Path(d).name} | " + " | ".join(cells) + " |")
    if len(record_dirs) > 1:
        print(f"| mean ± SD (n = {len(record_dirs)}) | " + " | ".join(
            f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}" for v in values.values()) + " |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    save = sub.add_parser("save", help="copy a finished run's small files into a record directory")
    save.add_argument("run")
    save.add_argument("record")
    table = sub.add_parser("table", help="print the results table of a results.json")
    table.add_argument("results")
    sub.add_parser("readme", help="rewrite the README's results table from docs/runs/cpu/results.json")
    comp = sub.add_parser("compare", help="records side by side, with mean ± SD (SD over the records)")
    comp.add_argument("records", nargs="+")
    args = p.parse_args()
    if args.command == "save":
        missing = [f for f in FILES if not (Path(args.run) / f).exists()]
        if missing:
            sys.exit(f"error: {args.run} has no {', '.join(missing)}: is it a finished run of train.py?")
        Path(args.record).mkdir(parents=True, exist_ok=True)
        for f in FILES:
            (Path(args.record) / f).write_text(cut_paths((Path(args.run) / f).read_text()))
        print(f"{args.run} -> {args.record}: {', '.join(FILES)} (paths of {', '.join(PATH_FIELDS)} cut to their names)")
    elif args.command == "compare":
        compare(args.records)
    elif args.command == "table":
        print(emprl.results_table(json.loads(Path(args.results).read_text())), end="")
    else:
        readme = (ROOT / "README.md").read_text()
        if readme_table(readme) is None:
            sys.exit(f"error: README.md has no generated table: put the two lines\n{BEGIN}\n{END}\nwhere it goes")
        head, rest = readme.split(BEGIN, 1)
        new = emprl.results_table(json.loads(README_RECORD.read_text()))
        (ROOT / "README.md").write_text(f"{head}{BEGIN}\n{new}{END}{rest.split(END, 1)[1]}")
        print(f"README.md: results table written from {README_RECORD.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
