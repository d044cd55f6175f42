"""Structured pruning: channels physically removed with Torch-Pruning, every dependent layer kept consistent."""

from __future__ import annotations

from itertools import islice
from typing import Any

import torch
from torch import nn

from shelltrain.engine import criterion
from shelltrain.models import count_parameters, find_classifier
from shelltrain.prune.context import (
    ADAPTIVE_GRID,
    Context,
    Outcome,
    layer_groups,
    prunable_layers,
    ramp,
    sensitivity_search,
)
from shelltrain.prune.measure import torch_pruning

GLOBAL_MAX_RATIO = 0.9  # structured pruning never removes more than this share of a layer's channels
NOTE = "channels physically removed: smaller tensors, fewer MACs (the measured CPU latency is in the line above)"


def _importance(name: str) -> Any:
    imp = torch_pruning().importance
    return {
        "l1": lambda: imp.GroupMagnitudeImportance(p=1),
        "l2": lambda: imp.GroupMagnitudeImportance(p=2),
        "taylor": imp.GroupTaylorImportance,
        "bn_scale": imp.BNScaleImportance,
        "fpgm": imp.FPGMImportance,
        "random": imp.RandomImportance,
    }[name]()


def structured(ctx: Context, model: nn.Module) -> Outcome:
    tp = torch_pruning()
    cfg, schedule = ctx.cfg, ctx.cfg.schedule
    kept = _kept_layers(model, cfg)  # the classifier first
    widths_before = _widths(model)
    segments: list[list] = []
    details: dict[str, Any] = {"importance": cfg.importance, "global": cfg["global"]}

    def pruner(ignored: list[nn.Module], steps: int = 1, **kwargs: Any) -> Any:
        model.eval()  # tracing in train mode breaks BatchNorm on a one-image batch
        return tp.pruner.MetaPruner(
            model,
            ctx.example,
            importance=_importance(cfg.importance),
            pruning_ratio=cfg.ratio,
            global_pruning=cfg["global"],
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
        kind = cfg.ramp
        p = pruner(kept, steps, iterative_pruning_ratio_scheduler=lambda r, s: [0.0, *ramp(r, s, kind)])
        for k in range(1, steps + 1):
            step(p)
            label = "oneshot" if steps == 1 else f"round {k}/{steps}"
            ctx.round(model, label, final=k == steps, params=count_parameters(model))
        segments.append(p.pruning_history())
    elif schedule == "hierarchical":
        modules = dict(model.named_modules())
        order = _group_order(model, kept[0], cfg)
        details["groups"] = [{"group": g, "layers": names} for g, names in order]
        for k, (group, names) in enumerate(order, 1):
            inside = {id(modules[n]) for n in names}
            ignored = kept + [m for _, m in prunable_layers(model) if id(m) not in inside]
            p = pruner(ignored)
            step(p)
            segments.append(p.pruning_history())
            label = f"group {group} ({k}/{len(order)})"
            ctx.round(model, label, final=k == len(order), params=count_parameters(model))
    else:  # adaptive
        segment, adaptive = _structured_adaptive(ctx, model, kept)
        segments.append(segment)
        details.update(adaptive)
        ctx.round(model, "adaptive", final=True, params=count_parameters(model))

    widths = _widths(model)
    details["widths"] = {name: [widths_before[name], widths.get(name)] for name in widths_before}
    ctx.say("prune: widths (out channels): " + ", ".join(f"{n} {b}->{a}" for n, (b, a) in details["widths"].items()))
    op = {"op": "structured", "history": segments}
    return Outcome(model, [op], details, [NOTE])


def _kept_layers(model: nn.Module, cfg: Any) -> list[nn.Module]:
    """Layers whose output channels stay: the classifier (its outputs are the classes) and every layer
    `prune.modules` / `prune.exclude` do not choose."""
    chosen = {id(m) for _, m in prunable_layers(model, cfg)}
    classifier = find_classifier(model)[1]
    return [classifier] + [m for _, m in prunable_layers(model) if id(m) not in chosen]


def _group_order(model: nn.Module, classifier: nn.Module, cfg: Any) -> list[tuple[str, list[str]]]:
    """The chosen layer groups from the output end towards the input, the classifier left out."""
    modules = dict(model.named_modules())
    groups = reversed(layer_groups(model, cfg))
    order = [(g, [n for n in names if modules[n] is not classifier]) for g, names in groups]
    return [(g, names) for g, names in order if names]


def _structured_adaptive(ctx: Context, model: nn.Module, kept: list[nn.Module]) -> tuple[list, dict[str, Any]]:
    """Per channel group: the largest ratio (up to `prune.ratio`) whose removal alone keeps the validation
    drop within `max_acc_drop`. Trials zero the group's channels (the same outputs as removing them);
    the chosen channels are then removed for real, once."""
    tp = torch_pruning()
    model.eval()
    graph = tp.DependencyGraph().build_dependency(model, ctx.example)
    root_types = [nn.modules.conv._ConvNd, nn.Linear]
    if ctx.cfg.importance == "taylor":
        _gradients(ctx, model)
    importance = _importance(ctx.cfg.importance)
    names = {m: n for n, m in model.named_modules()}
    plans: dict[str, tuple[Any, list[int]]] = {}
    for group in graph.get_all_groups(ignored_layers=kept, root_module_types=root_types):
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
    ratios, details = sensitivity_search(ctx, model, list(plans), grid, trial)
    for unit, ratio in ratios.items():
        group, order = plans[unit]
        if count(unit, ratio) > 0:  # (Group.prune(idxs=...) would also record the full group in the history)
            root, handler = group[0][0].target.module, group[0][0].handler
            graph.get_pruning_group(root, handler, order[: count(unit, ratio)]).prune()
    return graph.pruning_history(), details


@torch.no_grad()
def _zero_channels(graph: Any, group: Any, idxs: list[int]) -> None:
    """Zero what removing `idxs` of the group's root would remove: every coupled layer's output channels."""
    tp = torch_pruning()
    root = group[0][0].target.module
    sub = graph.get_pruning_group(root, group[0][0].handler, idxs)
    for dep, dep_idxs in sub:
        module = dep.target.module
        if isinstance(module, nn.Module) and graph.is_out_channel_pruning_fn(dep.handler):
            plain = tp._helpers.to_plain_idxs(dep_idxs)
            for param in module.parameters(recurse=False):
                param[plain] = 0


def _gradients(ctx: Context, model: nn.Module, batches: int = 4) -> None:
    """Accumulate loss gradients over a few training batches (Taylor importance reads them)."""
    model.zero_grad(set_to_none=True)
    model.eval()  # fixed BatchNorm statistics: importance of the model as it is
    for images, targets in islice(ctx.data.train, batches):
        images, targets = images.to(ctx.settings.device), targets.to(ctx.settings.device)
        criterion(model(images), targets, ctx.settings).backward()


def _widths(model: nn.Module) -> dict[str, int]:
    return {
        name: m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features
        for name, m in prunable_layers(model)
    }
