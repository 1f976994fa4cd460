"""Run a top-level script (generate.py, merge.py, ...) as a user would, or its main() in-process."""

import copy
import importlib.util
import io
import os
import subprocess
import sys
import time

import pytest
import torch

from minilora import GPT, GPTConfig, LoraConfig, apply_lora, save_adapter
from minilora.runtime import setup_runtime
from minilora.trainer import build_model, load_data, save_output, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The quickstart's --quick, smaller still: the tests check the plumbing, not the learning.
TINY = ["--quick", "--corpus_chars", "20000", "--pretrain_iters", "4", "--pretrain_batch_size", "4",
        "--finetune_iters", "2", "--batch_size", "4", "--n_train", "16", "--n_val", "4"]


def run_script(name, *args):
    """`python NAME ARGS...` in a subprocess, single-threaded -> CompletedProcess (text)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, name), *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)


def run_quickstart(out_dir, *extra):
    """python -m minilora.quickstart --out_dir OUT_DIR (TINY sizes) EXTRA... in a subprocess -> CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "minilora.quickstart", "--out_dir", str(out_dir), *TINY, *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def run_training(cfg, eval_fn=None):
    """train.py's flow in this process for a TrainConfig -> (model, TrainResult); progress goes nowhere."""
    rt = setup_runtime(cfg)
    model, info = build_model(cfg, rt)
    dataset = load_data(cfg, info.tokenizer, model.config.block_size, rt)
    result = train(model, dataset, cfg, rt, eval_fn=eval_fn, stream=io.StringIO(), info=info)
    save_output(model, cfg, info, rt, result)
    return model, result


def run_script_here(capsys, name, *args):
    """The script's main() in this process (cheaper than a subprocess): (exit status, stdout, stderr)."""
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py") + "_script", os.path.join(ROOT, name))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    try:
        script.main_guard(lambda: script.main(list(args)))
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def serve_process(workdir, *args, cwd=ROOT):
    """serve.py ARGS on 127.0.0.1, any free port, one thread (these come last, so they win over a --port
    in ARGS), run in `cwd` -> (Popen, base URL http://127.0.0.1:PORT/v1).

    Its output goes to workdir/stdout and workdir/stderr (files, not pipes: an undrained pipe could
    block the server). The caller kills the process."""
    return wait_serving(start_serve(workdir, *args, cwd=cwd), workdir)


def start_serve(workdir, *args, cwd=ROOT):
    """serve_process's first half: the process, started; wait_serving(proc, workdir) waits for it to listen."""
    with open(os.path.join(workdir, "stdout"), "w") as fo, open(os.path.join(workdir, "stderr"), "w") as fe:
        return subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), *args, "--port", "0", "--threads", "1"],
                                cwd=cwd, stdout=fo, stderr=fe, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                                    "PYTHONPATH": ROOT})


def wait_serving(proc, workdir):
    """-> (proc, base URL) once serve.py says it listens; fails the test if it exits or takes 2 minutes."""
    out, err = os.path.join(workdir, "stdout"), os.path.join(workdir, "stderr")
    read = lambda path: open(path).read()  # noqa: E731
    deadline = time.time() + 120
    while " on http://" not in read(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    line = read(out)
    if " on http://" not in line:
        proc.kill()
        proc.communicate(timeout=30)
        pytest.fail(f"serve.py did not start: {line}{read(err)[-2000:]}")
    return proc, line.split(" on ")[1].split()[0]  # "serving ... on http://127.0.0.1:PORT/v1 (...)"


def peaked_tiny(seed=0):
    """A tiny GPT with larger weights than GPT-2's init: peaked, varied logits, so greedy runs do not
    collapse into one repeated token and a wrong adapter, scaling or mask shows up as other tokens."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_name("tiny")).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return model


def random_adapter(base, path, r, seed, targets=("q_proj", "v_proj", "fc_in"), lora_alpha=None):
    """Save an adapter on a copy of `base` whose A and B are seeded N(0, 0.3^2) (strong enough to
    change greedy text) to `path`; return that copy (base + adapter). lora_alpha defaults to 2r."""
    m = apply_lora(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=lora_alpha or 2 * r, target_modules=list(targets)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    save_adapter(m, path)
    return m
