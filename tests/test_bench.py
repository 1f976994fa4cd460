"""bench.py runs end to end (--smoke: tiny shapes, seconds; --quick: the documented mode) and emits valid JSON.

No timing assertions: only that every measurement ran, in its own worker process, and produced
positive figures and well-formed ratios.
"""

import json
import math
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

    assert result["mode"] == "smoke"
    assert set(result["ceilings"]) == {"matmul_fp32_gflops", "matmul_bf16_gflops", "bandwidth_gbs"}
    rows = {r["name"]: r for r in result["rows"]}
    expected = {f"train_{kind}_{dtype}" for kind in ("lora", "full") for dtype in ("fp32", "bf16")}
    expected |= {"memory_lora", "memory_full"}
    expected |= {"generate_cached_fp32", "generate_uncached_fp32", "generate_cached_bf16", "decode_fp32",
                 "decode_bf16", "prefill_unmerged", "prefill_merged"}
    expected |= {"serving_mixed", "serving_merged_one_by_one", "serving_base_batch", "server_concurrent",
                 "server_sequential"}
    assert expected <= set(rows), sorted(expected - set(rows))
    for r in result["rows"]:
        assert math.isfinite(r["value"]) and r["value"] > 0, r
    for name in ("train_lora_fp32", "train_full_bf16"):
        assert rows[name]["mfu"] > 0 and rows[name]["peak_rss_mb"] > 0
    assert 0 < rows["decode_fp32"]["bandwidth_utilisation"]
    # LoRA trains 2 adapters (q, v) of r * (in + out) weights per block; full trains everything
    raw = result["raw"]
    assert raw["train_lora_fp32"]["trainable_params"] == 2 * 2 * 8 * (32 + 32)
    assert raw["train_full_fp32"]["trainable_params"] > 10 * raw["train_lora_fp32"]["trainable_params"]
    assert raw["generation"]["same_greedy_tokens"] is True  # cached and uncached decode the same tokens

    names = {r["name"] for r in result["ratios"]}
    assert {"train tok/s LoRA / full, fp32", "peak RSS LoRA / full", "prefill time unmerged / merged"} <= names
    for r in result["ratios"]:
        assert r["value"] > 0 and isinstance(r["met"], bool) and r["target"][:2] in (">=", "<=")



def test_bench_quick_mode_runs(tmp_path):
    """The documented `python bench.py --quick` (gpt2-width shapes, ~45 s on 2 cores) completes with every figure."""
    out = tmp_path / "quick.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--quick", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["mode"] == "quick"
    assert len(result["rows"]) == 18 and all(math.isfinite(r["value"]) and r["value"] > 0 for r in result["rows"])
    assert len({r["name"] for r in result["ratios"]}) == 13  # every target of the bench and generation issues
