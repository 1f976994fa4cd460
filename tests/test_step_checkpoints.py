"""checkpoint-N directories (--save_steps, --save_total_limit, --load_best_model_at_end,
--early_stopping_patience) and python -m minilora.convert: tiny models, a few steps each."""

import json
import os

import pytest
import torch

from minilora import GPT, GPTConfig, LoraConfig, MiniloraError, TrainingArguments, apply_lora, convert_adapter, \
    load_adapter, save_adapter
from minilora.adapter_files import adapter_state_dict
from minilora.checkpoint import step_checkpoints
from minilora.cli import main_guard, parse_args
from minilora.convert import main as convert_main
from minilora.safetensors import load_file
from minilora.trainer import TrainConfig

from scripts import run_script_here, run_training


@pytest.fixture
def files(tmp_path):
    """Training text of two letters, validation text of two others: training makes the validation loss rise."""
    (tmp_path / "train.txt").write_text("ab" * 1000)
    (tmp_path / "val.txt").write_text("QZ" * 1000)
    return str(tmp_path / "train.txt"), str(tmp_path / "val.txt")


def base(tmp_path, preset="tiny"):
    torch.manual_seed(0)
    path = str(tmp_path / f"base-{preset}")
    GPT(GPTConfig.from_name(preset)).save_pretrained(path)
    return path


def make_cfg(tmp_path, files, **kw):
    data, val = files
    defaults = dict(init_from=base(tmp_path), lora_r=4, data=data, val_data=val, out_dir=str(tmp_path / "out"),
                    block_size=32, batch_size=4, max_iters=4, warmup_iters=0, decay_lr=False, learning_rate=3e-2,
                    eval_interval=1, eval_iters=2, eval_examples=0, checkpoint_interval=100, device="cpu", dtype="fp32",
                    seed=7)
    return TrainConfig(**{**defaults, **kw})


run = run_training  # train.py's flow, in process (tests/scripts.py)


def lora_state(model):
    return {k: v.detach().clone() for k, v in adapter_state_dict(model).items()}


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_checkpoint_n_is_the_adapter_at_step_n(tmp_path, files, preset, capsys):
    snapshots = []  # eval_fn runs at every evaluation (--eval_interval 1): the adapter after each step
    model, result = run(make_cfg(tmp_path, files, init_from=base(tmp_path, preset), max_iters=5, save_steps=2),
                        eval_fn=lambda m: snapshots.append(lora_state(m)) or {})
    out = str(tmp_path / "out")
    assert [s for s, _ in step_checkpoints(out)] == [2, 4, 5]  # every 2 steps, and the last
    for step in (2, 5):
        path = os.path.join(out, f"checkpoint-{step}")
        assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.json", "minilora.json"} == set(os.listdir(path))
        with open(os.path.join(path, "adapter_config.json")) as f:
            assert json.load(f)["base_model_name_or_path"] == os.path.abspath(base(tmp_path, preset))
        loaded = load_adapter(GPT.from_pretrained(base(tmp_path, preset)), path)
        got, want = lora_state(loaded), snapshots[step - 1]
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not all(torch.equal(snapshots[1][k], snapshots[4][k]) for k in snapshots[1])  # the steps differ
    # generate.py finds the base through adapter_config.json, as for any adapter
    code, text, err = run_script_here(capsys, "generate.py", "--adapter", os.path.join(out, "checkpoint-4"),
                                      "--prompt", "ab", "--max_new_tokens", "3", "--temperature", "0")
    assert code == 0, err
    # and train.py --init_from starts a new run from it (minilora.json names the base, as in out_dir itself):
    # one step at learning rate 1e-9 leaves checkpoint-2's adapter (a fresh one would have other A, zero B)
    with open(os.path.join(out, "checkpoint-2", "minilora.json")) as f:
        record = json.load(f)
    assert (record["kind"], record["iter_num"], record["base_model"]) == ("lora", 2, os.path.abspath(base(tmp_path, preset)))
    code, text, err = run_script_here(capsys, "train.py", "--init_from", os.path.join(out, "checkpoint-2"), "--data",
                                      files[0], "--out_dir", str(tmp_path / "next"), "--max_iters", "1",
                                      "--learning_rate", "1e-9", "--block_size", "32", "--batch_size", "2", "--eval_iters", "1")
    assert code == 0, err
    assert f"continuing the adapter from {os.path.join(out, 'checkpoint-2')}" in text
    got = load_file(str(tmp_path / "next" / "adapter_model.safetensors"))
    want = load_file(os.path.join(out, "checkpoint-2", "adapter_model.safetensors"))
    assert got.keys() == want.keys() and all(torch.allclose(got[k], want[k], rtol=0, atol=1e-6) for k in want)


def test_a_chat_run_s_checkpoint_n_carries_its_chat_template(tmp_path, capsys):
    """generate.py --adapter out/checkpoint-N --chat renders conversations as the run trained on them."""
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "Capital of Peru?"},
                                                                  {"role": "assistant", "content": "Lima"}]}) + "\n")
    out = tmp_path / "out"
    code, text, err = run_script_here(capsys, "train.py", "--init_from", base(tmp_path), "--data", str(tmp_path / "chat.jsonl"),
                                      "--chat_template", "plain", "--out_dir", str(out), "--max_iters", "1",
                                      "--save_steps", "1", "--batch_size", "1")
    assert code == 0, err
    assert (out / "checkpoint-1" / "chat_template.jinja").read_text() == (out / "chat_template.jinja").read_text()
    assert "'Assistant:" in (out / "chat_template.jinja").read_text()  # the plain template's own text
    assert json.loads((out / "checkpoint-1" / "minilora.json").read_text())["chat_template"] == "plain"


def test_full_finetuning_checkpoints_are_hf_models_and_the_limit_prunes(tmp_path, files):
    model, _ = run(make_cfg(tmp_path, files, init_from="scratch", model="tiny", lora_r=0, max_iters=3,
                            save_steps=1, save_total_limit=2))
    out = str(tmp_path / "out")
    assert [s for s, _ in step_checkpoints(out)] == [2, 3]
    loaded = GPT.from_pretrained(os.path.join(out, "checkpoint-3")).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_load_best_and_early_stopping(tmp_path, files):
    """Validation loss rises after step 1: patience 3 stops at step 4; the output is checkpoint-1's adapter,
    which --save_total_limit 2 keeps beside the newest two."""
    snapshots = []
    cfg = make_cfg(tmp_path, files, max_iters=10, save_steps=1, save_total_limit=2, load_best_model_at_end=True,
                   early_stopping_patience=3)
    model, result = run(cfg, eval_fn=lambda m: snapshots.append(lora_state(m)) or {})
    out = cfg.out_dir
    with open(os.path.join(out, "log.jsonl")) as f:
        val = [r["val_loss"] for r in map(json.loads, f) if "val_loss" in r]
    assert len(val) == 4 and val.index(min(val)) == 0 and min(val[1:]) > val[0]
    assert result.iter_num == 4 and result.stopped_early and max(result.losses) == 4
    assert [s for s, _ in step_checkpoints(out)] == [1, 3, 4]
    assert result.best_model_checkpoint == os.path.join(out, "checkpoint-1")
    final = load_file(os.path.join(out, "adapter_model.safetensors"))
    best = load_file(os.path.join(out, "checkpoint-1", "adapter_model.safetensors"))
    assert final.keys() == best.keys() and all(torch.equal(final[k], best[k]) for k in best)
    assert all(torch.equal(v, snapshots[0][k]) for k, v in lora_state(model).items())  # in memory too
    # out_dir/checkpoint still holds the last step, so --resume continues the run, not the best one
    resume_weights = load_file(os.path.join(out, "checkpoint", "model.safetensors"))
    assert any(not torch.equal(resume_weights[n], p) for n, p in model.named_parameters() if p.requires_grad)


def test_resume_stays_exact_with_the_new_options(tmp_path, files):
    """2 steps, then --resume: the same losses, checkpoint-N contents, best output and early stop (step 4)
    as one uninterrupted run; the patience counter survives the resume (without it the stop would come at 5)."""
    opts = dict(max_iters=8, save_steps=2, save_total_limit=1, load_best_model_at_end=True,
                early_stopping_patience=3, lora_dropout=0.1)
    whole, whole_result = run(make_cfg(tmp_path / "a", files, **opts))
    run(make_cfg(tmp_path / "b", files, **{**opts, "max_iters": 2}))
    resumed, result = run(make_cfg(tmp_path / "b", files, resume=True, **opts))
    assert whole_result.iter_num == result.iter_num == 4 and result.stopped_early
    assert list(result.losses) == [3, 4] and all(result.losses[i] == whole_result.losses[i] for i in (3, 4))
    a, b = lora_state(whole), lora_state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    dirs_a, dirs_b = step_checkpoints(str(tmp_path / "a" / "out")), step_checkpoints(str(tmp_path / "b" / "out"))
    assert [s for s, _ in dirs_a] == [s for s, _ in dirs_b] == [2, 4]  # best (2) + newest (4)
    for (_, pa), (_, pb) in zip(dirs_a, dirs_b):
        ta, tb = load_file(os.path.join(pa, "adapter_model.safetensors")), load_file(os.path.join(pb, "adapter_model.safetensors"))
        assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert os.path.basename(result.best_model_checkpoint) == os.path.basename(whole_result.best_model_checkpoint)


def test_options_that_need_evaluation_are_refused_in_one_line(tmp_path, files, capsys):
    with pytest.raises(MiniloraError, match="--load_best_model_at_end compares validation losses, but --eval_interval is 0"):
        make_cfg(tmp_path, files, save_steps=2, load_best_model_at_end=True, eval_interval=0)
    with pytest.raises(MiniloraError, match="no validation split"):
        make_cfg(tmp_path, files, early_stopping_patience=2, val_data=None, val_fraction=0.0)
    with pytest.raises(MiniloraError, match=r"--save_steps to a multiple of --eval_interval \(2\), got 3"):
        make_cfg(tmp_path, files, save_steps=3, eval_interval=2, load_best_model_at_end=True)
    with pytest.raises(MiniloraError, match="--save_total_limit must be at least 1"):
        make_cfg(tmp_path, files, save_total_limit=0)
    with pytest.raises(SystemExit) as e:
        parse_args(TrainConfig, ["--load_best_model_at_end", "--eval_interval", "0", "--save_steps", "5"])
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_training_arguments_map_onto_the_options():
    cfg = TrainingArguments(output_dir="o", save_steps=4, save_total_limit=2, load_best_model_at_end=True,
                            eval_steps=2, metric_for_best_model="eval_loss").to_train_config(data="d", val_data="v")
    assert (cfg.save_steps, cfg.checkpoint_interval, cfg.save_total_limit, cfg.load_best_model_at_end,
            cfg.eval_interval) == (4, 4, 2, True, 2)
    with pytest.raises(MiniloraError, match="metric_for_best_model 'accuracy' is not implemented"):
        TrainingArguments(output_dir="o", metric_for_best_model="accuracy")


# ---- python -m minilora.convert ------------------------------------------------------------------

@pytest.fixture
def bin_adapter(tmp_path):
    """A PEFT adapter directory as older PEFT wrote it: adapter_config.json + adapter_model.bin."""
    torch.manual_seed(0)
    model = apply_lora(GPT(GPTConfig.from_name("tiny-llama")), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    path = str(tmp_path / "old")
    save_adapter(model, path)
    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    torch.save(tensors, os.path.join(path, "adapter_model.bin"))
    os.unlink(os.path.join(path, "adapter_model.safetensors"))
    return model, path, tensors


def test_convert_round_trip(tmp_path, bin_adapter, capsys):
    model, path, tensors = bin_adapter
    convert_main([path])
    assert "wrote" in capsys.readouterr().out
    assert load_file(os.path.join(path, "adapter_model.safetensors")).keys() == tensors.keys()
    assert os.path.exists(os.path.join(path, "adapter_model.bin"))  # kept without --remove_bin
    twin = GPT(model.config)
    twin.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k}, strict=False)
    loaded = lora_state(load_adapter(twin, path))
    assert all(torch.equal(loaded[k], v) for k, v in lora_state(model).items())
    # to a new directory, the config copied, the .bin removed
    new = str(tmp_path / "new")
    convert_adapter(path, new, remove_bin=False)
    convert_main([path, "--out", str(tmp_path / "new2"), "--remove_bin"])
    assert set(os.listdir(new)) == {"adapter_config.json", "adapter_model.safetensors"}
    assert not os.path.exists(os.path.join(path, "adapter_model.bin"))
    got = load_file(os.path.join(tmp_path / "new2", "adapter_model.safetensors"))
    assert all(torch.equal(got[k], tensors[k]) for k in tensors)


class NotATensor:
    pass


def test_convert_refusals(tmp_path, bin_adapter, capsys):
    _, path, _ = bin_adapter

    def refused(directory, message):
        try:
            main_guard(lambda: convert_main([str(directory)]))
            code = 0
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err

    refused(tmp_path / "missing", "does not exist")
    refused(tmp_path, "has no adapter_model.bin")
    convert_adapter(path)
    refused(path, "safetensors already exists")
    for name, content, message in [("ints", {"w": torch.zeros(2, dtype=torch.int64)}, "tensor w is int64"),
                                   ("list", [1, 2], "must hold a non-empty dict of name -> tensor"),
                                   ("code", {"w": NotATensor()}, "cannot be read with torch.load(weights_only=True)")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text("{}")
        torch.save(content, tmp_path / name / "adapter_model.bin")
        refused(tmp_path / name, message)
