"""Sample from a base model, a base + LoRA adapter, or a merged model.

    python generate.py --init_from gpt2 --prompt "The meaning of life is" --max_new_tokens 50
    python generate.py --adapter out/sql --prompt "list all users" --temperature 0   # base read from the adapter
    python generate.py --init_from out/base --adapter out/sql --merge --stream
    python generate.py --init_from scratch:gpt2 --max_new_tokens 128 --temperature 0 --no-cache  # speed check
    python generate.py --adapter out/sql --quantize nf4 --prompt "list all users"   # a QLoRA adapter on a 4-bit base
    python generate.py --init_from out/base --adapter sql=out/sql dates=out/dates --adapter_weights 0.7 0.3
    python generate.py --init_from out/base --adapter sql=out/sql dates=out/dates --prompt_adapter sql dates __base__
    python generate.py --adapter out/chat --chat                      # talk; /reset starts over, /exit or EOF ends
    python generate.py --adapter out/chat --messages talk.json        # one answer to a JSON list of {role, content}

--init_from takes a directory (HF layout of GPT-2, OPT, Llama, Mistral or Qwen2, or a train.py output dir: a LoRA one brings its
base and adapter), a hub name such as gpt2 (downloaded once), or random weights: a preset that
is not a GPT-2 name (tiny, small) or scratch:PRESET (scratch:gpt2); minilora.loading reads all
of them, for every script. Every option: -h.
Prints each sample (prompt + completion), then tokens/s with prefill and decode timed apart.
"""

import contextlib
import json
import sys
from dataclasses import dataclass

import torch

from minilora.adapters import BASE_ADAPTER, add_weighted_adapter, disable_adapter, set_adapter
from minilora.chat import load_chat_template
from minilora.chat_session import ChatSession
from minilora.cli import DTYPE_CHOICES, dtype_name, main_guard, opt, parse_args, parse_dtype
from minilora.errors import MiniloraError
from minilora.generation import generate, stream_generate
from minilora.fileio import atomic_open
from minilora.loading import adapter_base, adapter_specs, load_model, load_named_adapters, template_dirs
from minilora.lora import merge, merge_and_unload
from minilora.quantize import quantize
from minilora.tokenizer import get_tokenizer


@dataclass
class Args:
    """Sample text from a GPT, with or without a LoRA adapter."""
    init_from: str | None = opt(None, "model dir, hub name (gpt2), or random weights: tiny, small, scratch:PRESET; "
                                      "default: the base named by --adapter")
    adapter: list[str] = opt([], "a PEFT-format LoRA adapter directory to apply, or several as NAME=PATH "
                                 "(then --adapter_weights, or --prompt_adapter per sample)")
    adapter_weights: list[float] = opt([], "one weight per named adapter: generate with their weighted combination")
    combination_type: str = opt("cat", "how --adapter_weights combine (add_weighted_adapter): cat = exactly the "
                                       "weighted sum of the updates, any ranks; linear = PEFT's same-rank mix",
                                choices=["cat", "linear"])
    prompt_adapter: list[str] = opt([], "adapter NAME per sample (__base__: none), one for all or one per "
                                        "--num_samples row: a mixed-adapter batch")
    allow_pickle: bool = opt(False, "accept an older adapter_model.bin (read with torch.load(weights_only=True))")
    chat: bool = opt(False, "talk: read user lines from stdin (until EOF or /exit; /reset starts over), answer each "
                            "with the model's chat template, keeping the conversation in the KV cache")
    messages: str | None = opt(None, "one answer to a JSON file holding a list of {role, content} messages")
    messages_out: str | None = opt(None, "write the conversation (answers included) to this JSON file (--chat, --messages)")
    chat_template: str | None = opt(None, "chat template: a built-in (chatml, llama2, llama3, plain), a .jinja file or "
                                          "a tokenizer_config.json; default: the adapter's or model's own")
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
    cache: bool = opt(True, "KV cache; --no-cache re-runs the whole sequence every step (the slow reference); "
                            "with --chat, prefills the whole conversation every turn")


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

    specs = adapter_specs(args.adapter)
    named = [name for name, _ in specs if name is not None]
    rows = check_adapter_args(args, named)
    init_from = args.init_from
    if init_from is None:
        if not specs:
            raise MiniloraError("give --init_from (a model dir, a hub name like gpt2, or tiny) or --adapter")
        init_from = adapter_base(specs[0][1])
    plain = specs[0][1] if specs and not named else None
    try:
        # quantized as it loads, unless an adapter is to be merged into the float weights first
        model, base = load_model(init_from, adapter=plain, seed=args.seed, allow_pickle=args.allow_pickle,
                                 quantize=None if args.merge else args.quantize)
    except MiniloraError as e:
        if args.init_from is not None:
            raise
        raise MiniloraError(f"{e} (the base {init_from!r} is what {specs[0][1]}/adapter_config.json records; "
                            f"if it moved, pass it with --init_from)") from None
    load_named_adapters(model, [s for s in specs if s[0] is not None], base, allow_pickle=args.allow_pickle)
    adapter_names = None
    if args.adapter_weights:
        add_weighted_adapter(model, named, args.adapter_weights, "weighted", combination_type=args.combination_type)
        set_adapter(model, "weighted")
    elif len(set(rows)) == 1 and rows[0] != BASE_ADAPTER:
        set_adapter(model, rows[0])  # one adapter for every row: the plain path (and --merge works)
    elif rows:
        adapter_names = rows  # a mixed batch: each row its own adapter
    elif named:
        set_adapter(model, named[0])
    if args.merge:
        merge(model, safe_merge=True)
    if args.quantize and args.merge:  # the merged adapter is part of the weights: quantize the plain merged model
        model = quantize(merge_and_unload(model), args.quantize)
    model.to(device=args.device, dtype=parse_dtype(args.dtype))
    tok = get_tokenizer(model.config.tokenizer)
    if args.chat or args.messages:
        dirs = template_dirs(init_from, specs[0][1] if specs else None, model.config.tokenizer)
        template = load_chat_template(args.chat_template, dirs, tok)
        with disable_adapter(model) if adapter_names else contextlib.nullcontext():  # --prompt_adapter __base__
            return chat(args, model, template, tok)

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
        n_rows = len(adapter_names) if adapter_names else args.num_samples
        out = generate(model, [ids] * n_rows, n, adapter_names=adapter_names, **kwargs)
        for completion in out.texts:
            print(text + completion)
            print("---------------")
    s = out.stats
    print(f"prefill: {s.prompt_tokens} tokens in {s.prefill_s * 1e3:.1f} ms ({s.prefill_tokens_per_s:.1f} tok/s) | "
          f"decode: {s.new_tokens} tokens in {s.decode_s:.2f} s ({s.decode_tokens_per_s:.1f} tok/s) | "
          f"{'KV cache' if args.cache else 'no cache'}, {dtype_name(args.dtype)}, {args.device}", file=sys.stderr)


def check_adapter_args(args, named):
    """--adapter_weights / --prompt_adapter against the named adapters -> one adapter name per row, or []."""
    if args.adapter_weights and args.prompt_adapter:
        raise MiniloraError("--adapter_weights combines the adapters into one; --prompt_adapter picks one per "
                            "sample: give one or the other")
    if args.adapter_weights and len(args.adapter_weights) != len(named):
        raise MiniloraError(f"--adapter_weights needs one weight per named adapter ({len(named)}: "
                            f"{', '.join(named) or 'none; name them as --adapter sql=PATH dates=PATH'}), "
                            f"got {len(args.adapter_weights)}")
    rows = list(args.prompt_adapter)
    for name in rows:
        if name != BASE_ADAPTER and name not in named:
            raise MiniloraError(f"--prompt_adapter {name}: no adapter of that name; the named ones are "
                                f"{', '.join(named) or 'none (--adapter NAME=PATH)'}, and {BASE_ADAPTER} is the base")
    if len(rows) == 1:
        rows = rows * args.num_samples
    elif rows and args.num_samples not in (1, len(rows)):
        raise MiniloraError(f"--prompt_adapter gives {len(rows)} names for --num_samples {args.num_samples}; "
                            "give one name, or one per sample")
    if len(named) > 1 and not args.adapter_weights and not rows:
        raise MiniloraError(f"{len(named)} adapters loaded ({', '.join(named)}): combine them with --adapter_weights, "
                            "or choose per sample with --prompt_adapter NAME ...")
    if len(set(rows)) > 1:
        if args.merge:
            raise MiniloraError("--merge folds one adapter into every row; a mixed --prompt_adapter batch cannot merge")
        if args.stream:
            raise MiniloraError("--stream prints one sample as it grows; a mixed --prompt_adapter batch has several")
        if args.chat or args.messages:
            raise MiniloraError("--chat / --messages talk with one adapter: give one --prompt_adapter NAME")
    return rows


def chat(args, model, template, tok):
    """--chat (user lines from stdin) or --messages FILE (one answer), the conversation kept in the KV cache."""
    if args.num_samples != 1:
        raise MiniloraError("--chat and --messages give one answer per turn; use --num_samples 1")
    if args.prompt or args.prompt_file:
        raise MiniloraError("--chat and --messages take the conversation, not --prompt / --prompt_file")
    messages = []
    if args.messages:
        try:
            with open(args.messages, encoding="utf-8") as f:
                messages = json.load(f)
        except (UnicodeDecodeError, ValueError) as e:
            raise MiniloraError(f"--messages {args.messages}: not a JSON file ({e})") from None
        if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict) \
                or messages[-1].get("role") != "user":
            raise MiniloraError(f"--messages {args.messages}: needs a JSON list of {{role, content}} ending with a "
                                "user message (the one to answer)")
    with ChatSession(model, tok, template, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                     seed=args.seed, max_new_tokens=args.max_new_tokens, reuse=args.cache,
                     stop=args.stop) as session:
        def answer(conversation):
            for piece in session.reply(conversation):
                print(piece, end="", flush=True)
            print(flush=True)
            t = session.turns[-1]
            print(f"turn {len(session.turns)}: {t.prompt_tokens} prompt tokens, {t.reused} reused from the KV cache, "
                  f"{t.prefilled} prefilled in {t.prefill_s * 1e3:.1f} ms | {t.new_tokens} new in {t.decode_s:.2f} s",
                  file=sys.stderr)

        if not args.chat:
            answer(messages)
        else:
            session.messages = messages
            tty = sys.stdin.isatty()
            while True:
                if tty:
                    print("> ", end="", file=sys.stderr, flush=True)
                line = sys.stdin.readline()
                if not line or line.strip() == "/exit":
                    break
                if line.strip() == "/reset":
                    session.messages = []
                    continue
                if line.strip():
                    answer(session.messages + [{"role": "user", "content": line.rstrip("\n")}])
        print(session.summary(), file=sys.stderr)
        if args.messages_out:
            with atomic_open(args.messages_out) as f:
                f.write(json.dumps(session.messages, ensure_ascii=False, indent=1).encode("utf-8"))
    return session


if __name__ == "__main__":
    main_guard(main)
