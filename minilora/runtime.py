"""Where and how a training run computes: the device, the precision, and the processes (DDP).

    rt = setup_runtime(cfg)       # picks the device (and the dtype, but "auto" on the CPU), joins torchrun's group, seeds
    rt.dtype, why = resolve_dtype(cfg.dtype, rt.device_type, widest_matmul, step_speedup)  # trainer.training_dtype
    with autocast_context(rt.device_type, rt.dtype): ...
    cleanup(rt)                   # leaves the process group
"""

import ctypes
import os
import platform
import sys
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from minilora.checkpoint import seed_everything
from minilora.errors import MiniloraError
from minilora.ops import MIN_TIMED_FLOPS, matmul_speedup


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


# bf16 autocast must make the model's own forward + backward this much faster to be taken: a bf16
# matmul alone can be many times faster (7-9x with AMX) while the step is slower (casts, attention,
# norms and the optimizer do not speed up; a 128-wide model stepped 0.7-0.8x as fast in bf16).
BF16_MIN_SPEEDUP = 1.2
BF16_PROBE = (512, 512, 512)  # a matmul that tells whether a CPU has bf16 instructions at all


def resolve_dtype(dtype, device_type, widest_matmul=None, step_speedup=None):
    """-> (dtype, why). "auto" is bf16 on a CUDA GPU that has it, and on the CPU only where
    step_speedup() (fp32 time / bf16-autocast time of the model's own forward + backward, measured
    by the caller) reaches BF16_MIN_SPEEDUP. widest_matmul (rows, in, out) says which models are too
    small to bother. Explicit bf16 on a CPU that emulates it (measured slower than fp32) warns."""
    if dtype == "fp16" and device_type != "cuda":
        raise MiniloraError(f"--dtype fp16 needs a CUDA GPU (it relies on a GradScaler); on {device_type} use bf16 or fp32")
    if device_type == "cuda" and dtype == "auto":
        return ("bf16", "auto: this GPU has bf16") if torch.cuda.is_bf16_supported() else ("fp32", "auto: no bf16 on this GPU")
    if device_type != "cpu" or dtype == "fp32":
        return ("fp32" if dtype == "auto" else dtype), ("as asked" if dtype != "auto" else "auto")
    if dtype == "bf16":
        speedup = matmul_speedup(torch.bfloat16, *BF16_PROBE)
        if speedup < 1:
            warnings.warn(f"--dtype bf16 is slower than fp32 on this CPU: a {'x'.join(map(str, BF16_PROBE))} matmul "
                          f"measured {speedup:.2f}x fp32's speed in bf16 (no bf16 instructions?); --dtype auto picks "
                          "the faster one", stacklevel=2)
        return "bf16", "as asked"
    m, k, n = widest_matmul or BF16_PROBE
    if 2 * m * k * n < MIN_TIMED_FLOPS or step_speedup is None:  # ops.py's bar: too short for bf16 to pay
        return "fp32", f"auto: the model's widest matmul ({m}x{k}x{n}) is too small for bf16 to pay"
    matmul = matmul_speedup(torch.bfloat16, *BF16_PROBE)
    if matmul < 1:  # emulated bf16: no need to time the model
        return "fp32", f"auto: a bf16 matmul measured {matmul:.2f}x fp32's speed here (no bf16 instructions)"
    speedup = step_speedup()
    measured = f"auto: the model's forward + backward measured {speedup:.2f}x fp32's speed under bf16 autocast here"
    if speedup >= BF16_MIN_SPEEDUP:
        return "bf16", measured
    return "fp32", f"{measured} (bf16 needs {BF16_MIN_SPEEDUP}x)"


def autocast_context(device_type, dtype):
    """Mixed precision for the forward pass only: the parameters (master weights) stay fp32."""
    if dtype == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)


def keep_freed_memory():
    """Have glibc's malloc keep what a training step frees for the next step instead of handing it back to
    the OS; returns whether it applied (Linux with glibc only). train() calls it for CPU training.

    A step frees and re-allocates the backward's buffers, bf16 autocast's weight copies and, in full
    fine-tuning, every weight's gradient (0.5 GB at gpt2). By default glibc returns large blocks to the
    kernel at once (each above its mmap threshold, at most 32 MB, is an mmap of its own) and the next
    step page-faults them back in 4 KB at a time. gpt2 8x256 on an AMD Zen 5, default vs this, in
    separate processes: full fine-tuning fp32 330 -> 385 and 310 -> 389 tok/s (+180-200 MB peak RSS),
    LoRA fp32 616 -> 623 and 622 -> 646, LoRA bf16 976 -> 1009 and 989 -> 1000 (LoRA's peak the same or
    lower). The same as MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<2 GB> in the environment; a MALLOC_*
    or GLIBC_TUNABLES setting of the user's own (e.g. README's MALLOC_MMAP_THRESHOLD_ for a smaller peak) stands."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    if "GLIBC_TUNABLES" in os.environ or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
    # no block gets an mmap of its own (so none is unmapped on free), and the heap's top is trimmed only
    # once 2 GB of it are free (mallopt takes an int)
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2 ** 31 - 1))


def usable_cores(sys_root="/sys"):
    """Physical cores this process may run on: the CPUs of its affinity mask (taskset, cpusets), SMT
    siblings counted once, and no more than a cgroup CPU quota (docker --cpus) allows.

    torch starts with one thread per physical core (c10's defaultNumThreads, via cpuinfo): it follows
    the affinity mask (`taskset -c 0` gave 1 thread) but not a quota, and more threads than cores
    makes every matmul wait at its barrier for a thread that is not running (README, Performance)."""
    cores = set()
    for cpu in os.sched_getaffinity(0):
        topology = os.path.join(sys_root, f"devices/system/cpu/cpu{cpu}/topology")
        try:
            with open(os.path.join(topology, "physical_package_id")) as f, open(os.path.join(topology, "core_id")) as g:
                cores.add((f.read().strip(), g.read().strip()))
        except OSError:
            cores.add(("cpu", cpu))  # no topology in sysfs: count the CPU as a core
    try:
        with open(os.path.join(sys_root, "fs/cgroup/cpu.max")) as f:
            quota, period = f.read().split()
        quota = len(cores) if quota == "max" else -(-int(quota) // int(period))  # ceil: 1.5 CPUs -> 2 threads
    except (OSError, ValueError):
        quota = len(cores)
    return max(1, min(len(cores), quota))


def limit_threads():
    """Cap torch's threads at usable_cores() (never raise them: OMP_NUM_THREADS, torchrun's 1 per process
    and torch.set_num_threads stand). -> a line saying what changed, or None."""
    threads, cores = torch.get_num_threads(), usable_cores()
    if threads > cores and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(cores)
        return f"threads: {cores} (torch started {threads}, one per physical core of the machine; this process " \
               f"may run on {cores}: set OMP_NUM_THREADS to choose)"
    return None


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
    device_type = device.split(":")[0]
    # On the CPU "auto" (and bf16's check) needs the model: trainer.training_dtype decides it at train().
    dtype = cfg.dtype if device_type == "cpu" and cfg.dtype != "fp16" else resolve_dtype(cfg.dtype, device_type)[0]
    rt = Runtime(device, dtype, rank, local_rank, world_size)
    threads = limit_threads() if device_type == "cpu" else None
    if threads and rt.master:
        print(threads)
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
