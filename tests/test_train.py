"""`python train.py --preset=tiny` end to end in a subprocess, as a user runs it: on a small made-up
data set (runs on a fresh clone, no downloads) and on the real data (EMPRL_DATA)."""

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
from synthetic import write_synthetic_data

from t5 import load_safetensors

ROOT = Path(__file__).resolve().parent.parent
MODEL_KEYS = [
    "emp_f1",
    "emp_f1_er",
    "emp_f1_ip",
    "emp_f1_ex",
    "emp_f1_judge",
    "emp_f1_judge_er",
    "emp_f1_judge_ip",
    "emp_f1_judge_ex",
    "dist_1",
    "dist_2",
    "bleu_1",
    "bleu_2",
    "bleu_3",
    "bleu_4",
    "ppl",
    "reward",
    "length",
    "unique_frac",
]
# one thread: the float sums, hence the weights, are the same in every run (and two processes share
# 2 cores)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def train_cmd(data_dir, out_dir, *extra):
    return [
        sys.executable,
        str(ROOT / "train.py"),
        "--preset=tiny",
        f"--data_dir={data_dir}",
        f"--out_dir={out_dir}",
        *extra,
    ]


def run(cmd, timeout=300):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=ENV)


def assert_finished_with_finite_metrics(out):
    res = json.loads((out / "results.json").read_text())
    for model in ("sft", "emprl"):
        for k in MODEL_KEYS:
            assert math.isfinite(res[model][k]), (model, k, res[model][k])
    for k in ("emp_f1", "emp_f1_er", "emp_f1_ip", "emp_f1_ex"):
        assert math.isfinite(res["majority"][k])
    assert set(res["time_s"]) == {"tokenizer", "sft", "identifiers", "labels", "ppo", "eval"}
    assert (out / "results.md").read_text().startswith("| model |")
    assert (out / "sft" / "model.safetensors").exists() and (
        out / "emprl" / "model.safetensors"
    ).exists()
    assert json.loads((out / "log.jsonl").read_text().splitlines()[0])["stage"] == "config"
    return res


def same_weights(a, b):
    ta, tb = load_safetensors(a), load_safetensors(b)
    return ta.keys() == tb.keys() and all((ta[k] == tb[k]).all() for k in ta)


def kill_during_ppo(cmd, out, after_step=3, timeout=240):
    """Start cmd, SIGKILL it (and the processes it started: torchrun's workers) once PPO iteration
    `after_step` is logged."""
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline, log = time.time() + timeout, out / "log.jsonl"
    try:
        while not (log.exists() and f'"stage": "ppo", "step": {after_step},' in log.read_text()):
            assert proc.poll() is None, f"the run ended before PPO iteration {after_step}"
            assert time.time() < deadline, "timed out waiting for PPO"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        # torchrun's workers: sessions of their own
        subprocess.run(["pkill", "-9", "-f", "--", f"--out_dir={out}"])
        proc.wait()


@pytest.mark.slow
def test_tiny_pipeline_on_synthetic_data(tmp_path):
    """No downloads, no EMPRL_DATA: made-up ED and EPITOME files in the official formats; the tiny
    preset runs every stage to finite metrics, and a run SIGKILLed in PPO resumes from its last
    checkpoint and ends with exactly the weights and metrics of the uninterrupted run."""
    data_dir = write_synthetic_data(tmp_path / "data")
    p = run(train_cmd(data_dir, tmp_path / "run", "--ppo_steps=8"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    want = assert_finished_with_finite_metrics(tmp_path / "run")
    assert "ppo    1/8 | score" in p.stdout and "identifier er (" in p.stdout

    killed = tmp_path / "killed"
    kill_during_ppo(train_cmd(data_dir, killed, "--ppo_steps=8"), killed)
    assert not (killed / "results.json").exists() and (killed / "ppo_ckpt.pt").exists()
    p = run(train_cmd(data_dir, killed, "--ppo_steps=8"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "[sft] done earlier" in p.stdout and "ppo_ckpt.pt: resuming after step" in p.stdout
    got = assert_finished_with_finite_metrics(killed)
    assert same_weights(
        killed / "emprl" / "model.safetensors", tmp_path / "run" / "emprl" / "model.safetensors"
    )
    assert all(got[m] == want[m] for m in ("sft", "emprl", "majority"))
    assert not (killed / "ppo_ckpt.pt").exists()  # a finished stage's checkpoint is gone

    # RLOO, reused SFT
    p = run(train_cmd(data_dir, tmp_path / "rloo", f"--from_run={tmp_path / 'run'}", "--algo=rloo"))
    assert p.returncode == 0 and "[sft] done earlier" in p.stdout, (
        p.stdout[-3000:] + p.stderr[-3000:]
    )
    assert_finished_with_finite_metrics(tmp_path / "rloo")
    # GRPO too
    p = run(train_cmd(data_dir, tmp_path / "grpo", f"--from_run={tmp_path / 'run'}", "--algo=grpo"))
    assert p.returncode == 0 and "[sft] done earlier" in p.stdout, (
        p.stdout[-3000:] + p.stderr[-3000:]
    )
    assert_finished_with_finite_metrics(tmp_path / "grpo")


@pytest.mark.slow
def test_tiny_pipeline_runs_under_bfloat16_autocast_on_the_cpu(tmp_path):
    """--dtype=bfloat16 runs the same autocast code a GPU runs: on the CPU it must go through every
    stage to finite metrics, with the banner and results.json saying which dtype ran."""
    data_dir = write_synthetic_data(tmp_path / "data")
    p = run(train_cmd(data_dir, tmp_path / "bf16", "--dtype=bfloat16"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "| bfloat16 (--dtype) |" in p.stdout
    res = assert_finished_with_finite_metrics(tmp_path / "bf16")
    assert res["environment"]["dtype"] == "bfloat16"


@pytest.mark.slow
def test_torchrun_with_two_cpu_processes_keeps_one_beta_and_resumes(tmp_path):
    """`torchrun --nproc_per_node=2 train.py --preset=tiny --device=cpu` (gloo) on made-up data:
    every stage to finite metrics; one log line per PPO iteration (rank 0 alone writes); after every
    iteration both processes hold the same β (the adaptive controller sees the global batch's KL).
    --dtype=auto is decided once (rank 0's choice) and config.json keeps the resolved dtype. Killed
    during PPO, the same command resumes from the checkpoint and ends. Validation (SFT perplexity,
    PPO's validation Emp-F1) runs once, on rank 0, while the other rank waits. A batch that does not
    divide among the processes is refused."""
    data_dir = write_synthetic_data(tmp_path / "data")

    validations = tmp_path / "validations.txt"  # one line per validation: the rank that ran it
    driver = tmp_path / "train_counting_validations.py"  # train.py, with the validations counted
    driver.write_text(f"""import runpy, sys
sys.path.insert(0, {str(ROOT)!r})
import emprl, rundir
def counted(f):
    def wrapper(*args, **kwargs):
        with open({str(validations)!r}, "a") as out:
            out.write(f"{{f.__name__}} {{rundir.rank()}}\\n")
        return f(*args, **kwargs)
    return wrapper
emprl.evaluate, emprl.perplexity = counted(emprl.evaluate), counted(emprl.perplexity)
sys.argv[0] = {str(ROOT / "train.py")!r}
runpy.run_path(sys.argv[0], run_name="__main__")
""")

    def torchrun(out, *extra, script=ROOT / "train.py"):
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
            "--preset=tiny",
            "--device=cpu",
            f"--data_dir={data_dir}",
            f"--out_dir={out}",
            "--ppo_steps=6",
            *extra,
        ]

    p = run(torchrun(tmp_path / "run", "--dtype=auto", script=driver))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    calls = validations.read_text().split()
    assert set(calls[1::2]) == {"0"}, calls  # validation runs once, on rank 0
    # SFT at PPO step 0, every PPO step, SFT and EmpRL on test
    assert calls[0::2].count("evaluate") == 1 + 6 + 2
    res = assert_finished_with_finite_metrics(tmp_path / "run")
    assert res["config"]["dtype"] == res["environment"]["dtype"] in ("float32", "bfloat16")
    assert "processes 2" in p.stdout
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    ppo_lines = [d for d in lines if d["stage"] == "ppo"]
    assert [d["step"] for d in ppo_lines] == [1, 2, 3, 4, 5, 6]
    assert all(
        len(d["beta_per_rank"]) == 2 and d["beta_per_rank"][0] == d["beta_per_rank"][1]
        for d in ppo_lines
    )
    assert ppo_lines[-1]["beta_per_rank"][0] != 0.2  # β moved, and moved alike

    killed = tmp_path / "killed"
    kill_during_ppo(torchrun(killed), killed)
    assert not (killed / "results.json").exists() and (killed / "ppo_ckpt.pt").exists()
    p = run(torchrun(killed))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "ppo_ckpt.pt: resuming after step" in p.stdout
    assert_finished_with_finite_metrics(killed)

    p = run(torchrun(tmp_path / "odd", "--ppo_batch_size=6", "--ppo_mini_batch_size=3"))
    assert (
        p.returncode != 0
        and "--ppo_mini_batch_size=3 does not divide among 2 processes" in p.stderr
    )


@pytest.mark.slow
def test_under_torchrun_a_failure_on_every_rank_is_one_error_line_and_no_traceback(tmp_path):
    """Two processes (gloo) that both refuse a checkpoint saved on another device: the user sees
    the reason once (rank 0 speaks; the other rank, which raised the same error, is stopped by
    torchrun before it would), printed before the process group is torn down, and no worker prints
    a Python traceback (torchrun's own summary of the failure follows, as it always does)."""
    data_dir = write_synthetic_data(tmp_path / "data")
    out = tmp_path / "run"
    out.mkdir()
    checkpoint = dict(state=dict(step=1), device="cuda", rng=dict(ranks=[]), parts={})
    torch_save(checkpoint, out / "sft_ckpt.pt")  # as a GPU run leaves it
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(ROOT / "train.py"), "--preset=tiny", "--device=cpu", f"--data_dir={data_dir}"]
    p = run([*cmd, f"--out_dir={out}"])
    ours = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert p.returncode != 0 and len(ours) == 1, p.stderr[-3000:]
    assert "sft_ckpt.pt was saved on cuda, this run uses cpu" in ours[0]
    assert 'train.py", line' not in p.stderr, p.stderr[-3000:]  # no worker's traceback


def torch_save(obj, path):
    import torch

    torch.save(obj, path)


# --------------------------------------------------------------------------------------------------
# the real data


@pytest.fixture(scope="module")
def tiny_run(real_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "run"
    p = run(train_cmd(real_data_dir, out))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out, p


@pytest.mark.slow
def test_tiny_preset_on_the_real_data_runs_end_to_end_with_finite_metrics(tiny_run):
    out, p = tiny_run
    res = assert_finished_with_finite_metrics(out)
    assert res["config"]["limit_train"] == 400 and res["n_test"] == 64
    assert "ppo    1/4 | score" in p.stdout


def test_results_carry_the_judge_the_intervals_and_the_environment(tiny_run):
    """results.json holds Emp-F1 by the independent judge for both models, EmpRL - SFT with a
    paired-bootstrap interval around the full-set difference (lo <= mean <= hi) for the identifiers
    and the judge, the machine it ran on, the code that ran (commit, uncommitted changes, command),
    and the judge's test scores beside the identifiers' in identifiers.json."""
    out, p = tiny_run
    res = json.loads((out / "results.json").read_text())
    for key in ("emp_f1", "emp_f1_judge"):
        d = res["difference"][key]
        assert d["ci95"][0] <= d["mean"] <= d["ci95"][1], (key, d)
        assert d["mean"] == pytest.approx(res["emprl"][key] - res["sft"][key])
    assert set(res["environment"]) >= {
        "torch",
        "threads",
        "cpu_capability",
        "device",
        "dtype",
        "commit",
        "dirty",
        "command",
    }
    assert res["environment"]["threads"] == 1 and res["environment"]["dtype"] == "float32"
    for mech in ("er", "ip", "ex"):
        assert {"acc", "macro_f1"} <= set(res["identifiers"][mech]["judge"])
    assert (
        "judge er (TF-IDF logistic regression" in p.stdout and "EmpRL − SFT [95 % CI]" in p.stdout
    )
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    # the curves show the judge too
    assert all("emp_f1_judge" in r for r in logged if r["stage"] == "ppo_eval")


@pytest.mark.slow
def test_rerun_skips_every_finished_stage(tiny_run, real_data_dir):
    """Rerunning the same command redoes nothing and prints the same results table."""
    out, _ = tiny_run
    again = run(train_cmd(real_data_dir, out))
    assert again.returncode == 0, again.stderr[-2000:]
    for stage in ("tokenizer", "sft", "identifiers", "labels", "ppo", "eval"):
        assert f"[{stage}] done earlier" in again.stdout
    assert (out / "results.md").read_text() in again.stdout


@pytest.mark.slow
def test_changed_settings_are_refused_naming_the_field_and_the_reuse_command(
    tiny_run, real_data_dir
):
    out, _ = tiny_run
    p = run(train_cmd(real_data_dir, out, "--ppo_lr=0.5"))
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert (
        "ppo_lr: 1e-05 -> 0.5" in p.stderr
        and f"--from_run={out}" in p.stderr
        and "before 'ppo'" in p.stderr
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "change, reused",
    [
        ("--ppo_seed=1", ["tokenizer", "sft", "identifiers", "labels"]),
        ("--eval_seed=7", ["tokenizer", "sft", "identifiers", "labels", "ppo"]),
        ("--algo=rloo", ["tokenizer", "sft", "identifiers", "labels"]),
    ],
)
def test_from_run_reuses_the_stages_before_the_first_changed_one(
    tiny_run, real_data_dir, tmp_path, change, reused
):
    """A new run with --from_run copies the earlier run's results of the stages the changed field
    cannot affect (bit for bit) and computes the rest; `--algo=rloo` runs RLOO end to end on the
    reused SFT model."""
    out, _ = tiny_run
    new = tmp_path / "new"
    p = run(train_cmd(real_data_dir, new, f"--from_run={out}", change))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for stage in ("tokenizer", "sft", "identifiers", "labels", "ppo", "eval"):
        assert (f"[{stage}] done earlier" in p.stdout) == (stage in reused), stage
    assert same_weights(new / "sft" / "model.safetensors", out / "sft" / "model.safetensors")
    assert (new / "labels.pt").read_bytes() == (out / "labels.pt").read_bytes()
    assert_finished_with_finite_metrics(new)


@pytest.mark.slow
def test_ablation_runner_reruns_only_the_rl_stage_of_a_row_and_reports_it(tiny_run, real_data_dir):
    """`benchmarks/ablations.py run` starts a row from the base run (its SFT model and labels
    reused, the row's flags applied), records the row's peak memory, and `report` puts the row's
    gain over its own SFT model in the table beside PPO's (rows not run are not listed)."""
    out, _ = tiny_run
    script = str(ROOT / "benchmarks" / "ablations.py")
    p = run(
        [
            sys.executable,
            script,
            "run",
            f"--base={out}",
            "--preset=tiny",
            "--rows=no_er",
            f"--data_dir={real_data_dir}",
        ]
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    row = out.parent / f"{out.name}_no_er"
    assert "[sft] done earlier" in p.stdout and "[ppo] done earlier" not in p.stdout
    assert json.loads((row / "config.json").read_text())["reward_mechanisms"] == "ip,ex"
    assert json.loads((row / "peak_rss.json").read_text())["peak_rss_gb"] > 0
    p = run([sys.executable, script, "report", f"--base={out}"])
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((row / "results.json").read_text())
    gain = res["emprl"]["emp_f1"] - res["sft"]["emp_f1"]
    shown = f"{gain:+.2f}".replace("-", "−")
    assert f"| no_er | 1 | {shown} (one seed) |" in p.stdout, p.stdout
    assert "| ppo | 1 |" in p.stdout and "no_kl" not in p.stdout.split("\n\n")[0]


@pytest.mark.slow
def test_replies_script_describes_the_sft_and_the_rl_replies_of_a_run(tiny_run):
    """`benchmarks/replies.py RUN` decodes test dialogues with the SFT model and the policy and
    prints, for each, the level shares beside the human replies' and the per-mechanism accuracy."""
    out, _ = tiny_run
    p = run(
        [sys.executable, str(ROOT / "benchmarks" / "replies.py"), str(out), "--n=8"], timeout=180
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"{out} SFT:" in p.stdout and f"{out} emprl:" in p.stdout
    assert p.stdout.count("accuracy") == 6 and "human" in p.stdout


@pytest.mark.slow
def test_reply_command_answers_with_the_identifiers_levels(tiny_run):
    """`python emprl.py --run=RUN "message"` prints a reply and its ER / IP / EX levels. On a tiny
    run (a slice of the data) it also says that the replies are gibberish by design and where a
    real model comes from, so that a newcomer's first reply is not a surprise."""
    out, _ = tiny_run
    p = run(
        [sys.executable, str(ROOT / "emprl.py"), f"--run={out}", "I failed my driving test again."],
        timeout=120,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "emprl> " in p.stdout and "ER=" in p.stdout and "IP=" in p.stdout and "EX=" in p.stdout
    assert "gibberish by design" in p.stderr and "--preset=cpu" in p.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    ["identifiers/model.safetensors", "config.json", "emprl/model.safetensors", "spiece.model"],
)
def test_reply_command_on_a_damaged_run_is_one_error_line_naming_the_file(tiny_run, tmp_path, name):
    """A truncated file in the run directory: `emprl.py` exits 1 with one line naming it, no
    traceback."""
    out, _ = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    (copy / name).write_bytes((copy / name).read_bytes()[:40])
    p = run([sys.executable, str(ROOT / "emprl.py"), f"--run={copy}", "hello"], timeout=120)
    assert p.returncode == 1
    assert (
        "Traceback" not in p.stderr
        and p.stderr.startswith("error: ")
        and len(p.stderr.strip().splitlines()) == 1
    )
    # the damaged file, or its model directory, by its full path
    assert str(copy / name.split("/")[0]) in p.stderr


# --------------------------------------------------------------------------------------------------
# presets, precision, the GPU benchmark


def test_every_preset_parses_and_the_gpu_preset_is_the_authors_ppo_schedule():
    """The `small` and `gpu` presets exist; `gpu` makes 4 optimizer updates of 32 rollouts per
    iteration with lr decaying over 3 passes of ED train (3,774 iterations) and stops at iteration
    1,600, as the authors' TRL run."""
    import train

    for preset in train.PRESETS:
        cfg, name = train.parse_args([f"--preset={preset}"])
        assert name == preset
    gpu, _ = train.parse_args(["--preset=gpu"])
    assert (gpu.ppo_batch_size, gpu.ppo_mini_batch_size, gpu.ppo_grad_accum, gpu.ppo_epochs) == (
        32,
        8,
        4,
        4,
    )
    assert (gpu.ppo_steps, gpu.ppo_lr_decay_steps, gpu.ppo_lr) == (
        1600,
        3774,
        1e-5,
    ) and gpu.adaptive_kl
    small, _ = train.parse_args(["--preset=small", "--ppo_steps=10"])
    assert small.pretrained.endswith("t5-small") and small.ppo_steps == 10


@pytest.mark.slow
def test_help_prints_the_preset_settings():
    p = run([sys.executable, str(ROOT / "train.py"), "--preset=small", "--help"])
    assert (
        p.returncode == 0
        and "pretrained=models/t5-small" in p.stdout
        and "ppo_grad_accum=4" in p.stdout
    )


@pytest.mark.parametrize(
    "bf16, dtype", [(True, "bfloat16"), ("emulated", "float32"), (False, "float32")]
)
def test_dtype_auto_is_bfloat16_only_where_it_pays(monkeypatch, bf16, dtype):
    """No GPU needed: a CUDA device whose card has no bfloat16 (a T4, a V100) gets float32, never
    float16; the reason names the card. A card whose bfloat16 is only emulated (torch reports it as
    supported unless asked `including_emulation=False`) gets float32 too. A CPU gets bfloat16 only
    where its bfloat16 matmuls run at least 2x float32's (the banner says the measured factor);
    --dtype overrides; the tiny preset is float32."""
    import torch

    import machine
    import train

    def is_bf16_supported(including_emulation=True):  # torch's signature and default
        return bf16 is True or (bf16 == "emulated" and including_emulation)

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
    cfg, _ = train.parse_args(["--preset=cpu"])
    got, why = machine.choose_dtype(cfg, torch.device("cuda"))
    assert got == dtype and "Tesla T4" in why
    monkeypatch.setattr(machine, "bf16_matmul_speedup", lambda: 5.8 if dtype == "bfloat16" else 0.4)
    got, why = machine.choose_dtype(cfg, torch.device("cpu"))
    assert got == dtype and ("5.8x" if dtype == "bfloat16" else "0.4x") in why
    cfg.dtype = "bfloat16"
    assert machine.choose_dtype(cfg, torch.device("cpu")) == ("bfloat16", "--dtype")
    assert (
        machine.choose_dtype(train.parse_args(["--preset=tiny"])[0], torch.device("cpu"))[0]
        == "float32"
    )


def test_device_cpu_picks_the_cpu_preset_even_where_cuda_is_there(monkeypatch):
    """Without --preset, a machine with CUDA runs the `gpu` preset, unless --device=cpu asks for the
    CPU: then the `cpu` preset (t5-base's settings on a CPU would take days)."""
    import torch

    import train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert train.parse_args([])[1] == "gpu" and train.parse_args(["--device=cuda"])[1] == "gpu"
    assert train.parse_args(["--device=cpu"])[1] == "cpu"
    assert train.parse_args(["--device=cpu", "--preset=small"])[1] == "small"


@pytest.mark.slow
def test_gpu_smoke_dry_run_takes_every_step_at_tiny_size_on_the_cpu(tmp_path):
    """`benchmarks/gpu_smoke.sh DATA OUT --dry-run` runs the GPU checks' steps on the CPU at tiny
    size, so the script a lent GPU runs is known to work before its minutes start: bench_gpu.py
    (every stage timed, the full `gpu` preset extrapolated), the `gpu` preset scaled down through
    every stage under bfloat16 on a random checkpoint, and torchrun with one process."""
    data_dir = write_synthetic_data(tmp_path / "data")
    cmd = [
        "bash",
        str(ROOT / "benchmarks" / "gpu_smoke.sh"),
        str(data_dir),
        str(tmp_path / "out"),
        "--dry-run",
    ]
    p = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**ENV, "PYTHON": sys.executable},
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for stage in ("sft", "identifiers", "labels", "ppo", "eval"):
        assert f"| {stage} |" in p.stdout
    assert "rollout" in p.stdout and "**full `gpu` preset**" in p.stdout
    assert_finished_with_finite_metrics(tmp_path / "out" / "run")
    assert_finished_with_finite_metrics(tmp_path / "out" / "torchrun")
    assert "processes 1" in p.stdout and p.stdout.rstrip().endswith(
        "== gpu_smoke: all steps passed"
    )
