import os

# Triton kernels run in the interpreter on CPU-only machines; set before any @triton.jit executes.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
