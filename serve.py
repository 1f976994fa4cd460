"""Serve one base model and many LoRA adapters behind an OpenAI-compatible API (vLLM's flags).

    python serve.py --init_from out/base --lora-modules sql=out/sql quotes=out/quotes --port 8000
    python serve.py --init_from gpt2 --lora-modules sql=out/sql --max-loras 4 --max-lora-rank 16
    python serve.py --init_from out/base --enable-runtime-lora-updating --allowed-lora-dir out

    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "sql", "prompt": "SELECT", "max_tokens": 32, "temperature": 0}'

Requests name an adapter (or the base) in `model`; concurrent requests are decoded together in
one batch whatever their adapters (minilora.serving). Every option, with its default:
`python serve.py -h`. The server binds 127.0.0.1 unless --host says otherwise.
"""

import json
import os
import signal
from dataclasses import dataclass

import torch

from minilora.chat import load_chat_template
from minilora.cli import main_guard, opt, parse_args
from minilora.errors import MiniloraError
from minilora.loading import load_model, template_dirs
from minilora.openai_server import App, Server
from minilora.registry import AdapterRegistry
from minilora.serving import Engine
from minilora.tokenizer import get_tokenizer


@dataclass
class ServeArgs:
    """Serve a base model and many LoRA adapters behind an OpenAI-compatible API."""

    init_from: str = opt("", "the base model: an HF model name or directory (GPT-2, OPT, Llama, Mistral, Qwen2; or a train.py --lora_r 0 out_dir), "
                             "or a preset for random weights (tiny, scratch:gpt2)")
    lora_modules: list[str] = opt([], "adapters to serve, as name=path (PEFT-format directories) or vLLM's JSON "
                                      "'{\"name\": ..., \"path\": ...}'")
    lora_adapters: list[str] = opt([], "TGI's spelling of --lora-modules: name=path ...")
    chat_template: str | None = opt(None, "the base's chat template for /v1/chat/completions: a built-in (chatml, llama2, "
                                          "llama3, plain), a .jinja file or a tokenizer_config.json; default: the "
                                          "checkpoint's own (an adapter's chat_template.jinja wins for that adapter)")
    api_key: str | None = opt(None, "require 'Authorization: Bearer KEY' on every route but /health (as vLLM's --api-key)")
    served_model_name: str | None = opt(None, "the base model's name in the API (default: --init_from)")
    host: str = opt("127.0.0.1", "address to bind; 0.0.0.0 exposes the server to the network")
    port: int = opt(8000, "port to listen on (0: any free port)")
    max_loras: int = opt(4, "adapters in the active slots at once (one batch mixes at most this many)")
    max_cpu_loras: int | None = opt(None, "adapters kept in CPU memory (default max(max_loras, 8)); more are re-read on demand")
    max_lora_rank: int = opt(16, "largest adapter rank accepted (slots are padded to it)")
    max_num_seqs: int = opt(8, "rows decoded together: concurrent sequences (an idle row costs as much as a busy one)")
    max_model_len: int | None = opt(None, "prompt + completion tokens per sequence (default: the model's block_size)")
    enable_runtime_lora_updating: bool = opt(False, "allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter")
    allowed_lora_dir: list[str] = opt([], "directories runtime-loaded adapters must lie in (required with the above)")
    quantize: str | None = opt(None, "store the base's linear weights in 4-bit NF4 (QLoRA) or int8; adapters stay fp32",
                               choices=["nf4", "int8"])
    device: str = opt("cpu", "cpu, cuda, cuda:1, mps, ...")
    threads: int | None = opt(None, "torch CPU threads (default: torch's choice)")
    verbose: bool = opt(False, "log every HTTP request")


def lora_modules(specs):
    """['sql=out/sql', '{"name": "q", "path": "out/q"}'] -> {name: path}."""
    out = {}
    for spec in specs:
        if spec.lstrip().startswith("{"):
            try:
                d = json.loads(spec)
                name, path = d["name"], d["path"]
            except (ValueError, KeyError, TypeError):
                raise MiniloraError(f"--lora-modules {spec!r}: JSON form needs {{\"name\": ..., \"path\": ...}}") from None
        else:
            name, eq, path = spec.partition("=")
            if not eq or not name or not path:
                raise MiniloraError(f"--lora-modules {spec!r}: write name=path, e.g. sql=out/sql")
        if name in out:
            raise MiniloraError(f"--lora-modules names {name!r} twice")
        out[name] = path
    return out


def main(argv=None):
    args = parse_args(ServeArgs, argv)
    if not args.init_from:
        raise MiniloraError("--init_from is required: the base model's HF name or directory")
    adapters = lora_modules(args.lora_modules + args.lora_adapters)
    base_name = args.served_model_name or args.init_from
    if base_name in adapters:
        raise MiniloraError(f"--lora-modules name {base_name!r} is the base model's name; rename the adapter")
    for d in args.allowed_lora_dir:
        if not os.path.isdir(d):
            raise MiniloraError(f"--allowed-lora-dir {d} is not a directory")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise MiniloraError(f"--device {args.device}: CUDA is not available here; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)

    model, _ = load_model(args.init_from, quantize=args.quantize)  # quantized layer by layer as it is read
    if hasattr(model, "peft_config"):
        raise MiniloraError(f"{args.init_from} is a LoRA run directory; serve its base with --init_from and the "
                            f"adapter with --lora-modules NAME={args.init_from}")
    model.to(args.device)
    registry = AdapterRegistry(model, args.max_loras, args.max_cpu_loras, args.max_lora_rank)
    for name, path in adapters.items():
        registry.add(name, path)
    tokenizer = get_tokenizer(model.config.tokenizer)
    template = load_chat_template(args.chat_template, template_dirs(args.init_from, tokenizer=model.config.tokenizer),
                                  tokenizer)
    engine = Engine(model, tokenizer, registry, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len)
    app = App(engine, base_name, args.enable_runtime_lora_updating, args.allowed_lora_dir, chat_template=template,
              api_key=args.api_key or os.environ.get("MINILORA_API_KEY"))
    try:
        server = Server(app, args.host, args.port, args.verbose)
    except OSError as e:
        raise MiniloraError(f"cannot listen on {args.host}:{args.port} ({e.strerror}); pick another --port") from None
    engine.start()
    # Ctrl-C (SIGINT) stops the server even when it was started in the background, where the shell
    # leaves SIGINT ignored and Python would then never raise KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print(f"serving {base_name} + adapters [{', '.join(adapters)}] on {server.url}/v1 "
          f"(max_num_seqs={engine.max_num_seqs}, max_loras={registry.max_loras}, max_model_len={engine.max_model_len})", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        engine.stop()


if __name__ == "__main__":
    main_guard(main)
