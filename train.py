"""Pretrain a bbm decoder (``python train.py --help`` lists every key; ``bbm-train`` is the same command).

    python train.py --config tiny_cpu                                 # a preset: 2 CPU cores, about three minutes
    python train.py --config configs/tiny_cpu.yaml optimizer.lr=1e-3  # a YAML file, a key overridden
    deepspeed --num_gpus 8 train.py --config configs/gpt_350m_32k.yaml
"""
from bbm.train.cli import main

if __name__ == "__main__":
    main()
