"""The `quantize` method: post-training int8 (static or dynamic) or k-bit weight rounding as a pruning step,
measured and reported like the others (the torch.ao calls themselves are in `shelltrain.prune.quantize`)."""

from __future__ import annotations

from itertools import islice

from torch import nn

from shelltrain.errors import UserError
from shelltrain.prune.context import Context, Outcome, prunable_layers
from shelltrain.prune.measure import serialized_size
from shelltrain.prune.quantize import dynamic_int8, fake_quantize_, quantize_mode, static_int8

NOTES = {
    "static": "static int8 (weights and activations), fused conv-bn-relu; runs on the CPU only",
    "dynamic": "dynamic int8 for Linear layers only (activations quantized per batch); convolutions stay float; "
    "runs on the CPU only",
    "fake": "weights rounded to {bits} bits but stored as float32: shows the accuracy cost of k-bit weights, "
    "no size change",
}


def quantize(ctx: Context, model: nn.Module) -> Outcome:
    cfg = ctx.cfg
    mode = quantize_mode(cfg, ctx.arch)
    op = {"op": "quantize", "mode": mode, "bits": cfg.bits, "arch": ctx.arch, "backend": cfg.backend}
    layers = _chosen(cfg, model, mode)
    if layers is not None:
        op["layers"] = layers  # prune.modules / prune.exclude: `rebuild` quantizes the same ones
    if mode == "fake":
        quantized = model
        fake_quantize_(quantized, cfg.bits, layers)
    elif mode == "static":
        calibration = [images.cpu() for images, _ in islice(ctx.data.train, cfg.calibration_batches)]  # int8: CPU
        quantized = static_int8(model, ctx.arch, calibration, cfg.backend)
    else:
        quantized = dynamic_int8(model, layers)
    ctx.acc_pruned = ctx.accuracy(quantized, test=True)
    size = serialized_size(quantized)
    ctx.rounds.append({"round": "oneshot", "mode": mode, "val_acc_pruned": ctx.acc_pruned["val"], "size_bytes": size})
    ctx.say(f"prune: quantized ({mode}, {cfg.bits} bits), val acc {ctx.acc_pruned['val']:.4f}")
    note = NOTES[mode].format(bits=cfg.bits)
    macs_model = None if mode == "fake" else model  # the float original: the same operations, counted
    return Outcome(quantized, [op], {"mode": mode, "bits": cfg.bits}, [note], macs_model)


def _chosen(cfg, model: nn.Module, mode: str) -> list[str] | None:
    """The layer names prune.modules / prune.exclude choose (None: unset, the whole model). Static int8
    converts the whole network between its quant stubs, so it cannot leave layers out."""
    if not (cfg.modules or cfg.exclude):
        return None
    if mode == "static":
        raise UserError("prune.modules/prune.exclude: static int8 quantizes the whole model; use prune.mode=dynamic")
    return [name for name, _ in prunable_layers(model, cfg)]
