"""The run directory: every file written whole or not at all, read back with one clear message when damaged; the
lock that keeps a second train.py out; checkpoints that resume where a run stopped, RNG included; how the
processes of a torchrun share it.

Under torchrun only the main process (rank 0) writes: the other ranks hold the same numbers, and their
write/log/save_checkpoint calls write nothing (save_checkpoint still gathers their RNG states)."""
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
    """A file or model directory of the run, read by `load`; by default JSON, torch.load with weights_only (a tampered
    file cannot run code) or T5.from_pretrained. A damaged one stops the run with one line saying what to do."""
    path = Path(path)
    try:
        if load is None and path.suffix in (".pt", ".json"):
            return (json.loads(path.read_text()) if path.suffix == ".json" else
                    torch.load(path, map_location="cpu", weights_only=True))
        return (load or T5.from_pretrained)(path)
    except FileNotFoundError:
        raise RunError(f"{path} is missing: rerun the same command; the stage that writes it is redone") from None
    except OSError as e:
        if isinstance(e, PermissionError) or e.errno in (errno.EIO, errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise  # the file system said no, not the file: main() names the file and the reason
        why = e.strerror or str(e)  # e.g. torch's reader of a truncated file
    except (ValueError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError) as e:  # what a damaged file raises
        why = str(e).removeprefix(f"{path}: ") if isinstance(e, ValueError) else type(e).__name__
    raise RunError(f"{path} is damaged ({why}): delete it and rerun the same command; its stage is redone")


def copy(source, dest):
    """Copy a file or a model directory into the run whole or not at all, as every run file is written."""
    if not source.is_dir():
        return atomic_write(dest, source.read_bytes())
    tmp = dest.with_name(f".{dest.name}.tmp")
    remove(tmp)
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
    """Lock the run directory for this process, or refuse with one line if a live train.py holds it. The lock is
    the kernel's (flock): it goes with the process, so a killed run leaves nothing stuck."""
    f = open(run / "lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        raise RunError(f"{run} is in use by a running train.py (pid {f.read().strip() or '?'}): wait for it to end "
                       f"or give another --out_dir") from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return f  # held while this file object lives


def write(path, obj):
    """Write a file of the run whole or not at all (t5.atomic_write): JSON for .json, else torch.save. Rank 0 only."""
    if rank() > 0:
        return
    if path.suffix == ".json":
        return atomic_write(path, json.dumps(obj, indent=1).encode())
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, buf.getvalue())


def log(run, record):  # log.jsonl is appended to: a line cut short by a kill is skipped when read; rank 0 only
    if rank() > 0:
        return
    with open(run / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def save_checkpoint(path, parts, state):
    """The loop state, every part's state (a torch.Generator's too) and torch's RNG: the CPU's, and the GPUs' when
    CUDA is in use (dropout and sampling draw there), so a resumed run goes on instead of replaying draws. Under
    torchrun every rank calls it: each rank's RNG is kept, since each rank draws its own rollouts and dropout."""
    rng = dict(cpu=torch.get_rng_state())
    if torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    if dist.is_initialized():
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, rng)
        rng = dict(ranks=per_rank)
    write(path, dict(state=state, rng=rng, parts={
        k: p.get_state() if isinstance(p, torch.Generator) else p.state_dict() for k, p in parts.items()}))


def load_checkpoint(path, parts):
    """Restore what save_checkpoint saved into `parts` and return the loop state; None without a checkpoint."""
    if not path.exists():
        return None
    ck = read(path)
    for k, p in parts.items():
        if isinstance(p, torch.Generator):
            p.set_state(ck["parts"][k])
        else:
            p.load_state_dict(ck["parts"][k])
    rng = ck["rng"] if isinstance(ck["rng"], dict) else dict(cpu=ck["rng"])  # checkpoints before CUDA RNG was kept
    if "ranks" in rng:  # saved under torchrun: this rank's (resumed with fewer processes: some ranks' draws go)
        rng = rng["ranks"][rank() % len(rng["ranks"])]
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    print(f"{path.name}: resuming after step {ck['state']['step']}")
    return ck["state"]


def code_version():
    """What made a run, for its results.json: the git commit of this code, whether tracked files had uncommitted
    changes (None for both outside a git checkout), and the command line."""
    def git(*args):
        try:
            p = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=30)
            return p.stdout.strip() if p.returncode == 0 else None
        except OSError:  # no git
            return None
    commit, changes = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    return dict(commit=commit, dirty=None if commit is None else bool(changes),
                command=shlex.join(["python", Path(sys.argv[0]).name, *sys.argv[1:]]))


def broadcast(obj):
    """Rank 0's object on every rank."""
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def wait_for_stage(run, stage, poll_s=2.0):
    """Ranks > 0 wait while rank 0 runs a stage alone, by reading stages.json rather than in a collective: a long
    stage cannot trip the process group's timeout. Returns the finished stages."""
    while True:
        done = read(run / "stages.json") if (run / "stages.json").exists() else {}
        if stage in done:
            return done
        time.sleep(poll_s)
