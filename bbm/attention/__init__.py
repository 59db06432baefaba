"""Attention under a bbm.Mask: ``dispatch`` validates and chooses, one module per path does the work
(``sdpa``, ``ragged``: cuDNN, ``triton``: bbm's block-sparse kernels, ``reference``: exact PyTorch)."""
from bbm.attention.dispatch import BACKENDS, attention, choose_backend, plan

__all__ = ["BACKENDS", "attention", "choose_backend", "plan"]
