"""Crash-safe writes land with the permissions a plain open()/mkdir would give (the umask), not mkstemp's 0600."""

import os
import stat

import pytest
import torch

from minilora import GPT, GPTConfig, LoraConfig, apply_lora, save_adapter
from minilora.fileio import atomic_directory, atomic_open


@pytest.fixture
def with_umask():
    """Set the process umask for one test, restoring the old one after."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                       (0o002, 0o664, 0o775)])
def test_written_files_and_directories_follow_the_umask(tmp_path, with_umask, mask, file_mode, dir_mode):
    with_umask(mask)
    with atomic_open(tmp_path / "weights.bin") as f:
        f.write(b"x")
    with atomic_directory(tmp_path / "adapter") as d:
        with atomic_open(os.path.join(d, "adapter_model.safetensors")) as f:
            f.write(b"y")
        with open(os.path.join(d, "adapter_config.json"), "w") as f:  # plain open(): the reference
            f.write("{}")
    assert mode(tmp_path / "weights.bin") == file_mode
    assert mode(tmp_path / "adapter") == dir_mode
    assert mode(tmp_path / "adapter" / "adapter_model.safetensors") == file_mode
    assert mode(tmp_path / "adapter" / "adapter_config.json") == file_mode
    assert os.umask(mask) == mask  # reading the umask left it as it was


def test_replacing_a_file_gives_it_the_umask_mode_too(tmp_path, with_umask):
    with_umask(0o022)
    path = tmp_path / "config.json"
    path.write_text("old")
    os.chmod(path, 0o600)
    with atomic_open(path, "w") as f:
        f.write("new")
    assert path.read_text() == "new" and mode(path) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temporary left behind


def test_saved_models_and_adapters_are_readable_by_others_under_umask_022(tmp_path, with_umask):
    with_umask(0o022)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny"))
    model.save_pretrained(tmp_path / "model")
    save_adapter(apply_lora(model, LoraConfig(r=2)), tmp_path / "adapter")
    for d in ("model", "adapter"):
        assert mode(tmp_path / d) == 0o755
        files = os.listdir(tmp_path / d)
        assert files and all(mode(tmp_path / d / name) == 0o644 for name in files), {n: oct(mode(tmp_path / d / n)) for n in files}
