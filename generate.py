"""Sample from a base model, a base + LoRA adapter, or a merged model.

    python generate.py --init_from gpt2 --prompt "The meaning of life is" --max_new_tokens 50
    python generate.py --adapter out/sql --prompt "list all users" --temperature 0   # base read from the adapter
    python generate.py --init_from out/base --adapter out/sql --merge --stream
    python generate.py --init_from scratch:gpt2 --max_new_tokens 128 --temperature 0 --no-cache  # speed check
    python generate.py --adapter out/sql --quantize nf4 --prompt "list all users"   # a QLoRA adapter on a 4-bit base

--init_from takes a directory (HF layout of GPT-2, OPT, Llama, Mistral or Qwen2, or a train.py output dir: a LoRA one brings its
base and adapter), a hub name such as gpt2 (downloaded once), or random weights: a preset that
is not a GPT-2 name (tiny, small) or scratch:PRESET (scratch:gpt2); minilora.loading reads all
of them, for every script. Every option: -h.
Prints each sample (prompt + completion), then tokens/s with prefill and decode timed apart.
"""

import sys
from dataclasses import dataclass

import torch

from minilora.cli import DTYPE_CHOICES, dtype_name, main_guard, opt, parse_args, parse_dtype
from minilora.errors import MiniloraError
from minilora.generation import generate, stream_generate
from minilora.loading import adapter_base, load_model
from minilora.lora import merge, merge_and_unload
from minilora.quantize import quantize
from minilora.tokenizer import get_tokenizer


@dataclass
class Args:
    """Sample text from a GPT, with or without a LoRA adapter."""
    init_from: str | None = opt(None, "model dir, hub name (gpt2), or random weights: tiny, small, scratch:PRESET; "
                                      "default: the base named by --adapter")
    adapter: str | None = opt(None, "a PEFT-format LoRA adapter directory to apply")
    merge: bool = opt(False, "fold the adapter into the weights before generating (faster; same tokens)")
    quantize: str | None = opt(None, "store the base's linear weights in 4-bit NF4 or int8 (after --merge, if given)",
                               choices=["nf4", "int8"])
    prompt: str = opt("", "prompt text; empty = start of a document (<|endoftext|>)")
    prompt_file: str | None = opt(None, "read the prompt from this file instead")
    num_samples: int = opt(1, "samples to draw, generated as one batch")
    max_new_tokens: int | None = opt(None, "new tokens per sample; default: the rest of the context, at most 200")
    temperature: float = opt(0.8, "0 = greedy; higher = more random")
    top_k: int | None = opt(None, "sample only from the k most likely tokens")
    top_p: float | None = opt(None, "sample only from the smallest set of tokens holding this probability")
    stop: list[str] = opt([], "stop strings: a sample ends before the first one (end-of-text always stops)")
    seed: int = opt(1337, "seed for random weights and for sampling")
    stream: bool = opt(False, "print the sample as it is generated (one sample only)")
    dtype: str = opt("fp32", "weights' dtype", choices=DTYPE_CHOICES)
    device: str = opt("cpu", "cpu, cuda, cuda:1, ...")
    cache: bool = opt(True, "KV cache; --no-cache re-runs the whole sequence every step (the slow reference)")


def main(argv=None):
    args = parse_args(Args, argv)
    if args.num_samples < 1:
        raise MiniloraError(f"--num_samples must be at least 1, got {args.num_samples}")
    if args.stream and args.num_samples != 1:
        raise MiniloraError("--stream prints one sample as it grows; use --num_samples 1")
    if args.prompt and args.prompt_file:
        raise MiniloraError("give --prompt or --prompt_file, not both")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise MiniloraError(f"--device {args.device}: CUDA is not available here; use --device cpu")

    init_from = args.init_from
    if init_from is None:
        if args.adapter is None:
            raise MiniloraError("give --init_from (a model dir, a hub name like gpt2, or tiny) or --adapter")
        init_from = adapter_base(args.adapter)
    try:
        model, _ = load_model(init_from, adapter=args.adapter, seed=args.seed)
    except MiniloraError as e:
        if args.init_from is not None:
            raise
        raise MiniloraError(f"{e} (the base {init_from!r} is what {args.adapter}/adapter_config.json records; "
                            f"if it moved, pass it with --init_from)") from None
    if args.merge:
        merge(model, safe_merge=True)
    if args.quantize:  # a merged adapter is part of the weights then: quantize the plain merged model
        quantize(merge_and_unload(model) if args.merge else model, args.quantize)
    model.to(device=args.device, dtype=parse_dtype(args.dtype))
    tok = get_tokenizer(model.config.tokenizer)

    text = args.prompt
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise MiniloraError(f"--prompt_file {args.prompt_file} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    ids = tok.encode_document(text) if text else [tok.bos_token if tok.add_bos else tok.eot_token]
    n = args.max_new_tokens
    if n is None:
        n = min(200, model.config.block_size - len(ids))
        if n < 1:
            raise MiniloraError(f"the prompt's {len(ids)} tokens fill the model's context "
                                f"(block_size={model.config.block_size}); shorten the prompt")
    kwargs = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, use_cache=args.cache,
                  stop=args.stop, seed=args.seed, eot_token=tok.eos_token_ids, tokenizer=tok)

    if args.stream:
        stream = stream_generate(model, [ids], n, **kwargs)
        print(text, end="", flush=True)
        tokens, shown = [], ""
        for ev in stream:
            if ev.token is not None:
                tokens.append(ev.token)
                now = tok.decode(tokens)
                if not now.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                    print(now[len(shown):], end="", flush=True)
                    shown = now
        out = stream.result()
        print(out.texts[0][len(shown):])
    else:
        out = generate(model, [ids] * args.num_samples, n, **kwargs)
        for completion in out.texts:
            print(text + completion)
            print("---------------")
    s = out.stats
    print(f"prefill: {s.prompt_tokens} tokens in {s.prefill_s * 1e3:.1f} ms ({s.prefill_tokens_per_s:.1f} tok/s) | "
          f"decode: {s.new_tokens} tokens in {s.decode_s:.2f} s ({s.decode_tokens_per_s:.1f} tok/s) | "
          f"{'KV cache' if args.cache else 'no cache'}, {dtype_name(args.dtype)}, {args.device}", file=sys.stderr)


if __name__ == "__main__":
    main_guard(main)
