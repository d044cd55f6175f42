"""How an ensemble's members are evaluated and fused: the one home of the fusion rules.

`combine` is the rule, on member probabilities (M members x N samples x C classes), in float32 whatever the
autocast: `average`, `weighted` (with `accuracy_weights`) and `vote`. The ensemble stage (`fuse`), the ensemble as
one model (`FusedModel`: task=predict/export, `model.weights=<ensemble run>`) and a fused distillation teacher all
use it. `member_logits` evaluates the members one after another, or all at once with vmap (`StackedMembers`)
when they share one architecture.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shelltrain.engine import predict
from shelltrain.multilabel import as_logits
from shelltrain.placement import is_quantized
from shelltrain.schema import TrainerConfig


def average(probs: torch.Tensor) -> torch.Tensor:
    """The mean of M x N x C member probabilities: N x C."""
    return probs.mean(0)


def weighted(probs: torch.Tensor, weights: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """The weighted mean of M x N x C member probabilities (weights normalized to sum 1): N x C."""
    w = torch.as_tensor(weights if torch.is_tensor(weights) else list(weights), dtype=probs.dtype, device=probs.device)
    return torch.einsum("m,mnc->nc", w / w.sum(), probs)


def accuracy_weights(val_accs: Sequence[float], temperature: float = 1.0) -> list[float]:
    """Weights proportional to val_acc ** (1 / temperature), summing to 1.

    temperature 1 normalizes the accuracies; below 1 sharpens towards the best member, above 1
    flattens towards uniform. All accuracies 0 (or NaN) gives uniform weights.
    """
    acc = torch.nan_to_num(torch.tensor(list(val_accs), dtype=torch.float64), nan=0.0).clamp_min(0)
    if not bool((acc > 0).any()):
        return [1.0 / len(acc)] * len(acc)
    return torch.softmax(acc.log() / temperature, 0).tolist()  # log space: no underflow at small temperatures


def vote_shares(probs: torch.Tensor) -> torch.Tensor:
    """Each class's share of the members' votes (N x C); the members' summed probabilities, scaled far below one
    vote, break ties, so the argmax is the majority class and a tie goes to the most probable tied class."""
    votes = F.one_hot(probs.argmax(2), probs.shape[2]).sum(0).to(probs.dtype)  # N x C
    shares = votes + probs.sum(0) / (probs.shape[0] + 1)  # the sum stays below one vote
    return shares / shares.sum(1, keepdim=True)


def vote(probs: torch.Tensor) -> torch.Tensor:
    """Majority vote of the members' predicted classes (N)."""
    return vote_shares(probs).argmax(1)


def combine(rule: str, probs: torch.Tensor, weights: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """The one fusion rule: M x N x C member probabilities -> N x C fused probabilities, in float32 whatever the
    autocast (in half precision a probability below 6e-8 becomes 0 and its log -inf), or float64 if given."""
    with torch.autocast(probs.device.type, enabled=False):
        probs = probs.to(torch.promote_types(probs.dtype, torch.float32))  # float64 stays
        if rule == "vote":
            return vote_shares(probs)
        return weighted(probs, weights) if rule == "weighted" else average(probs)


def fuse(rule: str, probs: torch.Tensor, weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The ensemble's N x C probabilities and N predicted classes. A vote's predictions come from the
    votes; its probabilities (used for its loss) are the members' mean."""
    fused = combine(rule, probs, weights)
    return (combine("average", probs, weights) if rule == "vote" else fused), fused.argmax(1)


def fuse_labels(rule: str, logits: torch.Tensor, weights: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Multi-label: M x N x C member logits -> N x C logits of the fused per-class sigmoid probabilities (their
    sigmoid is the ensemble's probability), in float32 whatever the autocast, or float64 if given."""
    with torch.autocast(logits.device.type, enabled=False):
        probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).sigmoid()
        return as_logits(combine(rule, probs, weights))


class FusedModel(nn.Module):
    """An ensemble as one model (task=predict and export, a fused teacher): its forward gives the log of the fused
    probabilities (`combine`), so that softmax and argmax of the output are the ensemble's. `multi_label`: the
    members' sigmoid probabilities are fused per class and the output is their logit (its sigmoid is the fused
    probability)."""

    def __init__(self, members: Sequence[nn.Module], rule: str, weights: Sequence[float], multi_label: bool = False):
        super().__init__()
        self.members = nn.ModuleList(m.eval() for m in members)
        self.rule, self.multi_label = rule, multi_label
        weights = weights if rule == "weighted" else [1.0] * len(members)  # average (and vote): equal shares
        self.register_buffer("weights", torch.tensor([w / sum(weights) for w in weights]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = [member(x) for member in self.members]  # under the caller's autocast
        with torch.autocast(x.device.type, enabled=False):
            if self.multi_label:
                return fuse_labels(self.rule, torch.stack(logits), self.weights)
            probs = torch.stack([each.float().softmax(1) for each in logits])  # M x N x C
            return combine(self.rule, probs, self.weights).clamp_min(1e-12).log()


def fused_metrics(probs: torch.Tensor, preds: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Accuracy of the predictions and the negative log-likelihood of the fused probabilities."""
    if targets.numel() == 0:
        return {"loss": math.nan, "acc": math.nan}
    return {
        "loss": F.nll_loss(probs.clamp_min(1e-12).log(), targets).item(),
        "acc": (preds == targets).float().mean().item(),
    }


def same_architecture(models: Sequence[nn.Module]) -> bool:
    """Same module type and the same state-dict names, shapes and dtypes: stackable for vmap."""

    def signature(model: nn.Module) -> tuple:
        return type(model), [(k, tuple(v.shape), v.dtype) for k, v in model.state_dict().items()]

    first = signature(models[0])
    return all(signature(m) == first for m in models[1:])


class StackedMembers(nn.Module):
    """Same-architecture members as one module: their weights stacked with
    `torch.func.stack_module_state`, one `vmap`ped `functional_call` per batch; forward gives N x M x C."""

    def __init__(self, models: Sequence[nn.Module]):
        super().__init__()
        from torch.func import stack_module_state

        params, buffers = stack_module_state([m.eval() for m in models])
        self.param_names, self.buffer_names = list(params), list(buffers)
        for i, tensor in enumerate([*params.values(), *buffers.values()]):
            self.register_buffer(f"stacked_{i}", tensor.detach().contiguous())
        # In a list: not a submodule, so .to() and state_dict() leave the weightless template alone.
        self.template = [copy.deepcopy(models[0]).eval().to("meta")]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call, vmap

        tensors = [getattr(self, f"stacked_{i}") for i in range(len(self.param_names) + len(self.buffer_names))]
        params = dict(zip(self.param_names, tensors))
        buffers = dict(zip(self.buffer_names, tensors[len(self.param_names) :]))

        def call(p: dict, b: dict) -> torch.Tensor:
            return functional_call(self.template[0], (p, b), (x,))

        x = x.contiguous()  # channels_last (here or in the weights) sends adaptive pooling to a slow vmap fallback

        return vmap(call)(params, buffers).transpose(0, 1)


def member_logits(
    models: Sequence[nn.Module], loader: Any, settings: TrainerConfig, limit: int | None, stacked: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """M x N x C logits of every member over a loader and the N targets: one model after another (an int8
    member on the CPU), or (`stacked`, same architecture only) all at once with vmap.

    The members wait on the CPU: on the device there is one member at a time, or the one stacked copy (stacked
    on the CPU, moved by predict, freed on return), never every member plus a stacked copy."""
    if stacked:  # contiguous: channels_last does not apply to stacked 5-d weights, and slows vmap's pooling
        members = StackedMembers([m.cpu() for m in models])
        logits, targets = predict(members, loader, replace(settings, channels_last=False), limit)
        return logits.transpose(0, 1).contiguous(), targets
    outputs = []
    for model in models:
        outputs.append(predict(model, loader, settings, limit))  # where eval_settings puts it
        model.cpu()
    return torch.stack([logits for logits, _ in outputs]), outputs[0][1]


def use_vmap(option: Any, models: list[nn.Module], settings: TrainerConfig) -> bool:
    if option is False or len(models) < 2 or any(map(is_quantized, models)) or not same_architecture(models):
        return False
    return option is True or settings.device.type == "cuda"  # auto: on a CPU a plain loop is faster
