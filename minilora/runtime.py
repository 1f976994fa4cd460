"""Where and how a training run computes: the device, the precision, and the processes (DDP).

    rt = setup_runtime(cfg)       # picks the device and dtype, joins torchrun's process group, seeds
    with autocast_context(rt.device_type, rt.dtype): ...
    cleanup(rt)                   # leaves the process group
"""

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from minilora.checkpoint import seed_everything
from minilora.errors import MiniloraError


@dataclass
class Runtime:
    device: str = "cpu"
    dtype: str = "fp32"
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def device_type(self):
        return self.device.split(":")[0]

    @property
    def ddp(self):
        return self.world_size > 1

    @property
    def master(self):
        return self.rank == 0  # the only process that logs and writes files


def pick_device(name="auto"):
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(dtype, device_type):
    if dtype == "auto":
        return "bf16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if dtype == "fp16" and device_type != "cuda":
        raise MiniloraError(f"--dtype fp16 needs a CUDA GPU (it relies on a GradScaler); on {device_type} use bf16 or fp32")
    return dtype


def autocast_context(device_type, dtype):
    """Mixed precision for the forward pass only: the parameters (master weights) stay fp32."""
    if dtype == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)


def setup_runtime(cfg):
    """Pick the device and dtype; under torchrun (WORLD_SIZE > 1) join the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(cfg.device)
    if world_size > 1:
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    rt = Runtime(device, resolve_dtype(cfg.dtype, device.split(":")[0]), rank, local_rank, world_size)
    # Every rank builds the same initial model from the same seed (DDP also broadcasts rank 0's);
    # train() reseeds with seed + rank, so dropout masks differ per rank.
    seed_everything(cfg.seed)
    return rt


def cleanup(rt, completed=True):
    """Leave the process group. After a completed run every rank waits for the others first: a rank
    that tears the group down while a peer is still finishing (rank 0 writing the output) can make
    gloo abort that peer. After an error there is no barrier: the other ranks may never reach it."""
    if rt.ddp and dist.is_initialized():
        if completed:
            dist.barrier()
        dist.destroy_process_group()
