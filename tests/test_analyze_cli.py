"""python -m minilora.analyze on a tiny base, two adapters and a "full fine-tune" whose ΔW is known."""

import copy
import json
import sys

import pytest
import torch

from minilora import GPT, GPTConfig, MiniloraError, load_adapter, merge_and_unload
from minilora import analyze
from tests.scripts import random_adapter


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """base/, r2/ and r4/ adapters (q_proj, v_proj), and full/ = base with r2 merged in: ΔW_full = ΔW_r2 exactly."""
    tmp = tmp_path_factory.mktemp("analyze")
    torch.manual_seed(0)
    base = GPT(GPTConfig.from_name("tiny")).eval()
    base.save_pretrained(tmp / "base")
    random_adapter(base, tmp / "r2", 2, seed=1, targets=("q_proj", "v_proj"))
    random_adapter(base, tmp / "r4", 4, seed=2, targets=("q_proj", "v_proj"))
    full = load_adapter(copy.deepcopy(base), tmp / "r2")
    merge_and_unload(full).save_pretrained(tmp / "full")
    return tmp


def run(dirs, *extra):
    d = str(dirs)
    return analyze.main(["--base", f"{d}/base", "--adapter", f"{d}/r2", "--adapter2", f"{d}/r4",
                         "--full", f"{d}/full", "--top_k", "1", "2", "4", *extra])


def test_tables_and_known_answers(dirs, capsys):
    result = run(dirs, "--json", str(dirs / "out.json"))
    text = capsys.readouterr().out
    q0 = "transformer.h.0.attn.q_proj"
    assert list(result["layers"]) == [f"transformer.h.{i}.attn.{m}_proj" for i in range(2) for m in "qv"]
    row = result["layers"][q0]
    assert row["spectrum"]["r2"]["energy"][2] == pytest.approx(1.0)  # an r=2 update has all its energy in 2
    assert row["spectrum"]["full"]["energy"][2] == pytest.approx(1.0, abs=1e-6)  # ... and so has full, = r2 merged
    assert row["spectrum"]["r4"]["rank_90"] <= 4
    assert row["phi"]["r2 vs full"][1] == pytest.approx(1.0, abs=1e-5)  # the same ΔW: the same directions
    assert row["phi"]["r2 vs full"][2] == pytest.approx(1.0, abs=1e-5)
    assert 0 <= row["phi"]["r2 vs r4"][2] <= 1 and 4 not in row["phi"]["r2 vs r4"]  # k <= min(r1, r2)
    assert row["amplification"]["full"]["factor"] == pytest.approx(row["amplification"]["r2"]["factor"], rel=1e-4)
    assert len(row["phi_grid"]) == 2 and len(row["phi_grid"][0]) == 4
    assert row["random_phi"][4] == 4 / 32
    for needle in ("share of ‖ΔW‖²_F", "subspace similarity", "amplification", "r2 vs r4", "r2 vs full", q0):
        assert needle in text
    saved = json.loads((dirs / "out.json").read_text())
    assert saved["sources"] == {"r2": 2, "r4": 4, "full": None}


def test_plots_with_matplotlib(dirs, capsys):
    run(dirs, "--plot", str(dirs / "pics"))
    for name in ("spectrum.png", "phi.png"):
        assert (dirs / "pics" / name).read_bytes()[:4] == b"\x89PNG"
    assert "wrote spectrum.png, phi.png" in capsys.readouterr().out


def test_without_matplotlib_tables_and_a_hint(dirs, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    run(dirs, "--plot", str(dirs / "nopics"))
    captured = capsys.readouterr()
    assert "amplification" in captured.out and 'pip install -e ".[plot]"' in captured.err
    assert not (dirs / "nopics").exists()


def test_full_alone_covers_every_block_linear_and_refusals(dirs, capsys):
    result = analyze.main(["--base", str(dirs / "base"), "--full", str(dirs / "full")])
    assert len(result["layers"]) == 2 * 6  # q, k, v, out, fc_in, fc_out in each of 2 blocks
    assert result["layers"]["transformer.h.0.mlp.fc_in"]["spectrum"]["full"]["norm"] == 0.0  # untouched by r2
    with pytest.raises(MiniloraError, match="nothing to analyse"):
        analyze.Args()
    with pytest.raises(MiniloraError, match="does not name its base model; pass --base"):
        analyze.main(["--adapter", str(dirs / "r2")])
