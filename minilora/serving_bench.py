"""The serving claims as measurements (bench.py calls these): ratios from one run, warm-up excluded.

    bench_mixed_batch()   32 requests over 8 adapters on a gpt2-shaped random model:
                          mixed batch vs one at a time with merged weights, and vs the base batch
    bench_server()        the HTTP server: 16 concurrent clients vs the same requests one after another

Random weights and random prompts: only speed is measured, and every request decodes exactly its
token budget (no early end-of-text), so every variant does the same work.
"""

import copy
import http.client
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from minilora.config import GPTConfig
from minilora.generation import generate
from minilora.adapter_files import save_adapter
from minilora.adapters import disable_adapter, set_adapter
from minilora.lora import BASE_ADAPTER, LoraConfig, apply_lora, merge, unmerge
from minilora.model import GPT
from minilora.openai_server import App, Server
from minilora.registry import AdapterRegistry
from minilora.serving import Engine, Request, Sampling
from minilora.tokenizer import get_tokenizer


def _setup(preset, n_adapters, rank, targets, out_dir, seed):
    """(plain base, base + n named random adapters, names), the adapters also saved under out_dir."""
    torch.manual_seed(seed)
    base = GPT(GPTConfig.from_name(preset)).eval()
    model = copy.deepcopy(base)
    names = [f"lora{i}" for i in range(n_adapters)]
    for name in names:
        apply_lora(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets)), name)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(std=0.02)  # B = 0 would make every adapter the base model
    for name in names:
        save_adapter(model, f"{out_dir}/{name}", adapter_name=name)
    return base, model.eval(), names


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _run_engine(engine, jobs, new_tokens):
    reqs = [engine.submit(Request(name, [p], Sampling(max_tokens=new_tokens, temperature=0, ignore_eos=True)))
            for name, p in jobs]
    for r in reqs:
        for _ in r:
            pass


def bench_mixed_batch(preset="gpt2", n_requests=32, n_adapters=8, rank=8, prompt_len=16, new_tokens=16,
                      targets=("q_proj", "v_proj"), seed=0, repeats=2):
    """Seconds and ratios for one batch of n_requests spread evenly over n_adapters.

    The batched variants are timed `repeats` times, alternating mixed and base, best kept (a
    shared machine's noise only ever adds time); the one-by-one baseline once.
    mixed_s: generate(..., adapter_names=...) (adapters.adapter_rows); merged_one_by_one_s:
    each request alone with its adapter merged into the weights; base_batch_s: the same batch on
    the base model. engine_*: the same through the serving Engine (same kernel, padded slots, continuous batching).
    """
    with tempfile.TemporaryDirectory() as tmp:
        base, model, names = _setup(preset, n_adapters, rank, targets, tmp, seed)
        g = torch.Generator().manual_seed(seed)
        prompts = torch.randint(0, base.config.vocab_size, (n_requests, prompt_len), generator=g).tolist()
        per_row = [names[i % n_adapters] for i in range(n_requests)]
        gen = lambda m, ps, **kw: generate(m, ps, new_tokens, temperature=0, **kw)
        gen(model, prompts[:2], adapter_names=per_row[:2])  # warm-up

        out = {"preset": preset, "n_requests": n_requests, "n_adapters": n_adapters, "rank": rank,
               "prompt_len": prompt_len, "new_tokens": new_tokens, "targets": list(targets)}
        mixed, plain = [], []
        for _ in range(repeats):
            mixed.append(_timed(lambda: gen(model, prompts, adapter_names=per_row)))
            with disable_adapter(model):
                plain.append(_timed(lambda: gen(model, prompts)))
        out["mixed_s"], out["base_batch_s"] = min(mixed), min(plain)
        one_by_one = 0.0
        for name in names:
            set_adapter(model, name)
            merge(model)  # merged weights: each request then costs exactly the base model's compute
            for p, n in zip(prompts, per_row):
                if n == name:
                    one_by_one += _timed(lambda: gen(model, [p]))
            unmerge(model)
        out["merged_one_by_one_s"] = one_by_one
        model = None  # free this copy before the engine builds its own

        engine_model = copy.deepcopy(base)
        registry = AdapterRegistry(engine_model, max_loras=n_adapters, max_lora_rank=rank)
        for name in names:
            registry.add(name, f"{tmp}/{name}")
        engine = Engine(engine_model, get_tokenizer(base.config.tokenizer), registry, max_num_seqs=n_requests,
                        max_model_len=prompt_len + new_tokens).start()
        try:
            _run_engine(engine, list(zip(per_row, prompts))[:2], 2)  # warm-up (and loads the slots)
            _run_engine(engine, list(zip(names, prompts)), 1)
            mixed, plain = [], []
            for _ in range(repeats):
                mixed.append(_timed(lambda: _run_engine(engine, list(zip(per_row, prompts)), new_tokens)))
                plain.append(_timed(lambda: _run_engine(engine, [(BASE_ADAPTER, p) for p in prompts], new_tokens)))
            out["engine_mixed_s"], out["engine_base_s"] = min(mixed), min(plain)
        finally:
            engine.stop()
    out["speedup_vs_merged_one_by_one"] = out["merged_one_by_one_s"] / out["mixed_s"]
    out["mixed_over_base"] = out["mixed_s"] / out["base_batch_s"]
    out["engine_speedup_vs_merged_one_by_one"] = out["merged_one_by_one_s"] / out["engine_mixed_s"]
    out["engine_mixed_over_base"] = out["engine_mixed_s"] / out["engine_base_s"]
    return out


def bench_server(preset="gpt2", clients=16, requests_per_client=1, prompt_len=16, max_tokens=16, n_adapters=4,
                 rank=8, seed=0):
    """Completion tokens/s through the HTTP server: `clients` concurrent clients vs the same requests
    sent one after another, to the same server (max_num_seqs = clients) and to a one-row server
    (max_num_seqs=1: no batching, and no idle rows either, so the fair sequential baseline)."""
    with tempfile.TemporaryDirectory() as tmp:
        base, _, names = _setup(preset, n_adapters, rank, ("q_proj", "v_proj"), tmp, seed)  # the server builds its own
        g = torch.Generator().manual_seed(seed)
        jobs = [{"model": (["base"] + names)[i % (n_adapters + 1)], "max_tokens": max_tokens, "temperature": 0,
                 "ignore_eos": True, "prompt": torch.randint(0, base.config.vocab_size, (prompt_len,), generator=g).tolist()}
                for i in range(clients * requests_per_client)]

        def serve(rows):
            m = copy.deepcopy(base)
            registry = AdapterRegistry(m, max_loras=n_adapters, max_lora_rank=rank)
            for name in names:
                registry.add(name, f"{tmp}/{name}")
            engine = Engine(m, get_tokenizer(base.config.tokenizer), registry, max_num_seqs=rows,
                            max_model_len=prompt_len + max_tokens).start()
            return Server(App(engine, "base"), port=0).start()

        def post(server, body):
            conn = http.client.HTTPConnection(*server.server_address[:2], timeout=600)
            conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
            out = json.loads(conn.getresponse().read())
            conn.close()
            return out["usage"]["completion_tokens"]

        def sequential(server):
            t0 = time.perf_counter()
            tokens = sum(post(server, b) for b in jobs)
            return tokens / (time.perf_counter() - t0)

        out = {"preset": preset, "clients": clients, "requests": len(jobs), "max_tokens": max_tokens}
        server = serve(clients)
        try:
            post(server, {**jobs[0], "max_tokens": 2})  # warm-up
            with ThreadPoolExecutor(clients) as pool:
                t0 = time.perf_counter()
                tokens = sum(pool.map(lambda b: post(server, b), jobs))
                out["concurrent_tok_s"] = tokens / (time.perf_counter() - t0)
            out["sequential_tok_s"] = sequential(server)
        finally:
            server.close()
        server = serve(1)
        try:
            post(server, {**jobs[0], "max_tokens": 2})
            out["sequential_one_row_tok_s"] = sequential(server)
        finally:
            server.close()
    out["speedup"] = out["concurrent_tok_s"] / out["sequential_tok_s"]
    out["speedup_vs_one_row"] = out["concurrent_tok_s"] / out["sequential_one_row_tok_s"]
    return out


def bench_lora_kernels(rows=32, n_embd=768, out=768, n_slots=8, rank=16, repeats=50, seed=0):
    """Microseconds per call (best of `repeats`) of one layer's batched LoRA update, decode-shaped:
    the base matmul for scale, then three ways to add a different adapter to each row."""
    g = torch.Generator().manual_seed(seed)
    W, x = torch.randn(out, n_embd, generator=g), torch.randn(rows, 1, n_embd, generator=g)
    A, B = torch.randn(n_slots, n_embd, rank, generator=g), torch.randn(n_slots, rank, out, generator=g)
    slot = torch.randint(0, n_slots, (rows,), generator=g)
    xf, every = x.view(rows, n_embd), torch.arange(rows)

    def bgmv():  # gather each row's A and B, then batched matmuls
        return torch.bmm(torch.bmm(x, A[slot]), B[slot])

    def sgmv():  # rows grouped by adapter: select, two small matmuls, scatter back
        y = torch.zeros(rows, out)
        for s in slot.unique().tolist():
            idx = (slot == s).nonzero().squeeze(1)
            y.index_add_(0, idx, (xf[idx] @ A[s]) @ B[s])
        return y

    def all_slots():  # every slot for every row in a batched matmul, then each row picks its own
        return torch.bmm(torch.matmul(xf[None], A), B)[slot, every]

    A_cat = A.permute(1, 0, 2).reshape(n_embd, n_slots * rank)  # (in, S*R): the slots side by side
    B_cat = B.reshape(n_slots * rank, out)  # (S*R, out)
    col_slot = torch.arange(n_slots).repeat_interleave(rank)

    def stacked_mask():  # adapters.RowAdapters' kernel: one matmul over every slot, mask, one matmul back
        return ((xf @ A_cat) * (slot[:, None] == col_slot[None, :])) @ B_cat

    out_us = {}
    for name, fn in (("base", lambda: torch.nn.functional.linear(x, W)), ("bgmv", bgmv), ("sgmv", sgmv),
                     ("all_slots", all_slots), ("stacked_mask", stacked_mask)):
        for _ in range(3):
            fn()
        best = min(_timed(fn) for _ in range(repeats))
        out_us[name] = best * 1e6
    return out_us
