"""Training checkpoints: everything the next step depends on, so --resume continues exactly.

    save_checkpoint(model, optimizer, scaler, dataset, cfg, rt, iter_num, best_val_loss)
    iter_num, best_val_loss = load_checkpoint(find_checkpoint(out_dir), model, optimizer, ...)

out_dir/checkpoint/ holds model.safetensors (the trainable weights only: for LoRA the adapter,
the frozen base is rebuilt from --init_from) and state.pt (optimizer, GradScaler, every RNG of
every rank, the data loader's position, the step, the options). It is written to a temporary
sibling and renamed into place, so a kill at any moment leaves the previous one intact.

With --save_steps, out_dir/checkpoint-N/ directories are written beside it: each is a complete
PEFT adapter (adapter_config.json + adapter_model.safetensors; with --lora_r 0 the model in its HF
layout) that generate.py --adapter and PEFT load as they are, plus trainer_state.json (the step and
its validation loss) and train.py's minilora.json (so `--init_from out_dir/checkpoint-N` starts a new
run from that step's weights, as from any output directory). They are products to pick from, not
resume points: --resume reads checkpoint/.

    path = save_step_checkpoint(raw_model, out_dir, step, val_loss, {"minilora.json": text})
    prune_step_checkpoints(out_dir, limit, keep=best_path)   # --save_total_limit
    restore_step_checkpoint(raw_model, best_path)            # --load_best_model_at_end
"""

import dataclasses
import glob
import json
import os
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist

from minilora.adapter_files import read_adapter, save_adapter, set_adapter_weights
from minilora.errors import MiniloraError
from minilora.fileio import atomic_directory
from minilora.model import GPT
from minilora.ops import kernel_choices, use_kernel_choices
from minilora.safetensors import load_file, save_file


def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# Options that decide which weights exist; resuming with different ones is a different run.
MODEL_OPTIONS = ("init_from", "model", "lora_r", "lora_alpha", "target_modules", "use_rslora", "full_finetune", "bias",
                 "modules_to_save", "layers_to_transform", "init_lora_weights", "quantize")


def rng_state():
    keys = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             # numpy's state as plain lists and tensors, so torch.load(weights_only=True) accepts it
             "numpy": [keys[0], torch.from_numpy(keys[1].astype(np.int64)), *keys[2:]]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(s) if isinstance(s, list) else s for s in state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _gather(obj, rt):
    """Every rank's `obj`, in rank order (each rank has its own RNG and maybe its own data position)."""
    if not rt.ddp:
        return [obj]
    out = [None] * rt.world_size
    dist.all_gather_object(out, obj)
    return out


def find_checkpoint(out_dir):
    """out_dir/checkpoint, or the previous one if a kill came between atomic_directory's two renames."""
    path = os.path.join(out_dir, "checkpoint")
    if os.path.isdir(path):
        return path
    parked = sorted(glob.glob(os.path.join(glob.escape(out_dir), ".checkpoint.*.old", "prev")), key=os.path.getmtime)
    return parked[-1] if parked else None


def save_checkpoint(raw_model, optimizer, scaler, dataset, cfg, rt, iter_num, best_val_loss, progress=None):
    """Write out_dir/checkpoint atomically: a kill at any moment leaves the previous one intact.

    progress: a small dict of the loop's own bookkeeping (best checkpoint-N, evaluations without
    improvement) that resuming must restore too; load_checkpoint returns it."""
    rngs, data_states = _gather(rng_state(), rt), _gather(dataset.state_dict(), rt)
    if not rt.master:
        return
    # LoRA: only the adapter (and anything else trainable) is saved; the frozen base is rebuilt from init_from.
    weights = {n: p.detach().to("cpu").contiguous() for n, p in raw_model.named_parameters() if p.requires_grad}
    state = {"iter_num": iter_num, "best_val_loss": best_val_loss, "world_size": rt.world_size,
             "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "rng": rngs, "data": data_states,
             "config": dataclasses.asdict(cfg), "progress": progress or {},
             # what this run measured (--dtype auto, the fp32 kernels): a resumed run must not measure again
             "dtype": rt.dtype, "fp32_kernels": kernel_choices()}
    with atomic_directory(os.path.join(cfg.out_dir, "checkpoint")) as tmp:
        save_file(weights, os.path.join(tmp, "model.safetensors"))
        torch.save(state, os.path.join(tmp, "state.pt"))
    for stray in glob.glob(os.path.join(glob.escape(cfg.out_dir), ".checkpoint.*")):  # left by earlier kills
        shutil.rmtree(stray, ignore_errors=True)


def load_checkpoint(path, raw_model, optimizer, scaler, dataset, cfg, rt):
    """Restore everything save_checkpoint wrote; returns (iter_num, best_val_loss, progress)."""
    fp = os.path.join(path, "state.pt")
    try:
        state = torch.load(fp, map_location="cpu", weights_only=True)
        saved = state["config"]
    except Exception as e:  # truncated, empty or foreign files fail in many types; all mean the same here
        raise MiniloraError(f"{fp} cannot be read ({type(e).__name__}: {str(e)[:80]}); the checkpoint is damaged: "
                            f"start again without --resume in a new --out_dir") from None
    # an option a checkpoint predates (e.g. --bias) had its default then: missing counts as unchanged
    changed = [k for k in MODEL_OPTIONS if saved.get(k, getattr(cfg, k)) != getattr(cfg, k)]
    if changed:
        was = ", ".join(f"--{k} {saved.get(k)!r}" for k in changed)
        raise MiniloraError(f"{path} was trained with {was}; resume with the same options, or use a new --out_dir")
    others = [k for k, v in dataclasses.asdict(cfg).items() if k not in ("resume", "dry_run") and saved.get(k) != v]
    if others and rt.master:
        print(f"resuming with changed options: {', '.join(others)}")
    weights = load_file(os.path.join(path, "model.safetensors"))  # MiniloraError if damaged
    params = {n: p for n, p in raw_model.named_parameters() if p.requires_grad}
    if set(weights) != set(params):
        raise MiniloraError(f"{path}: weights do not match the model (missing {sorted(set(params) - set(weights))[:3]}, "
                            f"unexpected {sorted(set(weights) - set(params))[:3]})")
    with torch.no_grad():
        for n, p in params.items():
            if weights[n].shape != p.shape:
                raise MiniloraError(f"{path}: {n} has shape {tuple(weights[n].shape)}, the model {tuple(p.shape)}")
            p.copy_(weights[n])
    optimizer.load_state_dict(state["optimizer"])
    if state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    same_world = state["world_size"] == rt.world_size
    if not same_world and rt.master:
        print(f"note: checkpoint written by {state['world_size']} processes, resuming on {rt.world_size}: "
              "the run continues, but not bit-identically")
    dataset.load_state_dict(state["data"][rt.rank if same_world else 0])
    set_rng_state(state["rng"][rt.rank if same_world else 0])
    if cfg.dtype == "auto" and state.get("dtype"):
        rt.dtype = state["dtype"]
    use_kernel_choices(state.get("fp32_kernels", []))
    return state["iter_num"], state["best_val_loss"], state.get("progress", {})


# ---- checkpoint-N: usable products every --save_steps --------------------------------------------

STEP_STATE = "trainer_state.json"  # transformers' name for the same record
_STEP_DIR = re.compile(r"checkpoint-(\d+)")


def step_checkpoints(out_dir):
    """[(step, path)] of out_dir's checkpoint-N directories, oldest first."""
    found = []
    for name in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
        m = _STEP_DIR.fullmatch(name)
        if m and os.path.isdir(os.path.join(out_dir, name)):
            found.append((int(m.group(1)), os.path.join(out_dir, name)))
    return sorted(found)


def step_checkpoint_path(out_dir, step):
    """out_dir/checkpoint-{step}, or None for no step."""
    return None if step is None else os.path.join(out_dir, f"checkpoint-{step}")


def save_step_checkpoint(raw_model, out_dir, step, val_loss=None, extra_files=None):
    """Write out_dir/checkpoint-{step}: the adapter (or, without LoRA, the whole model) as the run's output
    would be at this step, + trainer_state.json + extra_files ({name: text}, the trainer's minilora.json and
    chat template); in one rename, so it is complete or absent. -> its path."""
    path = step_checkpoint_path(out_dir, step)
    with atomic_directory(path) as tmp:
        # save_adapter/save_pretrained each want a directory of their own; their files move up one level
        product = os.path.join(tmp, "product")
        if getattr(raw_model, "peft_config", None):
            save_adapter(raw_model, product)
        else:
            raw_model.save_pretrained(product)
        for name in os.listdir(product):
            os.replace(os.path.join(product, name), os.path.join(tmp, name))
        os.rmdir(product)
        with open(os.path.join(tmp, STEP_STATE), "w", encoding="utf-8") as f:
            json.dump({"global_step": step, "val_loss": val_loss}, f, indent=2)
            f.write("\n")
        for name, text in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
    return path


def prune_step_checkpoints(out_dir, limit, keep=None):
    """Delete all but the newest `limit` checkpoint-N directories, never `keep` (the best one)."""
    found = step_checkpoints(out_dir)
    for _, path in found[:max(0, len(found) - limit)]:
        if keep is None or os.path.realpath(path) != os.path.realpath(keep):
            shutil.rmtree(path, ignore_errors=True)


def restore_step_checkpoint(raw_model, path):
    """Put the weights a checkpoint-N directory holds back into `raw_model` (same options, same shapes)."""
    if getattr(raw_model, "peft_config", None):
        set_adapter_weights(raw_model, read_adapter(raw_model, path, trim=False), "default")
        return
    raw_model.load_state_dict(GPT.from_pretrained(path).state_dict())
