"""Averages of the weights. Exponential moving average (trainer.ema): an engine Callback that keeps a
torch.optim.swa_utils.AveragedModel beside the model, updates it after optimizer steps, validates it each epoch
(`ema_val_loss`, `ema_val_acc` in the epoch's row, so trainer.monitor can select by it) and hands its state to
the checkpoints, so a resumed run continues the same average.

BatchNorm buffers are averaged like the weights (`use_buffers=True`): the averaged model's running statistics
follow the averaged weights' history instead of the last step's, and no extra pass over the data is needed.

Stochastic weight averaging (trainer.swa, Izmailov et al., 2018): from trainer.swa.start_epoch on, the learning rate
is held at trainer.swa.lr by torch's SWALR (in place of the run's schedule) and the equal-weight mean of the
weights at the end of each epoch is kept, again as an AveragedModel whose state travels in the checkpoints.
BatchNorm statistics are not averaged: `update_bn` recomputes them with a pass over the train loader before the
averaged model is evaluated (`swa_test_metrics`)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import SWALR, AveragedModel, get_ema_multi_avg_fn, update_bn
from torch.utils.data import DataLoader

from shelltrain import distributed, rundir
from shelltrain.checkpoint import averaged_weights, load_checkpoint, model_checkpoint, save_checkpoint
from shelltrain.data import DataBundle, unsharded
from shelltrain.engine import Callback, TrainState, evaluate
from shelltrain.optim import Schedule
from shelltrain.placement import place
from shelltrain.rng import epoch_seed
from shelltrain.schema import EmaConfig, SwaConfig, TrainerConfig
from shelltrain.tta import tested_with_tta


class Averager(Callback):
    """An AveragedModel beside the trained model, its state saved under `key` in every checkpoint."""

    key = ""
    averaged: AveragedModel

    def state_dict(self) -> dict[str, Any]:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.averaged.load_state_dict(state)

    def resume(self, payload: dict[str, Any] | None) -> Averager:
        """Continue the average a resumed checkpoint carries (none in a fresh run)."""
        if payload is not None and payload.get(self.key) is not None:
            self.load_state_dict(payload[self.key])
        return self


START_WEIGHT_WARNING = 0.5  # warn when the first weights keep more than this share of the average at the end


class EmaAverager(Averager):
    """EMA_0 = W_1 (the weights after the first update step), then EMA = d_t * EMA + (1 - d_t) * W every
    `every_n_steps` optimizer steps. With `warmup` (the default, as timm's EMA) d_t = min(d, (1 + t) / (10 + t)):
    a run of few steps averages its recent weights instead of keeping mostly the random start (which d^steps
    would). With `warmup_steps` W > 0 the decay is also scaled by min(1, t / W)."""

    key = "ema"

    def __init__(self, model: nn.Module, val_loader: DataLoader, settings: TrainerConfig, ema: EmaConfig):
        self.model = model
        self.val_loader = val_loader
        self.settings = settings
        self.ema = ema
        self.decay = float(ema.decay)
        self.averaged = AveragedModel(model, multi_avg_fn=self._average, use_buffers=True)

    def _average(self, averaged: list[torch.Tensor], current: list[torch.Tensor], count: Any) -> None:
        get_ema_multi_avg_fn(self.decay)(averaged, current, count)

    def on_step(self, state: TrainState) -> None:
        if state.step % self.ema.every_n_steps:
            return
        self.decay = ema_decay(self.ema, state.step)
        self.averaged.update_parameters(self.model)

    def on_validation_end(self, row: dict[str, float]) -> None:
        val = evaluate(self.averaged.module, self.val_loader, self.settings, limit=self.settings.limit_val_batches)
        row["ema_val_loss"], row["ema_val_acc"] = val["loss"], val["acc"]


def ema_decay(ema: EmaConfig, step: int) -> float:
    """The decay of the update at optimizer step `step` (trainer.ema.decay, warmup, warmup_steps)."""
    decay = float(ema.decay)
    if ema.warmup:
        decay = min(decay, (1 + step) / (10 + step))
    if ema.warmup_steps > 0:
        decay *= min(1.0, step / ema.warmup_steps)
    return decay


def start_weight(ema: EmaConfig, steps: int) -> float:
    """The share of the average the first weights still hold after `steps` optimizer steps: the product of the
    decays of every update after the first (which copies the weights)."""
    share = 1.0
    for step in range(2 * ema.every_n_steps, steps + 1, ema.every_n_steps):
        share *= ema_decay(ema, step)
    return share


def build_averager(
    ema: EmaConfig,
    model: nn.Module,
    val_loader: DataLoader,
    settings: TrainerConfig,
    payload: dict[str, Any] | None,
    steps: int,
    notify: Callable[[str], None],
) -> EmaAverager | None:
    """The EMA callback when trainer.ema.decay is set, continuing the average a resumed checkpoint carries;
    `notify` says when the run's `steps` optimizer steps leave most of the average on the starting weights."""
    if ema.decay is None:
        return None
    kept = start_weight(ema, steps)
    if kept > START_WEIGHT_WARNING:
        notify(
            f"warning: trainer.ema.decay={ema.decay} over this run's {steps} optimizer steps leaves {kept:.0%} of "
            "the average on the starting weights, so ema_* figures describe mostly an untrained model; set "
            f"trainer.ema.warmup=true or a lower decay (e.g. trainer.ema.decay={0.1 ** (1 / max(steps, 1)):.3g})"
        )
    return EmaAverager(model, val_loader, settings, ema).resume(payload)


def ema_test_metrics(
    model: nn.Module,
    test_loader: DataLoader,
    settings: TrainerConfig,
    run_dir: Path,
    best_row: dict[str, Any],
    extra: dict[str, Any],
) -> dict[str, float]:
    """summary.json's EMA figures: the averaged weights best.pt carries (those of the selected epoch) on the test
    split (`ema_test_acc`, `ema_test_loss`), and their validation figures at that epoch; {} without EMA. The
    averaged weights are kept as a model of their own, checkpoints/ema.pt (`model.weights=RUN@ema`)."""
    best = rundir.best_checkpoint(run_dir)
    ema = load_checkpoint(best).get("ema") if best.exists() else None
    if ema is None:
        return {}
    averaged = copy.deepcopy(model)
    averaged.load_state_dict(averaged_weights(ema))
    save_checkpoint(model_checkpoint(averaged.state_dict(), extra), rundir.weights_checkpoint(run_dir, "ema"))
    figures, _, _ = tested_with_tta(averaged, test_loader, settings, "ema_test")
    best_val = {f"best_{key}": best_row[key] for key in ("ema_val_acc", "ema_val_loss") if key in best_row}
    return {**figures, **best_val}


class SwaAverager(Averager):
    """The equal mean of the weights at the end of every epoch from `swa.start_epoch` on; from that epoch the
    learning rate is SWALR's `swa.lr` (see `schedule`)."""

    key = "swa"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, swa: SwaConfig):
        self.model, self.optimizer, self.swa = model, optimizer, swa
        self.averaged = AveragedModel(model)  # buffers (BatchNorm statistics) come from update_bn
        self.swalr: SWALR | None = None  # made at the first averaging epoch: making it sets the learning rate

    def on_epoch_start(self, epoch: int, num_batches: int) -> None:
        if epoch >= self.swa.start_epoch and self.swalr is None:
            self.swalr = SWALR(self.optimizer, swa_lr=float(self.swa.lr), anneal_epochs=0)

    def on_epoch_end(self, state: TrainState, row: dict[str, float], improved: bool) -> None:
        if state.epoch >= self.swa.start_epoch:
            self.averaged.update_parameters(self.model)

    def schedule(self, base: Schedule | None) -> Schedule:
        """The run's schedule until the averaging starts, SWALR's constant swa.lr from then on."""
        return Schedule(SwaScheduler(self, base), base.interval if base else "epoch", bool(base and base.on_metric))


class SwaScheduler:
    """Steps the run's own scheduler until SwaAverager has made its SWALR, then SWALR; checkpoints keep the run's
    scheduler's state (SWALR holds a constant rate: remade on resume, it sets the same one)."""

    def __init__(self, averager: SwaAverager, base: Schedule | None):
        self.averager, self.base = averager, base.scheduler if base is not None else None

    @property
    def total_steps(self) -> int | None:
        return getattr(self.base, "total_steps", None)

    def step(self, *args: Any) -> None:
        if self.averager.swalr is not None:
            self.averager.swalr.step()
        elif self.base is not None:
            self.base.step(*args)

    def state_dict(self) -> dict[str, Any]:
        return self.base.state_dict() if self.base is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.base is not None:
            self.base.load_state_dict(state)


def build_swa(
    swa: SwaConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule | None,
    payload: dict[str, Any] | None,
) -> tuple[SwaAverager | None, Schedule | None]:
    """The SWA callback when trainer.swa.start_epoch is set (continuing a resumed checkpoint's average) and the
    schedule to train with (SWALR's from the start epoch on); (None, `schedule`) without SWA."""
    if swa.start_epoch is None:
        return None, schedule
    averager = SwaAverager(model, optimizer, swa).resume(payload)
    return averager, averager.schedule(schedule)


def averaged_test_metrics(
    model: nn.Module,
    data: DataBundle,
    settings: TrainerConfig,
    run_dir: Path,
    best_row: dict[str, Any],
    extra: dict[str, Any],
) -> dict[str, float]:
    """summary.json's figures of the averaged models the run kept: EMA (best.pt's) and SWA (last.pt's); each is
    also saved as a model of its own (checkpoints/ema.pt, swa.pt) with `extra` (config, classes, preprocessing)."""
    figures: dict[str, float] = {}
    if settings.ema.decay is not None:  # no checkpoint is read again for a run that kept no average
        figures.update(ema_test_metrics(model, data.test, settings, run_dir, best_row, extra))
    if settings.swa.start_epoch is not None:
        figures.update(swa_test_metrics(model, data.train, data.test, settings, run_dir, extra))
    return figures


def swa_test_metrics(
    model: nn.Module,
    train_loader: DataLoader,
    test_loader: DataLoader,
    settings: TrainerConfig,
    run_dir: Path,
    extra: dict[str, Any],
) -> dict[str, float]:
    """summary.json's SWA figures: the average last.pt carries, its BatchNorm statistics recomputed over the train
    loader (update_bn), on the test split (`swa_test_acc`, `swa_test_loss`, ...); {} without SWA or before any
    epoch was averaged. Saved as checkpoints/swa.pt (`model.weights=RUN@swa`), BatchNorm statistics included."""
    last = rundir.last_checkpoint(run_dir)
    state = load_checkpoint(last).get("swa") if last.exists() else None
    if state is None or int(state["n_averaged"]) == 0:
        return {}
    averaged = distributed.local_batchnorm(copy.deepcopy(model))  # rank 0 passes over the data alone
    averaged.load_state_dict(averaged_weights(state))
    place(averaged, settings)
    whole = unsharded(train_loader)  # under DDP the whole train split, as in one process, not rank 0's share
    with _seeded_pass(whole, settings):
        update_bn(_images(whole, settings), averaged, device=torch.device(settings.device))
    save_checkpoint(model_checkpoint(averaged.state_dict(), extra), rundir.weights_checkpoint(run_dir, "swa"))
    figures, _, _ = tested_with_tta(averaged, test_loader, settings, "swa_test")  # plain, TTA beside it
    return {**figures, "swa_epochs_averaged": int(state["n_averaged"])}


@contextlib.contextmanager
def _seeded_pass(loader: DataLoader, settings: TrainerConfig) -> Iterator[None]:
    """One pass over the train loader whose order and augmentation depend on trainer.seed alone, not on where the
    run's RNGs and the loader's generator stand (a run resumed after training draws as the uninterrupted one would
    not); the run's RNGs and the loader's position are as they were afterwards."""
    seed = epoch_seed(settings.seed, None, distributed.rank())
    generator = getattr(loader, "generator", None)
    own = generator.get_state() if isinstance(generator, torch.Generator) else None
    shufflers = [s for s in (loader, getattr(loader, "sampler", None)) if hasattr(s, "set_epoch")]
    epochs = [getattr(s, "epoch", 0) for s in shufflers]
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        if own is not None:
            generator.manual_seed(seed)
        for shuffler in shufflers:
            shuffler.set_epoch(0)
        try:
            yield
        finally:
            if own is not None:
                generator.set_state(own)
            for shuffler, epoch in zip(shufflers, epochs):
                shuffler.set_epoch(epoch)


def _images(loader: DataLoader, settings: TrainerConfig) -> Iterator[torch.Tensor]:
    """The loader's images in the memory format training used (update_bn moves them to the device)."""
    for images, _ in loader:
        yield images.contiguous(memory_format=torch.channels_last) if settings.channels_last else images
