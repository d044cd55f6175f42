"""Layer pruning: whole blocks (e.g. residual blocks) replaced by Identity, the least costly first."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from shelltrain.errors import UserError
from shelltrain.models import set_submodule
from shelltrain.prune.context import Context, Outcome, prunable_layers

NOTE = "whole blocks replaced by Identity: fewer layers, fewer MACs (the measured CPU latency is in the line above)"


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


def removable_or_error(model: nn.Module, example: torch.Tensor) -> list[str]:
    candidates = removable_blocks(model, example)
    if not candidates:
        raise UserError(
            f"prune=layer found no removable block in {type(model).__name__}: it needs blocks whose output has "
            "the input's shape (e.g. residual blocks of model=resnet18); try prune=structured"
        )
    return candidates


def layer(ctx: Context, model: nn.Module) -> Outcome:
    cfg, schedule = ctx.cfg, ctx.cfg.schedule
    chosen = {name for name, _ in prunable_layers(model, cfg)}
    candidates = [
        block
        for block in removable_or_error(model, ctx.example)
        if all(name in chosen for name, _ in prunable_layers(model) if name.startswith(block + "."))
    ]  # prune.modules, exclude: a block goes only when every layer in it may be touched
    if not candidates:
        raise UserError("prune=layer: prune.modules/prune.exclude leave no removable block; widen them")
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
    return Outcome(model, [{"op": "layer", "removed": removed}], details, [NOTE])
