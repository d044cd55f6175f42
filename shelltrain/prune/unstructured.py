"""Unstructured pruning (`threshold`, `magnitude`, `random`): masks on conv and linear weights with
`torch.nn.utils.prune`; masks stay applied while fine-tuning and are made permanent at the end, so the saved
weights are plain dense tensors with zeros."""

from __future__ import annotations

import math
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.nn.utils import prune as torch_prune

from shelltrain.prune.context import (
    ADAPTIVE_GRID,
    Context,
    Outcome,
    layer_groups,
    prunable_layers,
    ramp,
    sensitivity_search,
)

NOTE = (
    "unstructured sparsity: zeros inside dense tensors; size and MACs stay as they were and dense kernels gain "
    "no speed from zeros (they pay off only with sparse storage or sparse kernels)"
)


def unstructured(ctx: Context, model: nn.Module) -> Outcome:
    cfg, schedule = ctx.cfg, ctx.cfg.schedule
    layers = prunable_layers(model, cfg)
    details: dict[str, Any] = {}
    if schedule == "oneshot":
        _mask(ctx, layers, _target(cfg))
        ctx.round(model, "oneshot", final=True, target=_target(cfg))
    elif schedule == "iterative":
        targets = ramp(_target(cfg), cfg.steps, cfg.ramp)
        for k, target in enumerate(targets, 1):
            _mask(ctx, layers, target)
            ctx.round(model, f"round {k}/{len(targets)}", final=k == len(targets), target=target)
    elif schedule == "hierarchical":
        order = list(reversed(layer_groups(model, cfg)))
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
    return Outcome(model, [op], details, [NOTE])


def _target(cfg: DictConfig) -> float:
    return cfg.threshold if cfg.name == "threshold" else cfg.amount


def _mask(ctx: Context, layers: list[tuple[str, nn.Module]], target: float, local: bool | None = None) -> None:
    """Add masks so that `layers` reach `target` (a sparsity, or the magnitude threshold for `threshold`)."""
    method = ctx.cfg.name
    if method == "threshold":
        for _, module in layers:
            torch_prune.custom_from_mask(module, "weight", module.weight.detach().abs() >= target)
        return
    for _, module in layers:  # torch's pruning views weights and masks as flat vectors: no channels_last
        module.to(memory_format=torch.contiguous_format)
    local = not ctx.cfg["global"] if local is None else local
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
    ctx: Context, model: nn.Module, layers: list[tuple[str, nn.Module]]
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

    return sensitivity_search(ctx, model, [name for name, _ in layers], grid, trial)
