"""minilora.ops: the fp32 kernel choice for training linears and the head, and dtype by measurement."""

import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from minilora import ops
from minilora.errors import MiniloraError
from minilora.ops import KERNEL_ENV, Linear, LinearCrossEntropy, fp32_kernels, train_linear
from minilora.runtime import resolve_dtype

needs_onednn = pytest.mark.skipif(not ops._ONEDNN_LINEAR, reason="this torch build has no oneDNN linear")


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    """Each test decides the kernels anew (the choice is cached per process) and leaves no choice behind."""
    monkeypatch.setattr(ops, "_choices", {})
    monkeypatch.setattr(ops, "_speedups", {})
    monkeypatch.delenv(KERNEL_ENV, raising=False)


@needs_onednn
@pytest.mark.parametrize("kernel", ["mkl", "onednn"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("trainable", [True, False], ids=["full", "frozen"])
@pytest.mark.parametrize("strided", [False, True])
def test_kernel_linear_matches_f_linear(monkeypatch, kernel, bias, trainable, strided):
    """Outputs and the gradients of x, W and b equal F.linear's to fp32 rounding, on either library."""
    monkeypatch.setenv(KERNEL_ENV, kernel)
    torch.manual_seed(0)
    w = torch.randn(24, 40, requires_grad=trainable)
    b = torch.randn(24, requires_grad=trainable) if bias else None
    x0 = torch.randn(5, 3, 40)
    results = []
    for fn in (F.linear, train_linear):
        x = x0.clone().requires_grad_(True)
        xin = x.transpose(0, 1) if strided else x  # (3, 5, 40), not contiguous
        out = fn(xin, w, b)
        out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape))
        results.append([out.detach(), x.grad] + ([w.grad, b.grad if bias else None] if trainable else []))
        for t in (w, b):
            if t is not None:
                t.grad = None
    assert (out.grad_fn.name() == "KernelLinearBackward") == (kernel == "onednn")
    for got, ref in zip(results[1], results[0]):
        if ref is None:
            assert got is None
        else:
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_lora_layer_gradients_are_the_same_on_either_library(monkeypatch):
    """A LoRA layer (frozen base, trained A and B) gets the same gradients whichever library the base runs on."""
    from minilora import GPT, GPTConfig, LoraConfig
    from minilora.lora import apply_lora
    grads = {}
    for kernel in ("mkl", "onednn"):
        monkeypatch.setenv(KERNEL_ENV, kernel)
        monkeypatch.setattr(ops, "_choices", {})
        torch.manual_seed(0)
        model = GPT(GPTConfig.from_name("tiny"))
        apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="gaussian"))
        x = torch.randint(0, 257, (2, 16))
        model(x, x)[1].backward()
        grads[kernel] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads["mkl"].keys() == grads["onednn"].keys() and len(grads["mkl"]) > 0
    for name in grads["mkl"]:
        torch.testing.assert_close(grads["onednn"][name], grads["mkl"][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("times,expected", [({"mkl": 1.0, "onednn": 0.5}, "onednn"),
                                            ({"mkl": 1.0, "onednn": 0.98}, "mkl"),  # within the 5% margin: torch's own
                                            ({"mkl": 0.5, "onednn": 1.0}, "mkl")])
@needs_onednn
def test_each_product_takes_the_library_measured_faster(monkeypatch, times, expected):
    calls = []

    def seconds(fn, repeats=2):
        fn()
        calls.append(1)
        return times["onednn" if len(calls) % 2 == 0 else "mkl"]  # _choose times MKL first, then oneDNN
    monkeypatch.setattr(ops, "MIN_TIMED_FLOPS", 0)
    monkeypatch.setattr(ops, "_seconds", seconds)
    frozen = torch.randn(8, 16)
    assert fp32_kernels(torch.randn(4, 16), frozen) == {"forward": expected, "input_grad": expected}
    assert len(calls) == 4  # a frozen weight (LoRA's base): forward and input gradient x two libraries
    w = frozen.clone().requires_grad_(True)
    assert fp32_kernels(torch.randn(7, 16), w) == dict.fromkeys(ops.PRODUCTS, expected)
    assert len(calls) == 6  # a trained weight of the same shape: only its weight gradient is new...
    fp32_kernels(torch.randn(9, 16), w)
    assert len(calls) == 6  # ...and every choice is kept for the process (per weight shape)
    report = ops.kernel_report()
    assert len(report) == 3 and all(expected in line and "measured" in line for line in report)
    assert f"oneDNN for {3 if expected == 'onednn' else 0}, MKL for" in ops.kernel_summary()


@needs_onednn
def test_the_timing_probe_stays_small_for_a_wide_head(monkeypatch):
    """The head's 50k rows are timed on their first 8192 (oneDNN would otherwise reorder a copy of the whole
    head at the first step), whether to time is decided by the whole product's size, operands are made only
    for a product that is timed, and the choice is kept under the full weight's shape."""
    shapes, flops_seen = [], []

    def choose(product, operands, flops):
        flops_seen.append(flops)
        shapes.append((product, [tuple(t.shape) for t in operands() if t is not None]))
        return dict(kernel="mkl", reason="test")
    monkeypatch.setattr(ops, "_choose", choose)
    head = torch.randn(50000, 16)
    assert fp32_kernels(torch.randn(128, 16), head, products=("forward",)) == {"forward": "mkl"}
    assert shapes == [("forward", [(128, 16), (8192, 16)])] and flops_seen == [2 * 128 * 50000 * 16]
    fp32_kernels(torch.randn(128, 16), head, products=ops.PRODUCTS[:2])
    assert shapes[1] == ("input_grad", [(128, 8192), (16, 8192)])
    assert set(ops._choices) == {("forward", (50000, 16)), ("input_grad", (50000, 16))}


def test_untimed_products_build_no_operands(monkeypatch):
    """Forced by the environment, or too small to time: the probe's random gradient is never drawn."""
    monkeypatch.setattr(ops.torch, "randn", lambda *a, **k: pytest.fail("built a timing operand"))
    monkeypatch.setenv(KERNEL_ENV, "mkl")
    w = torch.ones(9000, 512, requires_grad=True)
    assert set(fp32_kernels(torch.ones(1024, 512), w).values()) == {"mkl"}
    monkeypatch.delenv(KERNEL_ENV)
    assert set(fp32_kernels(torch.ones(2, 8), torch.ones(4, 8, requires_grad=True)).values()) == {"mkl"}


def test_small_products_are_not_timed_and_keep_torchs_kernel(monkeypatch):
    monkeypatch.setattr(ops, "_seconds", lambda fn, repeats=2: pytest.fail("timed a tiny product"))
    assert set(fp32_kernels(torch.randn(4, 16), torch.randn(8, 16)).values()) == {"mkl"}
    assert ops.kernel_summary() == ""  # nothing was timed: train.py prints nothing about it
    x = torch.randn(4, 16, requires_grad=True)
    assert train_linear(x, torch.randn(8, 16)).grad_fn.name() == "MmBackward0"  # torch's own F.linear


@needs_onednn
@pytest.mark.parametrize("rows,calls", [(32, 1), (8, 4), (2, 16), (1, 0)])
def test_a_product_under_the_timing_bar_is_timed_over_repeated_calls(monkeypatch, rows, calls):
    """With the bar at 2^16 FLOPs: a product of 2^16 is timed one call at a time, 2^14 four calls at a time,
    2^12 (a sixteenth of the bar) sixteen, and a smaller one not at all (torch's MKL)."""
    monkeypatch.setattr(ops, "MIN_TIMED_FLOPS", 2 ** 16)
    per_sample = []

    def seconds(fn, repeats=2):
        n = len(ran)
        fn()
        per_sample.append(len(ran) - n)
        return 1.0
    ran = []
    kernel_linear = ops.kernel_linear
    monkeypatch.setattr(ops, "kernel_linear", lambda *a: ran.append(1) or kernel_linear(*a))
    monkeypatch.setattr(ops, "_seconds", seconds)
    kernels = fp32_kernels(torch.randn(rows, 32), torch.randn(32, 32), products=("forward",))  # 2 * rows * 32 * 32
    assert kernels == {"forward": "mkl"}  # equal times: torch's own
    assert per_sample == ([calls, calls] if calls else [])  # each library's sample: `calls` products


def test_forcing_a_library_by_environment(monkeypatch):
    monkeypatch.setenv(KERNEL_ENV, "mkl")
    assert set(fp32_kernels(torch.randn(4, 16), torch.randn(8, 16)).values()) == {"mkl"}
    monkeypatch.setenv(KERNEL_ENV, "fastest")
    with pytest.raises(MiniloraError, match=f"{KERNEL_ENV}='fastest': set it to mkl or onednn"):
        fp32_kernels(torch.randn(4, 16), torch.randn(9, 16))


# A process that runs one oneDNN product per row count in 1..400 (a batch of a new length each time), the
# RSS growth from the 100th to the 400th shape printed in MB.
_SHAPES_SCRIPT = """
import os, sys
from minilora import ops  # sets the caches' capacity unless the environment already has one
import torch
print(os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"], os.environ["LRU_CACHE_CAPACITY"])
def rss():
    return int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]) / 1024
w, x = torch.randn(512, 512), torch.randn(400, 512)
for m in range(1, 401):
    ops._onednn_linear(x[:m], w)
    if m == 100:
        before = rss()
print(rss() - before)
"""


@needs_onednn
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RSS from /proc")
def test_onednn_kernel_caches_are_bounded_so_varying_batch_shapes_do_not_grow_memory():
    """oneDNN keeps a kernel per shape (1024 of them by default, ~1 MB each): training on padded batches of
    varying length grew RSS by GBs. minilora.ops caps both caches at import, unless the user set a capacity."""
    def run(**env):
        environ = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY",
                                                                     "LRU_CACHE_CAPACITY")}
        out = subprocess.run([sys.executable, "-c", _SHAPES_SCRIPT], env={**environ, **env}, capture_output=True,
                             text=True, timeout=120, check=True).stdout.split()
        return out[:2], float(out[2])
    capacities, bounded = run()
    assert capacities == [str(ops.CACHE_CAPACITY)] * 2
    capacities, unbounded = run(ONEDNN_PRIMITIVE_CACHE_CAPACITY="1024", LRU_CACHE_CAPACITY="1024")
    assert capacities == ["1024", "1024"]  # the user's setting wins
    assert unbounded > 100 and bounded < unbounded / 3, (bounded, unbounded)  # ~126 vs ~26 MB on a Zen 5


def test_linear_module_uses_the_chosen_kernel_only_with_autograd(monkeypatch):
    monkeypatch.setenv(KERNEL_ENV, "onednn")
    layer = Linear(16, 8)
    x = torch.randn(4, 16)
    if ops._ONEDNN_LINEAR:
        assert layer(x).grad_fn.name() == "KernelLinearBackward"
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 autocast: torch's own path (oneDNN already)
        assert layer(x).grad_fn.name() != "KernelLinearBackward"


@pytest.mark.parametrize("kernel", ["mkl", "onednn"])
@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("train_head", [False, True])
def test_head_and_loss_match_cross_entropy_on_either_library(monkeypatch, kernel, pad, train_head):
    """The chunked head + loss: fp32 products on either library (the weight gradient too, when the head
    trains), the vocabulary padded (many rows, MKL's forward) or not. oneDNN gets the head's weight as it
    is: no padded copy, no transposed copy."""
    monkeypatch.setenv(KERNEL_ENV, kernel)
    monkeypatch.setattr(LinearCrossEntropy, "PAD_MIN_ROWS", 1 if pad else 10 ** 9)
    onednn_weights = []
    onednn = ops._onednn_linear
    monkeypatch.setattr(ops, "_onednn_linear", lambda a, b, *rest: onednn_weights.append(b) or onednn(a, b, *rest))
    torch.manual_seed(0)
    x = torch.randn(50, 24, requires_grad=True)
    w = (torch.randn(100, 24) * 0.3).requires_grad_(train_head)  # 100 rows: 128 when padded
    targets = torch.randint(0, 100, (50,))
    targets[[0, 17, 49]] = -100
    results = []
    for chunked in (False, True):
        x.grad = w.grad = None
        loss = LinearCrossEntropy.apply(x, w, targets, 16) if chunked else F.cross_entropy(F.linear(x, w), targets)
        loss.backward()
        results.append((loss.detach(), x.grad, w.grad))
    for got, ref in zip(results[1], results[0]):
        assert (got is None) == (ref is None)
        if ref is not None:
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    if kernel == "onednn" and ops._ONEDNN_LINEAR:  # forward: w itself; input gradient: a view of it
        on_w = [b for b in onednn_weights if b.data_ptr() == w.data_ptr()]
        assert on_w
        # a head that trains: its weight gradient g^T x on oneDNN too, over views of x's rows
        x_start, x_end = x.data_ptr(), x.data_ptr() + x.numel() * x.element_size()
        on_x = [b for b in onednn_weights if b.data_ptr() != w.data_ptr()]
        assert all(x_start <= b.data_ptr() < x_end for b in on_x) and bool(on_x) == train_head


@needs_onednn
def test_a_frozen_heads_input_gradient_runs_on_a_layout_kept_until_the_head_changes(monkeypatch):
    """keep_packed=True: the input gradient of a frozen head runs on packed_transpose(), made once and reused
    by later steps; an in-place change to the head (a merge, a load) makes a new one. Same values as F.linear."""
    monkeypatch.setenv(KERNEL_ENV, "onednn")
    monkeypatch.setattr(ops, "_packed", ops.WeakIdKeyDictionary())
    layouts = []
    torch.manual_seed(0)
    w = torch.randn(100, 24) * 0.3  # frozen
    targets = torch.randint(0, 100, (50,))
    for step in range(3):
        if step == 2:
            w.mul_(1.5)  # in place: the kept layout is stale
        x = torch.randn(50, 24, requires_grad=True)
        LinearCrossEntropy.apply(x, w, targets, 16, True).backward()
        x_ref = x.detach().requires_grad_(True)
        F.cross_entropy(F.linear(x_ref, w), targets).backward()
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-6)
        layouts.append(ops._packed[w][1])
    assert layouts[0] is layouts[1] and layouts[2] is not layouts[1]
    x = torch.randn(50, 24, requires_grad=True)
    LinearCrossEntropy.apply(x, w.clone().requires_grad_(True), targets, 16, True).backward()  # a head that trains
    assert len(ops._packed) == 1 and ops._packed[w][1] is layouts[2]
    del w, layouts
    assert len(ops._packed) == 0  # freed with the head


@needs_onednn
@pytest.mark.parametrize("memory_option", [None, "gradient_checkpointing", "nf4"])
def test_the_model_keeps_the_heads_layout_unless_set_up_to_save_memory(monkeypatch, memory_option):
    from minilora import GPT, GPTConfig, LoraConfig
    from minilora.lora import apply_lora
    from minilora.quantize import quantize
    monkeypatch.setenv(KERNEL_ENV, "onednn")
    monkeypatch.setattr(ops, "_packed", ops.WeakIdKeyDictionary())
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny"))
    if memory_option == "nf4":
        quantize(model, "nf4")
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    if memory_option == "gradient_checkpointing":
        model.gradient_checkpointing_enable()
    idx = torch.randint(0, model.config.vocab_size, (2, 16))
    model(idx, idx, loss_only=True)[1].backward()
    assert (len(ops._packed) == 1) == (memory_option is None)


def test_head_and_loss_in_fp32_over_a_head_stored_in_bf16(monkeypatch):
    """fp32 activations over a bf16 head: the kernel timing runs on the fp32 copy of its rows (it used to
    fail on the mixed dtypes), and the result is fp32 cross-entropy over the upcast head."""
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    monkeypatch.setattr(ops, "MIN_TIMED_FLOPS", 0)  # time even this small head
    monkeypatch.setattr(ops, "_choices", {})
    torch.manual_seed(0)
    x = torch.randn(40, 24, requires_grad=True)
    w = (torch.randn(100, 24) * 0.3).bfloat16()
    targets = torch.randint(0, 100, (40,))
    loss = LinearCrossEntropy.apply(x, w, targets, 16)
    ref = F.cross_entropy(F.linear(x, w.float()), targets)
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-5)


# ---- dtype by measurement ---------------------------------------------------------------------------

@pytest.mark.parametrize("speedup,expected", [(0.75, "fp32"), (1.1, "fp32"), (2.5, "bf16")])
def test_dtype_auto_takes_bf16_only_where_the_models_step_measures_faster(monkeypatch, speedup, expected):
    """The decision follows the model's own forward + backward, not a matmul: with AMX a bf16 matmul ran
    7-9x fp32's speed while a 128-wide model's step ran 0.7-0.8x."""
    monkeypatch.setattr("minilora.runtime.matmul_speedup", lambda *a: 8.0)  # bf16 instructions present
    dtype, why = resolve_dtype("auto", "cpu", (2048, 768, 3072), step_speedup=lambda: speedup)
    assert dtype == expected
    assert f"forward + backward measured {speedup:.2f}x fp32's speed under bf16 autocast" in why


def test_dtype_auto_skips_timing_where_bf16_is_emulated_or_the_model_tiny(monkeypatch):
    untimed = lambda: pytest.fail("timed the model")  # noqa: E731
    monkeypatch.setattr("minilora.runtime.matmul_speedup", lambda *a: 0.3)  # an AVX2-only CPU
    assert resolve_dtype("auto", "cpu", (2048, 768, 3072), untimed) == (
        "fp32", "auto: a bf16 matmul measured 0.30x fp32's speed here (no bf16 instructions)")
    monkeypatch.setattr("minilora.runtime.matmul_speedup", lambda *a: pytest.fail("timed a tiny matmul"))
    assert resolve_dtype("auto", "cpu", (256, 32, 128), untimed) == (
        "fp32", "auto: the model's widest matmul (256x32x128) is too small for bf16 to pay")


def test_training_dtype_times_the_model_and_leaves_it_as_it_was(monkeypatch):
    """trainer.training_dtype runs the model forward + backward in both precisions: afterwards no gradient
    is left and the global RNG is where it was (dropout masks of the run are unchanged)."""
    from minilora import GPT, GPTConfig, LoraConfig
    from minilora.lora import apply_lora
    from minilora.runtime import Runtime
    from minilora.trainer import TrainConfig, training_dtype
    monkeypatch.setattr("minilora.runtime.MIN_TIMED_FLOPS", 0)
    monkeypatch.setattr("minilora.runtime.matmul_speedup", lambda *a: 8.0)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny", dropout=0.1))
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    model.train()
    rng = torch.get_rng_state()
    dtype, why = training_dtype(TrainConfig(batch_size=4, block_size=32, dtype="auto"), Runtime("cpu"), model)
    assert dtype in ("fp32", "bf16") and "forward + backward measured" in why
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_explicit_bf16_on_a_cpu_that_emulates_it_warns_with_the_figure(monkeypatch):
    monkeypatch.setattr("minilora.runtime.matmul_speedup", lambda *a: 0.25)
    with pytest.warns(UserWarning, match=r"--dtype bf16 is slower than fp32 on this CPU: .* 0\.25x"):
        assert resolve_dtype("bf16", "cpu", (2048, 768, 3072))[0] == "bf16"
    monkeypatch.setattr("minilora.runtime.matmul_speedup", lambda *a: 4.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_dtype("bf16", "cpu")[0] == "bf16"  # native bf16: no warning


def test_matmul_speedup_measures_and_caches():
    s = ops.matmul_speedup(torch.bfloat16, 64, 64, 64)
    assert s > 0 and ops._speedups == {(torch.bfloat16, 64, 64, 64): s}
    assert ops.matmul_speedup(torch.bfloat16, 64, 64, 64) == s


# ---- threads ------------------------------------------------------------------------------------------

def fake_sys(tmp_path, cores_of_cpus, cpu_max=None):
    """A /sys with the topology of CPUs {cpu: (package, core)} and, optionally, a cgroup cpu.max line."""
    for cpu, (package, core) in cores_of_cpus.items():
        d = tmp_path / f"devices/system/cpu/cpu{cpu}/topology"
        d.mkdir(parents=True)
        (d / "physical_package_id").write_text(f"{package}\n")
        (d / "core_id").write_text(f"{core}\n")
    if cpu_max:
        (tmp_path / "fs/cgroup").mkdir(parents=True)
        (tmp_path / "fs/cgroup/cpu.max").write_text(cpu_max + "\n")
    return str(tmp_path)


@pytest.mark.parametrize("affinity,cpu_max,expected", [
    ({0, 1, 2, 3}, None, 2),            # 2 cores x 2 SMT threads: one thread per core
    ({0, 2}, None, 1),                  # taskset onto both threads of core 0
    ({0, 1}, None, 2),                  # one thread of each core
    ({0, 1, 2, 3}, "100000 100000", 1),  # docker --cpus=1
    ({0, 1, 2, 3}, "150000 100000", 2),  # --cpus=1.5 rounds up
    ({0, 1, 2, 3}, "max 100000", 2),     # no quota
])
def test_usable_cores_counts_physical_cores_in_the_mask_and_quota(tmp_path, monkeypatch, affinity, cpu_max, expected):
    from minilora.runtime import usable_cores
    root = fake_sys(tmp_path, {0: (0, 0), 1: (0, 1), 2: (0, 0), 3: (0, 1)}, cpu_max)  # cpu2, cpu3: SMT siblings
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: affinity)
    assert usable_cores(root) == expected


def test_limit_threads_only_lowers_and_leaves_omp_num_threads_alone(monkeypatch):
    from minilora import runtime
    monkeypatch.setattr(runtime, "usable_cores", lambda: 1)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert "threads: 1 (torch started 2" in runtime.limit_threads() and torch.get_num_threads() == 1
        assert runtime.limit_threads() is None  # already at the cores: nothing to say
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's choice stands
        assert runtime.limit_threads() is None and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# ---- what a resumed run keeps ---------------------------------------------------------------------------

def test_resume_keeps_the_measured_dtype_and_kernels(tmp_path):
    """--dtype auto and the fp32 kernel choice are measured once, when a run starts; the checkpoint carries
    them, so a resumed run computes as the interrupted one did even if a new measurement would differ."""
    import dataclasses
    import io
    import os
    from minilora.trainer import TrainConfig, build_model, load_data, train
    from minilora.runtime import setup_runtime
    data = tmp_path / "text.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    cfg = TrainConfig(init_from="scratch", model="tiny", lora_r=0, data=str(data), out_dir=str(tmp_path / "out"),
                      block_size=32, batch_size=2, max_iters=2, eval_interval=0, eval_examples=0, device="cpu",
                      dtype="auto", seed=7)

    def run(cfg):
        rt = setup_runtime(cfg)
        model, info = build_model(cfg, rt)
        log = io.StringIO()
        train(model, load_data(cfg, info.tokenizer, model.config.block_size, rt), cfg, rt, stream=log)
        return rt, log.getvalue()
    rt, log = run(cfg)
    assert rt.dtype == "fp32" and "precision: fp32 (auto: the model's widest matmul (64x32x128) is too small" in log
    path = os.path.join(cfg.out_dir, "checkpoint", "state.pt")
    state = torch.load(path, weights_only=True)
    assert state["dtype"] == "fp32"
    assert ["forward", [128, 32], "mkl"] in state["fp32_kernels"]  # fc_in's weight: 128 out, 32 in (untimed)
    # pretend the first run measured bf16 and oneDNN for fc_in: the resumed run must take both
    state["dtype"], state["fp32_kernels"] = "bf16", [["forward", [128, 32], "onednn"]]
    torch.save(state, path)
    ops._choices.clear()
    rt, log = run(dataclasses.replace(cfg, max_iters=3, resume=True))
    assert rt.dtype == "bf16" and "precision: bf16 autocast (auto: as measured when this run started)" in log
    assert ops._choices["forward", (128, 32)]["kernel"] == "onednn"


@needs_onednn
def test_a_lora_step_under_torch_compile_equals_eager(monkeypatch):
    """Inductor cannot lower oneDNN's linear: under torch.compile the training linears run torch's ops and the
    head + loss runs eagerly outside the graph (it used to fail in the head's oneDNN forward)."""
    from minilora import GPT, GPTConfig, LoraConfig
    from minilora.lora import apply_lora
    monkeypatch.setenv(KERNEL_ENV, "onednn")  # eager takes oneDNN everywhere, even at this size
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny"))
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    results = []
    compiled = torch.compile(model)
    for m, T in ((model, 16), (compiled, 16), (model, 24), (compiled, 24)):  # a new length: dynamic shapes
        idx = torch.randint(0, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(T))
        loss = m(idx, idx, loss_only=True)[1]
        loss.backward()
        results.append([loss.detach()] + [p.grad.clone() for p in model.parameters() if p.requires_grad])
        model.zero_grad(set_to_none=True)
    for eager, comp in ((results[0], results[1]), (results[2], results[3])):
        for got, ref in zip(comp, eager):
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
