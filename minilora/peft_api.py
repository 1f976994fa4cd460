"""PEFT's and TRL's names over minilora's functions, so code written from a PEFT/TRL guide reads the same.

    model = GPT.from_pretrained("facebook/opt-350m")            # AutoModelForCausalLM.from_pretrained
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    peft_model.print_trainable_parameters()
    trainer = SFTTrainer(model=model, args=TrainingArguments(output_dir="out/quotes", num_train_epochs=3),
                         train_dataset="quotes.jsonl", peft_config=lora_config, dataset_text_field="quote")
    trainer.train(); trainer.save_model()                       # adapter + minilora.json in output_dir
    peft_model = PeftModel.from_pretrained(GPT.from_pretrained("facebook/opt-350m"), "out/quotes")
    out = peft_model.generate(input_ids=ids, max_new_tokens=20)  # (B, T + new): prompt + new ids

Nothing here is a second implementation: each method is one call of the function named in its
docstring (apply_lora, load_adapter, set_adapter, generation.generate, trainer.train, ...), and the
tests check each against that function. PEFT's rule holds: a second adapter (add_adapter,
load_adapter) is added, not activated; set_adapter switches.

Where minilora differs from transformers on purpose, it says so by name: TrainingArguments'
lr_scheduler_type is "cosine" (warm-up then cosine decay to 0) or "constant", not "linear"; an
argument PEFT/TRL have and minilora does not is refused (TypeError naming it), never ignored.
"""

import dataclasses
import json
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from minilora.adapter_files import load_adapter, save_adapter
from minilora.adapters import add_weighted_adapter, delete_adapter, disable_adapter, set_adapter
from minilora.errors import MiniloraError
from minilora.fileio import atomic_open
from minilora.generation import generate
from minilora.loading import RunInfo, load_model
from minilora.lora import LoraConfig, active_adapters, apply_lora, count_parameters, merge_and_unload, \
    print_trainable_parameters
from minilora.runtime import Runtime, cleanup, setup_runtime
from minilora.tokenizer import get_tokenizer
from minilora.trainer import TrainConfig, load_data, save_output, task_eval_fn, train


# ---- generation with transformers' shapes --------------------------------------------------------

def generate_ids(model, input_ids, max_new_tokens=20, *, attention_mask=None, do_sample=False, temperature=1.0,
                 top_k=None, top_p=None, eos_token_id=None, pad_token_id=None, seed=None, adapter_names=None):
    """transformers' model.generate over minilora.generation.generate -> (B, T + n) LongTensor.

    Each row is its prompt row as given (left padding included) + its new tokens + the EOS it
    stopped at, then pad_token_id up to the longest row (transformers' layout). do_sample=False
    (transformers' default) is greedy; temperature / top_k / top_p need do_sample=True, as they
    do there (transformers ignores them with a warning; minilora refuses). eos_token_id: an id or
    a list (default: the model's tokenizer's); pad_token_id defaults to the first EOS id.
    """
    if not do_sample and (temperature != 1.0 or top_k is not None or top_p is not None):
        raise MiniloraError("temperature/top_k/top_p shape sampling, and do_sample=False is greedy; "
                            "pass do_sample=True to sample")
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]  # one prompt, (T,) -> (1, T)
    if eos_token_id is None:
        eos_token_id = get_tokenizer(model.config.tokenizer).eos_token_ids
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    pad = eos[0] if pad_token_id is None else pad_token_id
    out = generate(model, input_ids.cpu(), max_new_tokens, temperature=temperature if do_sample else 0.0,
                   top_k=top_k, top_p=top_p, seed=seed, eot_token=eos, attention_mask=attention_mask,
                   adapter_names=adapter_names)
    # generate leaves the EOS out of tokens; transformers keeps it
    new = [t + ([eos[0]] if why == "stop" else []) for t, why in zip(out.tokens, out.finish_reasons)]
    width = max(len(t) for t in new)
    tail = torch.tensor([t + [pad] * (width - len(t)) for t in new], dtype=input_ids.dtype).view(len(new), width)
    return torch.cat([input_ids.cpu(), tail], dim=1).to(input_ids.device)  # (B, T + width)


# ---- PeftModel -----------------------------------------------------------------------------------

class PeftModel(nn.Module):
    """PEFT's PeftModel: the GPT (with its LoRA layers) as `base_model`, and PEFT's methods.

    Any other attribute reads through to the GPT (peft_model.config, peft_model.peft_config), and
    calling it is calling the GPT. The adapters live on the GPT itself, so minilora's functions
    (set_adapter(peft_model.base_model, ...)) and these methods see the same state.
    """

    def __init__(self, model, peft_config=None, adapter_name="default"):
        super().__init__()
        if isinstance(model, PeftModel):
            raise MiniloraError("the model is already a PeftModel; call add_adapter on it for another adapter")
        self.base_model = model
        if peft_config is not None:
            if not isinstance(peft_config, LoraConfig):
                raise MiniloraError(f"peft_config must be a LoraConfig, got {type(peft_config).__name__}")
            if peft_config.base_model_name_or_path is None and getattr(model, "name_or_path", None):
                # PEFT records the base in adapter_config.json: generate.py --adapter then finds it alone
                peft_config = dataclasses.replace(peft_config, base_model_name_or_path=model.name_or_path)
            apply_lora(model, peft_config, adapter_name)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)  # parameters, buffers and submodules (base_model)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, idx, targets=None, *, loss_only=False, all_logits=False, pos=None, attn_mask=None,
                cache_pos=None, cache_rows=None):
        """GPT.forward, unchanged: (logits, loss)."""
        return self.base_model(idx, targets, loss_only=loss_only, all_logits=all_logits, pos=pos, attn_mask=attn_mask,
                               cache_pos=cache_pos, cache_rows=cache_rows)

    @classmethod
    def from_pretrained(cls, model, model_id, adapter_name="default", is_trainable=False, allow_pickle=False):
        """PeftModel.from_pretrained(base, adapter_dir): load_adapter, then wrap."""
        load_adapter(model, model_id, adapter_name, is_trainable=is_trainable, allow_pickle=allow_pickle)
        return cls(model)

    def get_base_model(self):
        return self.base_model

    @property
    def active_adapter(self):
        names = active_adapters(self.base_model)
        return names[0] if len(names) == 1 else names

    @property
    def active_adapters(self):
        return active_adapters(self.base_model)

    def print_trainable_parameters(self):
        """lora.print_trainable_parameters: PEFT's line; returns (trainable, total)."""
        return print_trainable_parameters(self.base_model)

    def get_nb_trainable_parameters(self):
        return count_parameters(self.base_model)

    def add_adapter(self, adapter_name, peft_config):
        """lora.apply_lora under a new name: added, not activated (PEFT's rule)."""
        apply_lora(self.base_model, peft_config, adapter_name)

    def load_adapter(self, model_id, adapter_name, is_trainable=False, allow_pickle=False):
        """adapter_files.load_adapter: added, not activated, unless the model has no active adapter yet."""
        load_adapter(self.base_model, model_id, adapter_name, is_trainable=is_trainable, allow_pickle=allow_pickle)

    def set_adapter(self, adapter_name):
        set_adapter(self.base_model, adapter_name)

    def disable_adapter(self):
        """`with peft_model.disable_adapter():` runs the base model (adapters.disable_adapter)."""
        return disable_adapter(self.base_model)

    def delete_adapter(self, adapter_name):
        delete_adapter(self.base_model, adapter_name)

    def add_weighted_adapter(self, adapters, weights, adapter_name, combination_type="linear"):
        add_weighted_adapter(self.base_model, adapters, weights, adapter_name, combination_type)

    def merge_and_unload(self, safe_merge=False):
        """lora.merge_and_unload: the plain GPT with the active adapters folded in (save_pretrained works)."""
        return merge_and_unload(self.base_model, safe_merge=safe_merge)

    def save_pretrained(self, save_directory, selected_adapters=None):
        """PEFT's layout: adapter "default" in save_directory, any other one in save_directory/<name>."""
        names = list(self.base_model.peft_config) if selected_adapters is None else list(selected_adapters)
        for name in sorted(names, key=lambda n: n != "default"):  # the directory itself first, then its subdirs
            save_adapter(self.base_model, save_directory if name == "default" else os.path.join(save_directory, name),
                         adapter_name=name)

    def generate(self, input_ids, max_new_tokens=20, *, attention_mask=None, do_sample=False, temperature=1.0,
                 top_k=None, top_p=None, eos_token_id=None, pad_token_id=None, seed=None, adapter_names=None):
        """generate_ids: prompt + new ids, (B, T + n), as transformers returns them."""
        return generate_ids(self.base_model, input_ids, max_new_tokens, attention_mask=attention_mask,
                            do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                            eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed, adapter_names=adapter_names)


def get_peft_model(model, peft_config, adapter_name="default"):
    """PEFT's get_peft_model: apply_lora(model, peft_config, adapter_name), wrapped as a PeftModel."""
    return PeftModel(model, peft_config, adapter_name)


# ---- TRL's SFTTrainer ----------------------------------------------------------------------------

@dataclass
class TrainingArguments:
    """transformers.TrainingArguments, the fields the guide uses and their neighbours, with HF's defaults.

    Each maps onto one field of minilora.trainer.TrainConfig (TrainingArguments.to_train_config).
    logging_dir is accepted for the guide's sake: the log is always output_dir/log.jsonl.
    """
    output_dir: str
    num_train_epochs: float = 3.0
    max_steps: int = -1                      # > 0 overrides num_train_epochs
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    lr_scheduler_type: str = "cosine"        # or "constant"; transformers' default "linear" is not implemented
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0
    logging_dir: str | None = None
    logging_steps: int = 500
    save_steps: int = 500                    # output_dir/checkpoint-N (a loadable adapter) + the resume state
    save_total_limit: int | None = None      # keep the newest K checkpoint-N (and the best, with load_best_model_at_end)
    load_best_model_at_end: bool = False     # by validation loss: needs eval_steps, and save_steps a multiple of it
    metric_for_best_model: str | None = None  # only "loss" / "eval_loss" (the validation loss)
    eval_steps: int | None = None            # with an eval_dataset: evaluate every N steps (None: at the end)
    seed: int = 42
    bf16: bool = False
    fp16: bool = False
    use_cpu: bool = False

    def __post_init__(self):
        if self.lr_scheduler_type not in ("cosine", "constant"):
            raise MiniloraError(f"lr_scheduler_type {self.lr_scheduler_type!r} is not implemented; use 'cosine' "
                                f"(warm-up, then cosine decay to 0) or 'constant'")
        if self.bf16 and self.fp16:
            raise MiniloraError("bf16 and fp16 exclude each other; pick one")
        if self.metric_for_best_model not in (None, "loss", "eval_loss"):
            raise MiniloraError(f"metric_for_best_model {self.metric_for_best_model!r} is not implemented; minilora picks "
                                f"the best checkpoint by validation loss ('eval_loss')")

    def to_train_config(self, **fields):
        """The TrainConfig these arguments mean (+ fields the trainer knows: data, text_field, lora_*, ...)."""
        steps = dict(max_iters=self.max_steps) if self.max_steps > 0 else dict(epochs=self.num_train_epochs)
        return TrainConfig(
            out_dir=self.output_dir, batch_size=self.per_device_train_batch_size,
            grad_accum=self.gradient_accumulation_steps, learning_rate=self.learning_rate, min_lr=0.0,
            decay_lr=self.lr_scheduler_type == "cosine", warmup_iters=self.warmup_steps,
            weight_decay=self.weight_decay, beta1=self.adam_beta1, beta2=self.adam_beta2, grad_clip=self.max_grad_norm,
            log_interval=self.logging_steps, checkpoint_interval=self.save_steps, eval_interval=self.eval_steps or 0,
            save_steps=self.save_steps, save_total_limit=self.save_total_limit,
            load_best_model_at_end=self.load_best_model_at_end,
            seed=self.seed, dtype="bf16" if self.bf16 else "fp16" if self.fp16 else "fp32",
            device="cpu" if self.use_cpu else "auto", **steps, **fields)


class SFTTrainer:
    """TRL's SFTTrainer over minilora's loop (trainer.train): a model, a dataset, optionally a LoraConfig.

    model: a GPT, a PeftModel, or a model argument (hub name, directory, preset) loaded by
    minilora.loading. peft_config: applied with get_peft_model (no peft_config: full fine-tuning,
    unless the model already carries an adapter). train_dataset / eval_dataset: a data path
    (.txt, .jsonl, .json, .csv, as train.py reads) or a list of dicts, written to
    output_dir/train_dataset.jsonl. dataset_text_field: train on that field's whole text (the
    guide's "quote"); without it, records are prompt/completion pairs. max_seq_length: tokens per
    row (default: the model's context).
    """

    def __init__(self, model, args=None, train_dataset=None, eval_dataset=None, tokenizer=None, peft_config=None,
                 dataset_text_field=None, max_seq_length=None, packing=False, processing_class=None):
        if isinstance(model, str):
            model = load_model(model, trainable=True)[0]
        self.args = args if args is not None else TrainingArguments(output_dir="trainer_output")  # TRL's default
        if not isinstance(self.args, TrainingArguments):
            raise MiniloraError(f"args must be a minilora TrainingArguments, got {type(self.args).__name__}")
        if train_dataset is None:
            raise MiniloraError("SFTTrainer needs a train_dataset: a data file path or a list of dicts")
        if isinstance(model, PeftModel):
            if peft_config is not None:
                raise MiniloraError("the model is already a PeftModel; pass peft_config only with a plain model")
        elif peft_config is not None:
            model = get_peft_model(model, peft_config)
        elif getattr(model, "peft_config", None):
            model = PeftModel(model)
        self.model = model
        self.tokenizer = processing_class or tokenizer
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.dataset_text_field, self.max_seq_length, self.packing = dataset_text_field, max_seq_length, packing
        self.state = None  # trainer.TrainResult after train()

    @property
    def _gpt(self):
        return self.model.base_model if isinstance(self.model, PeftModel) else self.model

    def _data_path(self, data, name):
        if isinstance(data, (str, os.PathLike)):
            return os.fspath(data)
        if not (isinstance(data, (list, tuple)) and data and all(isinstance(r, dict) for r in data)):
            raise MiniloraError(f"{name} must be a data file path or a non-empty list of dicts, got {type(data).__name__}")
        path = os.path.join(self.args.output_dir, f"{name}.jsonl")
        os.makedirs(self.args.output_dir, exist_ok=True)
        with atomic_open(path, "w") as f:
            for record in data:
                f.write(json.dumps(record) + "\n")
        return path

    def _config(self):
        gpt = self._gpt
        lora = getattr(gpt, "peft_config", None)
        first = next(iter(lora.values())) if lora else None
        extra = dict(lora_r=first.r, lora_alpha=first.lora_alpha, target_modules=first.target_modules
                     if isinstance(first.target_modules, list) else [first.target_modules]) if first else dict(lora_r=0)
        return self.args.to_train_config(
            init_from=getattr(gpt, "name_or_path", None) or "scratch",
            data=self._data_path(self.train_dataset, "train_dataset"),
            val_data=None if self.eval_dataset is None else self._data_path(self.eval_dataset, "eval_dataset"),
            val_fraction=0.0, text_field=self.dataset_text_field, packing=self.packing,
            block_size=min(self.max_seq_length or gpt.config.block_size, gpt.config.block_size), eval_examples=0, **extra)

    def train(self, resume_from_checkpoint=None):
        """trainer.train over this model and data -> TrainResult (also kept as trainer.state).

        resume_from_checkpoint=True continues exactly from output_dir/checkpoint (train.py --resume).
        """
        cfg = dataclasses.replace(self._config(), resume=bool(resume_from_checkpoint))
        rt = setup_runtime(cfg)
        completed = False
        try:
            gpt = self._gpt
            gpt.to(device=rt.device, dtype=torch.float32)  # master weights fp32; bf16/fp16 is autocast's
            gpt.train()
            tokenizer = self.tokenizer or get_tokenizer(gpt.config.tokenizer)
            dataset = load_data(cfg, tokenizer, gpt.config.block_size, rt)
            base = getattr(gpt, "name_or_path", None)  # as save_model: checkpoint-N names its base only if it is known
            info = RunInfo("lora" if getattr(gpt, "peft_config", None) else "full", base, gpt.config.tokenizer) if base else None
            self.state = train(gpt, dataset, cfg, rt, eval_fn=task_eval_fn(dataset, tokenizer, 0, cfg.block_size), info=info)
            completed = True
        finally:
            cleanup(rt, completed=completed)
        gpt.eval()
        return self.state

    def save_model(self, output_dir=None):
        """The adapter (PEFT format) or, without LoRA, the whole model, in output_dir (default args.output_dir),
        with minilora.json naming the base when the model knows it (GPT.from_pretrained sets name_or_path)."""
        gpt = self._gpt
        out_dir = output_dir or self.args.output_dir
        lora = bool(getattr(gpt, "peft_config", None))
        base = getattr(gpt, "name_or_path", None)
        if base is None:  # a preset's random base cannot be found again: write the product alone
            if lora:
                save_adapter(gpt, out_dir)
            else:
                gpt.save_pretrained(out_dir)
            return
        cfg = dataclasses.replace(self._config(), out_dir=out_dir)
        save_output(gpt, cfg, RunInfo("lora" if lora else "full", base, gpt.config.tokenizer),
                    Runtime(), self.state)  # Runtime(): the master process, as after a run

