"""Test setup. tests/unit runs on the CPU (Triton kernels in the interpreter); tests/gpu needs a CUDA GPU with
Triton compiling for it: ``TRITON_INTERPRET=0 python -m pytest tests/gpu``. Shared helpers: the ``helpers``
package beside this file."""
import os
from pathlib import Path

import pytest

# Triton kernels run in the interpreter unless told otherwise; set before any @triton.jit executes.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

GPU_TESTS = Path(__file__).parent / "gpu"


def _gpu_ready() -> bool:
    import torch

    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


def pytest_collection_modifyitems(config, items):
    """Every test under tests/gpu is marked ``gpu`` and skipped unless a GPU runs compiled kernels."""
    ready = _gpu_ready()
    skip = pytest.mark.skip(reason="needs a CUDA GPU and TRITON_INTERPRET=0 (python -m pytest tests/gpu)")
    for item in items:
        if GPU_TESTS in Path(item.fspath).parents:
            item.add_marker(pytest.mark.gpu)
            if not ready:
                item.add_marker(skip)
