"""Command-line plumbing shared by the scripts: dataclass fields become --options.

A script declares its defaults once, as a dataclass whose fields carry a help string:

    @dataclass
    class Args:
        max_iters: int = opt(200, "optimizer steps")

`parse_args(Args)` builds an argparse parser from the fields (so `-h` lists every option with
its default, once) and returns an Args instance. `main_guard(main)` runs a script's main and turns
a MiniloraError into one line on stderr and exit status 2, never a traceback.

One vocabulary in every script: `--flag` / `--no-flag` (or `--no_flag`) for booleans, and dtypes
as fp32|bf16|fp16 or float32|bfloat16|float16 (parse_dtype).
"""

import argparse
import dataclasses
import os
import sys
import types
import typing

import torch

from minilora.errors import MiniloraError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # torch's spellings, same meaning
DTYPE_CHOICES = [*DTYPES, *DTYPE_NAMES]


def dtype_name(name):
    """'bfloat16' or 'bf16' -> 'bf16' (the short spelling every script prints)."""
    short = DTYPE_NAMES.get(name, name)
    if short not in DTYPES:
        raise MiniloraError(f"unknown dtype {name!r}; use one of {', '.join(DTYPE_CHOICES)}")
    return short


def parse_dtype(name):
    """'bf16' or 'bfloat16' -> torch.bfloat16."""
    return DTYPES[dtype_name(name)]


def opt(default, help, **kwargs):
    """A dataclass field with a default and the help text its --option shows."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def _unwrap_optional(tp):
    """Optional[X] / X | None -> (X, True); anything else -> (tp, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _none_or(parse):
    return lambda s: None if s.lower() in ("none", "null", "") else parse(s)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" only where the help text does not already say what the default is."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default is argparse.SUPPRESS or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


def build_parser(cls, description=None):
    parser = argparse.ArgumentParser(description=description or cls.__doc__, formatter_class=_HelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, optional = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs = dict(default=default, help=f.metadata.get("help", " "))
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        names = ["--" + f.name] + (["--" + f.name.replace("_", "-")] if "_" in f.name else [])
        if tp is bool:  # --flag and --no-flag (--no_flag), each once, the default said in words
            on = kwargs["help"] + (" (the default)" if default else "")
            parser.add_argument(*names, dest=f.name, action="store_true", default=default, help=on)
            off = list(dict.fromkeys(["--no-" + f.name.replace("_", "-"), "--no_" + f.name, "--no-" + f.name]))
            parser.add_argument(*off, dest=f.name, action="store_false",
                                help="the opposite" + ("" if default else " (the default)"))
            continue
        elif typing.get_origin(tp) is list:
            (item,) = typing.get_args(tp)
            kwargs.update(nargs="*", type=item)
        else:
            kwargs["type"] = _none_or(tp) if optional else tp
        parser.add_argument(*names, dest=f.name, **kwargs)
    return parser


def parse_args(cls, argv=None, description=None):
    """Parse argv (default sys.argv[1:]) into an instance of the dataclass `cls`."""
    namespace = build_parser(cls, description).parse_args(argv)
    try:
        return cls(**vars(namespace))
    except MiniloraError as e:  # argparse's own errors exit 2 too
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def main_guard(main):
    """Run main(); a MiniloraError or a missing file ends the script with one line, not a traceback."""
    try:
        out = main()
        sys.stdout.flush()  # a reader that went away (`| head`) shows here, in the guard, not at exit
        return out
    except (MiniloraError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
            PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # `... | head` closed the pipe: not an error of ours
        # stdout to /dev/null (Python's docs): the flush at exit would fail again ("Exception ignored", exit 120)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
