"""Argument checks that fail loudly: every error names the argument, what was expected and what was given.

torch is imported inside the tensor checks only: the config checks (``fail``, ``check_positive_int``) run before
train.py imports torch."""


def fail(arg: str, expected: str, given, kind=ValueError):
    raise kind(f"{arg}: expected {expected}, got {given}")


def cudnn_takes(q) -> bool:
    """Whether cuDNN's fused attention takes queries like ``q`` (B, H, N, D): CUDA with compute capability 8.0 or
    newer, fp16 or bf16, head dim a multiple of 8 up to 128."""
    import torch

    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[3] % 8 == 0 and q.shape[3] <= 128
            and torch.cuda.get_device_capability(q.device) >= (8, 0))


def check_tensor(arg: str, x, *, ndim=None, dtype_kind=None):
    """dtype_kind: 'bool', 'int' or 'float'."""
    import torch

    if not isinstance(x, torch.Tensor):
        fail(arg, "a torch.Tensor", type(x).__name__, TypeError)
    if ndim is not None and x.ndim != ndim:
        fail(arg, f"a {ndim}-d tensor", f"shape {tuple(x.shape)}")
    if dtype_kind == "bool" and x.dtype != torch.bool:
        fail(arg, "dtype torch.bool", x.dtype, TypeError)
    if dtype_kind == "int" and (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool):
        fail(arg, "an integer dtype", x.dtype, TypeError)
    if dtype_kind == "float" and not x.dtype.is_floating_point:
        fail(arg, "a floating-point dtype", x.dtype, TypeError)
    return x


def check_positive_int(arg: str, value, *, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        fail(arg, "a positive int" + (" or None" if allow_none else ""), repr(value))
    return value
