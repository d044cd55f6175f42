"""The training loop. It knows nothing of Hydra: it takes a model, loaders, an optimizer, a schedule
and the trainer settings (schema.TrainerConfig, a plain dataclass, whose `device` holds the resolved device:
"cpu", "cuda:0" or a torch.device), so fine-tuning after pruning and training ensemble members reuse it as it is.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from shelltrain import distributed
from shelltrain.errors import UserError
from shelltrain.multilabel import bce, epoch_figures, is_multi_label, label_hits
from shelltrain.optim import Schedule
from shelltrain.placement import batch_to_device, eval_settings, place
from shelltrain.rng import epoch_seed, restore_rng
from shelltrain.schema import TrainerConfig

SYNC_EVERY = 20  # batches between host syncs for the progress display (each sync stalls a GPU)
# A training loss in place of `criterion`: (images, logits, targets, settings) -> loss, called under autocast
Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, TrainerConfig], torch.Tensor]


@dataclass
class TrainState:
    """Everything that changes while training; checkpoints store it so a run can continue."""

    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps taken
    best_metric: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped_early: bool = False
    history: list[dict[str, float]] = field(default_factory=list)
    # A mid-epoch state: batches of epoch `epoch + 1` already trained (0 at an epoch boundary) and the
    # running sums of that partial epoch (loss_sum, correct, seen, seconds), so its metrics row comes out
    # as if the epoch had never been interrupted.
    batch: int = 0
    partial: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainState:
        """Rebuild from `dataclasses.asdict(state)`, ignoring keys this version does not know."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


class NonFiniteLoss(UserError):
    """The training loss became NaN or infinite; nothing after the last good checkpoint was saved."""

    def __init__(self, value: float, epoch: int, step: int):
        self.value, self.epoch, self.step = value, epoch, step
        super().__init__(f"the training loss became {value} at epoch {epoch}, step {step}")


class Callback:
    """Hooks for display and persistence; the engine calls them, they never steer training."""

    def on_epoch_start(self, epoch: int, num_batches: int) -> None: ...

    def on_batch_end(self, batch: int, loss: float, acc: float, images_per_second: float) -> None: ...

    def on_step(self, state: TrainState) -> None:
        """After optimizer step `state.step` (e.g. to update an average of the weights)."""

    def on_validation_end(self, row: dict[str, float]) -> None:
        """May add figures to the epoch's row before trainer.monitor is read from it (e.g. `ema_val_acc`)."""

    def on_epoch_end(self, state: TrainState, row: dict[str, float], improved: bool) -> None: ...

    def on_checkpoint(self, state: TrainState) -> None:
        """A mid-epoch point (every `checkpoint_every_n_steps` steps, or a requested stop) where `state`,
        the model, optimizer, schedule and RNGs are consistent: a checkpoint taken now resumes exactly."""


class Callbacks(Callback):
    """Several callbacks called in order, as one."""

    def __init__(self, callbacks: list[Callback]):
        self.callbacks = callbacks

    def on_epoch_start(self, epoch: int, num_batches: int) -> None:
        for cb in self.callbacks:
            cb.on_epoch_start(epoch, num_batches)

    def on_batch_end(self, batch: int, loss: float, acc: float, images_per_second: float) -> None:
        for cb in self.callbacks:
            cb.on_batch_end(batch, loss, acc, images_per_second)

    def on_step(self, state: TrainState) -> None:
        for cb in self.callbacks:
            cb.on_step(state)

    def on_validation_end(self, row: dict[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_validation_end(row)

    def on_epoch_end(self, state: TrainState, row: dict[str, float], improved: bool) -> None:
        for cb in self.callbacks:
            cb.on_epoch_end(state, row, improved)

    def on_checkpoint(self, state: TrainState) -> None:
        for cb in self.callbacks:
            cb.on_checkpoint(state)


def monitor_mode(monitor: str) -> str:
    return "min" if monitor.endswith("loss") else "max"


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule | None,
    settings: TrainerConfig,
    state: TrainState | None = None,
    callbacks: list[Callback] | None = None,
    scaler: torch.amp.GradScaler | None = None,
    stop: Callable[[], bool] | None = None,
    rng: dict[str, Any] | None = None,
    loss: Loss | None = None,
) -> TrainState:
    """Train for `settings.epochs` epochs from `state`, validating after each epoch; `loss` replaces `criterion`
    as the training loss (e.g. distillation), validation keeps `criterion`.
    `stop` is polled after every optimizer step and every epoch: when it returns True, a mid-epoch state
    goes to `Callback.on_checkpoint` and fit returns early (the caller knows why it asked). `rng` is the
    RNG snapshot taken with `state` (see `rng_state`); resuming restores it, so a run continued from a
    checkpoint draws exactly what the uninterrupted run would have drawn.
    """
    state = state or TrainState()
    callback = Callbacks(callbacks or [])
    scaler = scaler or make_scaler(settings)
    net = trainable(model, settings)
    if rng is not None:
        restore_rng(rng)
    while state.epoch < settings.epochs and not state.stopped_early:
        epoch = state.epoch + 1
        num_batches = begin_epoch(net, train_loader, settings, epoch, callback)  # a policy may (un)freeze layers
        net = distributed.rewrap(net)  # DDP all-reduces what trains now
        train_metrics = train_one_epoch(
            net,
            train_loader,
            optimizer,
            schedule,
            settings,
            state,
            epoch,
            callback,
            scaler,
            stop=stop,
            rng=rng if state.batch else None,
            begun=num_batches,
            loss=loss,
        )
        if train_metrics is None:
            return state  # stopped mid-epoch; on_checkpoint has seen the state
        distributed.broadcast_buffers(model)
        val = evaluate(model, val_loader, settings, limit=settings.limit_val_batches)
        row = {"epoch": epoch, **train_metrics, **{f"val_{key}": value for key, value in val.items()}}
        callback.on_validation_end(row)
        _epoch_schedule_step(schedule, row[settings.monitor])
        improved = _update_best(state, row[settings.monitor], epoch, settings)
        state.epoch = epoch
        state.history.append(row)
        callback.on_epoch_end(state, row, improved)
        if stop is not None and stop():
            break
    return state


def _epoch_schedule_step(schedule: Schedule | None, metric: float) -> None:
    """An epoch-interval schedule steps after validation (a plateau schedule on the monitored metric)."""
    if schedule is None or schedule.interval != "epoch":
        return
    if schedule.on_metric:
        schedule.scheduler.step(metric)
    else:
        schedule.scheduler.step()


def trainable(model: nn.Module, settings: TrainerConfig) -> nn.Module:
    """The module that trains: `model` on its device and memory format, compiled if asked, then wrapped in DDP
    under several processes (compiled inside the wrapper, as PyTorch recommends). It shares its parameters with
    `model`, which stays eager: evaluation (other batch sizes, eval mode) causes no recompiles, and checkpoints
    keep plain state-dict keys."""
    if settings.sync_batchnorm and distributed.active():  # statistics over the global batch; converts in place
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    place(model, settings)
    net = torch.compile(model) if settings.compile else model
    return distributed.wrap(net, torch.device(settings.device))


def make_scaler(settings: TrainerConfig) -> torch.amp.GradScaler:
    """fp16 needs loss scaling; bf16 and fp32 do not (a disabled scaler is a no-op)."""
    return torch.amp.GradScaler(torch.device(settings.device).type, enabled=settings.precision == "16-mixed")


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule | None,
    settings: TrainerConfig,
    state: TrainState,
    epoch: int,
    callback: Callback,
    scaler: torch.amp.GradScaler,
    stop: Callable[[], bool] | None = None,
    rng: dict[str, Any] | None = None,
    begun: int | None = None,
    loss: Loss | None = None,
) -> dict[str, float] | None:
    """One epoch of training; None when `stop` ended it early (after an optimizer step). `begun`: the caller
    already began the epoch (`begin_epoch`), which has that many batches.
    With `state.batch` = k > 0 (a mid-epoch checkpoint) the first k batches are drawn but not trained on:
    the order is a function of the reseeded loader generator, so the rest come out as before; then `rng`
    (taken at the checkpoint) is restored, so augmentation and dropout continue exactly."""
    num_batches = begun if begun is not None else begin_epoch(model, loader, settings, epoch, callback)
    skip = min(state.batch, num_batches)
    tally = _Tally(state.partial if skip else {}, is_multi_label(settings.loss))
    every = settings.checkpoint_every_n_steps
    start = time.perf_counter() - tally.seconds
    optimizer.zero_grad(set_to_none=True)
    for i, (images, targets) in enumerate(_limited(loader, num_batches)):
        if i < skip:
            if i + 1 == skip and rng is not None:
                restore_rng(rng)  # where the checkpoint was taken: before batch `skip` was drawn
            continue
        stepped = (i + 1) % settings.accumulate == 0 or i + 1 == num_batches
        _train_batch(model, images, targets, optimizer, scaler, settings, tally, state.step + 1, stepped, loss)
        if stepped:
            state.step += 1
            callback.on_step(state)
            if schedule is not None and schedule.interval == "step":
                schedule.scheduler.step()
        if (i + 1) % SYNC_EVERY == 0 or i + 1 == num_batches:
            tally.sync(epoch)
            callback.on_batch_end(i + 1, tally.loss, tally.acc, tally.seen / (time.perf_counter() - start))
        if stepped and i + 1 < num_batches:  # at the last batch the epoch-end checkpoint follows anyway
            stopping = stop is not None and stop()
            if stopping or (every > 0 and state.step % every == 0):
                tally.sync(epoch)
                state.batch = i + 1
                state.partial = tally.partial(time.perf_counter() - start)
                callback.on_checkpoint(state)
                if stopping:
                    return None
    tally.sync(epoch)
    state.batch, state.partial = 0, {}
    seconds = time.perf_counter() - start
    return {
        "train_loss": tally.loss,
        "train_acc": tally.acc,
        "lr": optimizer.param_groups[0]["lr"],
        "seconds": seconds,
        "images_per_second": tally.seen / seconds if seconds > 0 else 0.0,
    }


def begin_epoch(model: nn.Module, loader: DataLoader, settings: TrainerConfig, epoch: int, callback: Callback) -> int:
    """Training mode, the epoch's seeds, then the callbacks' epoch start (a fine-tune policy sets what trains);
    returns how many batches the epoch trains."""
    model.train()
    num_batches = _start_epoch(loader, settings, epoch)
    callback.on_epoch_start(epoch, num_batches)
    return num_batches


def _start_epoch(loader: DataLoader, settings: TrainerConfig, epoch: int) -> int:
    """Seed the epoch and return how many batches it trains.

    The data order, augmentation and dropout of an epoch are a pure function of (seed, epoch, rank): a run resumed
    at an epoch boundary replays exactly what an uninterrupted run would. Under DDP the order is shared (the
    sampler's set_epoch) and each rank draws its own augmentation and dropout."""
    overfit = settings.overfit_batches > 0
    rank_seed = epoch_seed(settings.seed, None if overfit else epoch, distributed.rank())
    torch.manual_seed(rank_seed)
    if isinstance(getattr(loader, "generator", None), torch.Generator):
        loader.generator.manual_seed(rank_seed)
    for shuffler in (loader, getattr(loader, "sampler", None)):
        if hasattr(shuffler, "set_epoch"):  # DistributedSampler, on-device batches
            shuffler.set_epoch(0 if overfit else epoch)
    return _num_batches(loader, settings.overfit_batches if overfit else settings.limit_train_batches)


def _train_batch(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    settings: TrainerConfig,
    tally: _Tally,
    step: int,
    stepped: bool,
    loss_fn: Loss | None = None,
) -> None:
    """Forward and backward one batch (its loss counts towards optimizer step `step`); with `stepped`, the
    optimizer steps on the gradients accumulated since the last step."""
    images, targets = batch_to_device(images, targets, settings)
    with autocast(settings):
        logits = model(images)
        loss = criterion(logits, targets, settings) if loss_fn is None else loss_fn(images, logits, targets, settings)
    if settings.l1 > 0:
        loss = loss + settings.l1 * sum(p.abs().sum() for p in model.parameters() if p.ndim > 1)
    tally.add(loss, logits, targets, step)
    with _accumulating(model, stepped):
        scaler.scale(loss / settings.accumulate if settings.accumulate > 1 else loss).backward()
    if stepped:
        _optimizer_step(model, optimizer, scaler, settings)


class _Tally:
    """Loss and accuracy of the epoch so far, over all ranks.

    A batch only leaves its detached loss and predicted classes on the device (one argmax, no host sync);
    `sync`, at the progress points, folds the pending batches into the totals with a few batched ops and one
    host sync, sums them over ranks, and raises NonFiniteLoss naming the first step whose loss was NaN or
    infinite. The engine syncs before every checkpoint, so no checkpoint holds weights from after a bad loss.
    """

    def __init__(self, partial: dict[str, float], multi_label: bool = False):
        self.multi_label = multi_label  # accuracy: the share of right yes/no decisions per image
        self.loss_sum = float(partial.get("loss_sum", 0.0))
        self.correct = float(partial.get("correct", 0.0))
        self.seen = int(partial.get("seen", 0))
        self.seconds = float(partial.get("seconds", 0.0))
        self.losses: list[torch.Tensor] = []
        self.predicted: list[torch.Tensor] = []
        self.sizes: list[int] = []  # images in each pending batch
        self.steps: list[int] = []  # the optimizer step each pending batch contributes to

    def add(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, step: int) -> None:
        self.losses.append(loss.detach())
        logits = logits.detach()
        self.predicted.append(label_hits(logits, targets) if self.multi_label else logits.argmax(1) == _hard(targets))
        self.sizes.append(len(targets))
        self.steps.append(step)

    def sync(self, epoch: int) -> None:
        if not self.losses:  # already folded in (every rank trains the same number of batches, so all skip alike)
            return
        hits = torch.cat(self.predicted).float().sum()
        pending = torch.cat([torch.stack(self.losses).float(), hits.float()[None]]).cpu().double()  # host sync
        losses, sizes = pending[:-1], torch.tensor(self.sizes, dtype=torch.float64)
        local = torch.stack([losses @ sizes, pending[-1], sizes.sum(), (~torch.isfinite(losses)).sum().double()])
        loss_sum, correct, seen, non_finite = distributed.all_reduce_sum(local).tolist()
        self.loss_sum += loss_sum
        self.correct += correct
        self.seen += int(seen)
        if non_finite:
            bad = (~torch.isfinite(losses)).tolist()
            mine = next((step for step, flag in zip(self.steps, bad) if flag), 2**62)
            step = int(distributed.all_reduce_min(torch.tensor([mine])).item())
            raise NonFiniteLoss(self.loss_sum, epoch, step)
        self.losses, self.predicted, self.sizes, self.steps = [], [], [], []

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.seen, 1)

    @property
    def acc(self) -> float:
        return self.correct / max(self.seen, 1)

    def partial(self, seconds: float) -> dict[str, float]:
        """The running sums of a partial epoch, for a mid-epoch checkpoint."""
        return {"loss_sum": self.loss_sum, "correct": self.correct, "seen": self.seen, "seconds": seconds}


def _accumulating(model: nn.Module, stepped: bool) -> contextlib.AbstractContextManager:
    """DDP averages gradients over ranks in every backward; between optimizer steps (trainer.accumulate) that
    is wasted, so it waits for the backward of the stepping batch."""
    if stepped or not isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def _optimizer_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, settings: TrainerConfig
) -> None:
    if settings.grad_clip > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def predict(
    model: nn.Module, loader: DataLoader, settings: TrainerConfig, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and hard targets over a loader, on the CPU in float32; the model runs where `eval_settings` puts
    it (a quantized model on the CPU), in the memory format fit uses."""
    settings = eval_settings(model, settings)
    model.eval()
    place(model, settings)
    all_logits, all_targets = [], []
    for images, targets in _limited(loader, _num_batches(loader, limit)):
        images, targets = batch_to_device(images, targets, settings)
        with autocast(settings):
            logits = model(images)
        all_logits.append(logits.float().cpu())
        all_targets.append((targets if is_multi_label(settings.loss) else _hard(targets)).cpu())
    if not all_logits:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(all_logits), torch.cat(all_targets)


def evaluate(
    model: nn.Module, loader: DataLoader, settings: TrainerConfig, limit: int | None = None
) -> dict[str, float]:
    """Loss and accuracy over `loader`; under DDP each rank holds a shard and the sums are combined, so the
    figures are those of the whole split."""
    logits, targets = predict(model, loader, settings, limit)
    if not distributed.active():
        return metrics_from_logits(logits, targets, settings)
    if is_multi_label(settings.loss):  # mAP needs every score: rank 0 measures the whole split
        shards = distributed.gather((logits, targets))
        whole = shards and metrics_from_logits(*(torch.cat(part) for part in zip(*shards)), settings)
        return distributed.broadcast(whole)
    count = targets.numel()
    loss = metrics_from_logits(logits, targets, settings)["loss"] * count if count else 0.0
    correct = (logits.argmax(1) == targets).sum().item() if count else 0
    totals = distributed.all_reduce_sum(torch.tensor([loss, correct, count], dtype=torch.float64))
    loss_sum, correct, count = totals.tolist()
    if not count:
        return {"loss": math.nan, "acc": math.nan}
    return {"loss": loss_sum / count, "acc": correct / count}


def metrics_from_logits(logits: torch.Tensor, targets: torch.Tensor, settings: TrainerConfig) -> dict[str, float]:
    if targets.numel() == 0:
        return {"loss": math.nan, "acc": math.nan}
    plain = replace(settings, label_smoothing=0.0)  # no smoothing when measuring
    if is_multi_label(settings.loss):  # accuracy: right yes/no decisions at 1/2, then mAP, F1, ...
        return {"loss": criterion(logits, targets, plain).item(), **epoch_figures(logits, targets)}
    return {
        "loss": criterion(logits, targets, plain).item(),
        "acc": (logits.argmax(1) == targets).float().mean().item(),
    }


def criterion(logits: torch.Tensor, targets: torch.Tensor, settings: TrainerConfig) -> torch.Tensor:
    """Cross-entropy (hard or soft targets, optional smoothing), MSE on one-hot targets, or multi-label BCE."""
    if is_multi_label(settings.loss):
        return bce(logits, targets, settings.label_smoothing)
    if settings.loss == "mse":
        if targets.ndim == 1:
            targets = F.one_hot(targets, logits.shape[1])
        return F.mse_loss(logits.float(), targets.float())
    return F.cross_entropy(logits.float(), targets, label_smoothing=settings.label_smoothing)


def autocast(settings: TrainerConfig) -> contextlib.AbstractContextManager:
    if settings.precision == "32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if settings.precision == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(settings.device).type, dtype=dtype)


def _hard(targets: torch.Tensor) -> torch.Tensor:
    return targets.argmax(1) if targets.ndim == 2 else targets  # mixup/cutmix give soft targets


def _num_batches(loader: DataLoader, limit: int | None) -> int:
    return len(loader) if limit is None else min(limit, len(loader))


def _limited(loader: DataLoader, num_batches: int) -> Iterator[Any]:
    for i, batch in enumerate(loader):
        if i >= num_batches:
            break
        yield batch


def _update_best(state: TrainState, value: float, epoch: int, settings: TrainerConfig) -> bool:
    better = state.best_metric is None or (
        value > state.best_metric if monitor_mode(settings.monitor) == "max" else value < state.best_metric
    )
    if better:
        state.best_metric, state.best_epoch, state.bad_epochs = value, epoch, 0
    else:
        state.bad_epochs += 1
        if settings.patience is not None and state.bad_epochs >= settings.patience:
            state.stopped_early = True
    return better
