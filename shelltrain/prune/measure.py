"""What a model costs: parameters, sparsity, MACs, serialized size and CPU latency, measured the same way
before and after pruning so the report compares like with like."""

from __future__ import annotations

import copy
import io
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shelltrain.errors import UserError
from shelltrain.placement import is_quantized
from shelltrain.prune.quantize import quantized_bias, quantized_weight
from shelltrain.silence import quiet

LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class LatencySpec:
    batch: int = 32
    threads: int = 1
    repeats: int = 10
    warmup: int = 2


def cpu_copy(model: nn.Module) -> nn.Module:
    with quiet():
        return copy.deepcopy(model).cpu().eval()


def measure(model: nn.Module, input_shape: tuple[int, ...], macs_model: nn.Module | None = None) -> dict[str, Any]:
    """Parameters, sparsity (global and per layer), MACs and serialized size of a CPU `model`.

    `macs_model` counts MACs instead of `model` (a quantized model's float original: same operations).
    Latency is measured separately (`measure_latency`), for several models at once.
    """
    params = nonzero = 0
    for tensor in _parameter_tensors(model):
        params += tensor.numel()
        nonzero += int(torch.count_nonzero(tensor))
    layers, zeros, total = {}, 0, 0
    for name, weight in layer_weights(model):
        n_zero = weight.numel() - int(torch.count_nonzero(weight))
        layers[name] = {"shape": list(weight.shape), "sparsity": n_zero / weight.numel()}
        zeros, total = zeros + n_zero, total + weight.numel()
    return {
        "params": params,
        "nonzero_params": nonzero,
        "sparsity": zeros / total if total else 0.0,
        "macs": count_macs(macs_model if macs_model is not None else model, input_shape),
        "size_bytes": serialized_size(model),
        "layers": layers,
    }


@dataclass
class Latency:
    """One model's CPU forward time: the median of the interleaved repeats, and how far the repeats spread."""

    median_ms: float
    spread: float  # the repeats' interquartile range / median: 0.1 = the middle half lies within 10% of it


def latency_figures(
    models: list[nn.Module], input_shape: tuple[int, ...], spec: LatencySpec, channels_last: bool = False
) -> list[Latency]:
    """Each model's CPU forward time on one fixed random batch, with `spec.threads` threads: the median of
    `spec.repeats` timings and their spread. The models take turns within every repeat, so a busy machine slows
    them alike and the ratio holds; the spread says how busy it was."""
    models = [m.cpu().eval() for m in models]
    x = torch.randn((spec.batch, *input_shape), generator=torch.Generator().manual_seed(0))
    if channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
        models = [m if is_quantized(m) else m.to(memory_format=torch.channels_last) for m in models]
    threads = torch.get_num_threads()
    torch.set_num_threads(spec.threads)
    times: list[list[float]] = [[] for _ in models]
    try:
        with torch.inference_mode(), quiet():
            for i in range(spec.warmup + spec.repeats):
                for model, record in zip(models, times):
                    start = time.perf_counter()
                    model(x)
                    if i >= spec.warmup:
                        record.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return [_latency(t) for t in times]


def _latency(seconds: list[float]) -> Latency:
    median = statistics.median(seconds)
    low, _, high = statistics.quantiles(seconds, n=4, method="inclusive") if len(seconds) > 1 else seconds * 3
    return Latency(median * 1000, (high - low) / median if median else 0.0)


def measure_latency(
    models: list[nn.Module], input_shape: tuple[int, ...], spec: LatencySpec, channels_last: bool = False
) -> list[float]:
    """The median CPU forward time in ms of each model (`latency_figures` without the spread)."""
    return [f.median_ms for f in latency_figures(models, input_shape, spec, channels_last)]


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one image (Torch-Pruning's counter); 0 where it cannot count (quantized)."""
    tp = torch_pruning()
    example = torch.zeros((1, *input_shape), device=device_of(model))
    with torch.no_grad(), quiet():
        macs, _ = tp.utils.count_ops_and_params(model.eval(), example)
    return int(macs)


def serialized_size(model: nn.Module) -> int:
    """Bytes of the model's state_dict as `torch.save` writes it: the weights' share of a checkpoint."""
    buffer = io.BytesIO()
    with quiet():
        torch.save(model.state_dict(), buffer)
    return buffer.tell()


def layer_weights(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, weight) of every conv and linear layer, quantized ones dequantized; sparsity is measured on these."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, LAYER_TYPES):
            found.append((name, module.weight.detach()))
        else:
            weight = quantized_weight(module)
            if weight is not None:
                found.append((name, weight))
    return found


def sparsity(model: nn.Module) -> float:
    """Zeros / elements over all conv and linear weights."""
    weights = [w for _, w in layer_weights(model)]
    total = sum(w.numel() for w in weights)
    return sum(w.numel() - int(torch.count_nonzero(w)) for w in weights) / total if total else 0.0


def parameter_count(model: nn.Module) -> int:
    """Parameters of `model`, a quantized model's int8 weights and biases included: summary.json's `params`."""
    return sum(tensor.numel() for tensor in _parameter_tensors(model))


def _parameter_tensors(model: nn.Module) -> list[torch.Tensor]:
    tensors = [p.detach() for p in model.parameters()]
    for module in model.modules():
        for tensor in (quantized_weight(module), quantized_bias(module)):
            if tensor is not None:
                tensors.append(tensor)
    return tensors


def torch_pruning() -> Any:
    try:
        import torch_pruning
    except ImportError:  # pragma: no cover - a declared dependency
        raise UserError("prune=structured needs the torch-pruning package: pip install torch-pruning") from None
    return torch_pruning


def device_of(model: nn.Module) -> torch.device:
    tensor = next(model.parameters(), None)
    return tensor.device if tensor is not None else torch.device("cpu")
