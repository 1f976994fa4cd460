"""Rewrite an older PEFT adapter's adapter_model.bin (a pickle) as adapter_model.safetensors.

    python -m minilora.convert out/old_adapter                 # writes adapter_model.safetensors beside the .bin
    python -m minilora.convert out/old_adapter --out out/new   # a new directory (adapter_config.json copied)
    python -m minilora.convert out/old_adapter --remove_bin    # and delete the .bin once the new file is written

A pickle can run code when it is loaded; torch.load(weights_only=True) refuses anything but
tensors and plain containers, so reading one here is safe, and after the conversion nothing needs
to read a pickle again (load_adapter reads the .safetensors file and refuses the .bin by default).
Keys are kept exactly: PEFT writes the same names in both formats.
"""

import argparse
import os
import shutil

import torch

from minilora.adapter_files import CONFIG_NAME, PICKLE_NAME, WEIGHTS_NAME
from minilora.cli import main_guard
from minilora.errors import MiniloraError
from minilora.fileio import atomic_open
from minilora.safetensors import save_file

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def convert_adapter(adapter_dir, out_dir=None, remove_bin=False):
    """Write `adapter_dir`/adapter_model.bin as `out_dir` (default: the same directory)/adapter_model.safetensors.

    adapter_config.json comes along to a new out_dir. Every file lands by an atomic rename; the
    .bin is deleted only with remove_bin, and only after the new file is in place. -> the new file's path.
    """
    adapter_dir = os.fspath(adapter_dir)
    out_dir = adapter_dir if out_dir is None else os.fspath(out_dir)
    src, config = os.path.join(adapter_dir, PICKLE_NAME), os.path.join(adapter_dir, CONFIG_NAME)
    if not os.path.isdir(adapter_dir):
        raise MiniloraError(f"adapter directory {adapter_dir} does not exist; pass the directory holding {PICKLE_NAME}")
    if not os.path.isfile(src):
        have = " (it already has " + WEIGHTS_NAME + ": nothing to convert)" \
            if os.path.isfile(os.path.join(adapter_dir, WEIGHTS_NAME)) else ""
        raise MiniloraError(f"{adapter_dir} has no {PICKLE_NAME}{have}")
    if not os.path.isfile(config):
        raise MiniloraError(f"{adapter_dir} has no {CONFIG_NAME}; an adapter directory holds it beside the weights")
    dst = os.path.join(out_dir, WEIGHTS_NAME)
    if os.path.exists(dst):
        raise MiniloraError(f"{dst} already exists; remove it or pass --out to write elsewhere")
    try:
        tensors = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types; all mean the same here
        raise MiniloraError(f"{src} cannot be read with torch.load(weights_only=True): {type(e).__name__}: "
                            f"{str(e)[:120]}") from None
    if not isinstance(tensors, dict) or not tensors or \
            not all(isinstance(k, str) and torch.is_tensor(t) for k, t in tensors.items()):
        raise MiniloraError(f"{src} must hold a non-empty dict of name -> tensor, as PEFT writes; it is not an adapter")
    bad = next((k for k, t in tensors.items() if t.dtype not in _FLOATS), None)
    if bad is not None:
        raise MiniloraError(f"{src}: tensor {bad} is {str(tensors[bad].dtype).removeprefix('torch.')}; "
                            f"adapter weights are floating point")
    os.makedirs(out_dir, exist_ok=True)
    # clone: tensors that shared one storage in the pickle become separate arrays, as safetensors requires
    save_file({k: t.detach().clone().contiguous() for k, t in tensors.items()}, dst, metadata={"format": "pt"})
    if os.path.realpath(out_dir) != os.path.realpath(adapter_dir):
        with open(config, "rb") as f, atomic_open(os.path.join(out_dir, CONFIG_NAME), "wb") as g:
            shutil.copyfileobj(f, g)
    if remove_bin:
        os.unlink(src)
    return dst


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minilora.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter_dir", help=f"a PEFT adapter directory holding {PICKLE_NAME} and {CONFIG_NAME}")
    parser.add_argument("--out", default=None, help="write the converted adapter here (default: adapter_dir)")
    parser.add_argument("--remove_bin", "--remove-bin", action="store_true",
                        help=f"delete {PICKLE_NAME} after {WEIGHTS_NAME} is written")
    args = parser.parse_args(argv)
    path = convert_adapter(args.adapter_dir, args.out, remove_bin=args.remove_bin)
    print(f"wrote {path}" + (f" (removed {PICKLE_NAME})" if args.remove_bin else ""))


if __name__ == "__main__":
    main_guard(main)
