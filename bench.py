"""bench.py: LoRA's speed and memory claims, measured side by side on this machine, as ratios.

    python bench.py                  # gpt2 shape (random weights): a few minutes
    python bench.py --quick          # small shapes: about a minute on 2 cores
    python bench.py --json out.json  # also write every figure as JSON (--json alone: JSON on stdout)
    python bench.py --memory         # QLoRA and gradient checkpointing: storage, error, peak RSS, tokens/s, planner

Each measurement runs in a fresh subprocess (`python bench.py --_worker NAME --_params JSON`), so
the peak RSS it reports is that configuration's own. Timings exclude a warm-up and are the median
of several repeats. The machine's own ceilings (dense matmul GFLOP/s in fp32 and bf16, memory read
bandwidth) are measured in the same run, and every efficiency figure is relative to them.

FLOP counting (as in the PaLM paper and nanoGPT): N = matmul weights including the head
(12*L*C^2 + V*C); a training token costs 6*N for full fine-tuning (forward, input gradients,
weight gradients) and 4*N for LoRA (the frozen weights get no weight gradients; the rank-r A/B
products, ~0.2% of that, are not counted), plus 12*L*T*C for attention's two matmuls (the causal
mask is not discounted). MFU = achieved FLOP/s / measured matmul peak of the same dtype, probed
right before each timed step (a shared machine's load drifts within a run): the median over the
steps of each step's ratio.

bf16 on a CPU without native bf16 (no AVX512-BF16/AMX) is emulated, many times slower than fp32:
the bf16 training rows alone would take many minutes. A brief probe (a 512x512 matmul in each
dtype) decides by measurement: where bf16 is the slower one, those rows and the ratios built on
them are reported as skipped, with the reason. MINILORA_ASSUME_NO_BF16=1 forces that branch.

The table also says what train.py's --dtype auto picks for the training rows' model, and lists,
for each fp32 training row, the library (MKL or oneDNN) each matmul product ran on as
minilora.ops timed them at its first step (MINILORA_FP32_KERNEL=mkl|onednn forces one).
"""

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from minilora.cli import main_guard
from minilora.config import GPTConfig
from minilora.errors import MiniloraError
from minilora.fileio import atomic_open
from minilora.generation import generate
from minilora.lora import LoraConfig, apply_lora, merge
from minilora.memory import memory_plan
from minilora.model import GPT
from minilora.ops import kernel_report, linear
from minilora.progress import peak_memory_mb
from minilora.runtime import Runtime, keep_freed_memory
from minilora.trainer import TrainConfig, configure_optimizer, training_dtype
from minilora.quantize import NF4, QuantizedLinear, nf4_quantize, quantize
from minilora.serving_bench import bench_mixed_batch, bench_server

GPT2_SMALL = ("gpt2", {})
# The shapes each mode runs. quick keeps GPT-2's 50,257-token head (the part that dominates
# small models) on 4 narrow layers; smoke exists only so the test runs in seconds.
MODES = {
    "default": dict(train=(GPT2_SMALL, 8, 256), memory=(("gpt2-medium", {}), 1, 256), repeats=3,
                    gen=(GPT2_SMALL, 32, 512), prefill=(GPT2_SMALL, 8, 256), matmul_n=2048, bandwidth_mb=512,
                    serving=dict(batch=dict(preset="gpt2"), server=dict(preset="gpt2")),
                    families=((GPT2_SMALL, ("smollm2-135m", {})), 8, 256)),
    "quick": dict(train=(("gpt2", dict(n_layer=4, n_head=4, n_embd=256)), 4, 128),
                  memory=(("gpt2", dict(n_layer=8, n_head=4, n_embd=256)), 1, 128), repeats=3,
                  gen=(("gpt2", dict(n_layer=4, n_head=4, n_embd=256)), 32, 64),
                  prefill=(("gpt2", dict(n_layer=4, n_head=4, n_embd=256)), 4, 128), matmul_n=1024, bandwidth_mb=128,
                  serving=dict(batch=dict(preset="small", new_tokens=8), server=dict(preset="small", max_tokens=8)),
                  families=((("small", {}), ("small-llama", {})), 4, 128)),
    "smoke": dict(train=(("tiny", dict(vocab_size=1024, block_size=128)), 2, 32),
                  memory=(("tiny", dict(vocab_size=1024, block_size=128)), 1, 32), repeats=1,
                  gen=(("tiny", dict(vocab_size=1024, block_size=128)), 8, 8),
                  prefill=(("tiny", dict(vocab_size=1024, block_size=128)), 2, 32), matmul_n=512, bandwidth_mb=8,
                  serving=dict(batch=dict(preset="tiny", n_requests=4, n_adapters=2, new_tokens=4, repeats=1),
                               server=dict(preset="tiny", clients=4, max_tokens=4, n_adapters=2)),
                  families=((("tiny", {}), ("tiny-llama", {})), 2, 32)),
}
LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])  # the paper's W_q, W_v at r=8
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BF16_PROBE_N = 512  # big enough to time steadily, small enough to take ~1 s even where bf16 is emulated
ASSUME_NO_BF16 = "MINILORA_ASSUME_NO_BF16"


def describe(shape):
    name, overrides = shape
    return name + (" (" + ", ".join(f"{k}={v}" for k, v in overrides.items()) + ")" if overrides else " shape")


def matmul_params(cfg):
    """N: weights that take part in a matmul per token (blocks' linears + the tied head)."""
    return cfg.n_layer * 12 * cfg.n_embd ** 2 + cfg.vocab_size * cfg.n_embd


def train_flops_per_token(cfg, seq, lora):
    attention = 12 * cfg.n_layer * seq * cfg.n_embd  # QK^T and AV: 2 matmuls x 2*T*C, x3 for fwd+bwd
    return (4 if lora else 6) * matmul_params(cfg) + attention


# ---- workers: each runs in its own process and returns a dict of figures ------------------------

def timed(fn, repeats, warmup=1):
    """Median seconds of fn() over `repeats` runs after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build(shape, lora=False, **lora_overrides):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name(shape[0], **shape[1]))
    if lora:
        apply_lora(model, LoraConfig(**{**LORA, **lora_overrides}))
    return model


def n_params(shape):
    with torch.device("meta"):  # shapes only
        return GPT(GPTConfig.from_name(shape[0], **shape[1])).num_parameters()


def matmul_gflops(n, dtype, repeats=5):
    """The faster of the two GEMMs the model uses: torch.matmul (MKL for fp32 on x86) and
    minilora.ops.linear (oneDNN for fp32), on square n x n matrices."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    seconds = min(timed(lambda: torch.matmul(a, b), repeats), timed(lambda: linear(a, b), repeats))
    return 2 * n ** 3 / seconds / 1e9


def timed_against_peak(fn, repeats, n, dtype, warmup=2):
    """timed(fn) with the matmul peak probed right before each run: -> (median seconds, [(seconds, peak), ...]).
    On a shared machine the load drifts within a run (the peak of one probe swung 280-460 GFLOP/s from
    process to process); each run divided by the peak measured next to it keeps that drift out of MFU.
    Two warm-ups: a training step's first run after one still ran ~1.5x slower (full fine-tuning, Zen 5)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        peak = matmul_gflops(n, dtype, repeats=3)
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0, peak))
    return statistics.median(s for s, _ in samples), samples


def mfu(samples, flops_per_step):
    """The median over runs of each run's FLOP/s over the peak probed right before it."""
    return statistics.median(flops_per_step / (seconds * peak * 1e9) for seconds, peak in samples)


def read_bandwidth_gbs(mb):
    x = torch.rand(mb * 2 ** 20 // 4)  # fp32, far larger than the caches
    return x.numel() * 4 / timed(lambda: x.sum(), 10) / 1e9


def worker_ceilings(p):
    """The matmul peaks and read bandwidth, and whether bf16 is native here (measured, see the docstring)."""
    probe = {name: matmul_gflops(BF16_PROBE_N, dtype) for name, dtype in DTYPES.items()}
    forced = os.environ.get(ASSUME_NO_BF16, "") not in ("", "0")
    native = probe["bf16"] >= probe["fp32"] and not forced
    B, T = p["train_batch"]  # what train.py --dtype auto picks for the training rows' LoRA model
    auto = training_dtype(TrainConfig(batch_size=B, block_size=T, dtype="auto"), Runtime("cpu"), build(p["train"], True))
    out = {"auto_dtype": "{} ({})".format(*auto),
           "matmul_fp32_gflops": matmul_gflops(p["matmul_n"], torch.float32),
           # without native bf16 the full-size bf16 matmul alone takes minutes: the probe's figure stands in
           "matmul_bf16_gflops": matmul_gflops(p["matmul_n"], torch.bfloat16) if native else probe["bf16"],
           "bandwidth_gbs": read_bandwidth_gbs(p["bandwidth_mb"])}
    return dict(out, bf16=dict(native=native, forced=forced, probe_n=BF16_PROBE_N, probe_fp32_gflops=probe["fp32"],
                               probe_bf16_gflops=probe["bf16"]))


def worker_train(p):
    """One AdamW training step (forward, backward, step, zero_grad), LoRA or full, fp32 or bf16 autocast."""
    keep_freed_memory()  # as train.py does on the CPU
    model = build(p["shape"], p["lora"])
    V, B, T = model.config.vocab_size, p["batch"], p["seq"]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(V, (B, T), generator=g), torch.randint(V, (B, T), generator=g)
    trainable = [q for q in model.parameters() if q.requires_grad]
    optimizer = configure_optimizer(model, 0.0, 1e-4, (0.9, 0.999), "cpu")  # train.py's AdamW

    def step():  # GPT.forward's logits-free loss path, as train.py's step
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=p["dtype"] == "bf16"):
            _, loss = model(x, y, loss_only=True)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # MFU is only meaningful against a ceiling measured under the same load: the peak is probed before each step.
    seconds, samples = timed_against_peak(step, p["repeats"], p["matmul_n"], DTYPES[p["dtype"]])
    return dict(tokens_per_s=B * T / seconds, step_s=seconds, samples=samples,
                matmul_peak_gflops=statistics.median(peak for _, peak in samples), peak_rss_mb=peak_memory_mb("cpu"),
                trainable_params=sum(q.numel() for q in trainable), loss_only=True, kernels=kernel_report())


def worker_families(p):
    """The LoRA step of worker_train on each family's shape and each dtype, in one process: side by side, and
    one torch start-up instead of four (peak RSS is not reported: it would mix the runs)."""
    out = {}
    for shape in p["shapes"]:
        for dtype in p["dtypes"]:
            r = worker_train(dict(p, shape=shape, dtype=dtype, lora=True))
            out[f"family_{shape[0]}_{dtype}"] = {k: r[k] for k in ("tokens_per_s", "step_s", "matmul_peak_gflops")}
    return out


def worker_generation(p):
    """Batch-1 greedy generation: KV-cached vs re-forward, fp32 and bf16 weights."""
    model = build(p["shape"]).eval()
    prompt = torch.randint(model.config.vocab_size, (1, p["prompt"]), generator=torch.Generator().manual_seed(0))
    n, out = p["new"], {}

    def run(m, tokens, cache):
        t0 = time.perf_counter()
        result = generate(m, prompt, tokens, temperature=0, use_cache=cache)
        return time.perf_counter() - t0, result

    models = {"fp32": model, "bf16": copy.deepcopy(model).to(torch.bfloat16)}
    for name, m in models.items():
        run(m, 8, True)  # warm-up
        runs = sorted((run(m, n, True) for _ in range(p["repeats"])), key=lambda r: r[0])
        seconds, result = runs[len(runs) // 2]
        out[f"cached_{name}_tokens_per_s"] = n / seconds
        out[f"decode_{name}_tokens_per_s"] = result.stats.decode_tokens_per_s
        # bytes read per decoded token: every weight once (wpe contributes one row, so it is left out)
        params = sum(q.numel() for q in m.parameters()) - m.transformer.wpe.weight.numel()
        out[f"weight_bytes_{name}"] = params * m.lm_head.weight.element_size()
        if name == "fp32":
            cached_tokens = result.tokens
    # The ceiling again, in this process right after the decode runs: the machine's bandwidth drifts
    # between processes (28-48 GB/s seen), and utilisation is only meaningful against the same moment.
    out["bandwidth_gbs"] = read_bandwidth_gbs(p["bandwidth_mb"])
    run(model, 2, False)  # warm-up; the uncached run is long, so it is timed once
    seconds, result = run(model, n, False)
    out["uncached_fp32_tokens_per_s"] = n / seconds
    out["same_greedy_tokens"] = result.tokens == cached_tokens
    return out


def worker_prefill(p):
    """Forward over a batch of prompts (inference mode) with the LoRA unmerged, then merged."""
    model = build(p["shape"], lora=True, init_lora_weights=False).eval()  # a non-zero adapter
    idx = torch.randint(model.config.vocab_size, (p["batch"], p["seq"]), generator=torch.Generator().manual_seed(0))
    out = {}
    with torch.inference_mode():
        out["unmerged_s"] = timed(lambda: model(idx), p["repeats"])
        merge(model)
        out["merged_s"] = timed(lambda: model(idx), p["repeats"])
    return out


def worker_serving(p):
    """minilora.serving_bench's two measurements: the mixed-adapter batch and the HTTP server."""
    return dict(batch=bench_mixed_batch(**p["batch"]), server=bench_server(**p["server"]))


# ---- --memory: a quantized base (QLoRA) and gradient checkpointing ---------------------------------

def _proc_kb(field):
    """A /proc/self/status figure in KiB (VmRSS: now, VmHWM: the peak since the last reset)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def worker_memory_step(p):
    """LoRA training steps on an fp32 / NF4 / int8 base, with or without checkpointing: the steps' peak RSS
    above the bare runtime (Linux's VmHWM, reset after loading), tokens/s, and the planner's estimate.
    The base is read from a checkpoint the parent wrote, as a user loads one: a quantized base layer by layer
    (GPT.from_pretrained(quantize=...)), never whole in fp32. malloc as train.py sets it (keep_freed_memory),
    except in the rows that set MALLOC_MMAP_THRESHOLD_ themselves."""
    keep_freed_memory()
    warm = build(("tiny", {}), lora=True)  # load and initialise torch's kernels (oneDNN, autograd threads) first
    warm(*[torch.randint(257, (2, 8))] * 2, loss_only=True)[1].backward()
    del warm
    rss0 = _proc_kb("VmRSS")  # Python + torch, before any weight
    model = GPT.from_pretrained(p["path"], quantize=p["quantize"])
    apply_lora(model, LoraConfig(**LORA))
    if p["checkpointing"]:
        model.gradient_checkpointing_enable()
    model.train()
    V, B, T = model.config.vocab_size, p["batch"], p["seq"]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(V, (B, T), generator=g), torch.randint(V, (B, T), generator=g)
    optimizer = configure_optimizer(model, 0.0, 1e-4, (0.9, 0.999), "cpu")

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=p["dtype"] == "bf16"):
            _, loss = model(x, y, loss_only=True)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM: loading is not the step's memory
    seconds = timed(step, p["repeats"])
    peak_mb = (_proc_kb("VmHWM") - rss0) / 1024
    plan = memory_plan(model.config, "qlora" if p["quantize"] else "lora", LoraConfig(**LORA), p["quantize"] or "nf4",
                       dtype=p["dtype"], base_dtype="fp32", batch_size=B, seq_len=T,
                       gradient_checkpointing=p["checkpointing"])
    return dict(peak_mb=peak_mb, tokens_per_s=B * T / seconds, plan_mb=plan["total_bytes"] / 2**20,
                plan=plan, runtime_mb=rss0 / 1024)


def worker_quant_error(p):
    """Storage of the quantized linears against their fp32 bytes, and NF4's error against 4-bit absmax integers."""
    out = {}
    for method in ("nf4", "int8"):
        with torch.device("meta"):
            model = GPT(GPTConfig.from_name(p["preset"]))
        fp32 = sum(m.weight.numel() * 4 for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"))
        quantize(model, method)
        out[f"{method}_storage_ratio"] = sum(m.nbytes() for m in model.modules() if isinstance(m, QuantizedLinear)) / fp32
    w = torch.randn(p["n"], p["n"], generator=torch.Generator().manual_seed(0)) * 0.02  # Gaussian, like pretrained weights
    codes, absmax = nf4_quantize(w, 64)
    idx = torch.stack([codes >> 4, codes & 15], 1).view(-1).long()
    nf4 = (NF4[idx].view(-1, 64) * absmax[:, None]).view(w.shape)
    blocks = w.view(-1, 64)
    step = blocks.abs().amax(1, keepdim=True) / 7  # symmetric 4-bit integers -7..7, the same absmax per block of 64
    int4 = (torch.round(blocks / step) * step).view(w.shape)
    for name, q in (("nf4", nf4), ("int4_absmax", int4)):
        out[f"{name}_rmse"] = (q - w).pow(2).mean().sqrt().item()
        out[f"{name}_relative_error"] = ((q - w).norm() / w.norm()).item()
    return out


def worker_decode(p):
    """Batch-1 greedy decoding tokens/s on an fp32 vs a quantized base."""
    model = build(p["shape"]).eval()
    if p["quantize"]:
        quantize(model, p["quantize"])
    prompt = torch.randint(model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    generate(model, prompt, 4, temperature=0)  # warm-up
    out = generate(model, prompt, p["tokens"], temperature=0)
    return dict(decode_tokens_per_s=out.stats.decode_tokens_per_s)


MEMORY_RUNS = {  # name: (worker, params); the targets are ratios of these
    "quant_error": ("quant_error", dict(preset="gpt2", n=1024)),
    "medium_fp32": ("memory_step", dict(shape=("gpt2-medium", {}), batch=1, seq=256, quantize=None, checkpointing=False,
                                        dtype="fp32", repeats=2)),
    "medium_nf4": ("memory_step", dict(shape=("gpt2-medium", {}), batch=1, seq=256, quantize="nf4", checkpointing=False,
                                       dtype="fp32", repeats=2)),
    "gpt2_lora": ("memory_step", dict(shape=("gpt2", {}), batch=8, seq=256, quantize=None, checkpointing=False,
                                      dtype="fp32", repeats=2)),
    "gpt2_lora_ckpt": ("memory_step", dict(shape=("gpt2", {}), batch=8, seq=256, quantize=None, checkpointing=True,
                                           dtype="fp32", repeats=2)),
    "gpt2_nf4": ("memory_step", dict(shape=("gpt2", {}), batch=8, seq=256, quantize="nf4", checkpointing=False,
                                     dtype="fp32", repeats=2)),
    # glibc returning every freed tensor from 4 MiB up (its own environment variable; read at process start)
    "gpt2_lora_mmap4": ("memory_step", dict(shape=("gpt2", {}), batch=8, seq=256, quantize=None, checkpointing=False,
                                            dtype="fp32", repeats=2, env={"MALLOC_MMAP_THRESHOLD_": "4194304"})),
    "gpt2_lora_ckpt_mmap4": ("memory_step", dict(shape=("gpt2", {}), batch=8, seq=256, quantize=None,
                                                 checkpointing=True, dtype="fp32", repeats=2,
                                                 env={"MALLOC_MMAP_THRESHOLD_": "4194304"})),
    "small_lora": ("memory_step", dict(shape=("gpt2", dict(n_layer=4, n_head=4, n_embd=256)), batch=4, seq=128,
                                       quantize=None, checkpointing=False, dtype="fp32", repeats=2)),
    "small_nf4": ("memory_step", dict(shape=("gpt2", dict(n_layer=4, n_head=4, n_embd=256)), batch=4, seq=128,
                                      quantize="nf4", checkpointing=False, dtype="fp32", repeats=2)),
    "decode_fp32": ("decode", dict(shape=("gpt2", {}), quantize=None, tokens=32)),
    "decode_nf4": ("decode", dict(shape=("gpt2", {}), quantize="nf4", tokens=32)),
    "decode_int8": ("decode", dict(shape=("gpt2", {}), quantize="int8", tokens=32)),
}


def memory_bench():
    """Run MEMORY_RUNS and print the issue's targets against what was measured (timings: noisy on a shared machine)."""
    with tempfile.TemporaryDirectory() as tmp:  # each shape's random base, written once, read by its workers
        paths = {}
        for kind, params in MEMORY_RUNS.values():
            if kind == "memory_step" and repr(params["shape"]) not in paths:
                paths[repr(params["shape"])] = path = os.path.join(tmp, str(len(paths)))
                build(params["shape"]).save_pretrained(path)
        r = {name: run_worker(kind, {**params, "path": paths.get(repr(params.get("shape")))}, name)
             for name, (kind, params) in MEMORY_RUNS.items()}
    e = r["quant_error"]
    lines = [f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} (shared: timings are noisy)",
             "| figure | measured | target |", "|---|---:|---:|",
             f"| NF4 + double quant storage / fp32 (gpt2 linears) | {e['nf4_storage_ratio']:.4f}x | <= 0.135x |",
             f"| int8 storage / fp32 | {e['int8_storage_ratio']:.4f}x | <= 0.26x |",
             f"| relative error on N(0, 0.02) 1024x1024: NF4 vs 4-bit absmax int | {e['nf4_relative_error']:.4f} vs "
             f"{e['int4_absmax_relative_error']:.4f} | NF4 lower |",
             f"| peak RSS of a LoRA step, gpt2-medium 1x256: NF4 / fp32 base | {r['medium_nf4']['peak_mb']:,.0f} / "
             f"{r['medium_fp32']['peak_mb']:,.0f} MiB = {r['medium_nf4']['peak_mb'] / r['medium_fp32']['peak_mb']:.2f}x "
             "| <= 0.5x |",
             f"| gradient checkpointing, gpt2 8x256 LoRA: peak RSS | {r['gpt2_lora_ckpt']['peak_mb']:,.0f} / "
             f"{r['gpt2_lora']['peak_mb']:,.0f} MiB = {r['gpt2_lora_ckpt']['peak_mb'] / r['gpt2_lora']['peak_mb']:.2f}x "
             "| <= 0.6x |",
             f"| gradient checkpointing, gpt2 8x256 LoRA: tokens/s | {r['gpt2_lora_ckpt']['tokens_per_s']:,.0f} / "
             f"{r['gpt2_lora']['tokens_per_s']:,.0f} = {r['gpt2_lora_ckpt']['tokens_per_s'] / r['gpt2_lora']['tokens_per_s']:.2f}x "
             "| >= 0.7x |",
             f"| LoRA training tokens/s, gpt2 8x256: NF4 / fp32 base | {r['gpt2_nf4']['tokens_per_s']:,.0f} / "
             f"{r['gpt2_lora']['tokens_per_s']:,.0f} = {r['gpt2_nf4']['tokens_per_s'] / r['gpt2_lora']['tokens_per_s']:.2f}x | report |",
             f"| decode tokens/s, gpt2 batch 1: fp32 / NF4 / int8 | {r['decode_fp32']['decode_tokens_per_s']:.1f} / "
             f"{r['decode_nf4']['decode_tokens_per_s']:.1f} / {r['decode_int8']['decode_tokens_per_s']:.1f} | report |"]
    m4, c4 = r["gpt2_lora_mmap4"], r["gpt2_lora_ckpt_mmap4"]
    lines.append(f"| with MALLOC_MMAP_THRESHOLD_=4194304: gradient checkpointing, gpt2 8x256 LoRA: peak RSS / tokens/s | "
                 f"{c4['peak_mb'] / m4['peak_mb']:.2f}x / {c4['tokens_per_s'] / m4['tokens_per_s']:.2f}x "
                 f"(LoRA step {m4['tokens_per_s'] / r['gpt2_lora']['tokens_per_s']:.2f}x the default's tokens/s) | report |")
    for name in ("small_lora", "small_nf4", "gpt2_lora", "gpt2_lora_ckpt", "gpt2_nf4", "medium_fp32", "medium_nf4",
                 "gpt2_lora_mmap4", "gpt2_lora_ckpt_mmap4"):
        m = r[name]
        lines.append(f"| planner vs measured peak RSS above the runtime, {name} | {m['plan_mb']:,.0f} vs {m['peak_mb']:,.0f} MiB "
                     f"({100 * (m['plan_mb'] / m['peak_mb'] - 1):+.0f}%) | within ~15% |")
    print("\n".join(lines))
    return r


WORKERS = {"ceilings": worker_ceilings, "train": worker_train, "families": worker_families, "generation": worker_generation,
           "prefill": worker_prefill, "serving": worker_serving, "memory_step": worker_memory_step,
           "quant_error": worker_quant_error, "decode": worker_decode}


# ---- the parent: run the workers, then print and save ---------------------------------------------

def run_worker(kind, params, label):
    print(f"bench: {label} ...", file=sys.stderr, flush=True)
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", kind, "--_params", json.dumps(params)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **params.get("env", {})})
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise MiniloraError(f"benchmark worker {label!r} failed (exit {proc.returncode}): {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bf16_skip_reason(bf16):
    """Why the bf16 training rows are skipped (None: they run)."""
    if bf16["forced"]:
        return f"{ASSUME_NO_BF16} is set: treating this CPU as one without native bf16"
    if not bf16["native"]:
        return (f"no native bf16 on this CPU: a {bf16['probe_n']}x{bf16['probe_n']} bf16 matmul measured slower than "
                f"fp32 ({bf16['probe_bf16_gflops']:.1f} vs {bf16['probe_fp32_gflops']:.1f} GFLOP/s)")
    return None


def measure(mode):
    m = MODES[mode]
    shape, B, T = m["train"]
    res = {"ceilings": run_worker("ceilings", dict(matmul_n=m["matmul_n"], bandwidth_mb=m["bandwidth_mb"], train=shape,
                                                   train_batch=(B, T)), "machine ceilings")}
    res["bf16"] = res["ceilings"].pop("bf16")
    res["bf16"]["skip_reason"] = skip = bf16_skip_reason(res["bf16"])
    if skip:
        print(f"bench: skipping the bf16 training rows: {skip}", file=sys.stderr, flush=True)
    shape, B, T = m["train"]
    for dtype in ["fp32"] if skip else DTYPES:
        for kind in ("lora", "full"):
            res[f"train_{kind}_{dtype}"] = run_worker(
                "train", dict(shape=shape, batch=B, seq=T, lora=kind == "lora", dtype=dtype, repeats=m["repeats"],
                              matmul_n=m["matmul_n"]),
                f"train {kind} {dtype}")
    shape, B, T = m["memory"]
    for kind in ("lora", "full"):
        res[f"memory_{kind}"] = run_worker(
            "train", dict(shape=shape, batch=B, seq=T, lora=kind == "lora", dtype="fp32", repeats=1,
                           matmul_n=m["matmul_n"]),
            f"peak memory {kind}")
    shape, prompt, new = m["gen"]
    res["generation"] = run_worker("generation", dict(shape=shape, prompt=prompt, new=new, repeats=m["repeats"],
                                                      bandwidth_mb=m["bandwidth_mb"]),
                                   "generation")
    shape, B, T = m["prefill"]
    res["prefill"] = run_worker("prefill", dict(shape=shape, batch=B, seq=T, repeats=m["repeats"]), "prefill")
    res["serving"] = run_worker("serving", m["serving"], "multi-adapter serving")
    shapes, B, T = m["families"]  # the same LoRA step on a GPT-2 shape and a Llama-family one of similar size
    res.update(run_worker("families", dict(shapes=shapes, dtypes=["fp32"] if skip else list(DTYPES), batch=B, seq=T,
                                           repeats=m["repeats"], matmul_n=m["matmul_n"]), "LoRA step by family"))
    return res


def report(mode, res):
    """-> (rows, ratios): each figure with its section, label and context; each ratio with its target."""
    m = MODES[mode]
    rows, ratios = [], []
    skip = res.get("bf16", {}).get("skip_reason")
    bf16 = not skip  # the bf16 training rows ran

    def row(section, name, label, value, unit, detail="", **extra):
        rows.append(dict(section=section, name=name, label=label, value=value, unit=unit, detail=detail, **extra))

    def ratio(name, value, op, target):
        """value None: a row it needs was skipped, so it is reported as skipped (met None), not as a failure."""
        ratios.append(dict(name=name, value=value, target=f"{op} {target}", **(
            dict(met=None, skipped=skip) if value is None else
            dict(met=value >= target if op == ">=" else value <= target))))

    shape, B, T = m["train"]
    cfg = GPTConfig.from_name(shape[0], **shape[1])
    section = f"training step, {describe(shape)}, batch {B}x{T}, AdamW"
    for dtype in DTYPES:
        for kind in ("lora", "full"):
            r = res.get(f"train_{kind}_{dtype}")
            if r is None:
                continue
            flops = train_flops_per_token(cfg, T, kind == "lora")
            utilisation = mfu(r["samples"], B * T * flops)
            row(section, f"train_{kind}_{dtype}", f"{'LoRA r=8 q,v' if kind == 'lora' else 'full fine-tuning'} "
                f"{'fp32' if dtype == 'fp32' else 'bf16 autocast'}", r["tokens_per_s"], "tok/s",
                f"MFU {utilisation:4.0%} of {r['matmul_peak_gflops']:.0f} GFLOP/s, peak RSS {r['peak_rss_mb']:6.0f} MB",
                mfu=utilisation,
                peak_rss_mb=r["peak_rss_mb"], flops_per_token=flops, kernels=r.get("kernels", []))
        ratio(f"train tok/s LoRA / full, {dtype}", res[f"train_lora_{dtype}"]["tokens_per_s"]
              / res[f"train_full_{dtype}"]["tokens_per_s"] if f"train_lora_{dtype}" in res else None, ">=", 1.7)
    utilisation = {r["name"]: r["mfu"] for r in rows if "mfu" in r}
    ratio("train MFU LoRA fp32 (of the fp32 matmul peak)", utilisation["train_lora_fp32"], ">=", 0.70)
    ratio("train MFU LoRA bf16 (of the bf16 matmul peak)", utilisation.get("train_lora_bf16"), ">=", 0.55)
    ratio("train tok/s LoRA bf16 / fp32", res["train_lora_bf16"]["tokens_per_s"]
          / res["train_lora_fp32"]["tokens_per_s"] if bf16 else None, ">=", 1.8)
    shape, B, T = m["memory"]
    section = f"peak memory of a training step, {describe(shape)}, batch {B}x{T}, fp32, AdamW"
    for kind in ("lora", "full"):
        row(section, f"memory_{kind}", "LoRA r=8 q,v" if kind == "lora" else "full fine-tuning",
            res[f"memory_{kind}"]["peak_rss_mb"], "MB", "peak RSS of the whole process")
    ratio("peak RSS LoRA / full", res["memory_lora"]["peak_rss_mb"] / res["memory_full"]["peak_rss_mb"], "<=", 0.45)
    if "generation" in res:
        g, (shape, prompt, new) = res["generation"], m["gen"]
        section = f"generation, {describe(shape)}, {prompt}-token prompt + {new} new tokens, batch 1, greedy"
        for name, label in (("cached_fp32", "KV cache, fp32"), ("uncached_fp32", "no cache (re-forward), fp32"),
                            ("cached_bf16", "KV cache, bf16 weights")):
            row(section, f"generate_{name}", label, g[f"{name}_tokens_per_s"], "tok/s", "prefill included")
        util = {}
        for dtype in DTYPES:
            util[dtype] = g[f"decode_{dtype}_tokens_per_s"] * g[f"weight_bytes_{dtype}"] / (g["bandwidth_gbs"] * 1e9)
            row(section, f"decode_{dtype}", f"decode steps only, {dtype} weights", g[f"decode_{dtype}_tokens_per_s"],
                "tok/s", f"{util[dtype]:4.0%} of {g['bandwidth_gbs']:.1f} GB/s ({g[f'weight_bytes_{dtype}'] / 1e6:.0f} MB "
                "of weights per token)", bandwidth_utilisation=util[dtype])
        ratio("generate tok/s KV cache / no cache", g["cached_fp32_tokens_per_s"] / g["uncached_fp32_tokens_per_s"], ">=", 5)
        ratio("decode bandwidth utilisation, fp32", util["fp32"], ">=", 0.85)
        ratio("decode tok/s bf16 / fp32 weights", g["decode_bf16_tokens_per_s"] / g["decode_fp32_tokens_per_s"], ">=", 1.3)
        p, (shape, B, T) = res["prefill"], m["prefill"]
        section = f"prefill, {describe(shape)}, batch {B}x{T}, LoRA r=8 q,v, fp32, inference mode"
        for name in ("unmerged", "merged"):
            row(section, f"prefill_{name}", f"adapter {name}", B * T / p[f"{name}_s"], "tok/s")
        ratio("prefill time unmerged / merged", p["unmerged_s"] / p["merged_s"], "<=", 1.10)
    if "serving" in res:
        b, s = res["serving"]["batch"], res["serving"]["server"]
        section = (f"multi-adapter serving, {b['preset']}, {b['n_requests']} requests over {b['n_adapters']} adapters, "
                   f"{b['prompt_len']}+{b['new_tokens']} tokens")
        n_tokens = b["n_requests"] * b["new_tokens"]
        for key, label in (("mixed_s", "mixed-adapter batch"), ("merged_one_by_one_s", "one by one, merged weights"),
                           ("base_batch_s", "same batch, base model only")):
            row(section, f"serving_{key[:-2]}", label, n_tokens / b[key], "tok/s")
        row(section, "server_concurrent", f"HTTP server, {s['clients']} concurrent clients", s["concurrent_tok_s"], "tok/s")
        row(section, "server_sequential", "HTTP server, the same requests one after another", s["sequential_tok_s"], "tok/s")
        ratio("mixed batch speed-up vs merged one by one", b["speedup_vs_merged_one_by_one"], ">=", 4)
        ratio("mixed batch time / base batch time", b["mixed_over_base"], "<=", 1.5)
        ratio("server tok/s concurrent / sequential", s["speedup"], ">=", 3)
    shapes, B, T = m["families"]
    section = f"LoRA r=8 q,v training step by family, batch {B}x{T}, AdamW"
    for dtype in DTYPES:
        for shape in shapes:
            r = res.get(f"family_{shape[0]}_{dtype}")
            if r is not None:
                row(section, f"family_{shape[0]}_{dtype}", f"{describe(shape)}, {dtype}", r["tokens_per_s"], "tok/s",
                    f"{n_params(shape) / 1e6:.0f}M params, {r['step_s']:.2f} s per step")
    return rows, ratios


def format_table(mode, out):
    c, mc, skip = out["ceilings"], out["machine"], out["bf16"]["skip_reason"]
    lines = [f"minilora bench ({mode}) on {mc['cpu']} ({mc['cpu_flags']}), {mc['cores']} cores, torch {mc['torch']}, "
             f"{mc['threads']} threads", "", "machine ceilings, measured in this run",
             f"  {'matmul fp32 (square, best of MKL and oneDNN)':52s} {c['matmul_fp32_gflops']:9.1f} GFLOP/s",
             f"  {'matmul bf16 (square, best of MKL and oneDNN)':52s} {c['matmul_bf16_gflops']:9.1f} GFLOP/s"
             + (f" (the {out['bf16']['probe_n']}x{out['bf16']['probe_n']} probe)" if skip else ""),
             f"  {'memory read bandwidth (fp32 tensor.sum())':52s} {c['bandwidth_gbs']:9.1f} GB/s"]
    if skip:
        lines += ["", f"bf16 autocast training rows skipped: {skip}"]
    lines += ["", f"train.py --dtype auto at the training shape: {out['auto_dtype']}"]
    section = None
    for r in out["rows"]:
        if r["section"] != section:
            section = r["section"]
            lines += ["", section]
        lines.append(f"  {r['label']:52s} {r['value']:9.1f} {r['unit']:7s} {r['detail']}")
    for r in out["rows"]:  # the library each fp32 product ran on (minilora.ops.fp32_kernels), as measured
        if r.get("kernels"):
            lines += ["", f"fp32 kernels of '{r['label']}', chosen by timing MKL and oneDNN on the first step:"]
            lines += [f"  {line}" for line in r["kernels"]]
    lines += ["", f"  {'ratio':52s} {'measured':>9s}  target"]
    for r in out["ratios"]:
        if r["value"] is None:
            lines.append(f"  {r['name']:52s} {'skipped':>9s}  {r['target']:8s} (needs the skipped bf16 training rows)")
        else:
            lines.append(f"  {r['name']:52s} {r['value']:9.2f}  {r['target']:8s} {'met' if r['met'] else 'NOT met'}")
    lines += ["", out["flop_counting"]]
    if mode != "default":
        lines.append("(the targets are set for the default shapes; in this mode they only show the direction)")
    return "\n".join(lines)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def cpu_flags():
    """Whether the CPU advertises native bf16 (AVX512-BF16, AMX-BF16), as /proc/cpuinfo says."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line.split(":", 1)[1].split() for line in f if line.startswith("flags")))
    except (OSError, StopIteration):
        return "CPU flags unknown"
    return ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in ("avx512_bf16", "amx_bf16"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small shapes, about a minute on 2 cores")
    size.add_argument("--smoke", action="store_true", help="tiny shapes, seconds: only for the test suite")
    size.add_argument("--memory", action="store_true", help="QLoRA and gradient checkpointing figures (minutes)")
    parser.add_argument("--json", nargs="?", const="-", metavar="PATH",
                        help="write the results as JSON to PATH (no PATH: JSON on stdout, the table on stderr)")
    parser.add_argument("--_worker", choices=WORKERS, help=argparse.SUPPRESS)
    parser.add_argument("--_params", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._worker:
        print(json.dumps(WORKERS[args._worker](json.loads(args._params))))
        return
    if args.memory:
        res = memory_bench()
        if args.json:
            with atomic_open(args.json, "w") as f:
                json.dump(res, f, indent=1)
        return
    mode = "smoke" if args.smoke else "quick" if args.quick else "default"
    res = measure(mode)
    rows, ratios = report(mode, res)
    out = dict(mode=mode, machine=dict(cpu=cpu_name(), cpu_flags=cpu_flags(), cores=os.cpu_count(), torch=torch.__version__,
                                       threads=torch.get_num_threads(), python=platform.python_version()),
               ceilings=res["ceilings"], bf16=res["bf16"], auto_dtype=res["ceilings"].pop("auto_dtype"), rows=rows,
               ratios=ratios, raw=res,
               skipped_rows=[name for name in [f"train_{kind}_bf16" for kind in ("lora", "full")]
                             + [f"family_{shape[0]}_bf16" for shape in MODES[mode]["families"][0]] if name not in res],
               flop_counting="MFU counts per token 6*N FLOPs for full fine-tuning and 4*N for LoRA (N = matmul "
                             "weights incl. the head), plus 12*L*T*C for attention, over the matmul peak probed before each step")
    print(format_table(mode, out), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json == "-":
        print(json.dumps(out, indent=1))
    elif args.json:
        with atomic_open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main_guard(main)
