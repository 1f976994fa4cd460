"""python -m minilora.plot: loss curves from log.jsonl, with matplotlib and without it."""

import json
import sys

import pytest

from minilora import plot


def write_log(run_dir, records):
    run_dir.mkdir(parents=True)
    with open(run_dir / "log.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.write('{"step": 9, "loss": 1.')  # a line torn by a kill: skipped
    return str(run_dir)


@pytest.fixture
def runs(tmp_path):
    a = write_log(tmp_path / "lora", [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0},
                                      {"step": 2, "val_loss": 2.5, "accuracy": 0.25}])
    b = write_log(tmp_path / "full", [{"step": 1, "loss": 2.8}, {"step": 2, "loss": 1.5}, {"step": 2, "val_loss": 1.9}])
    return a, b


def test_reads_series_and_prints_the_table(runs):
    s = plot.read_log(runs[0])
    assert s == {"train": [(1, 3.0), (2, 2.0)], "val": [(2, 2.5)], "accuracy": [(2, 0.25)]}
    table = plot.summary_table({"lora": s, "full": plot.read_log(runs[1])})
    assert "lora" in table and "25.0%" in table and "1.9000" in table


def test_writes_the_chart_with_matplotlib(runs, tmp_path, capsys):
    # matplotlib comes with the dev extra; the next test covers its absence
    out = tmp_path / "pics" / "loss.png"
    assert plot.main([*runs, "--out", str(out)]) == str(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {out}" in capsys.readouterr().out


def test_without_matplotlib_prints_the_table_and_the_hint(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert plot.pyplot() is None
    out = tmp_path / "loss.png"
    assert plot.main([*runs, "--out", str(out)]) is None
    captured = capsys.readouterr()
    assert "lora" in captured.out and 'pip install -e ".[plot]"' in captured.err and not out.exists()


def test_a_directory_without_a_log_is_one_line(tmp_path):
    with pytest.raises(plot.MiniloraError, match="log.jsonl does not exist"):
        plot.main([str(tmp_path)])
