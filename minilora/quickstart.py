"""LoRA end to end in one command: no network, about 10 minutes on 2 CPU cores.

    python -m minilora.quickstart                # pretrain a base (cached), then LoRA adapters "sql" and "dates"
    python -m minilora.quickstart --lora_r 0     # the same "sql" fine-tuning with every weight trained
    python -m minilora.quickstart --target_modules q_proj v_proj   # the LoRA paper's setting (see 2.)
    python -m minilora.quickstart --quick        # a few steps of everything (what CI runs)
    python -m minilora.quickstart --arch llama   # the same with a Llama-shaped base (RoPE, RMSNorm, SwiGLU, GQA)
    python -m minilora.quickstart --quantize nf4 --tasks sql   # QLoRA: the same LoRA on a 4-bit NF4 base
    python -m minilora.quickstart --tasks sql --use_dora               # DoRA: a row of its own in the table
    python -m minilora.quickstart --tasks sql --loraplus_lr_ratio 16   # LoRA+: lora_B learns 16x faster
    python -m minilora.quickstart --tasks chat   # a chat adapter: multi-turn conversations (TRL's messages)

1. Pretrain a tiny byte-level GPT from scratch on Python's own documentation (tasks.stdlib_corpus).
   It lands in out_dir/base and a later run with the same settings reuses it.
2. Fine-tune it on generated tasks (tasks.make_task): English requests -> SQL, and dates between
   ISO and words. The base scores 0% exact match on both. On a base this small, carrying a value
   (a city, a number) from the request into the answer is the hard part: the base has no copying
   ability (no induction heads after ~2.5M tokens of pretraining), so the adapter has to build it.
   LoRA r=8 on q_proj/v_proj (the paper's setting) learns the query shapes but not the values
   (~5% exact match); r=8 on every linear layer (8.6% of the base's parameters), with alpha 64
   and lr 5e-3, learns both and matches full fine-tuning (96.5% each, measured figures: README),
   hence the default --target_modules all-linear.
   --tasks chat (not in the default run) trains on conversations instead: a booking assistant that
   confirms a request and then a change to it, in TRL's {"messages": [...]} format, through the same
   chat-template path as train.py (the byte-level base has no template: the built-in "plain" one);
   it is scored on the final answer given the turns before it.
3. Print what LoRA claims: trainable parameters, held-out accuracy of base vs adapter, adapter
   size vs base size, speed and memory; write it all to out_dir/results.json.

Each stage runs in a fresh Python process, so the peak memory reported for a fine-tuning run
(the process's maximum resident set size, from getrusage) is that run's own, not pretraining's.
The figure includes the Python and PyTorch runtime (~300 MB), which dwarfs a model this small, so
the report adds the computed training state too: fp32 weights, plus gradients and AdamW's two
moments for the trainable ones (4 + 12 bytes per trainable parameter, 4 per frozen one).

out_dir layout:
    data/        stdlib.txt and {task}_{train,val}.jsonl ("chat": one conversation per line)
    base/        the pretrained model (HF GPT-2 layout + minilora.json)
    runs/NAME/   each fine-tuning run's trainer output (log.jsonl, checkpoint/, weights)
    adapters/    sql/ and dates/: PEFT adapters (adapter_config.json + adapter_model.safetensors)
                 plus minilora.json, which names the base: the input of generate.py and serve.py
                 (chat/ also holds chat_template.jinja, the template it trained with)
"""

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import shutil
import threading
import time
from dataclasses import dataclass
from typing import Optional

import torch

from minilora.chat import TEMPLATE_FILE
from minilora.cli import main_guard, opt, parse_args
from minilora.config import GPTConfig
from minilora.data import read_jsonl
from minilora.errors import MiniloraError
from minilora.ops import KERNEL_ENV, forced_kernel, forced_library
from minilora.fileio import atomic_directory, atomic_open
from minilora.lora import print_trainable_parameters
from minilora.model import GPT
from minilora.plot import plot_runs, pyplot, read_log
from minilora.tasks import (TASKS, exact_match_accuracy, greedy_completions, make_task, task_answer, task_prompt,
                            write_corpus, write_jsonl)
from minilora.tokenizer import get_tokenizer
from minilora.trainer import TrainConfig, save_output, start_run, train


# Steps and batch per task, chosen so each adapter ends on its accuracy plateau on any CPU, not on
# the steep rise before it, where another CPU's rounding moved the first wave's 400 x 32 from 96.5% to
# 78.5% (sql) and from 51% to 9% (dates). With these, an Intel Sapphire Rapids CPU, natively and
# restricted to AVX2 kernels, reached sql 97-99% and dates 91-96% (README, Quickstart). "chat" (not a
# default task): its loss falls from 0.31 to 0.15 between steps 300 and 480, then flattens; 600 steps gave
# 98.5% and 800 gave 97.5%.
TASK_SETTINGS = {"sql": dict(finetune_iters=800, batch_size=16), "dates": dict(finetune_iters=1000, batch_size=32),
                 "chat": dict(finetune_iters=600, batch_size=16)}


@dataclass
class Args:
    """Pretrain a tiny GPT on the stdlib docs, then fine-tune LoRA adapters (or the full model) on generated tasks."""
    out_dir: str = opt("out/quickstart", "where data, base model, runs, adapters and results.json go")
    quick: bool = opt(False, "a reduced run (tiny sizes, a handful of steps) for CI; its accuracy means nothing")
    lora_r: int = opt(8, "LoRA rank; 0 = full fine-tuning of the 'sql' task, for comparison")
    lora_alpha: float = opt(64.0, "LoRA alpha (updates scaled by alpha/r; 64/8 = 8 learns these tasks in the "
                                        "set steps, the usual 2x rank too slowly)")
    target_modules: list[str] = opt(["all-linear"], "modules LoRA adapts (e.g. q_proj v_proj, the paper's "
                                                    "setting), or all-linear")
    use_dora: bool = opt(False, "DoRA adapters (LoRA on the direction, a trained magnitude per row)")
    loraplus_lr_ratio: Optional[float] = opt(None, "LoRA+: lora_B's learning rate is this many times lora_A's")
    tasks: list[str] = opt([], f"tasks to fine-tune ({', '.join(TASKS)}); default: sql and dates, or sql alone "
                               "with --lora_r 0")
    quantize: str | None = opt(None, "fine-tune on a base quantized to nf4 (QLoRA) or int8; its figures go to "
                                     "results_lora-nf4.json and a row of the comparison table", choices=["nf4", "int8"])
    dtype: str = opt("fp32", "training precision of every stage: fp32 (its published figures; these 128-wide matmuls "
                             "measured 0.91-1.11x as fast in bf16 on AMX), bf16, or auto (train.py's: measured "
                             "here, so a run may differ from the next)", choices=["fp32", "bf16", "auto"])
    arch: str = opt("gpt2", "base architecture: gpt2 (learned positions, LayerNorm, GELU) or llama (rotary "
                            "positions, RMSNorm, SwiGLU, grouped-query attention); llama defaults to "
                            "--model small-llama and --out_dir out/quickstart-llama")
    # ---- pretraining (the cached base) ----
    model: str = opt("small", "preset of the base model (byte-level presets: tiny, small, tiny-llama, small-llama)")
    corpus_chars: int = opt(0, "characters of the stdlib corpus to pretrain on (0 = all, ~1 MB)")
    pretrain_iters: int = opt(600, "pretraining optimizer steps")
    pretrain_batch_size: int = opt(32, "pretraining rows per step")
    pretrain_block_size: int = opt(128, "pretraining tokens per row")
    pretrain_lr: float = opt(2e-3, "pretraining peak learning rate")
    # ---- fine-tuning ----
    n_train: int = opt(1000, "training examples per task")
    n_val: int = opt(200, "held-out examples per task (exact-match accuracy)")
    finetune_iters: int = opt(0, "fine-tuning optimizer steps (0 = each task's own: " + ", ".join(
        f"{t} {s['finetune_iters']}" for t, s in TASK_SETTINGS.items()) + ")")
    batch_size: int = opt(0, "fine-tuning examples per step (0 = each task's own: " + ", ".join(
        f"{t} {s['batch_size']}" for t, s in TASK_SETTINGS.items()) + ")")
    learning_rate: float = opt(0.0, "fine-tuning peak learning rate (0 = 5e-3 for LoRA, 1e-3 for full)")
    n_examples: int = opt(4, "example generations to print per task")
    seed: int = opt(1337, "seed for data generation, initialisation and batches")

    def __post_init__(self):
        if self.arch not in ("gpt2", "llama"):
            raise MiniloraError(f"--arch must be gpt2 or llama, got {self.arch!r}")
        if self.arch == "llama":  # its own base and out_dir: a GPT-2 base already pretrained is kept
            self.model = "small-llama" if self.model == "small" else self.model
            self.out_dir = "out/quickstart-llama" if self.out_dir == "out/quickstart" else self.out_dir
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise MiniloraError(f"unknown task(s) {unknown}; known tasks: {', '.join(TASKS)}")
        if self.lora_r < 0:
            raise MiniloraError(f"--lora_r must be >= 0 (0 = full fine-tuning), got {self.lora_r}")
        if self.quantize and self.lora_r == 0:
            raise MiniloraError(f"--quantize {self.quantize} freezes the base; it needs LoRA, not --lora_r 0")
        if self.lora_r == 0 and (self.use_dora or self.loraplus_lr_ratio is not None):
            raise MiniloraError("--use_dora and --loraplus_lr_ratio are LoRA variants; drop them or --lora_r 0")
        for name in ("pretrain_iters", "pretrain_batch_size", "n_train", "n_val"):
            if getattr(self, name) < 1:
                raise MiniloraError(f"--{name} must be at least 1, got {getattr(self, name)}")
        for name in ("finetune_iters", "batch_size"):
            if getattr(self, name) < 0:
                raise MiniloraError(f"--{name} must be at least 1 (or 0: each task's own), got {getattr(self, name)}")


# --quick: what CI runs. Values here replace the defaults above; options given explicitly still win.
QUICK = dict(corpus_chars=100_000, pretrain_iters=20, pretrain_batch_size=8, n_train=64, n_val=8,
             finetune_iters=6, batch_size=8, n_examples=2)


def apply_quick(args):
    defaults = Args()
    for name, value in QUICK.items():
        if getattr(args, name) == getattr(defaults, name):
            setattr(args, name, value)
    return args


def _exit_with_parent(parent_pid):
    """Stop the worker if the quickstart that started it dies (a kill that never reaches the worker)."""
    def watch():
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def in_fresh_process(fn, *args):
    """Run fn(*args) in a new interpreter and return its result: the stage's peak RSS is its own."""
    ctx = multiprocessing.get_context("spawn")  # fork would inherit the parent's memory high-water mark
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=_exit_with_parent,
                                                initargs=(os.getpid(),)) as pool:
        return pool.submit(fn, *args).result()


def dir_bytes(path, names=None):
    return sum(os.path.getsize(os.path.join(path, n)) for n in (names or os.listdir(path))
               if os.path.isfile(os.path.join(path, n)))


# ---- one fp32 library for the whole run -------------------------------------------------------------

# Its figures must reproduce on a given CPU, and these exact-match scores move with rounding: two runs whose
# per-product timings (train.py's default) chose MKL and oneDNN differently gave sql 100% and 67.5% on one
# machine. So one library runs every product of every stage, decided once, by a margin no run-to-run noise
# crosses: a training step of the base on either (AMD Zen 5: oneDNN 1.3-1.5x MKL's speed; Sapphire Rapids: MKL
# faster on every gradient). fp32 also unless --dtype says otherwise (train.py's --dtype auto is a timing too).
LIBRARY_MARGIN = 1.2
LIBRARY_NAMES = {"mkl": "MKL", "onednn": "oneDNN"}


def time_libraries(args):
    """{"mkl": s, "onednn": s}: the best of a few forward + backward steps of the base model at the pretraining
    batch on each library, alternated (the model's initial weights: only the time matters)."""
    torch.manual_seed(args.seed)
    model = GPT(GPTConfig.from_name(args.model))
    x = torch.randint(model.config.vocab_size, (args.pretrain_batch_size, args.pretrain_block_size))

    def step():
        _, loss = model(x, x, loss_only=True)
        loss.backward()
        model.zero_grad(set_to_none=True)
    best = {}
    for _ in range(2):
        for kernel in LIBRARY_NAMES:
            with forced_kernel(kernel):
                step()  # warm-up: oneDNN makes its kernels, the allocator its pages
                t0 = time.perf_counter()
                for _ in range(3):
                    step()
                best[kernel] = min(best.get(kernel, float("inf")), time.perf_counter() - t0)
    return best


def fp32_library(args):
    """(library, why): the environment's MINILORA_FP32_KERNEL, else oneDNN where a training step of the base
    ran LIBRARY_MARGIN times as fast on it as on MKL, else MKL (torch's own)."""
    forced = forced_library()
    if forced:
        return forced, f"{KERNEL_ENV} is set"
    if not torch.backends.mkldnn.is_available():
        return "mkl", "this torch has no oneDNN"
    t = in_fresh_process(time_libraries, args)
    speedup = t["mkl"] / t["onednn"]
    kernel = "onednn" if speedup >= LIBRARY_MARGIN else "mkl"
    return kernel, (f"a training step of the base ran {speedup:.2f}x as fast on oneDNN as on MKL here, "
                    f"{'at least' if kernel == 'onednn' else 'under'} the {LIBRARY_MARGIN}x bar; "
                    f"{KERNEL_ENV}=mkl|onednn picks one")


# ---- stage 1: the base model ----------------------------------------------------------------------

def pretrain_config(args, paths):
    n_eval = 4
    return TrainConfig(init_from="scratch", model=args.model, lora_r=0, data=paths["corpus"], val_fraction=0.05,
                       out_dir=paths["base"], max_iters=args.pretrain_iters, batch_size=args.pretrain_batch_size,
                       block_size=args.pretrain_block_size, learning_rate=args.pretrain_lr,
                       warmup_iters=min(50, args.pretrain_iters // 10), weight_decay=0.1, beta2=0.95,
                       eval_interval=max(1, args.pretrain_iters // n_eval), eval_iters=10,
                       log_interval=max(1, args.pretrain_iters // 20), checkpoint_interval=max(1, args.pretrain_iters // 10),
                       seed=args.seed, resume=True, dtype=args.dtype)


def pretrain(cfg):
    """Train the base from scratch (continuing an interrupted attempt); runs in its own process."""
    with start_run(cfg) as run:  # train.py's pipeline
        print(f"base: {cfg.model} preset, {run.model.num_parameters():,d} parameters, byte-level tokenizer")
        print(f"corpus: {run.dataset.num_train_tokens:,d} training tokens, {run.dataset.num_val_tokens:,d} held out")
        result = train(run.model, run.dataset, cfg, run.rt, eval_fn=run.eval_fn)
        save_output(run.model, cfg, run.info, run.rt, result)
        return {"val_loss": result.val_loss, "elapsed": result.elapsed, "tokens_per_sec": result.tokens_per_sec}


def base_key(args, paths):
    """Everything the base depends on: a cached base is reused only when this matches exactly."""
    key = {k: v for k, v in dataclasses.asdict(pretrain_config(args, paths)).items() if k != "resume"}
    return {**key, "corpus_chars": args.corpus_chars}


def base_status(paths, key):
    """'reuse' (finished with these settings), 'resume' (interrupted), 'stale' (other settings) or 'new'."""
    marker = os.path.join(paths["base"], "quickstart.json")
    if not os.path.isfile(marker):
        if os.path.isdir(paths["base"]):
            raise MiniloraError(f"{paths['base']} exists but was not written by the quickstart; "
                                "choose another --out_dir")
        return "new"
    with open(marker, encoding="utf-8") as f:
        if json.load(f) != key:
            return "stale"
    return "reuse" if os.path.isfile(os.path.join(paths["base"], "minilora.json")) else "resume"


def ensure_base(args, paths):
    """Pretrain unless out_dir/base already holds a finished base trained with these exact settings."""
    cfg, key = pretrain_config(args, paths), base_key(args, paths)
    status = base_status(paths, key)
    if status == "reuse":
        print(f"reusing the base model in {paths['base']} (delete it to pretrain again)")
        return None
    if status == "stale":
        print(f"{paths['base']} was pretrained with other settings: pretraining again")
        shutil.rmtree(paths["base"])
    marker = os.path.join(paths["base"], "quickstart.json")
    n = write_corpus(paths["corpus"], args.corpus_chars or None)
    print(f"corpus: {n:,d} characters of Python's documentation -> {paths['corpus']}")
    with atomic_open(marker, "w") as f:  # first, so an interrupted pretraining resumes next time
        json.dump(key, f, indent=2)
    t0 = time.time()
    out = in_fresh_process(pretrain, cfg)
    out["wall_s"] = time.time() - t0
    return out


# ---- stage 2: fine-tuning ------------------------------------------------------------------------

def finetune(args, task, paths):
    """Fine-tune one task on the base; runs in its own process and returns the measured figures."""
    t_start = time.time()
    full = args.lora_r == 0
    name = f"{task}-full" if full else task + variant(args)
    run_dir = os.path.join(paths["runs"], name)
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run each time: this is a demo, not a resumable job
    lr = args.learning_rate or (1e-3 if full else 5e-3)
    steps = args.finetune_iters or TASK_SETTINGS[task]["finetune_iters"]
    cfg = TrainConfig(init_from=paths["base"], lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                      target_modules=list(args.target_modules), use_dora=args.use_dora,
                      loraplus_lr_ratio=args.loraplus_lr_ratio, data=paths[task + "_train"],
                      val_data=paths[task + "_val"], out_dir=run_dir, max_iters=steps,
                      batch_size=args.batch_size or TASK_SETTINGS[task]["batch_size"], learning_rate=lr,
                      warmup_iters=min(20, steps // 10), eval_interval=0, eval_iters=4, log_interval=max(1, steps // 10),
                      checkpoint_interval=steps, eval_examples=0, seed=args.seed, quantize=args.quantize,
                      dtype=args.dtype)
    with start_run(cfg) as run:  # train.py's pipeline; accuracy is scored before and after, not during
        model, dataset, rt = run.model, run.dataset, run.rt
        trainable, total = print_trainable_parameters(model)
        tok = get_tokenizer(run.info.tokenizer)
        # conversations ("chat") are scored on their final answer, rendered with the template training used
        template = run.info.chat_template
        val = ([{"prompt": p, "completion": c} for p, c in dataset.val_examples] if dataset.val_examples is not None
               else [rec for _, rec in read_jsonl(paths[task + "_val"])])
        # Long enough for the longest reference, a template's space before it and its end of turn;
        # anything longer is wrong anyway.
        max_new = max(len(tok.encode(task_answer(ex))) for ex in val) + 2
        base_acc = exact_match_accuracy(model, tok, val, max_new, chat_template=template)  # LoRA's B starts at zero
        print(f"held-out exact match before fine-tuning (the base): {base_acc:.1%}")

        result = train(model, dataset, cfg, rt)  # accuracy is scored after, so tokens/s is training alone
        acc = exact_match_accuracy(model, tok, val, max_new, chat_template=template)
        save_output(model, cfg, run.info, rt, result)

        shown = val[:args.n_examples]
        preds = greedy_completions(model, tok, [task_prompt(ex) for ex in shown], max_new, chat_template=template)
        examples = [{"prompt": show_prompt(ex), "completion": task_answer(ex), "generated": p}
                    for ex, p in zip(shown, preds)]
        # fp32 weights + gradients + AdamW's two moments for the trainable, the stored bytes of the frozen
        frozen_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad) + \
            sum(b.numel() * b.element_size() for b in model.buffers())
        method = "full" if full else (f"{'dora' if args.use_dora else 'lora'} r={args.lora_r} {'/'.join(args.target_modules)}"
                                      + (f" lora+ x{args.loraplus_lr_ratio:g}" if args.loraplus_lr_ratio else ""))
        return {"task": task, "method": f"q{method} ({args.quantize} base)" if args.quantize else method,
                "trainable_params": trainable, "total_params": total,
                "train_state_bytes": 16 * trainable + frozen_bytes,
                "base_accuracy": base_acc, "accuracy": acc, "val_loss": result.val_loss,
                "steps": result.iter_num, "train_s": result.elapsed, "tokens_per_sec": result.tokens_per_sec,
                # --dtype auto is measured at the start of each run: results compared across runs (LoRA vs
                # QLoRA) must say which precision they trained in
                "precision": rt.dtype, "fp32_kernel": os.environ.get(KERNEL_ENV),
                "peak_rss_mb": result.peak_memory_mb, "wall_s": time.time() - t_start,
                "n_train": dataset.num_train_examples, "n_val": len(val), "run_dir": run_dir, "examples": examples,
                "torch_threads": torch.get_num_threads()}


def show_prompt(example):
    """The prompt as the report prints it: a conversation as its turns before the final answer, one line."""
    if "messages" not in example:
        return example["prompt"]
    return " | ".join(f"{m['role']}: {m['content']}" for m in task_prompt(example))


def variant(args):
    """'' for plain LoRA, else '-nf4'/'-int8', '-dora', '-loraplus' as set: the run's, adapter's and results file's suffix."""
    return ((f"-{args.quantize}" if args.quantize else "") + ("-dora" if args.use_dora else "")
            + ("-loraplus" if args.loraplus_lr_ratio else ""))


def publish_adapter(run_dir, adapter_dir):
    """Copy the adapter files (not the checkpoint and logs) to out_dir/adapters/NAME, atomically; a
    conversational task's chat_template.jinja too, so generate.py, serve.py and merge.py render as training did."""
    with atomic_directory(adapter_dir) as tmp:
        for name in ("adapter_config.json", "adapter_model.safetensors", "minilora.json", TEMPLATE_FILE):
            if name != TEMPLATE_FILE or os.path.isfile(os.path.join(run_dir, name)):
                shutil.copy(os.path.join(run_dir, name), tmp)


# ---- the report ----------------------------------------------------------------------------------

def fmt_bytes(n):
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def report(r, paths):
    """What one fine-tuning run showed, in a few lines."""
    lines = [f"--- {r['task']}: {r['method']} ---",
             f"held-out exact match ({r['n_val']} examples): base {r['base_accuracy']:.1%} -> "
             f"fine-tuned {r['accuracy']:.1%}",
             f"trainable params {r['trainable_params']:,d} of {r['total_params']:,d} "
             f"({100 * r['trainable_params'] / r['total_params']:.2f}%)",
             f"{r['steps']} steps in {r['train_s']:.0f} s ({r.get('precision', '?')}), {r['tokens_per_sec']:,.0f} tokens/s, "
             f"peak RSS {r['peak_rss_mb']:,.0f} MiB (whole process), "
             f"training state {fmt_bytes(r['train_state_bytes'])} (computed)"]
    base_bytes = dir_bytes(paths["base"], ["config.json", "model.safetensors"])
    if "adapter_dir" in r:
        size = dir_bytes(r["adapter_dir"], ["adapter_config.json", "adapter_model.safetensors"])
        lines.append(f"adapter on disk: {fmt_bytes(size)} in {r['adapter_dir']} vs base {fmt_bytes(base_bytes)} "
                     f"({100 * size / base_bytes:.1f}%)")
    else:
        size = dir_bytes(r["run_dir"], ["config.json", "model.safetensors"])
        lines.append(f"full model on disk: {fmt_bytes(size)} in {r['run_dir']} (a whole copy per task)")
    lines.append("examples (held out, greedy):")
    for ex in r["examples"]:
        mark = "ok  " if ex["generated"].strip() == ex["completion"].strip() else "MISS"
        lines.append(f"  {mark} {ex['prompt'].strip()!r} -> {ex['generated']!r}")
    return "\n".join(lines)


def sql_runs(out):
    """{kind: the 'sql' result} of this out_dir's results_{kind}.json files: lora and its variants, then full."""
    runs = {}
    names = sorted(f for f in os.listdir(out) if f.startswith("results_") and f.endswith(".json"))
    for name in sorted(names, key=lambda f: f == "results_full.json"):
        with open(os.path.join(out, name), encoding="utf-8") as f:
            r = next((r for r in json.load(f)["finetune"] if r["task"] == "sql"), None)
        if r is not None:
            runs[name.removeprefix("results_").removesuffix(".json")] = r
    return runs


def comparison_table(out):
    """A Markdown table of the 'sql' runs in out/results_*.json, once plain LoRA and full fine-tuning both ran."""
    runs = sql_runs(out)
    if "lora" not in runs or "full" not in runs:
        return None
    rows = []
    for r in runs.values():
        rows.append(f"| {r['method']} | {r['trainable_params']:,d} ({100 * r['trainable_params'] / r['total_params']:.2f}%) "
                    f"| {r['peak_rss_mb']:,.0f} MiB / {fmt_bytes(r['train_state_bytes'])} "
                    f"| {r['tokens_per_sec']:,.0f} | {r['train_s']:.0f} s | {r['base_accuracy']:.1%} -> {r['accuracy']:.1%} |")
    head = ("| method | trainable params | peak RSS (measured) / training state (computed) | tokens/s "
            "| training time | held-out exact match (base -> tuned) |\n|---|---|---|---|---|---|")
    return "\n".join([head] + rows)


def loss_chart(out):
    """out/loss_sql.png: the 'sql' runs' loss curves on one chart (python -m minilora.plot), if matplotlib is here."""
    plt = pyplot()
    dirs = {r["method"]: r["run_dir"] for r in sql_runs(out).values() if os.path.isfile(os.path.join(r["run_dir"], "log.jsonl"))}
    if plt is None or len(dirs) < 2:
        return None
    path = os.path.join(out, "loss_sql.png")
    plot_runs(plt, {m: read_log(d) for m, d in dirs.items()}, path)
    return path


def main(argv=None):
    args = parse_args(Args, argv)
    if args.quick:
        args = apply_quick(args)
    tasks = args.tasks or (["sql"] if args.lora_r == 0 else ["sql", "dates"])
    os.environ[KERNEL_ENV], why = fp32_library(args)  # every stage inherits it
    print(f"fp32 matmuls: {LIBRARY_NAMES[os.environ[KERNEL_ENV]]} for every product of every stage ({why})")
    out = os.path.abspath(args.out_dir)
    paths = {"base": os.path.join(out, "base"), "runs": os.path.join(out, "runs"),
             "corpus": os.path.join(out, "data", "stdlib.txt")}
    t0 = time.time()

    print("== 1. base model: a byte-level GPT pretrained on Python's documentation ==")
    pre = ensure_base(args, paths)

    results = []
    for i, task in enumerate(tasks, 2):
        train_ex, val_ex = make_task(task, args.n_train, args.n_val, seed=args.seed)
        for split, examples in (("train", train_ex), ("val", val_ex)):
            paths[f"{task}_{split}"] = write_jsonl(examples, os.path.join(out, "data", f"{task}_{split}.jsonl"))
        method = "full fine-tuning" if args.lora_r == 0 else f"LoRA r={args.lora_r} on {', '.join(args.target_modules)}"
        print(f"\n== {i}. task {task!r}: {method}, {len(train_ex)} training / {len(val_ex)} held-out examples ==")
        print(f"example: {show_prompt(train_ex[0])!r} -> {task_answer(train_ex[0])!r}")
        r = in_fresh_process(finetune, args, task, paths)
        if args.lora_r:
            r["adapter_dir"] = os.path.join(out, "adapters", task + variant(args))
            publish_adapter(r["run_dir"], r["adapter_dir"])
        results.append(r)

    print("\n== results ==")
    for r in results:
        print(report(r, paths))
    total = time.time() - t0
    # one file per method, so a --lora_r 0 run does not overwrite the LoRA figures it is compared with
    results_path = os.path.join(out, f"results_{'full' if args.lora_r == 0 else 'lora' + variant(args)}.json")
    with atomic_open(results_path, "w") as f:
        json.dump({"args": dataclasses.asdict(args), "pretrain": pre, "finetune": results, "wall_s": total}, f, indent=2)
        f.write("\n")
    table = comparison_table(out)
    if table:
        print("\nthe methods on 'sql' (from this out_dir's results_*.json):\n" + table)
        chart = loss_chart(out)
        print(f"loss curves: {chart}" if chart else "loss curves: pip install -e \".[plot]\" to draw them (matplotlib)")
    print(f"\nquickstart done in {total / 60:.1f} min; figures in {results_path}")
    return results


if __name__ == "__main__":
    main_guard(main)
