"""The pruning stage: shrink a trained model, fine-tune it, and report honestly what that bought.

One call, `prune_model`, runs after training. It takes the trained model, the data, the training
settings and a fine-tune function built from the engine, and returns the final model, a report
(`prune.json`, `summary.json["prune"]`, written by `report.write_report`) and the checkpoint entry that
`rebuild` turns back into the pruned architecture. Methods (`prune.name`), one module each:

- `threshold`, `magnitude`, `random` (`unstructured.py`): masks on conv and linear weights, made permanent.
- `structured` (`structured.py`): channels physically removed with Torch-Pruning.
- `layer` (`layer.py`): whole blocks (e.g. residual blocks) replaced by Identity, the least costly first.
- `quantize` (`ptq.py`): post-training int8 (static or dynamic) or k-bit weight rounding (`quantize.py`).

Schedules (`prune.schedule`): `oneshot`, `iterative` (`steps` rounds towards the target, each followed by
fine-tuning), `hierarchical` (layer groups one at a time, from the output end towards the input) and
`adaptive` (per-layer amounts from a sensitivity scan on the validation split, within `max_acc_drop`).

The report (`report.py`) measures the model before and after on the same footing (`measure.py`):
parameters, non-zero parameters, sparsity, MACs, serialized size, and CPU latency for a fixed batch and
thread count, plus validation and test accuracy before pruning, right after pruning and after fine-tuning.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from shelltrain.errors import UserError
from shelltrain.imagesize import size_hw
from shelltrain.models import set_submodule
from shelltrain.placement import is_quantized
from shelltrain.prune import layer, ptq, structured, unstructured
from shelltrain.prune import quantize as quantization
from shelltrain.prune.context import Context, Finetune, Outcome, chosen_names
from shelltrain.prune.measure import LatencySpec, cpu_copy, device_of, latency_figures, measure, torch_pruning
from shelltrain.prune.report import NOISY_SPREAD, build_report, describe
from shelltrain.schema import TrainerConfig
from shelltrain.schema_values import PRUNE_SCHEDULES

PRIOR_OPS = "_shelltrain_pruning_ops"  # set by `rebuild`: what a loaded model already went through

METHODS: dict[str, Callable[[Context, nn.Module], Outcome]] = {
    "threshold": unstructured.unstructured,
    "magnitude": unstructured.unstructured,
    "random": unstructured.unstructured,
    "structured": structured.structured,
    "layer": layer.layer,
    "quantize": ptq.quantize,
}
assert set(PRUNE_SCHEDULES) == set(METHODS)


@dataclass
class PruneResult:
    model: nn.Module  # the final model: masks permanent, on the training device (CPU when quantized)
    report: dict[str, Any]
    checkpoint: dict[str, Any]  # the checkpoint's "pruning" entry, read back by `rebuild`


def prune_model(
    cfg: DictConfig,
    model: nn.Module,
    data: Any,
    settings: TrainerConfig,
    finetune: Finetune,
    *,
    arch: str | None = None,
    test_limit: int | None = None,
    say: Callable[[str], None] = print,
) -> PruneResult:
    """Prune `model` (in place where the method allows) as `cfg` (the `prune` group) says; fine-tune; report."""
    started = time.perf_counter()
    if is_quantized(model):
        raise UserError("the model is already quantized; prune or quantize the float model instead")
    torch.manual_seed(settings.seed)  # random pruning and calibration order are reproducible
    ctx = Context(cfg, data, settings, finetune, arch, test_limit, say)
    ctx.chosen = chosen_names(model, cfg)
    latency = LatencySpec(batch=cfg.latency_batch, threads=cfg.latency_threads, repeats=cfg.latency_repeats)
    shape = tuple(ctx.example.shape[1:])
    model.eval()
    original = cpu_copy(model)  # kept for timing it side by side with the result
    before = measure(original, shape)
    ctx.acc_before = ctx.accuracy(model, test=True)
    say(
        f"prune: {cfg.name} ({cfg.schedule}) on a model with {before['params']:,} parameters, "
        f"val acc {ctx.acc_before['val']:.4f}"
    )

    outcome = METHODS[cfg.name](ctx, model)
    final = outcome.model.eval()
    result = cpu_copy(final)
    after = measure(result, shape, macs_model=outcome.macs_model)
    _time_side_by_side([original, result], shape, (before, after), latency, settings.channels_last, say)
    acc_after = ctx.accuracy(final, test=True)
    ops = [*getattr(model, PRIOR_OPS, []), *outcome.ops]
    setattr(final, PRIOR_OPS, ops)

    report = build_report(ctx, outcome, before, after, acc_after)
    report.update(
        latency_setup={**vars(latency), "input": list(shape), "device": "cpu", "channels_last": settings.channels_last},
        finetune_history=ctx.history,
        ops=ops,
        seconds=round(time.perf_counter() - started, 3),
    )
    say(describe(report))
    for note in outcome.notes:
        say(f"prune: {note}")
    return PruneResult(final, report, {"method": cfg.name, "ops": ops})


def _time_side_by_side(
    models: list[nn.Module],
    shape: tuple[int, ...],
    into: tuple[dict[str, Any], ...],
    spec: LatencySpec,
    channels_last: bool,
    say: Callable[[str], None],
) -> None:
    """`latency_ms` (median of interleaved repeats) and `latency_spread` of each model into its figures (`into`);
    a spread too large for the speed-up to mean much is said in one line."""
    figures = latency_figures(models, shape, spec, channels_last)
    for measured, latency in zip(into, figures):
        measured["latency_ms"], measured["latency_spread"] = latency.median_ms, latency.spread
    spread = max(f.spread for f in figures)
    if spread > NOISY_SPREAD:
        say(
            f"prune: warning: the CPU latency repeats spread by {spread:.0%} of their median (the machine was busy); "
            f"the speed-up is uncertain: raise prune.latency_repeats (now {spec.repeats}) or time on an idle machine"
        )


def preflight(cfg: DictConfig, model: nn.Module, example: torch.Tensor, arch: str | None = None) -> None:
    """Fail before training, not after it, when `cfg` cannot apply to `model`."""
    chosen_names(model, cfg)  # prune.modules / prune.exclude patterns that match nothing
    if cfg.name == "layer":
        layer.removable_or_error(model, example)
    elif cfg.name == "quantize":
        quantization.quantize_mode(cfg, arch)


def rebuild(model: nn.Module, checkpoint: dict[str, Any], example_inputs: torch.Tensor | None = None) -> nn.Module:
    """Turn a freshly built (unpruned) model into the architecture saved in `checkpoint`.

    Replays the checkpoint's `pruning` ops in order (removed blocks, Torch-Pruning histories, int8
    conversion), so that `model.load_state_dict(checkpoint["model"])` fits exactly. Returns the
    model to use (quantization returns a new module). `example_inputs` (one batch) is needed for
    structured pruning; by default it is built from the checkpoint's data config.
    """
    info = checkpoint.get("pruning") or {}
    ops = info.get("ops", [])
    for op in ops:
        kind = op["op"]
        if kind == "layer":
            for name in op["removed"]:
                set_submodule(model, name, nn.Identity())
        elif kind == "structured":
            tp = torch_pruning()
            example = example_inputs if example_inputs is not None else _example_from_config(model, checkpoint)
            model.eval()
            for segment in op["history"]:
                graph = tp.DependencyGraph().build_dependency(model, example.to(device_of(model)))
                graph.load_pruning_history(segment)
        elif kind == "quantize":
            model = quantization.rebuild(model, op)
        # "unstructured": the zeros are in the weights themselves; nothing to rebuild
    setattr(model, PRIOR_OPS, list(ops))
    return model


def _example_from_config(model: nn.Module, checkpoint: dict[str, Any]) -> torch.Tensor:
    config = checkpoint.get("config") or {}
    size = size_hw((config.get("data") or {}).get("image_size", 32))
    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    channels = first.in_channels if first is not None else 3
    return torch.zeros(1, channels, *size)
