"""The README's numbers trace to committed run records: its results table is the one generated from
docs/runs/cpu/results.json (`python benchmarks/records.py readme`)."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import emprl  # noqa: E402
import records  # noqa: E402


def test_readme_results_table_is_the_one_generated_from_the_committed_cpu_record():
    """Edit docs/runs/cpu/results.json (a new run's record) or the README's table alone, and this fails: rerun
    `python benchmarks/records.py readme`."""
    results = json.loads(records.README_RECORD.read_text())
    assert records.readme_table((ROOT / "README.md").read_text()) == emprl.results_table(results)


def test_the_cpu_record_has_the_judge_the_intervals_and_its_environment():
    """The published record carries what a reader needs to trust it: Emp-F1 by the independent judge for both
    models, EmpRL - SFT intervals, and the machine and software it ran on."""
    results = json.loads(records.README_RECORD.read_text())
    for model in ("sft", "emprl"):
        assert "emp_f1_judge" in results[model]
    for key in ("emp_f1", "emp_f1_judge"):
        lo, hi = results["difference"][key]["ci95"]
        assert lo <= results["difference"][key]["mean"] <= hi
    assert {"torch", "threads", "cpu_capability", "device", "dtype"} <= set(results["environment"])
    assert results["n_test"] == 5259 and results["config"]["limit_test"] == 0  # the full ED test split


def test_check_run_passes_the_published_record_and_fails_it_with_a_perturbed_emp_f1(tmp_path):
    """`lab/lab.py check-run` against the committed record and lab/tolerances.json: the record itself is in range;
    the same record with EmpRL's Emp-F1 moved by 5 points is out of range (exit 1)."""
    import subprocess
    cmd = [sys.executable, str(ROOT / "lab" / "lab.py"), "check-run"]
    ok = subprocess.run(cmd + [str(ROOT / "docs" / "runs" / "cpu")], capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0 and "OUT OF RANGE" not in ok.stdout, ok.stdout + ok.stderr
    results = json.loads(records.README_RECORD.read_text())
    results["emprl"]["emp_f1"] += 5.0
    (tmp_path / "results.json").write_text(json.dumps(results))
    bad = subprocess.run(cmd + [str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 1 and "OUT OF RANGE" in bad.stdout and "emprl.emp_f1" in bad.stdout
