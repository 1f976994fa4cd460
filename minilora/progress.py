"""Progress of a training run: a live status line, log.jsonl, and peak memory.

log.jsonl gets one JSON object per logged step ({"step", "loss", "lr", "grad_norm", ...}) and one
per evaluation ({"step", "val_loss", "accuracy", ...}); a resumed run drops the records past its
checkpoint and writes them again.
"""

import json
import math
import os
import resource
import sys

import torch

from minilora.fileio import atomic_open


def fmt_time(seconds):
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """A live status line (rewritten in place on a terminal, one line per log otherwise) + log.jsonl."""

    def __init__(self, out_dir, enabled, resume_step=None, stream=None):
        self.enabled, self.stream = enabled, stream or sys.stdout
        self.tty, self.live = self.stream.isatty(), False
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "log.jsonl")
        if resume_step is not None and os.path.exists(path):
            # Drop records past the checkpoint (written before a kill): the resumed run writes them again.
            with open(path) as f:
                keep = [line for line in f if _step(line) <= resume_step]
            with atomic_open(path, "w") as f:
                f.writelines(keep)
        elif resume_step is None and os.path.exists(path):
            os.remove(path)
        self.path = path

    def record(self, **fields):
        """One JSON line; opened per record so no handle outlives a crash or an exception."""
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(fields) + "\n")

    def line(self, text):
        """The live line: replaces itself on a terminal."""
        if self.enabled:
            if self.tty:
                self.stream.write("\r" + text + "\033[K")
                self.live = True
            else:
                self.stream.write(text + "\n")
            self.stream.flush()

    def note(self, text):
        """A line that stays (evaluations, the summary)."""
        if self.enabled:
            self.stream.write(("\n" if self.live else "") + text + "\n")
            self.stream.flush()
            self.live = False


def _step(line):
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a line torn by a kill: dropped


def peak_memory_mb(device_type):
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB: the process's peak RSS
