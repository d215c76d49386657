"""Process-group set-up shared by every way of starting train.py.

`python train.py` (one process, no launcher), `deepspeed`, `torchrun` and SLURM's `srun` all end
up here. The launchers export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; srun exports SLURM_* instead;
a bare `python` exports nothing, so we fill in a world of one.
"""

import os
import socket
import time
from pathlib import Path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fill_launcher_env():
    """Export the torch.distributed variables if no launcher did; returns (rank, world_size, local_rank)."""
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env:  # srun without torchrun/deepspeed
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env["SLURM_LOCALID"]
    env.setdefault("RANK", "0")
    env.setdefault("WORLD_SIZE", "1")
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        if env["WORLD_SIZE"] != "1":
            raise RuntimeError("MASTER_PORT is not set: launch with deepspeed, torchrun or a SLURM script in launch/")
        # a world of one meets through an in-process store (init_distributed), but DeepSpeed looks
        # for MASTER_PORT and would go looking for MPI without it
        env["MASTER_PORT"] = str(free_port())
    return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])


# a JIT build of DeepSpeed's ops takes 30 s to 2 min on a CPU; a lock this old has no build behind it
STALE_BUILD_LOCK_MINUTES = 15


def check_extension_build_locks():
    """Stop on a torch-extension build lock that a killed build left behind.

    DeepSpeed JIT-compiles C++ ops on first use (its CPU comm op on every CPU run, CPU Adam for
    offload) into TORCH_EXTENSIONS_DIR under a `lock` file. A build killed half-way (Ctrl-C, a
    job's time limit) leaves the file, and every later run waits on it forever without a word."""
    from torch.utils.cpp_extension import get_default_build_root

    from configs import ConfigError

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:  # with and without the pyXY_cu tag
        try:
            minutes = (time.time() - lock.stat().st_mtime) / 60
        except FileNotFoundError:  # its build just finished
            continue
        if minutes > STALE_BUILD_LOCK_MINUTES:
            raise ConfigError(f"{lock} is the lock of a torch extension build that never finished ({minutes:.0f} "
                              f"minutes old): every run would wait on it forever. Delete it (rm {lock}) unless a "
                              "build is still running")


def init_distributed():
    """Start the process group: NCCL on GPUs, gloo on CPU (DeepSpeed's CPU accelerator)."""
    rank, world_size, local_rank = fill_launcher_env()
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    if world_size == 1:
        # A world of one has no one to meet: an in-process store instead of a TCP rendezvous on a
        # port that was free a moment ago, which runs started side by side (a sweep's jobs) could
        # race for. DeepSpeed adopts the group.
        import torch.distributed as dist

        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend=backend)
    return rank, world_size, local_rank


def host_group():
    """The process group for values that live on the host (the step policy's flags): gloo, so that
    agreeing on them every step never waits for the GPU stream. None without torch.distributed."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return None
    return dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def check_ranks_agree(facts, rank):
    """Stop every rank when one resolved something else than rank 0 (facts: name -> value).

    Data, tokenizer, config and resume point are resolved by each process on its own disk before
    the process group exists. Nodes without a shared filesystem, or with a stale copy of the data,
    would otherwise load different checkpoints or vocabularies and hang or diverge silently. The
    line names the first rank that differs; rank 0 prints it, every rank exits with code 2."""
    import hashlib
    import sys

    import torch.distributed as dist

    mine = (socket.gethostname(), {k: hashlib.sha256(str(v).encode()).hexdigest()[:12] for k, v in facts.items()})
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    host0, reference = gathered[0]
    for other, (host, seen) in enumerate(gathered):
        differs = [k for k in reference if seen[k] != reference[k]]
        if differs:
            if rank == 0:
                print(f"error: rank {other} on {host} resolved another {differs[0]} than rank 0 on {host0} "
                      f"({seen[differs[0]]} vs {reference[differs[0]]}): every node must see the same data.path, "
                      "train.out_dir (checkpoints) and config (see docs/checkpointing.md, \"What must be shared between nodes\")",
                      file=sys.stderr)
            raise SystemExit(2)
