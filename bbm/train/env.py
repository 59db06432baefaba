"""Process setup: rank variables for one process / SLURM, extension cache, device, process group."""
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from bbm._checks import fail

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_rank_variables(local_rank=None):
    """Fills in what torch.distributed needs: from the launcher (deepspeed / torchrun set RANK etc.), from
    SLURM (``srun``), or for a plain single process. ``--local_rank`` from an older launcher wins."""
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env:  # srun: one task per GPU
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        if "MASTER_ADDR" not in env:
            fail("MASTER_ADDR", "set by the SLURM batch script (see launch/slurm.sbatch)", "unset", RuntimeError)
    if "RANK" not in env:  # a plain `python train.py`: a one-process group
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    env.setdefault("MASTER_PORT", "29500")
    if local_rank is not None and local_rank >= 0:
        env["LOCAL_RANK"] = str(local_rank)
    # JIT-compiled DeepSpeed ops are cached inside the workspace (gitignored), not in ~/.cache
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".cache" / "torch_extensions"))


def resolve_device(kind: str) -> str:
    if kind == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        fail("run.device", "'cpu' or 'auto' on a machine without CUDA", "'cuda'")
    return kind


def init_distributed(device_kind: str = "auto", local_rank=None) -> DistEnv:
    """Initialises the process group through DeepSpeed (NCCL on GPUs, gloo on CPUs)."""
    set_rank_variables(local_rank)
    kind = resolve_device(device_kind)
    if kind == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # chosen, not a failed GPU detection (no warning)
    import deepspeed

    if kind == "cpu":
        # DeepSpeed's CPU shared-memory all-reduce serves inference only; skip its slow C++ build
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    local = int(os.environ["LOCAL_RANK"])
    if kind == "cuda":
        torch.cuda.set_device(local)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if kind == "cuda" else "gloo", verbose=False)
    if kind == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # ranks of one machine share its cores; oversubscribed OpenMP threads stall each other for ms per op
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    device = torch.device("cuda", local) if kind == "cuda" else torch.device("cpu")
    return DistEnv(torch.distributed.get_rank(), local, torch.distributed.get_world_size(), device)
