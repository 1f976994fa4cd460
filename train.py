"""Fine-tune the GPT with LoRA (or in full), or pretrain it from scratch.

    python train.py --init_from scratch --model tiny --lora_r 0 --data corpus.txt --out_dir out/base
    python train.py --init_from out/base --data sql_train.jsonl --lora_r 8 --out_dir out/sql
    python train.py --init_from gpt2 --data notes.txt --lora_r 8 --target_modules q_proj v_proj
    python train.py --out_dir out/sql ... --resume               # continue exactly where it stopped
    python train.py --dry_run --init_from gpt2 --lora_r 8        # parameter report, no data, no download
    torchrun --nproc_per_node 2 train.py ...                     # data parallel (gloo on CPU, nccl on CUDA)

Every option, with its default: `python train.py -h` (they are the fields of minilora.trainer.TrainConfig).
The output directory gets the adapter in PEFT format (adapter_config.json + adapter_model.safetensors)
or, with --lora_r 0, the model in its family's HF layout; minilora.json names the base and tokenizer;
log.jsonl holds every logged step; checkpoint/ is what --resume reads.
"""

from minilora.cli import main_guard, parse_args
from minilora.lora import print_trainable_parameters
from minilora.trainer import TrainConfig, dry_run, save_output, start_run, train


def main(argv=None):
    cfg = parse_args(TrainConfig, argv)
    if cfg.dry_run:
        print(dry_run(cfg))
        return

    with start_run(cfg) as run:  # runtime (device, dtype, DDP), model + LoRA, data; leaves DDP at the end
        model, info, rt = run.model, run.info, run.rt
        if rt.master:
            print(f"{info.kind} training on {rt.device} ({rt.world_size} process"
                  f"{'es' if rt.ddp else ''}), base {info.base_model}, tokenizer {info.tokenizer}")
            print_trainable_parameters(model)

        result = train(model, run.dataset, cfg, rt, eval_fn=run.eval_fn, info=info)

        save_output(model, cfg, info, rt, result)
        if rt.master:
            print(f"saved {'adapter' if info.kind == 'lora' else 'model'} to {cfg.out_dir}")


if __name__ == "__main__":
    main_guard(main)
