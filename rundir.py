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
import re
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


FILE_SYSTEM_SAID_NO = (errno.EIO, errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def read(path, load=None):
    """A file or model directory of the run, read by `load`; by default JSON, torch.load with
    weights_only (a tampered file cannot run code) or T5.from_pretrained. A damaged one stops the
    run with one line saying what to do."""
    path = Path(path)
    try:
        if load is None and path.suffix == ".json":
            return json.loads(path.read_text())
        if load is None and path.suffix == ".pt":
            return torch.load(path, map_location="cpu", weights_only=True)
        return (load or T5.from_pretrained)(path)
    except FileNotFoundError:
        raise RunError(
            f"{path} is missing: rerun the same command; the stage that writes it is redone"
        ) from None
    except OSError as e:
        # the file system said no, not the file: main() names the file and the reason
        if isinstance(e, PermissionError) or e.errno in FILE_SYSTEM_SAID_NO:
            raise
        why = e.strerror or str(e)  # e.g. torch's reader of a truncated file
    except (ValueError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError) as e:  # damaged
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
        holder = f.read().strip() or "?"
        raise RunError(
            f"{run} is in use by a running train.py (pid {holder}): wait for it to end or give "
            "another --out_dir"
        ) from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    for leftover in leftovers(run):
        remove(leftover)
    return f  # held while this file object lives


# the model directories a run writes (train.py's stages), and the temporary names that a writer
# killed in the middle leaves: atomic_write's ".NAME.8hex.tmp", and copy's ".DIR.tmp"
MODEL_DIRS = ("sft", "identifiers", "emprl")
TEMPORARY = re.compile(r"\..+\.[0-9a-f]{8}\.tmp|\.(" + "|".join(MODEL_DIRS) + r")\.tmp")


def leftovers(run):
    """This run's half-written files: its temporary names in the run directory and its model
    directories only (a run directory nested inside it, or a user's hidden files, are not its)."""
    folders = [run] + [run / name for name in MODEL_DIRS if (run / name).is_dir()]
    return [p for folder in folders for p in folder.iterdir() if TEMPORARY.fullmatch(p.name)]


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


def save_checkpoint(path, parts, state, device):
    """The loop state, every part's state (a torch.Generator's too), the kind of device, and torch's
    RNG: the CPU's, and the run's GPU's, so a resumed run goes on instead of replaying draws. Under
    torchrun every rank's RNG is kept."""
    rng = dict(cpu=torch.get_rng_state())
    if device.type == "cuda":  # the GPU this process uses (--device=cuda:1 is not GPU 0)
        rng["cuda"] = torch.cuda.get_rng_state(device)
    ranks = [rng]
    if dist.is_initialized():
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, rng)
    saved = {}
    for name, part in parts.items():
        if isinstance(part, torch.Generator):
            saved[name] = part.get_state()
        else:
            saved[name] = part.state_dict()
    checkpoint = dict(state=state, device=device.type, rng=dict(ranks=ranks), parts=saved)
    write(path, checkpoint)


def load_checkpoint(path, parts, device):
    """Restore what save_checkpoint saved into `parts`; returns the loop state, None without a
    checkpoint. Another kind of device is refused: its random streams differ. With more processes
    than saved RNG states, rank r >= n takes rank r % n's and seeds with a draw from it + r."""
    if not path.exists():
        return None
    ck = read(path)
    if ck.get("device", device.type) != device.type:
        raise RunError(
            f"{path} was saved on {ck['device']}, this run uses {device.type}: resume with the "
            f"--device it ran on, or start a new --out_dir"
        )
    for name, part in parts.items():
        try:
            if isinstance(part, torch.Generator):
                part.set_state(ck["parts"][name])
            else:
                part.load_state_dict(ck["parts"][name])
        except (RuntimeError, KeyError, ValueError) as e:
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RunError(
                f"{path} does not fit this run ({name}: {why}): delete it to redo the stage from "
                f"its start, or start a new --out_dir"
            ) from None
    ranks = ck["rng"]["ranks"]
    rng = ranks[rank() % len(ranks)]
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)
    # no saved state of its own: draw apart from the rank whose state it took
    if rank() >= len(ranks):
        torch.manual_seed(int(torch.randint(2**62, ())) + rank())
    print(f"{path.name}: resuming after step {ck['state']['step']}")
    return ck["state"]


def code_version():
    """What made a run: the git commit of this code, uncommitted changes to it (None outside git),
    the command."""

    def git(*args):
        cmd = ["git", "-C", str(Path(__file__).parent), *args]
        return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD") or None
        changes = git("status", "--porcelain", "-uno")
    except OSError:  # no git
        commit = None
    command = shlex.join(["python", Path(sys.argv[0]).name, *sys.argv[1:]])
    return dict(commit=commit, dirty=bool(changes) if commit else None, command=command)


# ----------------------------------------------------------------------- the pipeline's bookkeeping


def open_run(run, config, stage_of, results, preset):
    """Rank 0: lock the run directory, refuse changed settings, reuse --from_run's stages, write
    config.json, and drop a stage whose result was deleted with every stage after it. Returns the
    lock (held while it lives). A stage is done while stages.json lists it and its result files
    (results[stage]) exist; every field of the config belongs to one stage (stage_of) and changes
    it and every later stage."""
    if run.exists() and not run.is_dir():
        raise RunError(f"--out_dir={run} is a file; give a directory")
    run.mkdir(parents=True, exist_ok=True)
    lock = hold(run)
    stages = list(results)
    if (run / "config.json").exists():
        changed, first = changed_fields(read(run / "config.json"), config, stage_of, stages)
        if changed:
            raise RunError(
                f"{run} was made with other settings ({'; '.join(changed.values())}); use a new "
                f"--out_dir, with --from_run={run} to reuse its stages before '{first}'"
            )
    if config["from_run"] and not (run / "stages.json").exists():
        reuse_stages(run, Path(config["from_run"]), config, stage_of, results)
    write(run / "config.json", config)
    log(run, dict(stage="config", preset=preset, **config))
    done = finished_stages(run)
    for i, stage in enumerate(stages):
        if stage in done and not all((run / f).exists() for f in results[stage]):
            print(f"[{stage}] a result is missing: redoing '{stage}' and the stages after it")
            for later in stages[i:]:  # they were built on it: results and checkpoints go
                done.pop(later, None)
                for name in {Path(f).parts[0] for f in results[later]} | {f"{later}_ckpt.pt"}:
                    remove(run / name)
            write(run / "stages.json", done)
            break
    return lock


def finished_stages(run):
    """{stage: seconds it took} of the stages done in this run directory."""
    return read(run / "stages.json") if (run / "stages.json").exists() else {}


def changed_fields(old, config, stage_of, stages):
    """{field: "field: old -> new"} for the fields that change results (stage_of[field] is not None)
    and differ from an earlier config, and the first stage they belong to (None if none)."""
    changed = {}
    for key, value in config.items():
        if stage_of[key] and old.get(key) != value:
            changed[key] = f"{key}: {old.get(key)} -> {value}"
    first = min((stage_of[k] for k in changed), key=stages.index, default=None)
    return changed, first


def reuse_stages(run, source, config, stage_of, results):
    """Copy an earlier run's results of the finished stages before the first changed one; done
    here, with the times they took there."""
    if not (source / "stages.json").exists():
        raise RunError(f"--from_run={source}: not a run directory (no stages.json)")
    stages = list(results)
    changed, first = changed_fields(read(source / "config.json"), config, stage_of, stages)
    source_done = read(source / "stages.json")
    done = {}
    for stage in stages[: stages.index(first) if first else None]:
        if stage not in source_done or not all((source / f).exists() for f in results[stage]):
            break
        for name in {Path(f).parts[0] for f in results[stage]}:  # a file, or a model directory
            copy(source / name, run / name)
        done[stage] = source_done[stage]
    write(run / "stages.json", done)
    reused = ", ".join(done) or "nothing"
    print(f"--from_run={source}: reusing {reused} ({'; '.join(changed.values()) or 'no change'})")


def timed(run, stage, step):
    """Run one stage, then record it done in stages.json with its time, and in the log with the
    threads and the machine's 1-minute load average at its start and end (what else was running)."""
    t0 = time.time()
    load = os.getloadavg()[0]
    step()
    seconds = time.time() - t0
    write(run / "stages.json", {**finished_stages(run), stage: seconds})
    record = dict(stage="timing", name=stage, seconds=seconds, threads=torch.get_num_threads())
    log(run, dict(record, load_1min=[load, os.getloadavg()[0]]))
    if rank() == 0:  # finished: its results supersede the checkpoint
        (run / f"{stage}_ckpt.pt").unlink(missing_ok=True)
    return seconds
