"""Crash safety, bad input and untrusted files.

A training run is hours of someone's GPU budget, and checkpoints and datasets come from the
internet, so: a killed or Ctrl-C'd run loses at most the work since its last periodic checkpoint and
resumes to the same weights; a damaged file or a bad option ends with one clear line, never a
traceback; loading a file never runs code; non-finite numbers never reach the weights.

The runs are `--preset=tiny` in a subprocess (as a user runs it) or `train.main` in-process where a
monkeypatch is needed, all with one torch thread (reproducible float sums, and no fight over 2
cores). Covered elsewhere: a run end to end, rerun skips every stage, changed settings refused,
--from_run (test_train.py); malformed safetensors and checkpoint directories (test_t5.py); archives,
downloads and bad CSV rows (test_data.py).
"""

import errno
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from test_data import mutate  # the CSV fuzzer's byte mutations, reused for the safetensors reader
from test_emprl import SubsetReward, _nullctx, batch, ppo_cfg, setup

import data
import emprl
import machine
import ppo
import reward
import rundir
import train
from t5 import T5, CheckpointError, load_safetensors, save_safetensors

ROOT = Path(__file__).resolve().parent.parent
# max_nonfinite=2: the non-finite tests below reuse the finished run and must hit the limit within 4
# PPO steps
OPTS = ["--preset=tiny", "--max_nonfinite=2"]
# unbuffered: poll stdout for stages
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def argv(data_dir, out):
    return [*OPTS, f"--data_dir={data_dir}", f"--out_dir={out}"]


def start(data_dir, out):
    """`python train.py ...` in the background; stdout and stderr go to out.log (read while it
    runs)."""
    with open(f"{out}.log", "w") as f:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *argv(data_dir, out)],
            cwd=ROOT,
            env=ENV,
            stdout=f,
            stderr=subprocess.STDOUT,
            preexec_fn=default_sigint,
        )


def default_sigint():
    """In the child: Ctrl-C as a terminal delivers it. A test run from a background job inherits
    SIGINT ignored, and Python then never raises KeyboardInterrupt in the child."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt(data_dir, out, when, sig, timeout=180):
    """Run the command and send `sig` as soon as when(out, output so far) holds. Returns (exit code,
    output)."""
    proc, deadline, log = start(data_dir, out), time.monotonic() + timeout, Path(f"{out}.log")
    try:
        while not when(out, log.read_text()):
            assert proc.poll() is None, (
                "the run ended before the moment to interrupt it:\n" + log.read_text()[-3000:]
            )
            assert time.monotonic() < deadline, (
                "timed out waiting for the moment to interrupt the run"
            )
            time.sleep(0.02)
        proc.send_signal(sig)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, log.read_text()


def run_to_end(data_dir, out):
    proc = start(data_dir, out)
    proc.wait(timeout=300)
    return proc.returncode, Path(f"{out}.log").read_text()


def stages_done(out):
    p = out / "stages.json"
    return set(json.loads(p.read_text())) if p.exists() else set()


def printed(text):
    return lambda out, log: text in log


def appeared(name):
    return lambda out, log: (out / name).exists()


def one_error_line(err):
    """The failure is one `error: ...` line and no traceback (tqdm's bars may precede it on
    stderr)."""
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), err[-3000:]
    assert sum(line.startswith("error: ") for line in lines) == 1, err[-3000:]
    return lines[-1]


def same_tensors(a, b):
    ta, tb = load_safetensors(a), load_safetensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


# --------------------------------------------------------------------------------------------------
# shared runs


@pytest.fixture(scope="module")
def baseline(real_data_dir, tmp_path_factory):
    """One uninterrupted run: the reference weights, and the finished run directory that other tests
    copy."""
    out = tmp_path_factory.mktemp("baseline") / "run"
    code, log = run_to_end(real_data_dir, out)
    assert code == 0, log[-3000:]
    return out


@pytest.fixture(scope="module")
def interrupted(real_data_dir, tmp_path_factory):
    """The same command as `baseline`, interrupted in every stage, each time rerun as is:
    SIGKILL in the tokenizer and in SFT, Ctrl-C in SFT and in the identifiers, SIGKILL in PPO, a log
    line cut short, Ctrl-C in PPO, SIGKILL in the evaluation, then a last rerun to the end. Returns
    the run directory and {event: (exit code, output, stages done after it)}."""
    out, events = tmp_path_factory.mktemp("interrupted") / "run", {}

    def event(name, when, sig):
        code, log = interrupt(real_data_dir, out, when, sig)
        events[name] = (code, log, stages_done(out))

    event("kill_tokenizer", printed("[tokenizer]"), signal.SIGKILL)
    # the first SFT checkpoint (step 10 of 25)
    event("kill_sft", appeared("sft_ckpt.pt"), signal.SIGKILL)
    event("ctrl_c_sft", printed("sft_ckpt.pt: resuming"), signal.SIGINT)
    event("ctrl_c_identifiers", printed("[identifiers]"), signal.SIGINT)
    event("kill_ppo", appeared("ppo_ckpt.pt"), signal.SIGKILL)  # after PPO iteration 1 of 4
    # as if a kill had landed in the middle of appending a record
    with open(out / "log.jsonl", "a") as f:
        f.write('{"stage": "ppo", "step": 2, "sco')
    event("ctrl_c_ppo", printed("ppo_ckpt.pt: resuming"), signal.SIGINT)
    event("kill_eval", printed("[eval]"), signal.SIGKILL)
    code, log = run_to_end(real_data_dir, out)
    events["final"] = (code, log, stages_done(out))
    return out, events


@pytest.fixture(autouse=True, scope="module")
def one_thread_and_our_sigint_handler_restored():
    """In-process runs: one torch thread (as the subprocesses), and pytest's Ctrl-C handler back
    afterwards."""
    threads, handler = torch.get_num_threads(), signal.getsignal(signal.SIGINT)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, handler)


def main(args, capsys):
    """train.main in-process -> (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        train.main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def finished(baseline, tmp_path):
    """A private copy of the finished baseline run."""
    out = tmp_path / "run"
    shutil.copytree(baseline, out)
    return out


def unfinish(run, stage):
    """Mark `stage` and the later ones unfinished, files kept: a run killed in `stage` after its
    last checkpoint."""
    done = json.loads((run / "stages.json").read_text())
    (run / "stages.json").write_text(
        json.dumps(
            {k: v for k, v in done.items() if train.STAGES.index(k) < train.STAGES.index(stage)}
        )
    )


# --------------------------------------------------------------------------------------------------
# SIGKILL and Ctrl-C at every stage


@pytest.mark.slow
def test_sigkill_during_any_stage_then_the_same_command_resumes_and_completes(interrupted):
    """A SIGKILL in the tokenizer, SFT, PPO or evaluation leaves files a rerun of the same command
    can use: each kill landed inside its stage (the stage is not recorded done), and the last rerun
    finishes."""
    out, ev = interrupted
    for stage in ("tokenizer", "sft", "ppo", "eval"):
        name = f"kill_{stage}"
        code, log, done = ev[name]
        assert code == -signal.SIGKILL, (name, log[-2000:])
        assert stage not in done, f"{name}: the kill landed after stage {stage} had finished"
    # the rerun after the SIGKILL in SFT
    assert "sft_ckpt.pt: resuming after step 10" in ev["ctrl_c_sft"][1]
    # the rerun after the SIGKILL in PPO
    assert "ppo_ckpt.pt: resuming after step 1" in ev["ctrl_c_ppo"][1]
    code, log, done = ev["final"]
    assert code == 0, log[-3000:]
    assert done == set(train.STAGES)
    assert (out / "results.json").exists()
    leftovers = [p.name for p in out.rglob("*") if p.name.endswith((".part", ".tmp"))]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    assert not list(out.glob("*_ckpt.pt")), "finished stages keep no checkpoint"


@pytest.mark.slow
def test_resumed_run_ends_with_the_same_weights_and_metrics_as_an_uninterrupted_one(
    interrupted, baseline
):
    """Fixed seed, same device and threads: a run killed and Ctrl-C'd during SFT and PPO ends
    bit-identical to one never interrupted. Checkpoints hold everything that decides the future:
    weights, optimizer, schedule, torch's RNG (dropout, sampling), the PPO generator, KL controller,
    score moments, data position."""
    out, _ = interrupted
    for model in ("sft", "emprl"):
        assert same_tensors(
            out / model / "model.safetensors", baseline / model / "model.safetensors"
        ), model
    got, want = (json.loads((d / "results.json").read_text()) for d in (out, baseline))
    for model in ("sft", "emprl", "majority"):
        assert got[model] == want[model], model


def test_ctrl_c_in_any_stage_exits_130_with_the_resume_command_and_the_rerun_goes_on(
    interrupted, real_data_dir
):
    """Ctrl-C (SIGINT) in SFT, the identifiers or PPO: exit code 130, no traceback, one line saying
    that the finished stages and the last checkpoint are kept and the command to resume with; the
    rerun resumes SFT and PPO from their last periodic checkpoint and redoes the identifiers (a
    stage without checkpoints)."""
    out, ev = interrupted
    for name in ("ctrl_c_sft", "ctrl_c_identifiers", "ctrl_c_ppo"):
        code, log, _ = ev[name]
        assert code == 130 and "Traceback" not in log, (name, log[-2000:])
        lines = [
            line for line in log.replace("\r", "\n").splitlines() if line.startswith("interrupted;")
        ]
        assert len(lines) == 1, log[-2000:]
        assert "finished stages and the last checkpoint are kept" in lines[0]
        assert (
            f"Resume with the same command: python train.py {' '.join(argv(real_data_dir, out))}"
        ) in lines[0]
    # periodic ones
    assert re.search(r"sft_ckpt.pt: resuming after step (10|20)\n", ev["ctrl_c_identifiers"][1])
    assert (
        "identifiers" not in ev["ctrl_c_identifiers"][2] and "[identifiers]\n" in ev["kill_ppo"][1]
    )
    assert "ppo_ckpt.pt: resuming after step" in ev["kill_eval"][1]


# --------------------------------------------------------------------------------------------------
# damaged files of the run directory


def truncate(p):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


class RunsCode:
    """A pickle that would create a file when unpickled by a full (unsafe) unpickler."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


# (file, damage, the first stage to mark unfinished, so that the run reads the file)
DAMAGE = [
    ("config.json", "not_json", None),
    ("stages.json", "not_json", None),
    ("spiece.model", "truncate", "sft"),
    ("encoded.pt", "truncate", "sft"),
    ("identifiers.json", "not_json", "eval"),
    ("sft/model.safetensors", "truncate", "ppo"),
    ("sft/config.json", "not_json", "ppo"),
    ("labels.pt", "truncate", "ppo"),
    ("labels.pt", "code", "ppo"),
    ("judge.pt", "truncate", "ppo"),
    ("identifiers/model.safetensors", "truncate", "labels"),
    ("emprl/model.safetensors", "truncate", "eval"),
    ("sft_ckpt.pt", "garbage", "sft"),
    ("ppo_ckpt.pt", "garbage", "ppo"),
    ("ppo_ckpt.pt", "code", "ppo"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, damage, unfinished", DAMAGE)
def test_a_damaged_file_ends_the_run_with_one_line_naming_it_and_what_to_do(
    finished, name, damage, unfinished, real_data_dir, capsys, tmp_path
):
    """Truncated, garbled or tampered-with files: one `error:` line naming the file (or its model
    directory), no traceback, and no code from a tampered pickle runs (.pt files are read with
    weights_only=True)."""
    if unfinished:
        unfinish(finished, unfinished)
    p, marker = finished / name, tmp_path / "code_ran"
    if damage == "truncate":
        truncate(p)
    elif damage == "not_json":
        p.write_text('{"tokenizer": 3.1, "sft')
    elif damage == "garbage":
        p.write_bytes(b"PK\x03\x04 not a checkpoint")
    elif damage == "code":
        torch.save({"x": RunsCode(marker)}, p)
    code, out, err = main(argv(real_data_dir, finished), capsys)
    assert code == 1, out[-2000:] + err[-2000:]
    line = one_error_line(err)
    assert (
        f"{finished / name.split('/')[0]} is damaged" in line
        and ("delete it and rerun the same command") in line
    )
    assert not marker.exists(), "unpickling ran code"


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, unfinished, redone",
    [
        ("labels.pt", "ppo", ["labels", "ppo", "eval"]),
        ("ppo_ckpt.pt", "ppo", ["ppo", "eval"]),
        ("emprl/model.safetensors", "eval", ["ppo", "eval"]),
        ("config.json", None, []),
        ("stages.json", None, list(train.STAGES)),
    ],
)
def test_following_the_damaged_file_message_gets_the_run_to_the_end(
    finished, name, unfinished, redone, real_data_dir, capsys
):
    """The advice is true: delete what the message names, rerun the same command, and the run
    completes, redoing the stage that wrote the file and the stages built on it."""
    if unfinished:
        unfinish(finished, unfinished)
    p = finished / name
    p.write_bytes(b"garbage") if not p.exists() else truncate(p)
    code, _, err = main(argv(real_data_dir, finished), capsys)
    assert code == 1
    named = Path(one_error_line(err).split("error: ")[1].split(" is damaged")[0])
    shutil.rmtree(named) if named.is_dir() else named.unlink()
    code, out, err = main(argv(real_data_dir, finished), capsys)
    assert code == 0, out[-2000:] + err[-2000:]
    assert (finished / "results.json").exists() and (
        finished / "emprl" / "model.safetensors"
    ).exists()
    for stage in train.STAGES:
        assert (f"[{stage}]\n" in out) == (stage in redone), (stage, out[-2000:])


# --------------------------------------------------------------------------------------------------
# bad command lines and a full disk


@pytest.mark.parametrize(
    "args, says",
    [
        (["--no_such_key=1"], "unknown option --no_such_key"),
        (["--ppo_steps=many"], "--ppo_steps=many: expected int"),
        (["--adaptive_kl=maybe"], "--adaptive_kl=maybe: expected bool"),
        (["--preset=huge"], "unknown preset 'huge'"),
        (["positional"], "unexpected argument 'positional'"),
        (["--dtype=float16"], "--dtype=float16: use auto or float32 or bfloat16"),
        (["--algo=dpo"], "--algo=dpo: use ppo or rloo"),
        (["--algo=rloo", "--rloo_k=1"], "RLOO needs at least 2 replies"),
        (["--reward_mechanisms=er,empathy"], "a comma list of er,ip,ex"),
        (["--pretrained=no/such/dir"], "is not a T5 checkpoint directory"),
    ],
)
def test_bad_command_line_is_one_error_line_and_exit_1(args, says, capsys, tmp_path):
    code, _, err = main(args + [f"--out_dir={tmp_path / 'run'}"], capsys)
    assert code == 1
    assert says in one_error_line(err)


def test_out_dir_that_is_a_file_or_inside_one_is_one_error_line(tmp_path, real_data_dir, capsys):
    f = tmp_path / "a_file"
    f.write_text("x")
    for out, says in ((f, "is a file; give a directory"), (f / "run", str(f / "run"))):
        code, _, err = main(argv(real_data_dir, out), capsys)
        assert code == 1
        assert says in one_error_line(err)


def test_no_space_left_on_device_names_the_file_and_keeps_the_finished_stages(
    finished, real_data_dir, capsys, monkeypatch
):
    """A full disk (ENOSPC from fsync, as from any write): one line naming the file being written,
    exit 1, and the files already there are untouched (writes go to a temp file, then a rename)."""
    unfinish(finished, "ppo")
    before = (finished / "config.json").read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    code, _, err = main(argv(real_data_dir, finished), capsys)
    monkeypatch.undo()
    assert code == 1
    line = one_error_line(err)
    assert f"{finished / 'config.json'}: No space left on device; free some space" in line, line
    assert (finished / "config.json").read_bytes() == before
    assert not [p for p in finished.rglob("*.tmp")]


@pytest.mark.slow
def test_command_line_errors_print_no_traceback_in_a_real_process(tmp_path):
    """As a user sees it: a subprocess with an unknown option prints one line on stderr and exits
    1."""
    p = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--preset=tiny", "--learning_rate=1"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 1
    assert p.stderr.strip() == (
        "error: unknown option --learning_rate: see the fields of Config in train.py"
    )


# --------------------------------------------------------------------------------------------------
# non-finite numbers


class NaNReward:
    """Identifiers gone wrong: every score is NaN."""

    def score(self, ctx, ctx_mask, replies, mask, levels, mechanisms=None):
        return torch.full((replies.shape[0],), float("nan"))


# no optimizer step: all skipped
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")
def test_nan_scores_skip_the_whole_update_and_are_reported():
    """A non-finite score never reaches the running moments, the optimizer or the weights; the
    iteration says how many scores were non-finite."""
    policy, ref, opt, sched, kl_ctl, moments = setup()
    weights = {k: v.clone() for k, v in policy.state_dict().items()}
    stats, _ = emprl.ppo_iteration(
        policy,
        ref,
        NaNReward(),
        opt,
        sched,
        kl_ctl,
        moments,
        batch(),
        ppo_cfg(),
        _nullctx,
        torch.Generator().manual_seed(0),
    )
    assert stats == {"nonfinite_scores": 16}
    assert all(torch.equal(v, weights[k]) for k, v in policy.state_dict().items())
    assert opt.state_dict()["state"] == {} and sched.last_epoch == 0 and kl_ctl.value == 0.05
    assert moments.state_dict() == ppo.RunningMoments().state_dict()


def test_nan_losses_skip_each_update_and_are_counted(monkeypatch):
    """A non-finite PPO loss (hence gradient) skips that optimizer update: weights unchanged, every
    skip counted."""
    policy, ref, opt, sched, kl_ctl, moments = setup()
    weights = {k: v.clone() for k, v in policy.state_dict().items()}
    real = ppo.policy_loss
    monkeypatch.setattr(ppo, "policy_loss", lambda *a: (real(*a)[0] * float("nan"), real(*a)[1]))
    cfg = ppo_cfg()
    stats, _ = emprl.ppo_iteration(
        policy,
        ref,
        SubsetReward(),
        opt,
        sched,
        kl_ctl,
        moments,
        batch(),
        cfg,
        _nullctx,
        torch.Generator().manual_seed(0),
    )
    assert stats["skipped_nonfinite"] == cfg.ppo_epochs * 16 // cfg.ppo_mini_batch_size
    assert all(torch.equal(v, weights[k]) for k, v in policy.state_dict().items())
    assert opt.state_dict()["state"] == {}


def forget(run, stage):
    """Mark `stage` and the later ones unfinished and delete their results: as if they had never
    run."""
    unfinish(run, stage)
    for later in train.STAGES[train.STAGES.index(stage) :]:
        for name in {Path(f).parts[0] for f in train.RESULTS[later]}:
            shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()


def test_a_run_that_keeps_getting_nan_rewards_stops_with_one_clear_line(
    finished, real_data_dir, capsys, monkeypatch
):
    """max_nonfinite (2 here) iterations in a row with NaN rewards: each is printed and logged, then
    the run stops (exit 1) instead of training on garbage, and writes no EmpRL model."""
    forget(finished, "ppo")
    monkeypatch.setattr(
        reward.Identifiers, "score", lambda self, *a, **k: NaNReward().score(*a, **k)
    )
    code, out, err = main(argv(real_data_dir, finished), capsys)
    assert code == 1
    assert (
        "2 PPO iterations in a row with non-finite losses, rewards or gradients"
        in one_error_line(err)
    )
    assert "ppo    1/4 | 8 non-finite scores: update skipped" in out
    logged = [json.loads(line) for line in (finished / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if r.get("nonfinite_scores") == 8] == [1, 2]
    assert not (finished / "emprl").exists()


# every step skipped, as it should
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")
def test_an_sft_run_that_keeps_getting_nan_losses_stops_with_one_clear_line(
    finished, real_data_dir, capsys, monkeypatch
):
    forget(finished, "sft")
    monkeypatch.setattr(
        emprl,
        "sft_loss",
        lambda model, b: (model.shared.weight.sum() * float("nan"), torch.tensor(1)),
    )
    code, _, err = main(argv(real_data_dir, finished), capsys)
    assert code == 1
    assert "2 SFT steps in a row with non-finite losses" in one_error_line(err)
    assert not (finished / "sft").exists()


# --------------------------------------------------------------------------------------------------
# untrusted files


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_pickle_that_would_run_code_is_refused_by_from_pretrained(tmp_path):
    """pytorch_model.bin is read with weights_only=True: a pickle whose unpickling calls a function
    is a CheckpointError, and the function never runs (raw pickle and torch.save's zip format
    alike)."""
    torch.manual_seed(0)
    T5(setup()[0].model.config).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    marker = tmp_path / "code_ran"
    for write in (
        lambda p: p.write_bytes(pickle.dumps({"shared.weight": RunsCode(marker)})),
        lambda p: torch.save({"shared.weight": RunsCode(marker)}, p),
    ):
        write(tmp_path / "pytorch_model.bin")
        with pytest.raises(CheckpointError, match="pytorch_model.bin"):
            T5.from_pretrained(tmp_path)
        assert not marker.exists()


def small_safetensors(path):
    g = torch.Generator().manual_seed(0)
    save_safetensors(
        {
            "w": torch.randn(3, 4, generator=g),
            "b": torch.randn(4, generator=g).bfloat16(),
            "i": torch.arange(6).view(2, 3),
            "flag": torch.tensor([True, False]),
        },
        path,
        metadata={"format": "pt"},
    )
    return path.read_bytes()


def header_variant(rng, raw):
    """The file with one header entry's field replaced by an odd JSON value (types, signs, sizes,
    NaN, ∞)."""
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    name = rng.choice([k for k in header if k != "__metadata__"])
    odd = [
        None,
        True,
        -1,
        0,
        2**63,
        2**70,
        1.5,
        -0.0,
        float("nan"),
        float("inf"),
        "F32",
        "I4",
        "",
        [],
        {},
        [1, 2, 3],
        [-1, 4],
        [0, 2**62],
        [2**31, 2**31],
        [float("inf")],
        ["3", "4"],
        [[3]],
        {"a": 1},
        "x" * 100,
    ]
    field = rng.choice(["dtype", "shape", "data_offsets", None, "empty"])
    if field == "empty":  # no bytes to check the shape against: only the shape's own sanity is left
        header[name] = {
            "dtype": "F32",
            "shape": [0, rng.choice([2**63, 2**70, -1, 5])],
            "data_offsets": [0, 0],
        }
    elif field is None:
        header[name] = rng.choice(odd)
    elif rng.random() < 0.5:
        header[name][field] = rng.choice(odd)
    else:
        header[name].pop(field)
    # json writes NaN and Infinity, which Python's json reads back
    blob = json.dumps(header).encode()
    return len(blob).to_bytes(8, "little") + blob + raw[8 + n :]


@pytest.mark.slow
def test_fuzzed_safetensors_files_only_ever_raise_checkpoint_error(tmp_path):
    """Seeded, ~2 s: random byte edits and odd header values either load or raise CheckpointError,
    never another exception (the hand-made malformations are in test_t5.py)."""
    p = tmp_path / "fuzz.safetensors"
    raw = small_safetensors(p)
    rng, n, t0 = random.Random(0), 0, time.monotonic()
    while time.monotonic() - t0 < 2.0:
        p.write_bytes(header_variant(rng, raw) if rng.random() < 0.5 else mutate(rng, raw))
        try:
            load_safetensors(p)
        except CheckpointError:
            pass
        n += 1
    assert n > 200


@pytest.mark.parametrize(
    "parser, path",
    [
        (data.load_empathetic_dialogues, "empatheticdialogues/train.csv"),
        (data.load_epitome, "epitome/emotional-reactions-reddit.csv"),
    ],
)
def test_fuzzed_real_csv_prefixes_only_ever_raise_data_error(real_data_dir, tmp_path, parser, path):
    """test_data.py fuzzes small hand-written fixtures; here the mutations start from the first ~40
    rows of the real files (real quoting, `_comma_`, long posts). Seeded, ~1 s each."""
    raw = (real_data_dir / path).read_bytes()[:20000]
    raw = raw[: raw.rfind(b"\n") + 1]
    p, rng, n, t0 = tmp_path / "fuzz.csv", random.Random(1), 0, time.monotonic()
    while time.monotonic() - t0 < 1.0:
        p.write_bytes(mutate(rng, raw))
        try:
            parser(p)
        except data.DataError:
            pass
        n += 1
    assert n > 20


# --------------------------------------------------------------------------------------------------
# the run layer


def test_every_config_field_has_the_stage_of_its_group():
    """The changed-settings check and --from_run read each field's stage from STAGE_OF, made from
    Config's groups (FIRST_FIELD): every field has one, every stage has fields, the groups follow
    the pipeline's order, and the "run" fields belong to none (they are compared in no run)."""
    fields = [f.name for f in train.dataclasses.fields(train.Config)]
    assert list(train.STAGE_OF) == fields
    assert [fields.index(f) for f in train.FIRST_FIELD.values()] == sorted(
        fields.index(f) for f in train.FIRST_FIELD.values()
    )
    assert list(train.FIRST_FIELD)[1:] == list(train.STAGES) == list(train.PIPELINE)
    assert {s for s in train.STAGE_OF.values() if s} == set(train.STAGES)
    expected = dict(out_dir=None, max_nonfinite=None, seed="tokenizer", limit_test="tokenizer")
    expected.update(dtype="sft", sft_limit_valid="sft", ident_init="identifiers")
    expected.update(ident_limit_pairs="identifiers", label_limit_train="labels", ppo_steps="ppo")
    expected.update(ppo_limit_valid="ppo", eval_batch_size="eval", eval_seed="eval")
    assert {k: train.STAGE_OF[k] for k in expected} == expected


@pytest.mark.slow
def test_a_second_run_on_a_held_run_directory_is_refused_and_a_killed_run_leaves_no_stale_lock(
    tmp_path, real_data_dir
):
    """Two train.py writing one run directory would corrupt it: while one runs, a second is refused
    with one line naming the holder's pid. The lock is the kernel's, so after a SIGKILL the same
    command runs again."""
    out = tmp_path / "run"
    proc = start(real_data_dir, out)
    try:
        deadline = time.monotonic() + 120
        while "[sft]" not in Path(f"{out}.log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, Path(
                f"{out}.log"
            ).read_text()[-2000:]
            time.sleep(0.1)
        second = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), *argv(real_data_dir, out)],
            cwd=ROOT,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert f"in use by a running train.py (pid {proc.pid})" in second.stderr
    finally:
        proc.kill()
        proc.wait()
    again = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *argv(real_data_dir, out)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0 and (out / "results.json").exists(), again.stderr[-2000:]


# --------------------------------------------------------------------------------------------------
# leftovers, file modes, checkpoints moved between devices and process counts


def test_a_writer_killed_mid_write_leaves_a_leftover_that_the_next_run_removes(tmp_path):
    """SIGKILL during atomic_write leaves `.NAME.XXXX.tmp` behind (no handler runs); the next run,
    once it holds the run directory's lock, deletes every such leftover, in the run directory and in
    its model directories, and a half-copied model directory of --from_run, and nothing else."""
    run = tmp_path / "run"
    (run / "sft").mkdir(parents=True)
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
from t5 import atomic_write
def chunks():
    yield b"x" * 1000
    print("writing", flush=True)
    time.sleep(60)
    yield b"y"
atomic_write({str(run / "sft" / "model.safetensors")!r}, chunks())
""",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    leftovers = list(run.glob("**/.*.tmp"))
    assert len(leftovers) == 1 and leftovers[0].parent == run / "sft"
    assert not (run / "sft" / "model.safetensors").exists()
    (run / ".emprl.tmp").mkdir()  # a model directory that a killed --from_run was copying
    (run / ".emprl.tmp" / "config.json").write_text("{}")
    (run / "notes.tmp").write_text("not ours: no leading dot")
    lock = rundir.hold(run)
    try:
        assert (
            not list(run.glob("**/.*.tmp"))
            and (run / "notes.tmp").exists()
            and (run / "sft").is_dir()
        )
    finally:
        lock.close()


def test_run_files_get_the_mode_the_umask_gives_so_others_can_read_results(tmp_path):
    """Run files are created as open() creates them (0666 less the umask), not 0600 as mkstemp makes
    them: under umask 022 another user or a group job can read results.json and the models."""
    old = os.umask(0o022)
    try:
        rundir.write(tmp_path / "results.json", {"emp_f1": 1.0})
        rundir.write(tmp_path / "labels.pt", {"x": torch.zeros(2)})
        T5(small_config()).save_pretrained(tmp_path / "sft")
        os.umask(0o077)
        rundir.write(tmp_path / "private.json", {})
    finally:
        os.umask(old)
    for name in ("results.json", "labels.pt", "sft/model.safetensors", "sft/config.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
    assert (tmp_path / "private.json").stat().st_mode & 0o777 == 0o600


def small_config():
    from t5 import T5Config

    return T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4)


def test_a_checkpoint_from_another_kind_of_device_is_refused_with_one_line(tmp_path):
    """A checkpoint keeps the kind of device it ran on: its random streams (a CUDA generator's state
    is 16 bytes, a CPU one's 5,056) belong there, so resuming on another kind of device would not be
    the same run. Every checkpoint, SFT's as PPO's, is refused there with one line naming it and
    what to do."""
    cpu = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    for name in ("ppo_ckpt.pt", "sft_ckpt.pt"):
        rundir.save_checkpoint(tmp_path / name, dict(generator=gen), dict(step=3), cpu)
        ck = torch.load(tmp_path / name, weights_only=True)
        assert ck["device"] == "cpu"
        ck["device"] = "cuda"  # as a GPU run saves it
        torch.save(ck, tmp_path / name)
        with pytest.raises(rundir.RunError, match=rf"{name} was saved on cuda, this run uses cpu"):
            rundir.load_checkpoint(tmp_path / name, dict(generator=torch.Generator()), cpu)


def test_a_checkpoint_that_does_not_fit_the_run_names_the_part_and_its_error(tmp_path):
    """Any other failure to load a checkpoint (a part of another size or kind) is not reported as
    another device: the message names the part and the error, and says how to start over."""
    cpu = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    rundir.save_checkpoint(tmp_path / "ppo_ckpt.pt", dict(generator=gen), dict(step=3), cpu)
    ck = torch.load(tmp_path / "ppo_ckpt.pt", weights_only=True)
    ck["parts"]["generator"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA generator's state
    torch.save(ck, tmp_path / "ppo_ckpt.pt")
    with pytest.raises(rundir.RunError) as e:
        rundir.load_checkpoint(tmp_path / "ppo_ckpt.pt", dict(generator=torch.Generator()), cpu)
    assert "does not fit this run (generator: " in str(e.value)
    assert "another device" not in str(e.value) and "delete it" in str(e.value)
    model = torch.nn.Linear(2, 2)
    rundir.save_checkpoint(tmp_path / "sft_ckpt.pt", dict(model=model), dict(step=1), cpu)
    with pytest.raises(rundir.RunError, match=r"sft_ckpt.pt does not fit this run \(model: "):
        rundir.load_checkpoint(tmp_path / "sft_ckpt.pt", dict(model=torch.nn.Linear(3, 2)), cpu)


def test_a_one_process_checkpoint_resumed_under_torchrun_gives_each_rank_draws_of_its_own(
    tmp_path, monkeypatch
):
    """Resumed with more processes than it was saved with, rank 0 goes on with the saved RNG
    exactly, and every other rank draws apart from it (its own seed from the saved state + its
    rank): the ranks' rollouts are not copies of each other. Only this process's device RNG is saved
    (none here: no GPU in use)."""
    torch.manual_seed(123)
    rundir.save_checkpoint(tmp_path / "ck.pt", {}, dict(step=1), torch.device("cpu"))
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert len(ck["rng"]["ranks"]) == 1 and "cuda" not in ck["rng"]["ranks"][0]
    expected = torch.rand(4)  # what the uninterrupted process draws next
    draws = {}
    for r in (0, 1, 2):
        monkeypatch.setattr(rundir, "rank", lambda r=r: r)
        rundir.load_checkpoint(tmp_path / "ck.pt", {}, torch.device("cpu"))
        draws[r] = torch.rand(4)
    assert torch.equal(draws[0], expected)
    assert not torch.equal(draws[1], draws[0]) and not torch.equal(draws[2], draws[1])


def test_ranks_waiting_for_rank_0_stop_with_an_error_when_it_dies(tmp_path):
    """Ranks > 0 wait for a rank-0-only stage through stages.json. While rank 0 holds the run's lock
    they wait, and return once the stage is listed; once no process holds the lock (rank 0 died) the
    wait stops with one error line instead of polling forever."""
    run = tmp_path / "run"
    run.mkdir()
    lock = rundir.hold(run)  # rank 0, alive
    rundir.write(run / "stages.json", {"tokenizer": 1.0, "sft": 2.0})
    assert machine.wait_for_stage(run, "sft", poll_s=0.01) == {"tokenizer": 1.0, "sft": 2.0}
    lock.close()  # rank 0 is gone before finishing 'identifiers'
    t0 = time.monotonic()
    with pytest.raises(
        rundir.RunError, match="rank 0 stopped before finishing stage 'identifiers'"
    ):
        machine.wait_for_stage(run, "identifiers", poll_s=0.01)
    assert time.monotonic() - t0 < 5


def test_the_leftover_sweep_removes_only_this_runs_own_temporary_files(tmp_path):
    """Opening a run directory deletes what a writer killed in the middle left: atomic_write's and
    copy's temporary names in the run directory and its model directories. It must not reach into a
    run directory nested inside it (a live run's checkpoint being written), nor delete a user's own
    hidden files."""
    run = tmp_path / "run"
    (run / "sft").mkdir(parents=True)
    (run / ".sft.tmp").mkdir()  # a killed copy of a model directory
    own = [run / ".results.json.0a1b2c3d.tmp", run / "sft" / ".model.safetensors.deadbeef.tmp"]
    nested = run / "nested" / ".ppo_ckpt.pt.12345678.tmp"  # another run, writing now
    nested.parent.mkdir()
    mine = [run / ".notes.tmp", run / "sft" / "notes.tmp", run / "nested" / ".x.tmp"]
    for path in own + [nested] + mine:
        path.write_text("x")
    rundir.hold(run).close()
    assert not any(p.exists() for p in own) and not (run / ".sft.tmp").exists()
    assert nested.exists() and all(p.exists() for p in mine)


def test_main_leaves_the_denormal_flag_as_it_found_it(tmp_path):
    """train.main flushes denormals for its run and restores the flag when it returns, so that a
    test calling it in-process does not change the numbers of every later test."""
    torch.set_flush_denormal(False)
    assert not machine.denormals_flushed()
    args = ["--preset=tiny", "--device=cpu", f"--data_dir={tmp_path / 'none'}"]
    with pytest.raises(SystemExit):  # stops at the missing data, after the flag was set
        train.main([*args, f"--out_dir={tmp_path / 'run'}"])
    assert not machine.denormals_flushed()
    torch.set_flush_denormal(True)
    assert machine.denormals_flushed()
    torch.set_flush_denormal(False)


@pytest.mark.slow
def test_denormals_are_flushed_before_any_matmul_starts_the_thread_pool():
    """The CPU's worker threads copy the flush-to-zero flag when they start. Set after a matmul
    has started them (as choose_dtype's timing does), half of every two-thread matmul is not
    flushed; set first, all of it is. flush_denormals reports which happened, and train.py calls it
    first."""
    code = (
        "import sys, torch; sys.path.insert(0, {root!r}); import machine\n"
        "torch.set_num_threads(2)\n"
        "{before}\n"
        "print(machine.flush_denormals())\n"
    )
    for before, expected in (
        ("", "True"),
        ("torch.randn(512, 512) @ torch.randn(512, 512)", "False"),
    ):
        p = subprocess.run(
            [sys.executable, "-c", code.format(root=str(ROOT), before=before)],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "2"},
        )
        assert p.stdout.strip() == expected, (before, p.stdout, p.stderr[-2000:])
    source = (ROOT / "train.py").read_text()
    body = source[source.index("def run_pipeline") :]
    assert body.index("machine.flush_denormals()") < body.index("machine.choose_dtype(")
    assert body.index("machine.flush_denormals()") < body.index("machine.start_processes(")


@pytest.mark.parametrize(
    "capability, dtype, note",
    [
        ((7, 5), "float32", ""),  # T4: no TF32
        ((7, 0), "bfloat16", ""),  # V100
        ((8, 0), "float32", " with TF32 matmuls"),  # A100
        ((9, 0), "bfloat16", " with its float32 LM head in TF32"),  # H100
    ],
)
def test_the_banner_names_tf32_only_where_the_gpu_has_it_and_the_run_uses_it(
    monkeypatch, capability, dtype, note
):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert machine.tf32_note(torch.device("cuda"), dtype) == note
    assert machine.tf32_note(torch.device("cpu"), dtype) == ""


def test_a_numbered_gpu_is_made_current_and_its_random_state_is_the_one_saved(
    monkeypatch, tmp_path
):
    """--device=cuda:1 in one process: GPU 1 becomes the current device, and the checkpoint saves
    and restores GPU 1's random state, not GPU 0's. (No GPU needed: torch.cuda is mocked.)"""
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))

    def get_rng_state(device="cuda"):
        calls.append(("get", device))
        return torch.zeros(16, dtype=torch.uint8)

    monkeypatch.setattr(torch.cuda, "get_rng_state", get_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d="cuda": calls.append(("set", d)))
    cfg = types.SimpleNamespace(device="cuda:1")
    device = machine.choose_device(cfg)
    assert device == torch.device("cuda", 1) and calls == [("set_device", device)]
    rundir.save_checkpoint(tmp_path / "ck.pt", {}, dict(step=1), device)
    rundir.load_checkpoint(tmp_path / "ck.pt", {}, device)
    assert calls[1:] == [("get", device), ("set", device)]
