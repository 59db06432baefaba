"""Checkpoint files loaded without running code: ``torch.load(..., weights_only=True)`` for bbm's own files and,
through a wrapper around DeepSpeed's checkpoint engine, for DeepSpeed's model and optimizer states.

weights_only unpickles tensors and plain data (dicts, lists, tuples, numbers, strings) and the classes that
``deepspeed_types()`` names: plain DeepSpeed records found in its ZeRO 0-3 files (an enum, the loss-scale
holder, a dataclass of two ints), rebuilt from their saved fields without calling any of their methods. Anything else
in a file (a pickled object whose ``__reduce__`` would run a command, say) fails the load with an error that
names the file and the refused name."""
import pickle
from pathlib import Path

import torch

from bbm._checks import fail


def deepspeed_types() -> list:
    """The DeepSpeed classes that its checkpoints of ZeRO stages 0-3 (fp32, bf16; a dynamic loss scale with fp16)
    hold besides plain data."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def load(path, map_location="cpu", allowed=()):
    """``torch.load`` of tensors and plain data (plus the classes in ``allowed``); any other content, a damaged
    file or a missing one is an error naming ``path``."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        fail(str(path), "a checkpoint file of tensors and plain data (loaded with weights_only=True)",
             _refused(str(e)), pickle.UnpicklingError)
    except FileNotFoundError:
        fail(str(path), "an existing checkpoint file", "no such file", FileNotFoundError)
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # truncated or overwritten
        fail(str(path), "a readable checkpoint file", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
             ValueError)


def _refused(message: str) -> str:
    """The line of torch's weights_only error that names the refused global (the rest is generic advice)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line]
    return (named or lines or ["an unloadable object"])[0]


class WeightsOnlyLoads:
    """Wraps a DeepSpeed checkpoint engine: saves and everything else as before, every load weights-only."""

    def __init__(self, inner):
        self.inner = inner

    def load(self, path: str, map_location=None):
        return load(path, map_location=map_location, allowed=deepspeed_types())

    def __getattr__(self, name):
        return getattr(self.inner, name)


def install(engine):
    """Makes ``engine`` (a DeepSpeed engine) load its checkpoint files with weights_only=True."""
    if not isinstance(engine.checkpoint_engine, WeightsOnlyLoads):
        engine.checkpoint_engine = WeightsOnlyLoads(engine.checkpoint_engine)
