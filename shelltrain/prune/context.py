"""What every pruning method shares: the context it runs in (data, settings, evaluation), the fine-tuning round
after each pruning step and its records, and the sensitivity search of the `adaptive` schedule."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn

from shelltrain.engine import Callback, TrainState, evaluate, monitor_mode
from shelltrain.errors import UserError
from shelltrain.placement import eval_settings
from shelltrain.prune.measure import LAYER_TYPES, serialized_size, sparsity
from shelltrain.silence import quiet

# finetune(model, epochs, callbacks, label) trains `model` in place with a fresh optimizer and schedule.
Finetune = Callable[[nn.Module, int, list[Callback], str], TrainState]


ADAPTIVE_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


@dataclass
class Outcome:
    model: nn.Module
    ops: list[dict[str, Any]]
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    macs_model: nn.Module | None = None


class Context:
    def __init__(self, cfg, data, settings, finetune, arch, test_limit, say):
        self.cfg, self.data, self.settings = cfg, data, settings
        self.finetune_fn, self.arch, self.test_limit, self.say = finetune, arch, test_limit, say
        self.example = next(iter(data.val))[0][:1].to(settings.device)
        self.rounds: list[dict[str, Any]] = []
        self.history: list[dict[str, Any]] = []
        self.acc_before: dict[str, float] = {}
        self.acc_pruned: dict[str, float] | None = None
        self.chosen: set[str] = set()  # the layers prune.modules / prune.exclude let the method touch

    def evaluate(self, model: nn.Module, split: str = "val") -> dict[str, float]:
        settings = eval_settings(model, self.settings)
        loader = self.data.val if split == "val" else self.data.test
        limit = settings.limit_val_batches if split == "val" else self.test_limit
        with quiet():
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
        record["size_bytes"] = serialized_size(model)
        epochs = self.cfg.finetune_epochs
        if epochs > 0:
            keep = KeepBest(model, self.settings.monitor, val)
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


class KeepBest(Callback):
    """Keeps the best fine-tuning epoch's weights; the pruned model before fine-tuning is epoch 0."""

    def __init__(self, model: nn.Module, monitor: str, start: dict[str, float]):
        self.model, self.key, self.mode = model, monitor, monitor_mode(monitor)
        self.best = start["acc" if monitor == "val_acc" else "loss"]
        self.state, self.epoch = clone_state(model), 0

    def on_epoch_end(self, state: TrainState, row: dict[str, float], improved: bool) -> None:
        value = row[self.key]
        if value > self.best if self.mode == "max" else value < self.best:
            self.best, self.state, self.epoch = value, clone_state(self.model), int(row["epoch"])


def clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def ramp(final: float, steps: int, kind: str) -> list[float]:
    """Cumulative targets of `steps` rounds: linear, or cubic (fast at first, gentle at the end)."""
    fractions = [k / steps for k in range(1, steps + 1)]
    if kind == "cubic":
        return [final * (1 - (1 - f) ** 3) for f in fractions]
    return [final * f for f in fractions]


def prunable_layers(model: nn.Module, cfg: Any = None) -> list[tuple[str, nn.Module]]:
    """Conv/linear layers; with a prune config, only those `prune.modules` names and `prune.exclude` does not."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LAYER_TYPES)]
    return layers if cfg is None else [(n, m) for n, m in layers if n in chosen_names(model, cfg)]


def chosen_names(model: nn.Module, cfg: Any) -> set[str]:
    """The conv/linear layers a method may touch: matched by a `prune.modules` pattern (all when unset) and by
    no `prune.exclude` pattern. A pattern (fnmatch) matches a layer or any module holding it: `layer3`,
    `layer3.*`, `features.0*`, `fc`. A pattern that matches nothing is a mistake, said in one line. The final
    classifier stays out unless a `prune.modules` pattern names it (`quantize` converts it like the rest)."""
    names = [name for name, m in model.named_modules() if isinstance(m, LAYER_TYPES)]
    modules, exclude = list(cfg.modules or []), list(cfg.exclude or [])
    for key, patterns in (("modules", modules), ("exclude", exclude)):
        for pattern in patterns:
            if not any(_matches(name, pattern) for name in names):
                raise UserError(
                    f"prune.{key}: {pattern!r} matches no conv/linear layer; layer names are "
                    f"{', '.join(names[:6])}{', ...' if len(names) > 6 else ''}"
                )
    chosen = {
        name
        for name in names
        if (not modules or any(_matches(name, p) for p in modules)) and not any(_matches(name, p) for p in exclude)
    }
    classifier = _classifier_name(model)
    if classifier and cfg.name != "quantize" and not any(_matches(classifier, p) for p in modules):
        chosen.discard(classifier)  # its outputs are the classes: pruned only when prune.modules names it
    if not chosen:
        raise UserError(
            f"prune.modules={modules} and prune.exclude={exclude} leave no layer to prune (the classifier "
            f"{classifier!r} counts only when prune.modules names it); widen them"
        )
    return chosen


def _classifier_name(model: nn.Module) -> str | None:
    """The final classifier: the last Linear layer (None when the model has none)."""
    return next((name for name, m in reversed(list(model.named_modules())) if isinstance(m, nn.Linear)), None)


def _matches(name: str, pattern: str) -> bool:
    parts = name.split(".")
    return any(fnmatchcase(".".join(parts[:k]), pattern) for k in range(1, len(parts) + 1))


def layer_groups(model: nn.Module, cfg: Any = None) -> list[tuple[str, list[str]]]:
    """Conv/linear layers grouped by the top-level module holding them (one level deeper when that gives
    fewer than three groups), in definition order: input side first."""
    names = [name for name, _ in prunable_layers(model, cfg)]
    for depth in (1, 2):
        groups: dict[str, list[str]] = {}
        for name in names:
            groups.setdefault(".".join(name.split(".")[:depth]), []).append(name)
        if len(groups) >= 3:
            break
    return list(groups.items())


def sensitivity_search(
    ctx: Context,
    model: nn.Module,
    units: list[str],
    grid: list[float],
    trial: Callable[[dict[str, float]], float],
) -> tuple[dict[str, float], dict[str, Any]]:
    """Shared by unstructured and structured `adaptive`: scan each unit alone, choose, then check jointly."""
    budget = ctx.cfg.max_acc_drop
    base = ctx.acc_before["val"]
    saved = clone_state(model)
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
