import os

import torch

# Tests use tiny models: one thread avoids oversubscribing CI's 2 cores with thread handoffs.
torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--soak", action="store_true",
                     help="run the fuzz, crash-safety and server soak tests at scale (same as MINILORA_SOAK=1)")


def pytest_configure(config):
    if config.getoption("--soak"):
        os.environ["MINILORA_SOAK"] = "1"  # set before test modules are imported, which read it
