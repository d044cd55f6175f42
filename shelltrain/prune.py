"""The pruning stage: shrink a trained model, fine-tune it, and report honestly what that bought.

One call, `prune_model`, runs after training. It takes the trained model, the data, the training
settings and a fine-tune function built from the engine, and returns the final model, a report
(`prune.json`, `summary.json["prune"]`) and the checkpoint entry that `rebuild` turns back into the
pruned architecture. Methods (`prune.name`):

- `threshold`, `magnitude`, `random`: unstructured masks on conv and linear weights
  (`torch.nn.utils.prune`); masks stay applied while fine-tuning and are made permanent at the end,
  so the saved weights are plain dense tensors with zeros.
- `structured`: channels physically removed with Torch-Pruning, every dependent layer kept consistent.
- `layer`: whole blocks (e.g. residual blocks) replaced by Identity, the least costly first.
- `quantize`: post-training int8 (static or dynamic) or k-bit weight rounding, see `shelltrain.quantize`.

Schedules (`prune.schedule`): `oneshot`, `iterative` (`steps` rounds towards the target, each followed by
fine-tuning), `hierarchical` (layer groups one at a time, from the output end towards the input) and
`adaptive` (per-layer amounts from a sensitivity scan on the validation split, within `max_acc_drop`).

The report measures the model before and after on the same footing: parameters, non-zero parameters,
sparsity of conv/linear weights (global and per layer), MACs, serialized size, and CPU latency for a
fixed batch and thread count (median of repeats), plus validation and test accuracy before pruning,
right after pruning and after fine-tuning.
"""

from __future__ import annotations

import copy
import io
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from itertools import islice
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.utils import prune as torch_prune

from shelltrain import quantize
from shelltrain.engine import Callback, TrainState, criterion, evaluate, monitor_mode
from shelltrain.errors import UserError
from shelltrain.models import count_parameters, find_classifier, set_submodule
from shelltrain.schema import PRUNE_SCHEDULES, TrainerConfig

# finetune(model, epochs, callbacks, label) trains `model` in place with a fresh optimizer and schedule.
Finetune = Callable[[nn.Module, int, list[Callback], str], TrainState]

LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
ADAPTIVE_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
GLOBAL_MAX_RATIO = 0.9  # structured pruning never removes more than this share of a layer's channels
PRIOR_OPS = "_shelltrain_pruning_ops"  # set by `rebuild`: what a loaded model already went through

NOTES = {
    "unstructured": "unstructured sparsity: zeros inside dense tensors; size, MACs and latency stay as they were "
    "(they pay off only with sparse storage or sparse kernels)",
    "structured": "channels physically removed: smaller tensors, fewer MACs, real CPU speed-up",
    "layer": "whole blocks replaced by Identity: fewer layers, fewer MACs, real speed-up",
    "static": "static int8 (weights and activations), fused conv-bn-relu; runs on the CPU only",
    "dynamic": "dynamic int8 for Linear layers only (activations quantized per batch); convolutions stay float; "
    "runs on the CPU only",
    "fake": "weights rounded to {bits} bits but stored as float32: shows the accuracy cost of k-bit weights, "
    "no size or speed change",
}


@dataclass
class PruneResult:
    model: nn.Module  # the final model: masks permanent, on the training device (CPU when quantized)
    report: dict[str, Any]
    checkpoint: dict[str, Any]  # the checkpoint's "pruning" entry, read back by `rebuild`


@dataclass
class LatencySpec:
    batch: int = 32
    threads: int = 1
    repeats: int = 10
    warmup: int = 2


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
    if quantize.is_quantized(model):
        raise UserError("the model is already quantized; prune or quantize the float model instead")
    torch.manual_seed(settings.seed)  # random pruning and calibration order are reproducible
    ctx = _Context(cfg, data, settings, finetune, arch, test_limit, say)
    latency = LatencySpec(**{k: cfg[f"latency_{k}"] for k in ("batch", "threads", "repeats") if f"latency_{k}" in cfg})
    shape = tuple(ctx.example.shape[1:])
    model.eval()
    original = cpu_copy(model)  # kept for timing it side by side with the result
    before = measure(original, shape)
    ctx.acc_before = ctx.accuracy(model, test=True)
    schedule = cfg.get("schedule", "oneshot")
    say(
        f"prune: {cfg.name} ({schedule}) on a model with {before['params']:,} parameters, "
        f"val acc {ctx.acc_before['val']:.4f}"
    )

    method = _METHODS[cfg.name]
    outcome = method(ctx, model)
    final = outcome.model.eval()
    result = cpu_copy(final)
    after = measure(result, shape, macs_model=outcome.macs_model)
    latencies = measure_latency([original, result], shape, latency, settings.channels_last)
    before["latency_ms"], after["latency_ms"] = latencies
    acc_after = ctx.accuracy(final, test=True)
    ops = [*getattr(model, PRIOR_OPS, []), *outcome.ops]
    setattr(final, PRIOR_OPS, ops)

    layers = _layer_table(before.pop("layers"), after.pop("layers"))
    report: dict[str, Any] = {
        "method": cfg.name,
        "schedule": schedule,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "before": before,
        "after": after,
        "change": _change(before, after, ctx.acc_before, acc_after),
        "accuracy": {"before": ctx.acc_before, "pruned": ctx.acc_pruned or acc_after, "finetuned": acc_after},
        "rounds": ctx.rounds,
        "details": outcome.details,
        "layers": layers,
        "notes": outcome.notes,
        "latency_setup": {
            **vars(latency),
            "input": list(shape),
            "device": "cpu",
            "channels_last": settings.channels_last,
        },
        "finetune_history": ctx.history,
        "ops": ops,
        "seconds": round(time.perf_counter() - started, 3),
    }
    say(describe(report))
    for note in outcome.notes:
        say(f"prune: {note}")
    return PruneResult(final, report, {"method": cfg.name, "ops": ops})


def preflight(cfg: DictConfig, model: nn.Module, example: torch.Tensor, arch: str | None = None) -> None:
    """Fail before training, not after it, when `cfg` cannot apply to `model`."""
    if cfg.name == "layer":
        _removable_or_error(model, example)
    elif cfg.name == "quantize":
        _quantize_mode(cfg, arch)


def eval_settings(model: nn.Module, settings: TrainerConfig) -> TrainerConfig:
    """Where `model` can be evaluated: quantized kernels run on the CPU only, in float32 around them."""
    if quantize.is_quantized(model):
        return replace(settings, device=torch.device("cpu"), precision="32")
    return settings


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
            tp = _torch_pruning()
            example = example_inputs if example_inputs is not None else _example_from_config(model, checkpoint)
            model.eval()
            for segment in op["history"]:
                graph = tp.DependencyGraph().build_dependency(model, example.to(_device_of(model)))
                graph.load_pruning_history(segment)
        elif kind == "quantize":
            model = quantize.rebuild(model, op)
        # "unstructured": the zeros are in the weights themselves; nothing to rebuild
    setattr(model, PRIOR_OPS, list(ops))
    return model


# ----------------------------------------------------------------------------------------------
# Measuring


def cpu_copy(model: nn.Module) -> nn.Module:
    with quantize.quiet():
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


def measure_latency(
    models: list[nn.Module], input_shape: tuple[int, ...], spec: LatencySpec, channels_last: bool = False
) -> list[float]:
    """Median CPU forward time in ms of each model on one fixed random batch, with `spec.threads` threads.

    The models take turns within every repeat, so a busy machine slows them alike and the ratio holds.
    """
    models = [m.cpu().eval() for m in models]
    x = torch.randn((spec.batch, *input_shape), generator=torch.Generator().manual_seed(0))
    if channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
        models = [m if quantize.is_quantized(m) else m.to(memory_format=torch.channels_last) for m in models]
    threads = torch.get_num_threads()
    torch.set_num_threads(spec.threads)
    times: list[list[float]] = [[] for _ in models]
    try:
        with torch.inference_mode(), quantize.quiet():
            for i in range(spec.warmup + spec.repeats):
                for model, record in zip(models, times):
                    start = time.perf_counter()
                    model(x)
                    if i >= spec.warmup:
                        record.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return [statistics.median(t) * 1000 for t in times]


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one image (Torch-Pruning's counter); 0 where it cannot count (quantized)."""
    tp = _torch_pruning()
    example = torch.zeros((1, *input_shape), device=_device_of(model))
    with torch.no_grad(), quantize.quiet():
        macs, _ = tp.utils.count_ops_and_params(model.eval(), example)
    return int(macs)


def serialized_size(model: nn.Module) -> int:
    """Bytes of the model's state_dict as `torch.save` writes it: the weights' share of a checkpoint."""
    buffer = io.BytesIO()
    with quantize.quiet():
        torch.save(model.state_dict(), buffer)
    return buffer.tell()


def layer_weights(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, weight) of every conv and linear layer, quantized ones dequantized; sparsity is measured on these."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, LAYER_TYPES):
            found.append((name, module.weight.detach()))
        else:
            weight = quantize.quantized_weight(module)
            if weight is not None:
                found.append((name, weight))
    return found


def sparsity(model: nn.Module) -> float:
    """Zeros / elements over all conv and linear weights."""
    weights = [w for _, w in layer_weights(model)]
    total = sum(w.numel() for w in weights)
    return sum(w.numel() - int(torch.count_nonzero(w)) for w in weights) / total if total else 0.0


def describe(report: dict[str, Any]) -> str:
    """One line: what pruning did to parameters, MACs, size, latency and accuracy."""
    b, a, c, acc = report["before"], report["after"], report["change"], report["accuracy"]
    return (
        f"prune: {report['method']} ({report['schedule']}): params {_si(b['params'])} -> {_si(a['params'])} "
        f"({c['params']:.2f}x), sparsity {a['sparsity']:.3f}, MACs {_si(b['macs'])} -> {_si(a['macs'])}, "
        f"size {b['size_bytes'] / 1e6:.2f} -> {a['size_bytes'] / 1e6:.2f} MB ({c['size']:.2f}x), "
        f"CPU latency {b['latency_ms']:.1f} -> {a['latency_ms']:.1f} ms (speed-up {c['speedup']:.2f}x), "
        f"val acc {acc['before']['val']:.4f} -> {acc['pruned']['val']:.4f} (pruned) -> "
        f"{acc['finetuned']['val']:.4f} (fine-tuned), test acc {acc['before']['test']:.4f} -> "
        f"{acc['finetuned']['test']:.4f}"
    )


def summary_keys(report: dict[str, Any]) -> dict[str, Any]:
    """The flat `summary.json` keys of a prune report (the nested report goes under "prune")."""
    a, c, acc = report["after"], report["change"], report["accuracy"]
    return {
        "prune_method": report["method"],
        "prune_params": a["params"],
        "prune_sparsity": a["sparsity"],
        "prune_macs": a["macs"],
        "prune_size_ratio": c["size"],
        "prune_speedup": c["speedup"],
        "prune_latency_ms": a["latency_ms"],
        "prune_test_acc_before": acc["before"]["test"],
        "prune_test_acc_pruned": acc["pruned"]["test"],
    }


def _parameter_tensors(model: nn.Module) -> list[torch.Tensor]:
    tensors = [p.detach() for p in model.parameters()]
    for module in model.modules():
        for tensor in (quantize.quantized_weight(module), quantize.quantized_bias(module)):
            if tensor is not None:
                tensors.append(tensor)
    return tensors


def _change(before: dict, after: dict, acc_before: dict, acc_after: dict) -> dict[str, float]:
    def ratio(key: str) -> float:
        return after[key] / before[key] if before[key] else math.nan

    return {
        "params": ratio("params"),
        "nonzero_params": ratio("nonzero_params"),
        "macs": ratio("macs"),
        "size": ratio("size_bytes"),
        "speedup": before["latency_ms"] / after["latency_ms"] if after["latency_ms"] else math.nan,
        "val_acc": acc_after["val"] - acc_before["val"],
        "test_acc": acc_after["test"] - acc_before["test"],
    }


def _layer_table(before: dict[str, dict], after: dict[str, dict]) -> list[dict[str, Any]]:
    rows = []
    for name, b in before.items():
        a = after.get(name)
        rows.append(
            {
                "name": name,
                "shape_before": b["shape"],
                "shape_after": a["shape"] if a else None,  # None: the layer was removed
                "sparsity": a["sparsity"] if a else 1.0,
            }
        )
    return rows


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


# ----------------------------------------------------------------------------------------------
# What every method shares: evaluation, fine-tuning rounds and their records


@dataclass
class _Outcome:
    model: nn.Module
    ops: list[dict[str, Any]]
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    macs_model: nn.Module | None = None


class _Context:
    def __init__(self, cfg, data, settings, finetune, arch, test_limit, say):
        self.cfg, self.data, self.settings = cfg, data, settings
        self.finetune_fn, self.arch, self.test_limit, self.say = finetune, arch, test_limit, say
        self.example = next(iter(data.val))[0][:1].to(settings.device)
        self.rounds: list[dict[str, Any]] = []
        self.history: list[dict[str, Any]] = []
        self.acc_before: dict[str, float] = {}
        self.acc_pruned: dict[str, float] | None = None

    def evaluate(self, model: nn.Module, split: str = "val") -> dict[str, float]:
        settings = eval_settings(model, self.settings)
        loader = self.data.val if split == "val" else self.data.test
        limit = settings.limit_val_batches if split == "val" else self.test_limit
        with quantize.quiet():
            return evaluate(model, loader, settings, limit=limit)

    def val_acc(self, model: nn.Module) -> float:
        return self.evaluate(model)["acc"]

    def accuracy(self, model: nn.Module, test: bool = False) -> dict[str, float]:
        acc = {"val": self.val_acc(model)}
        if test:
            acc["test"] = self.evaluate(model, "test")["acc"]
        return acc

    def round(self, model: nn.Module, label: str, final: bool, **info: Any) -> None:
        """After one pruning step: measure, fine-tune `prune.finetune_epochs` epochs, keep the best epoch."""
        val = self.evaluate(model)
        if final:
            self.acc_pruned = {"val": val["acc"], "test": self.evaluate(model, "test")["acc"]}
        record = {"round": label, **info, "sparsity": sparsity(model), "val_acc_pruned": val["acc"]}
        epochs = self.cfg.get("finetune_epochs", 0)
        if epochs > 0:
            keep = _KeepBest(model, self.settings.monitor, val)
            state = self.finetune_fn(model, epochs, [keep], f"fine-tune {label}")
            model.load_state_dict(keep.state)
            model.eval()
            self.history += [{"round": label, **row} for row in state.history]
            record.update(val_acc_finetuned=self.val_acc(model), finetune_best_epoch=keep.epoch)
        self.rounds.append(record)
        self.say(
            f"prune: {label}: sparsity {record['sparsity']:.3f}, val acc {val['acc']:.4f} after pruning"
            + (f", {record['val_acc_finetuned']:.4f} after fine-tuning" if epochs > 0 else "")
        )


class _KeepBest(Callback):
    """Keeps the best fine-tuning epoch's weights; the pruned model before fine-tuning is epoch 0."""

    def __init__(self, model: nn.Module, monitor: str, start: dict[str, float]):
        self.model, self.key, self.mode = model, monitor, monitor_mode(monitor)
        self.best = start["acc" if monitor == "val_acc" else "loss"]
        self.state, self.epoch = _clone_state(model), 0

    def on_epoch_end(self, state: TrainState, row: dict[str, float], improved: bool) -> None:
        value = row[self.key]
        if value > self.best if self.mode == "max" else value < self.best:
            self.best, self.state, self.epoch = value, _clone_state(self.model), int(row["epoch"])


def _clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _ramp(final: float, steps: int, kind: str) -> list[float]:
    """Cumulative targets of `steps` rounds: linear, or cubic (fast at first, gentle at the end)."""
    fractions = [k / steps for k in range(1, steps + 1)]
    if kind == "cubic":
        return [final * (1 - (1 - f) ** 3) for f in fractions]
    return [final * f for f in fractions]


def _prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LAYER_TYPES)]


def _layer_groups(model: nn.Module) -> list[tuple[str, list[str]]]:
    """Conv/linear layers grouped by the top-level module holding them (one level deeper when that gives
    fewer than three groups), in definition order: input side first."""
    names = [name for name, _ in _prunable_layers(model)]
    for depth in (1, 2):
        groups: dict[str, list[str]] = {}
        for name in names:
            groups.setdefault(".".join(name.split(".")[:depth]), []).append(name)
        if len(groups) >= 3:
            break
    return list(groups.items())


# ----------------------------------------------------------------------------------------------
# Unstructured: threshold, magnitude, random


def _unstructured(ctx: _Context, model: nn.Module) -> _Outcome:
    cfg, schedule = ctx.cfg, ctx.cfg.get("schedule", "oneshot")
    layers = _prunable_layers(model)
    details: dict[str, Any] = {}
    if schedule == "oneshot":
        _mask(ctx, layers, _target(cfg))
        ctx.round(model, "oneshot", final=True, target=_target(cfg))
    elif schedule == "iterative":
        targets = _ramp(_target(cfg), cfg.steps, cfg.get("ramp", "linear"))
        for k, target in enumerate(targets, 1):
            _mask(ctx, layers, target)
            ctx.round(model, f"round {k}/{len(targets)}", final=k == len(targets), target=target)
    elif schedule == "hierarchical":
        order = list(reversed(_layer_groups(model)))
        details["groups"] = [{"group": g, "layers": names} for g, names in order]
        by_name = dict(layers)
        for k, (group, names) in enumerate(order, 1):
            _mask(ctx, [(n, by_name[n]) for n in names], _target(cfg))
            ctx.round(model, f"group {group} ({k}/{len(order)})", final=k == len(order), target=_target(cfg))
    else:  # adaptive
        amounts, details = _adaptive_amounts(ctx, model, layers)
        for name, module in layers:
            _mask(ctx, [(name, module)], amounts[name], local=True)
        ctx.round(model, "adaptive", final=True)
    for _, module in layers:
        if torch_prune.is_pruned(module):
            torch_prune.remove(module, "weight")  # permanent: plain weights with zeros, no hooks
    op = {"op": "unstructured", "method": cfg.name}
    return _Outcome(model, [op], details, [NOTES["unstructured"]])


def _target(cfg: DictConfig) -> float:
    return cfg.threshold if cfg.name == "threshold" else cfg.amount


def _mask(ctx: _Context, layers: list[tuple[str, nn.Module]], target: float, local: bool | None = None) -> None:
    """Add masks so that `layers` reach `target` (a sparsity, or the magnitude threshold for `threshold`)."""
    method = ctx.cfg.name
    if method == "threshold":
        for _, module in layers:
            torch_prune.custom_from_mask(module, "weight", module.weight.detach().abs() >= target)
        return
    for _, module in layers:  # torch's pruning views weights and masks as flat vectors: no channels_last
        module.to(memory_format=torch.contiguous_format)
    local = not ctx.cfg.get("global", True) if local is None else local
    pruning = torch_prune.RandomUnstructured if method == "random" else torch_prune.L1Unstructured
    if local:
        for _, module in layers:
            count = _at_least_share(target, module.weight.numel()) - _masked(module)
            if count > 0:
                pruning.apply(module, "weight", amount=count)
        return
    total = sum(m.weight.numel() for _, m in layers)
    count = _at_least_share(target, total) - sum(_masked(m) for _, m in layers)
    if count > 0:
        torch_prune.global_unstructured(
            [(m, "weight") for _, m in layers],
            pruning_method=pruning,
            amount=count,
            importance_scores={(m, "weight"): m.weight.detach().contiguous() for _, m in layers},
        )


def _at_least_share(share: float, total: int) -> int:
    """The fewest elements that make up at least `share` of `total` (so 0.9 sparsity is never 0.8999)."""
    return math.ceil(round(share * total, 6))


def _masked(module: nn.Module) -> int:
    mask = getattr(module, "weight_mask", None)
    return 0 if mask is None else int((mask == 0).sum())


def _adaptive_amounts(
    ctx: _Context, model: nn.Module, layers: list[tuple[str, nn.Module]]
) -> tuple[dict[str, float], dict[str, Any]]:
    """Per-layer sparsity: the largest grid amount (up to `prune.amount`) whose pruning of that layer alone
    keeps the validation drop within `max_acc_drop`; then all together, stepping down until they fit too."""
    grid = [a for a in ADAPTIVE_GRID if a <= ctx.cfg.amount + 1e-9]
    random = ctx.cfg.name == "random"

    def zero(module: nn.Module, amount: float) -> None:
        w = module.weight.data
        k = round(amount * w.numel())
        order = torch.randperm(w.numel(), device=w.device) if random else w.abs().flatten().argsort()
        keep = torch.ones(w.numel(), dtype=w.dtype, device=w.device)
        keep[order[:k]] = 0
        w.mul_(keep.view(w.shape))

    def trial(amounts: dict[str, float]) -> float:
        for name, module in layers:
            if amounts.get(name):
                zero(module, amounts[name])
        return ctx.val_acc(model)

    return _sensitivity_search(ctx, model, [name for name, _ in layers], grid, trial)


def _sensitivity_search(
    ctx: _Context,
    model: nn.Module,
    units: list[str],
    grid: list[float],
    trial: Callable[[dict[str, float]], float],
) -> tuple[dict[str, float], dict[str, Any]]:
    """Shared by unstructured and structured `adaptive`: scan each unit alone, choose, then check jointly."""
    budget = ctx.cfg.max_acc_drop
    base = ctx.acc_before["val"]
    saved = _clone_state(model)
    scan: dict[str, dict[str, float]] = {}
    chosen: dict[str, float] = {}
    with torch.no_grad():
        for unit in units:
            scan[unit] = {}
            chosen[unit] = 0.0
            for amount in grid:
                acc = trial({unit: amount})
                model.load_state_dict(saved)
                scan[unit][f"{amount:g}"] = base - acc
                if base - acc <= budget:
                    chosen[unit] = amount
        backoffs = []
        while True:
            joint = base - trial(chosen)
            model.load_state_dict(saved)
            backoffs.append({"amounts": dict(chosen), "val_drop": joint})
            if joint <= budget or not any(chosen.values()):
                break
            chosen = {u: max([a for a in grid if a < chosen[u]], default=0.0) for u in units}
    ctx.say(
        f"prune: adaptive: {sum(1 for a in chosen.values() if a)} of {len(units)} layers pruned, "
        f"joint val drop before fine-tuning {joint:.4f} (budget {budget:g})"
    )
    details = {
        "budget": budget,
        "grid": grid,
        "sensitivity": scan,  # unit -> amount -> validation accuracy drop with only that unit pruned
        "amounts": chosen,
        "joint_checks": backoffs,
        "why": "each layer gets the largest amount whose pruning alone keeps the validation drop within "
        "max_acc_drop; all amounts step down together until the joint drop fits too",
    }
    return chosen, details


# ----------------------------------------------------------------------------------------------
# Structured: Torch-Pruning


def _torch_pruning() -> Any:
    try:
        import torch_pruning
    except ImportError:  # pragma: no cover - a declared dependency
        raise UserError("prune=structured needs the torch-pruning package: pip install torch-pruning") from None
    return torch_pruning


def _importance(name: str) -> Any:
    imp = _torch_pruning().importance
    return {
        "l1": lambda: imp.GroupMagnitudeImportance(p=1),
        "l2": lambda: imp.GroupMagnitudeImportance(p=2),
        "taylor": imp.GroupTaylorImportance,
        "bn_scale": imp.BNScaleImportance,
        "fpgm": imp.FPGMImportance,
        "random": imp.RandomImportance,
    }[name]()


def _structured(ctx: _Context, model: nn.Module) -> _Outcome:
    tp = _torch_pruning()
    cfg, schedule = ctx.cfg, ctx.cfg.get("schedule", "oneshot")
    classifier = find_classifier(model)[1]
    widths_before = _widths(model)
    segments: list[list] = []
    details: dict[str, Any] = {"importance": cfg.importance, "global": cfg.get("global", False)}

    def pruner(ignored: list[nn.Module], steps: int = 1, **kwargs: Any) -> Any:
        model.eval()  # tracing in train mode breaks BatchNorm on a one-image batch
        return tp.pruner.MetaPruner(
            model,
            ctx.example,
            importance=_importance(cfg.importance),
            pruning_ratio=cfg.ratio,
            global_pruning=cfg.get("global", False),
            max_pruning_ratio=GLOBAL_MAX_RATIO,
            iterative_steps=steps,
            ignored_layers=ignored,
            **kwargs,
        )

    def step(p: Any) -> None:
        if cfg.importance == "taylor":
            _gradients(ctx, model)
        p.step()
        model.zero_grad(set_to_none=True)

    if schedule in ("oneshot", "iterative"):
        steps = cfg.steps if schedule == "iterative" else 1
        ramp = cfg.get("ramp", "linear")
        p = pruner([classifier], steps, iterative_pruning_ratio_scheduler=lambda r, s: [0.0, *_ramp(r, s, ramp)])
        for k in range(1, steps + 1):
            step(p)
            label = "oneshot" if steps == 1 else f"round {k}/{steps}"
            ctx.round(model, label, final=k == steps, params=count_parameters(model))
        segments.append(p.pruning_history())
    elif schedule == "hierarchical":
        order = [(g, names) for g, names in reversed(_layer_groups(model))]
        modules = dict(model.named_modules())
        order = [(g, [n for n in names if modules[n] is not classifier]) for g, names in order]
        order = [(g, names) for g, names in order if names]
        details["groups"] = [{"group": g, "layers": names} for g, names in order]
        for k, (group, names) in enumerate(order, 1):
            inside = {id(modules[n]) for n in names}
            ignored = [classifier] + [m for _, m in _prunable_layers(model) if id(m) not in inside]
            p = pruner(ignored)
            step(p)
            segments.append(p.pruning_history())
            label = f"group {group} ({k}/{len(order)})"
            ctx.round(model, label, final=k == len(order), params=count_parameters(model))
    else:  # adaptive
        segment, adaptive = _structured_adaptive(ctx, model, classifier)
        segments.append(segment)
        details.update(adaptive)
        ctx.round(model, "adaptive", final=True, params=count_parameters(model))

    widths = _widths(model)
    details["widths"] = {name: [widths_before[name], widths.get(name)] for name in widths_before}
    ctx.say("prune: widths (out channels): " + ", ".join(f"{n} {b}->{a}" for n, (b, a) in details["widths"].items()))
    op = {"op": "structured", "history": segments}
    return _Outcome(model, [op], details, [NOTES["structured"]])


def _structured_adaptive(ctx: _Context, model: nn.Module, classifier: nn.Module) -> tuple[list, dict[str, Any]]:
    """Per channel group: the largest ratio (up to `prune.ratio`) whose removal alone keeps the validation
    drop within `max_acc_drop`. Trials zero the group's channels (the same outputs as removing them);
    the chosen channels are then removed for real, once."""
    tp = _torch_pruning()
    model.eval()
    graph = tp.DependencyGraph().build_dependency(model, ctx.example)
    root_types = [nn.modules.conv._ConvNd, nn.Linear]
    if ctx.cfg.importance == "taylor":
        _gradients(ctx, model)
    importance = _importance(ctx.cfg.importance)
    names = {m: n for n, m in model.named_modules()}
    plans: dict[str, tuple[Any, list[int]]] = {}
    for group in graph.get_all_groups(ignored_layers=[classifier], root_module_types=root_types):
        scores = importance(group)
        if scores is not None:
            plans[names[group[0][0].target.module]] = (group, scores.argsort().tolist())
    model.zero_grad(set_to_none=True)

    def count(unit: str, ratio: float) -> int:
        return min(int(len(plans[unit][1]) * ratio), len(plans[unit][1]) - 1)

    def trial(ratios: dict[str, float]) -> float:
        for unit, ratio in ratios.items():
            group, order = plans[unit]
            if ratio:
                _zero_channels(graph, group, order[: count(unit, ratio)])
        return ctx.val_acc(model)

    grid = [r for r in ADAPTIVE_GRID if r <= ctx.cfg.ratio + 1e-9]
    ratios, details = _sensitivity_search(ctx, model, list(plans), grid, trial)
    for unit, ratio in ratios.items():
        group, order = plans[unit]
        if count(unit, ratio) > 0:  # (Group.prune(idxs=...) would also record the full group in the history)
            root, handler = group[0][0].target.module, group[0][0].handler
            graph.get_pruning_group(root, handler, order[: count(unit, ratio)]).prune()
    return graph.pruning_history(), details


@torch.no_grad()
def _zero_channels(graph: Any, group: Any, idxs: list[int]) -> None:
    """Zero what removing `idxs` of the group's root would remove: every coupled layer's output channels."""
    tp = _torch_pruning()
    root = group[0][0].target.module
    sub = graph.get_pruning_group(root, group[0][0].handler, idxs)
    for dep, dep_idxs in sub:
        module = dep.target.module
        if isinstance(module, nn.Module) and graph.is_out_channel_pruning_fn(dep.handler):
            plain = tp._helpers.to_plain_idxs(dep_idxs)
            for param in module.parameters(recurse=False):
                param[plain] = 0


def _gradients(ctx: _Context, model: nn.Module, batches: int = 4) -> None:
    """Accumulate loss gradients over a few training batches (Taylor importance reads them)."""
    model.zero_grad(set_to_none=True)
    model.eval()  # fixed BatchNorm statistics: importance of the model as it is
    for images, targets in islice(ctx.data.train, batches):
        images, targets = images.to(ctx.settings.device), targets.to(ctx.settings.device)
        criterion(model(images), targets, ctx.settings).backward()


def _widths(model: nn.Module) -> dict[str, int]:
    return {
        name: m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features
        for name, m in _prunable_layers(model)
    }


# ----------------------------------------------------------------------------------------------
# Layer (block) pruning


def removable_blocks(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Blocks that can be replaced by Identity: non-leaf children of Sequential containers with parameters
    whose output has the input's shape (residual blocks without downsampling, for ResNets)."""
    shapes: dict[str, tuple] = {}
    hooks = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        for child_name, child in parent.named_children():
            if next(child.children(), None) is None or next(child.parameters(), None) is None:
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name

            def hook(module, inputs, output, name=name):
                if isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor):
                    shapes[name] = (tuple(inputs[0].shape), tuple(output.shape))

            hooks.append(child.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    return [name for name, (i, o) in shapes.items() if i == o]


def _removable_or_error(model: nn.Module, example: torch.Tensor) -> list[str]:
    candidates = removable_blocks(model, example)
    if not candidates:
        raise UserError(
            f"prune=layer found no removable block in {type(model).__name__}: it needs blocks whose output has "
            "the input's shape (e.g. residual blocks of model=resnet18); try prune=structured"
        )
    return candidates


def _layer(ctx: _Context, model: nn.Module) -> _Outcome:
    cfg, schedule = ctx.cfg, ctx.cfg.get("schedule", "oneshot")
    candidates = _removable_or_error(model, ctx.example)
    modules = dict(model.named_modules())
    removed: list[str] = []
    choices: list[dict[str, Any]] = []

    def choose() -> dict[str, Any]:
        """Remove the remaining block whose removal costs the least validation accuracy."""
        costs = {}
        for name in candidates:
            if name in removed:
                continue
            set_submodule(model, name, nn.Identity())
            costs[name] = ctx.acc_before["val"] - ctx.val_acc(model)
            set_submodule(model, name, modules[name])
        best = min(costs, key=costs.get)
        set_submodule(model, best, nn.Identity())
        removed.append(best)
        choice = {"block": best, "val_drop": costs[best], "candidates": costs}
        choices.append(choice)
        ctx.say(f"prune: removed block {best} (val drop without it {costs[best]:.4f}; candidates {len(costs)})")
        return choice

    blocks = min(cfg.blocks, len(candidates))
    if schedule == "oneshot":
        for _ in range(blocks):
            choose()
        ctx.round(model, "oneshot", final=True, removed=list(removed))
    elif schedule == "iterative":
        for k in range(1, blocks + 1):
            choose()
            ctx.round(model, f"round {k}/{blocks}", final=k == blocks, removed=list(removed))
    else:  # adaptive: as many blocks as the validation budget allows
        while len(removed) < len(candidates):
            choice = choose()
            if choice["val_drop"] > cfg.max_acc_drop:
                set_submodule(model, choice["block"], modules[choice["block"]])
                removed.pop()
                choice["kept"] = "its removal would exceed max_acc_drop"
                break
        ctx.round(model, "adaptive", final=True, removed=list(removed))
    details = {
        "candidates": candidates,
        "removed": removed,
        "choices": choices,
        "why": "greedy: each step removes the remaining block whose removal costs the least validation accuracy",
    }
    return _Outcome(model, [{"op": "layer", "removed": removed}], details, [NOTES["layer"]])


# ----------------------------------------------------------------------------------------------
# Quantization


def _quantize_mode(cfg: DictConfig, arch: str | None) -> str:
    mode = quantize.resolve_mode(cfg.mode, cfg.bits, arch)
    if mode == "static" and not quantize.static_available(arch):
        raise UserError(
            "prune.mode=static needs a model torchvision ships a quantizable version of (resnet18, resnet50, "
            f"mobilenet_v2, mobilenet_v3_large, ...), not {arch or 'a custom model'}; "
            "use prune.mode=dynamic or fake"
        )
    if mode in ("static", "dynamic") and cfg.bits != 8:
        raise UserError(f"prune.mode={mode} is int8 only; for prune.bits={cfg.bits} use prune.mode=fake")
    return mode


def _quantize(ctx: _Context, model: nn.Module) -> _Outcome:
    cfg = ctx.cfg
    mode = _quantize_mode(cfg, ctx.arch)
    op = {"op": "quantize", "mode": mode, "bits": cfg.bits, "arch": ctx.arch, "backend": cfg.backend}
    if mode == "fake":
        quantized = model
        quantize.fake_quantize_(quantized, cfg.bits)
    elif mode == "static":
        calibration = [images.cpu() for images, _ in islice(ctx.data.train, cfg.calibration_batches)]  # int8: CPU
        quantized = quantize.static_int8(model, ctx.arch, calibration, cfg.backend)
    else:
        quantized = quantize.dynamic_int8(model)
    ctx.acc_pruned = ctx.accuracy(quantized, test=True)
    ctx.rounds.append({"round": "oneshot", "mode": mode, "val_acc_pruned": ctx.acc_pruned["val"]})
    ctx.say(f"prune: quantized ({mode}, {cfg.bits} bits), val acc {ctx.acc_pruned['val']:.4f}")
    note = NOTES[mode].format(bits=cfg.bits)
    macs_model = None if mode == "fake" else model  # the float original: the same operations, counted
    return _Outcome(quantized, [op], {"mode": mode, "bits": cfg.bits}, [note], macs_model)


_METHODS: dict[str, Callable[[_Context, nn.Module], _Outcome]] = {
    "threshold": _unstructured,
    "magnitude": _unstructured,
    "random": _unstructured,
    "structured": _structured,
    "layer": _layer,
    "quantize": _quantize,
}
assert set(PRUNE_SCHEDULES) == set(_METHODS)


# ----------------------------------------------------------------------------------------------
# Rebuilding helpers


def _device_of(model: nn.Module) -> torch.device:
    tensor = next(model.parameters(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _example_from_config(model: nn.Module, checkpoint: dict[str, Any]) -> torch.Tensor:
    config = checkpoint.get("config") or {}
    size = (config.get("data") or {}).get("image_size", 32)
    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    channels = first.in_channels if first is not None else 3
    return torch.zeros(1, channels, size, size)
