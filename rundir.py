"""The run directory: every file written whole or not at all, read back with one clear message when
damaged; the lock that keeps a second train.py out; checkpoints that resume where a run stopped, RNG
included. Under torchrun only rank 0 writes: the other ranks' write/log/save_checkpoint write
nothing (save_checkpoint gathers their RNG)."""

import errno
import fcntl
import io
import json
import os
import pickle
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from t5 import T5, atomic_write


def rank():
    """This process's rank under torchrun, 0 otherwise."""
    return dist.get_rank() if dist.is_initialized() else 0


class RunError(Exception):
    """A user-facing failure: printed as one line, no traceback."""


def read(path, load=None):
    """A file or model directory of the run, read by `load`; by default JSON, torch.load with
    weights_only (a tampered file cannot run code) or T5.from_pretrained. A damaged one stops the
    run with one line saying what to do."""
    path = Path(path)
    try:
        if load is None and path.suffix in (".pt", ".json"):
            return (
                json.loads(path.read_text())
                if path.suffix == ".json"
                else torch.load(path, map_location="cpu", weights_only=True)
            )
        return (load or T5.from_pretrained)(path)
    except FileNotFoundError:
        raise RunError(
            f"{path} is missing: rerun the same command; the stage that writes it is redone"
        ) from None
    except OSError as e:
        if isinstance(e, PermissionError) or e.errno in (
            errno.EIO,
            errno.ENOSPC,
            errno.EDQUOT,
            errno.EROFS,
        ):
            raise  # the file system said no, not the file: main() names the file and the reason
        why = e.strerror or str(e)  # e.g. torch's reader of a truncated file
    # what a damaged file raises
    except (ValueError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError) as e:
        why = str(e).removeprefix(f"{path}: ") if isinstance(e, ValueError) else type(e).__name__
    raise RunError(
        f"{path} is damaged ({why}): delete it and rerun the same command; its stage is redone"
    )


def copy(source, dest):
    """Copy a file or a model directory into the run whole or not at all, as every run file is
    written."""
    if not source.is_dir():
        return atomic_write(dest, source.read_bytes())
    # a leftover of a killed copy went when the run was opened (hold)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.copytree(source, tmp)
    remove(dest)
    tmp.rename(dest)


def remove(path):
    """Delete a file or a directory of the run, if it is there."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def hold(run):
    """Lock the run directory for this process, or refuse with one line if a live train.py holds it;
    then delete what a killed writer left half-written. The lock is the kernel's (flock): it goes
    with the process."""
    f = open(run / "lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        raise RunError(
            f"{run} is in use by a running train.py (pid {f.read().strip() or '?'}): "
            "wait for it to end "
            f"or give another --out_dir"
        ) from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    # of atomic_write or copy, in a process killed while writing
    for leftover in list(run.glob("**/.*.tmp")):
        remove(leftover)
    return f  # held while this file object lives


def write(path, obj):
    """Write a file of the run whole or not at all (t5.atomic_write): JSON for .json, else
    torch.save. Rank 0 only."""
    if rank() > 0:
        return
    if path.suffix == ".json":
        return atomic_write(path, json.dumps(obj, indent=1).encode())
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, buf.getvalue())


# log.jsonl is appended to: a line cut short by a kill is skipped when read; rank 0 only
def log(run, record):
    if rank() == 0:
        with open(run / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def save_checkpoint(path, parts, state):
    """The loop state, every part's state (a torch.Generator's too) and torch's RNG: the CPU's, and
    this process's GPU's in use, so a resumed run goes on instead of replaying draws. Under torchrun
    every rank's RNG is kept."""
    rng = dict(cpu=torch.get_rng_state())
    if torch.cuda.is_initialized():  # its own device's only: a resume may see fewer GPUs
        rng["cuda"] = torch.cuda.get_rng_state()
    ranks = [rng]
    if dist.is_initialized():
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, rng)
    write(
        path,
        dict(
            state=state,
            rng=dict(ranks=ranks),
            parts={
                k: p.get_state() if isinstance(p, torch.Generator) else p.state_dict()
                for k, p in parts.items()
            },
        ),
    )


def load_checkpoint(path, parts):
    """Restore what save_checkpoint saved into `parts`; returns the loop state, None without a
    checkpoint. With more processes than saved RNG states, rank r >= n takes rank r % n's and seeds
    with a draw from it + r (one process's checkpoint under torchrun: every rank draws apart).
    Another kind of device than the saving one is refused."""
    if not path.exists():
        return None
    ck = read(path)
    for k, p in parts.items():
        try:
            p.set_state(ck["parts"][k]) if isinstance(p, torch.Generator) else p.load_state_dict(
                ck["parts"][k]
            )
        except RuntimeError:  # e.g. a CPU generator's state into a CUDA generator
            raise RunError(
                f"{path} was saved on another device (not "
                f"{getattr(p, 'device', '?')}): resume with the "
                f"--device it ran on, or start a new --out_dir"
            ) from None
    ranks = ck["rng"]["ranks"]
    rng = ranks[rank() % len(ranks)]
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    # no saved state of its own: draw apart from the rank whose state it took
    if rank() >= len(ranks):
        torch.manual_seed(int(torch.randint(2**62, ())) + rank())
    print(f"{path.name}: resuming after step {ck['state']['step']}")
    return ck["state"]


def code_version():
    """What made a run: the git commit of this code, uncommitted changes to it (None outside git),
    the command."""
    git = ["git", "-C", str(Path(__file__).parent)]
    try:
        commit = (
            subprocess.run(
                [*git, "rev-parse", "HEAD"], capture_output=True, text=True
            ).stdout.strip()
            or None
        )
        changes = subprocess.run(
            [*git, "status", "--porcelain", "-uno"], capture_output=True, text=True
        ).stdout
    except OSError:  # no git
        commit = None
    return dict(
        commit=commit,
        dirty=bool(changes) if commit else None,
        command=shlex.join(["python", Path(sys.argv[0]).name, *sys.argv[1:]]),
    )


def wait_for_stage(run, stage, poll_s=2.0):
    """Ranks > 0 wait while rank 0 runs a stage alone, by reading stages.json rather than in a
    collective: a long stage cannot trip the process group's timeout. Returns the finished stages.
    Should rank 0 die, its lock on the run directory goes with it (on one machine): the wait then
    stops with an error instead of lasting forever."""
    while True:
        # looked at before stages.json: rank 0 writes it, then ends and frees the lock
        with open(run / "lock") as f:
            # a shared lock is refused while rank 0 holds its exclusive one; taken (flock gives
            # None): it is gone
            try:
                alive = bool(fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB))
            except BlockingIOError:
                alive = True
        done = read(run / "stages.json") if (run / "stages.json").exists() else {}
        if stage in done:
            return done
        if not alive:
            raise RunError(f"rank 0 stopped before finishing stage '{stage}' (its error is above)")
        time.sleep(poll_s)
