import os

import pytest
import torch

from scripts import run_quickstart

# Tests use tiny models: one thread avoids oversubscribing CI's 2 cores with thread handoffs.
torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--soak", action="store_true",
                     help="run the fuzz, crash-safety and server soak tests at scale (same as MINILORA_SOAK=1)")


def pytest_configure(config):
    if config.getoption("--soak"):
        os.environ["MINILORA_SOAK"] = "1"  # set before test modules are imported, which read it


@pytest.fixture(scope="session")
def quick_quickstart(tmp_path_factory):
    """(out_dir, stdout) of one tiny `python -m minilora.quickstart --quick --tasks sql dates chat` run (scripts.TINY), built once
    per session: tests/test_quickstart.py checks it and adds runs to it; test_readme_commands.py copies it."""
    out = tmp_path_factory.mktemp("quickstart") / "out" / "quickstart"
    proc = run_quickstart(out, "--tasks", "sql", "dates", "chat")  # the defaults, and the conversational task
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout
