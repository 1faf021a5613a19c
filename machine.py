"""Where a run runs: the device, the dtype, denormals on the CPU, the record of the machine, and
several processes under torchrun. Skip it at first.

With one process (`python train.py`) every torchrun function here is the identity or does nothing.
Under
`torchrun --nproc_per_node=N train.py ...` each process joins a group (NCCL on CUDA, one GPU each;
gloo on the CPU) and takes 1/N of every SFT batch and PPO iteration, so that the global batch is the
preset's. Gradients are averaged across processes by DistributedDataParallel; the statistics that
must be the same on every process (score moments, whitening, the KL that moves β) are summed or
gathered over the global batch with the functions below. Only rank 0 prints and writes files.
"""

import datetime
import fcntl
import os
import platform
import sys
import time

import torch
import torch.distributed as dist

from rundir import RunError, rank, read  # rank(): 0 in one process

# ------------------------------------------------------------------------------ device and dtype


def choose_device(cfg):
    """auto: the GPU if there is one, else the CPU. A numbered GPU (--device=cuda:1) becomes the
    current one, so that its random state is the one saved and restored."""
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(cfg.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


def tf32_note(device, dtype):
    """What runs in TF32 (GPUs of compute capability 8.0 and newer, with allow_tf32 on): a float32
    run's matmuls, or a bfloat16 run's float32 LM head. Nothing on older GPUs and on the CPU."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 8:
        return ""
    if dtype == "float32":
        return " with TF32 matmuls"
    return " with its float32 LM head in TF32"


def flush_denormals():
    """Flush denormal float32 numbers to zero on the CPU: they slow matmuls many times and change no
    result here. Returns whether every thread of a matmul now flushes them (threads started before
    the flag was set keep theirs: call this first)."""
    torch.set_flush_denormal(True)
    tiny = torch.full((256, 256), 1e-20) @ torch.full((256, 256), 1e-21)  # each entry 2.6e-39
    return bool((tiny == 0).all())


def denormals_flushed():
    """Whether this thread flushes denormal float32 numbers (torch has no getter for the flag)."""
    return bool((torch.tensor([1e-39]) * 1.0 == 0).all())


def choose_dtype(cfg, device):
    """(dtype, why). auto: bfloat16 autocast on a GPU that supports it, and on a CPU whose bfloat16
    matmuls run at least twice as fast as float32's (AVX512-BF16, AMX; docs/speed.md measures the
    `cpu` preset both ways), else float32. Never float16: T5 overflows in it."""
    if cfg.dtype != "auto":
        return cfg.dtype, "--dtype"
    if device.type == "cpu":
        speedup = bf16_matmul_speedup()
        if speedup >= 2.0:
            return "bfloat16", f"bfloat16 matmuls run {speedup:.1f}x float32's on this CPU"
        return "float32", f"bfloat16 matmuls run {speedup:.1f}x float32's on this CPU, under 2x"
    # emulated bfloat16 (V100, T4) is slow
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return "bfloat16", f"{torch.cuda.get_device_name(device)} supports bfloat16"
    return "float32", (
        f"{torch.cuda.get_device_name(device)} has no bfloat16 and T5 overflows in float16"
    )


def bf16_matmul_speedup(n=512, repeats=5):
    """Best-of-`repeats` time of a float32 n x n matmul over a bfloat16 one, on the CPU (a tenth of
    a second)."""
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        best[dtype] = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best[dtype] = min(best[dtype], time.perf_counter() - t0)
    return best[torch.float32] / best[torch.bfloat16]


def environment(env):
    """What ran a run, for its results.json: versions, threads, CPU, device, dtype, the code."""
    return dict(
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        device=str(env["device"]),
        dtype=env["dtype"],
        machine=platform.machine(),
        python=platform.python_version(),
        flush_denormal=env["flush_denormal"],
        **env["code"],
    )


# --------------------------------------------------------------------- several processes: torchrun


def start_processes(cfg, device):
    """The number of processes, and this process's device. Under torchrun: checks that every batch
    divides among the processes, gives each process its own GPU and joins the group."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return world, device
    for name in ("sft_batch_size", "ppo_batch_size", "ppo_mini_batch_size"):
        if getattr(cfg, name) % world:
            raise RunError(
                f"--{name}={getattr(cfg, name)} does not divide among {world} processes: the "
                f"global batch is kept, so choose a multiple of {world}"
            )
    if cfg.algo != "ppo" and (cfg.ppo_batch_size // world) % cfg.rloo_k:
        raise RunError(
            f"--algo={cfg.algo}: each of the {world} processes needs whole groups of "
            f"rloo_k={cfg.rloo_k} replies; make ppo_batch_size a multiple of {world * cfg.rloo_k}"
        )
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(minutes=cfg.dist_timeout_min)
    dist.init_process_group(backend, timeout=timeout)
    if rank() > 0:  # one voice: the others' prints go nowhere (their errors still reach stderr)
        sys.stdout = open(os.devnull, "w")
    return world, device


def stop():
    """Leave the process group (NCCL warns otherwise); nothing in one process."""
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(idx, world):
    """This rank's contiguous share of a global batch's example indices (RLOO and GRPO groups stay
    whole). A short last batch of an epoch may give a rank one example fewer, or, with fewer
    examples than ranks, its last one."""
    n = -(-len(idx) // world)
    return idx[rank() * n : (rank() + 1) * n] or idx[-1:]


def data_parallel(model, world, device):
    """The model wrapped for data-parallel steps (gradients averaged across processes during
    backward), or the model itself in one process. Every process starts from rank 0's weights."""
    if world == 1:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    torch.manual_seed(torch.initial_seed() + rank())  # each process its own dropout masks from here
    return wrapped


def unwrap(model):
    """The model inside a DistributedDataParallel wrapper, or the model itself."""
    return getattr(model, "module", model)


def all_sum(x):
    """x summed over every process (x itself in one process)."""
    if not dist.is_initialized():
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x


def all_mean(x):
    """x averaged over every process (x itself in one process)."""
    if not dist.is_initialized():
        return x
    return all_sum(x) / dist.get_world_size()


def all_gather(x):
    """Every process's x (the same shape on each) concatenated along dim 0, in rank order (x itself
    in one process)."""
    if not dist.is_initialized():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def gather_objects(obj):
    """Every process's picklable obj, in rank order ([obj] in one process)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def from_rank_0(obj):
    """Rank 0's picklable obj on every process (obj itself in one process)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier():
    if dist.is_initialized():
        dist.barrier()


def wait_for_stage(run, stage, poll_s=2.0):
    """Ranks > 0 wait while rank 0 runs a stage alone, by reading stages.json rather than in a
    collective: a long stage cannot trip the process group's timeout. Returns the finished stages.
    Should rank 0 die, its lock on the run directory goes with it (on one machine): the wait then
    stops with an error instead of lasting forever."""
    while True:
        # looked at before stages.json: rank 0 writes it, then ends and frees the lock
        with open(run / "lock") as f:
            # a shared lock is refused while rank 0 holds its exclusive one
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
                alive = False
            except BlockingIOError:
                alive = True
        done = read(run / "stages.json") if (run / "stages.json").exists() else {}
        if stage in done:
            return done
        if not alive:
            raise RunError(f"rank 0 stopped before finishing stage '{stage}' (its error is above)")
        time.sleep(poll_s)
