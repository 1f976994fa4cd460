"""bench.py runs end to end (--smoke: tiny shapes, every worker of the other modes) and emits valid JSON.

No timing assertions: only that every measurement ran, in its own worker process, and produced
positive figures and well-formed ratios.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_smoke_emits_json_with_every_row(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--smoke", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert "matmul fp32" in proc.stdout and "LoRA / full" in proc.stdout  # the table went to stdout
    # what --dtype auto picks here, and the library each fp32 product of the training steps ran on
    assert "train.py --dtype auto at the training shape: fp32 (auto: the model's widest matmul (64x32x128) is too small" in proc.stdout
    assert "fp32 kernels of 'LoRA r=8 q,v fp32', chosen by timing MKL and oneDNN on the first step:" in proc.stdout
    assert "fp32 kernels of 'LoRA r=8 q,v bf16 autocast'" not in proc.stdout  # bf16 runs on torch's own path

    assert result["mode"] == "smoke"
    assert set(result["ceilings"]) == {"matmul_fp32_gflops", "matmul_bf16_gflops", "bandwidth_gbs"}
    rows = {r["name"]: r for r in result["rows"]}
    expected = {f"train_{kind}_{dtype}" for kind in ("lora", "full") for dtype in ("fp32", "bf16")}
    expected |= {"memory_lora", "memory_full"}
    expected |= {"generate_cached_fp32", "generate_uncached_fp32", "generate_cached_bf16", "decode_fp32",
                 "decode_bf16", "prefill_unmerged", "prefill_merged"}
    expected |= {"serving_mixed", "serving_merged_one_by_one", "serving_base_batch", "server_concurrent",
                 "server_sequential"}
    expected |= {f"family_{name}_{dtype}" for name in ("tiny", "tiny-llama") for dtype in ("fp32", "bf16")}
    assert result["skipped_rows"] == ([] if result["bf16"]["native"] else
                                      ["train_lora_bf16", "train_full_bf16", "family_tiny_bf16", "family_tiny-llama_bf16"])
    expected -= set(result["skipped_rows"])  # a CPU without native bf16 skips those (see the next test)
    assert expected <= set(rows), sorted(expected - set(rows))
    for r in result["rows"]:
        assert math.isfinite(r["value"]) and r["value"] > 0, r
    for name in {"train_lora_fp32", "train_full_bf16"} & set(rows):
        assert rows[name]["mfu"] > 0 and rows[name]["peak_rss_mb"] > 0
        samples = result["raw"][name]["samples"]  # (step seconds, the peak probed right before it), per repeat
        assert len(samples) == 1 and all(s > 0 and peak > 0 for s, peak in samples)
    assert 0 < rows["decode_fp32"]["bandwidth_utilisation"]
    # LoRA trains 2 adapters (q, v) of r * (in + out) weights per block; full trains everything
    raw = result["raw"]
    assert raw["train_lora_fp32"]["trainable_params"] == 2 * 2 * 8 * (32 + 32)
    assert raw["train_full_fp32"]["trainable_params"] > 10 * raw["train_lora_fp32"]["trainable_params"]
    assert raw["generation"]["same_greedy_tokens"] is True  # cached and uncached decode the same tokens

    names = {r["name"] for r in result["ratios"]}
    assert {"train tok/s LoRA / full, fp32", "peak RSS LoRA / full", "prefill time unmerged / merged"} <= names
    for r in result["ratios"]:
        assert r["target"][:2] in (">=", "<=")
        assert r["value"] > 0 and isinstance(r["met"], bool) or r["value"] is None and r["met"] is None and r["skipped"]


def test_bench_without_native_bf16_skips_the_bf16_training_rows_with_the_reason(tmp_path):
    """MINILORA_ASSUME_NO_BF16=1 takes the branch a CPU without native bf16 takes (where bf16 is emulated
    and its training rows alone would take many minutes): skipped rows and ratios, the reason printed."""
    out = tmp_path / "bench.json"
    env = dict(os.environ, MINILORA_ASSUME_NO_BF16="1")
    proc = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--smoke", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    header = proc.stdout.splitlines()[0]
    assert "avx512_bf16" in header or "CPU flags unknown" in header  # the CPU's bf16 support, said up front
    assert "bf16 autocast training rows skipped: MINILORA_ASSUME_NO_BF16 is set" in proc.stdout
    assert "skipping the bf16 training rows" in proc.stderr and "train lora bf16" not in proc.stderr  # never ran
    result = json.loads(out.read_text())
    assert result["bf16"]["native"] is False and result["bf16"]["forced"] is True
    assert result["skipped_rows"] == ["train_lora_bf16", "train_full_bf16", "family_tiny_bf16", "family_tiny-llama_bf16"]
    rows = {r["name"] for r in result["rows"]}
    assert {"train_lora_fp32", "train_full_fp32", "decode_bf16"} <= rows and not rows & set(result["skipped_rows"])
    skipped = {r["name"] for r in result["ratios"] if r["value"] is None}
    assert skipped == {"train tok/s LoRA / full, bf16", "train MFU LoRA bf16 (of the bf16 matmul peak)",
                       "train tok/s LoRA bf16 / fp32"}
    for r in result["ratios"]:
        if r["name"] in skipped:
            assert r["met"] is None and "MINILORA_ASSUME_NO_BF16" in r["skipped"]
        else:
            assert r["value"] > 0 and isinstance(r["met"], bool)
    assert proc.stdout.count("(needs the skipped bf16 training rows)") == 3
    assert result["ceilings"]["matmul_bf16_gflops"] > 0  # from the short probe, not the full-size matmul


def test_memory_worker_loads_its_base_from_a_file_and_measures_a_step(tmp_path):
    """bench.py --memory's step worker at a tiny shape, fp32 and NF4 base (read from a checkpoint, as a user
    loads one): the peak RSS, tokens/s and the planner's estimate come back."""
    sys.path.insert(0, str(ROOT))
    import torch
    from minilora import GPT, GPTConfig
    torch.manual_seed(0)
    GPT(GPTConfig.from_name("tiny")).save_pretrained(tmp_path / "base")
    import bench
    for quantize in (None, "nf4"):
        params = dict(shape=["tiny", {}], batch=2, seq=16, quantize=quantize, checkpointing=quantize is None,
                      dtype="fp32", repeats=1, path=str(tmp_path / "base"), env={"MALLOC_MMAP_THRESHOLD_": "4194304"})
        r = bench.run_worker("memory_step", params, f"memory step, {quantize}")  # as bench.py --memory runs it
        assert r["peak_mb"] >= 0 and r["tokens_per_s"] > 0 and r["plan_mb"] > 0
        assert r["plan"]["method"] == ("qlora" if quantize else "lora") and (r["plan"]["quantized"] > 0) == bool(quantize)


def test_mfu_is_the_median_of_each_step_over_the_peak_probed_next_to_it():
    """On a shared machine the peak drifts within a run: a slow step next to a low peak is a step at the
    same efficiency. The median of per-step ratios says so; median step over median peak would not."""
    sys.path.insert(0, str(ROOT))
    import bench
    samples = [(1.0, 100.0), (2.0, 50.0), (1.5, 80.0)]  # seconds, GFLOP/s: 0.50, 0.50, 0.42 of the peak
    assert math.isclose(bench.mfu(samples, 50e9), 0.5)
    assert not math.isclose(50e9 / (1.5 * 80.0 * 1e9), 0.5)  # what dividing the two medians would give
