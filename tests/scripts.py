"""Run a top-level script (generate.py, merge.py, ...) as a user would, or its main() in-process."""

import importlib.util
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(name, *args):
    """`python NAME ARGS...` in a subprocess, single-threaded -> CompletedProcess (text)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, name), *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)


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
