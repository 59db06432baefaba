"""The mark of tests that run the compiled kernels: they need a CUDA GPU and Triton outside its interpreter,
which tests/conftest.py turns on unless TRITON_INTERPRET is set: on a GPU machine run them as
``TRITON_INTERPRET=0 pytest tests/kernels/test_gpu.py tests/kernels/test_ragged.py tests/train/test_model_gpu.py``."""
import os

import pytest
import torch

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                               reason="needs a CUDA GPU and TRITON_INTERPRET=0")
