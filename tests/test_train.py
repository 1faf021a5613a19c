"""`python train.py --preset=tiny` end to end on the real data, in a subprocess, as a user runs it."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL_KEYS = ["emp_f1", "emp_f1_er", "emp_f1_ip", "emp_f1_ex", "dist_1", "dist_2", "bleu_1", "bleu_2", "bleu_3",
              "bleu_4", "ppl", "reward", "length", "unique_frac"]


def train_cmd(data_dir, out_dir, *extra):
    return [sys.executable, str(ROOT / "train.py"), "--preset=tiny", f"--data_dir={data_dir}", f"--out_dir={out_dir}",
            *extra]


def run(cmd, timeout=300):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def tiny_run(real_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "run"
    t0 = time.time()
    p = run(train_cmd(real_data_dir, out))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out, p, time.time() - t0


def test_tiny_preset_runs_end_to_end_with_finite_metrics(tiny_run):
    """Every stage runs; results.json holds finite metrics for sft and emprl, the majority row, config and times."""
    out, p, seconds = tiny_run
    res = json.loads((out / "results.json").read_text())
    for model in ("sft", "emprl"):
        for k in MODEL_KEYS:
            assert math.isfinite(res[model][k]), (model, k, res[model][k])
    for k in ("emp_f1", "emp_f1_er", "emp_f1_ip", "emp_f1_ex"):
        assert math.isfinite(res["majority"][k])
    assert res["config"]["limit_train"] == 400
    assert set(res["time_s"]) == {"tokenizer", "sft", "identifiers", "labels", "ppo", "eval"}
    assert (out / "results.md").read_text().startswith("| model |")
    assert (out / "sft" / "model.safetensors").exists() and (out / "emprl" / "model.safetensors").exists()
    first = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert first["stage"] == "config"
    assert "ppo    1/4 | score" in p.stdout


def test_rerun_skips_every_finished_stage(tiny_run, real_data_dir):
    """Rerunning the same command redoes nothing and prints the same results table."""
    out, p, _ = tiny_run
    again = run(train_cmd(real_data_dir, out))
    assert again.returncode == 0, again.stderr[-2000:]
    for stage in ("tokenizer", "sft", "identifiers", "labels", "ppo", "eval"):
        assert f"[{stage}] done earlier" in again.stdout
    assert (out / "results.md").read_text() in again.stdout


def test_changed_settings_are_refused_without_force(tiny_run, real_data_dir):
    """A rerun whose config differs in a field that changes results names the field and refuses."""
    out, _, _ = tiny_run
    p = run(train_cmd(real_data_dir, out, "--ppo_lr=0.5"))
    assert p.returncode != 0
    assert "ppo_lr" in p.stderr and "Traceback" not in p.stderr


def test_kill_during_ppo_then_rerun_resumes_and_finishes(real_data_dir, tmp_path):
    """SIGKILL in the middle of PPO; the same command resumes from the last PPO checkpoint and completes."""
    out = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(real_data_dir, out, "--ppo_steps=8"), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    log = out / "log.jsonl"
    while time.time() < deadline:
        if log.exists() and sum('"stage": "ppo", "step": 3' in l for l in log.read_text().splitlines()):
            break
        if proc.poll() is not None:
            pytest.fail("the run ended before PPO step 3")
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "results.json").exists()
    p = run(train_cmd(real_data_dir, out, "--ppo_steps=8"))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "ppo: resuming at iteration" in p.stdout
    assert (out / "results.json").exists()


def test_reply_command_answers_with_the_identifiers_levels(tiny_run):
    """`python emprl.py --run=RUN "message"` prints a reply and its ER / IP / EX levels."""
    out, _, _ = tiny_run
    p = run([sys.executable, str(ROOT / "emprl.py"), f"--run={out}", "I failed my driving test again."], timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "emprl> " in p.stdout and "ER=" in p.stdout and "IP=" in p.stdout and "EX=" in p.stdout


@pytest.mark.parametrize("name", ["identifiers.pt", "config.json", "emprl/model.safetensors", "spiece.model"])
def test_reply_command_on_a_damaged_run_is_one_error_line_naming_the_file(tiny_run, tmp_path, name):
    """A truncated file in the run directory: `emprl.py` exits 1 with one line naming it, no traceback."""
    out, _, _ = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    (copy / name).write_bytes((copy / name).read_bytes()[:40])
    p = run([sys.executable, str(ROOT / "emprl.py"), f"--run={copy}", "hello"], timeout=120)
    assert p.returncode == 1
    assert "Traceback" not in p.stderr and p.stderr.startswith("error: ") and len(p.stderr.strip().splitlines()) == 1
    assert str(copy / name) in p.stderr  # the damaged file, by its full path
