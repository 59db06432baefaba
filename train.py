"""Pretrain a bbm decoder.

    deepspeed --num_gpus 8 train.py --config configs/gpt_350m_32k.yaml [key=value ...]
    python train.py --config configs/tiny_cpu.yaml optimizer.lr=1e-3      # one process (CPU or one GPU)
"""
import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file (see configs/)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optimizer.lr=1e-3")
    args = parser.parse_args(argv)
    from bbm.train import Trainer, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, TypeError, FileNotFoundError, NotImplementedError) as e:
        sys.exit(f"config error: {e}")
    Trainer(cfg, local_rank=args.local_rank).train()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()  # join gloo/NCCL threads before the interpreter exits


if __name__ == "__main__":
    main()
