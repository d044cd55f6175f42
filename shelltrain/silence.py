"""Third-party warnings a user never needs to see, silenced in one place and only inside the blocks that cause them.

`quiet()`: torch.ao.quantization's deprecation notices and the warnings quantized tensors raise when they are
created, copied, saved or loaded (torch.ao.quantization is deprecated, but on torch 2.x it is still the only path
to int8 convolutions on a CPU; prune/quantize.py says more). `quiet_torchscript()`: torch.jit's deprecation
notice, which it repeats on every call (the README says it once).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

QUANTIZATION_NOISE = (
    r"(?s).*torch\.ao\.quantization is deprecated",
    r"(?s).*Please use quant_min and quant_max to specify the range",
    r"(?s).*torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized tensor creation",
    r"(?s).*TypedStorage is deprecated",  # torch.load / deepcopy of quantized tensors
    r"(?s).*must run observer before calling calculate_qparams",  # converting an uncalibrated twin to load weights into
)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence torch.ao.quantization's deprecation warnings (and only those) inside the block."""
    with warnings.catch_warnings():
        for pattern in QUANTIZATION_NOISE:
            warnings.filterwarnings("ignore", message=pattern)
        yield


@contextlib.contextmanager
def quiet_torchscript() -> Iterator[None]:
    """torch.jit warns on every call that it is deprecated (README says so once)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        yield
