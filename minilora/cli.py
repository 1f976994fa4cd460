"""Command-line plumbing shared by the scripts: dataclass fields become --options.

A script declares its defaults once, as a dataclass whose fields carry a help string:

    @dataclass
    class Args:
        max_iters: int = opt(200, "optimizer steps")

`parse_args(Args)` builds an argparse parser from the fields (so `-h` lists every option with
its default) and returns an Args instance. `main_guard(main)` runs a script's main and turns a
MiniloraError into one line on stderr and exit status 2, never a traceback.
"""

import argparse
import dataclasses
import sys
import types
import typing

from minilora.errors import MiniloraError


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


def build_parser(cls, description=None):
    parser = argparse.ArgumentParser(description=description or cls.__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, optional = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs = dict(default=default, help=f.metadata.get("help", " "))
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        names = ["--" + f.name] + (["--" + f.name.replace("_", "-")] if "_" in f.name else [])
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
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
    except MiniloraError as e:
        raise SystemExit(f"error: {e}")


def main_guard(main):
    """Run main(); a MiniloraError or a missing file ends the script with one line, not a traceback."""
    try:
        return main()
    except (MiniloraError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
