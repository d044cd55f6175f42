"""Knowledge distillation (Hinton et al., 2015): a student trained to match a teacher's temperature-softened outputs.

The teacher is a trained shelltrain model opened by the one loader of trained models (trained.open_trained:
pruned and int8 checkpoints too, each fed its own preprocessing), or several fused by fusion.FusedModel.
The engine knows nothing of it: the runner hands `Distiller` to `engine.fit` as its training loss, so the
teacher sees the very batch the student sees (augmented, on the training device, under the run's autocast), in
eval mode without gradients. An eval-mode teacher is a pure function of the batch, so a resumed run distils
exactly as before.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from shelltrain import engine
from shelltrain.data import unsharded
from shelltrain.errors import UserError
from shelltrain.fusion import FusedModel
from shelltrain.placement import batch_to_device, place_frozen
from shelltrain.preprocess import Preprocessing
from shelltrain.schema import TrainerConfig
from shelltrain.trained import open_trained, read_ensemble, sweep_jobs


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    targets: torch.Tensor,
    settings: TrainerConfig,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """alpha * KL(softmax(teacher / T) || softmax(student / T)) * T^2 + (1 - alpha) * the hard-label loss.

    The T^2 keeps the soft term's gradients the size of the hard term's whatever T is (Hinton et al.);
    the KL is averaged over the batch, as cross-entropy is."""
    log_student = F.log_softmax(student.float() / temperature, dim=1)
    log_teacher = F.log_softmax(teacher.float() / temperature, dim=1)
    soft = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature**2
    if alpha == 1.0:
        return soft
    return alpha * soft + (1.0 - alpha) * engine.criterion(student, targets, settings)


class Distiller:
    """The training loss `engine.fit` takes (engine.Loss): the teacher's logits on the student's batch, then
    `distillation_loss`. With `cache` (a TeacherCache), each train image's teacher logits are computed once, in one
    pass over the split, and read from a table from then on: only right when the images a sample yields are the
    same every epoch (no augmentation)."""

    def __init__(
        self,
        teacher: nn.Module,
        temperature: float,
        alpha: float,
        description: str = "",
        cache: TeacherCache | None = None,
    ):
        self.teacher, self.temperature, self.alpha = teacher.eval().requires_grad_(False), temperature, alpha
        self.description = description
        self.cache = cache

    def __call__(
        self, images: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, settings: TrainerConfig
    ) -> torch.Tensor:
        if self.cache is None:
            with torch.no_grad():
                teacher_logits = self.teacher(images)
        else:
            teacher_logits = self.cache.logits(self.teacher, images)
        return distillation_loss(logits, teacher_logits, targets, settings, self.temperature, self.alpha)


class TeacherCache:
    """Teacher logits by image content, for every image of the train split (`source`: the whole split, also under
    DDP). An eval-mode teacher is a pure function of the image, so the first lookup runs it once over the split and
    keeps each image's logits in one table on the training device, sorted by key; every lookup then finds its batch's
    rows on the device (searchsorted): no host sync, no Python per image, and the rows are gathered copies, not views
    that keep whole batches alive. Content keys stay right across shuffling and resume. The key is the image
    projected on two fixed random directions (float64): distinct images collide with negligible probability, and the
    nearest stored key is taken, so a key that differs by rounding still finds its image."""

    def __init__(self, source: Any, settings: TrainerConfig) -> None:
        self.source, self.settings = source, settings
        self.keys: torch.Tensor | None = None  # N x 2, sorted by the first column
        self.table: torch.Tensor | None = None  # N x classes, in the keys' order
        self.probe: torch.Tensor | None = None
        self.hits = self.misses = 0  # images read from the table; images the teacher computed

    def key(self, images: torch.Tensor) -> torch.Tensor:
        """Each image's content key (B x 2, float64), computed where the images are."""
        flat = images.detach().flatten(1)
        if self.probe is None:
            generator = torch.Generator().manual_seed(0)
            self.probe = torch.randn(flat.shape[1], 2, generator=generator, dtype=torch.float64).to(flat.device)
        return flat.to(torch.float64) @ self.probe

    def fill(self, teacher: nn.Module) -> None:
        """The teacher over the whole train split once, as the student's batches reach it (on the device, in its
        memory format, under the run's autocast); the run's RNG is left where it was."""
        keys, rows = [], []
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for images, targets in self.source:
                images, _ = batch_to_device(images, targets, self.settings)
                with engine.autocast(self.settings):
                    rows.append(teacher(images).detach())
                keys.append(self.key(images))
        order = torch.cat(keys)[:, 0].argsort()
        self.keys, self.table = torch.cat(keys)[order].contiguous(), torch.cat(rows)[order]
        self.misses += len(order)

    def logits(self, teacher: nn.Module, images: torch.Tensor) -> torch.Tensor:
        if self.table is None:
            self.fill(teacher)
        query = self.key(images)
        first = self.keys[:, 0].contiguous()
        at = torch.searchsorted(first, query[:, 0].contiguous())
        candidates = torch.stack([(at - 1).clamp(min=0), at.clamp(max=len(first) - 1)], dim=1)
        distance = (self.keys[candidates] - query[:, None]).abs().sum(-1)
        nearest = candidates.gather(1, distance.argmin(1, keepdim=True)).squeeze(1)
        self.hits += images.shape[0]
        return self.table[nearest]


def make_distiller(
    distill: DictConfig | None,
    data: Any,
    settings: TrainerConfig,
    say: Callable[[str], None],
    augmentation: DictConfig | None = None,
) -> Distiller | None:
    """The distillation loss of `distill` (the config group), its teacher on the training device; None without
    distillation. A teacher trained on other classes is one line, before training starts. The teacher's logits
    are cached (`distill.cache`, null: whenever `augmentation` changes nothing: the same images every epoch)."""
    if distill is None or distill.name == "none":
        return None
    plain = augmentation is None or not (augmentation.train or augmentation.mixup_alpha or augmentation.cutmix_alpha)
    cache = plain if distill.cache is None else bool(distill.cache)
    if cache and not plain:
        raise UserError("distill.cache=true needs augmentation=none (augmented images differ every epoch); unset it")
    key = "distill.teacher" if distill.teacher else "distill.sweep"
    teacher, what = _teacher(distill, data, settings, key, say)
    description = f"distilling from {what} (temperature {distill.temperature:g}, alpha {distill.alpha:g})"
    say(description + (", teacher logits cached" if cache else ""))
    cached = TeacherCache(unsharded(data.train), settings) if cache else None
    return Distiller(teacher, float(distill.temperature), float(distill.alpha), description, cached)


def _teacher(
    distill: DictConfig, data: Any, settings: TrainerConfig, key: str, say: Callable[[str], None]
) -> tuple[nn.Module, str]:
    """The teacher as one module fed the student's batches (each model brought to its own preprocessing), where
    it may run (an int8 teacher on the CPU), and what it is in words. Several models are fused by their rule (a
    vote teaches with the members' mean: votes are no distribution to learn)."""
    if distill.sweep:
        paths = [path for path, _ in sweep_jobs(distill.sweep, distill.top_k, settings.monitor, "distill.sweep")]
        rule, weights = "average", [1.0] * len(paths)
    else:
        paths, rule, weights = [Path(str(distill.teacher))], "average", [1.0]
    models = [open_trained(path, key) for path in paths]
    if len(models) == 1 and models[0].kind == "ensemble":
        report = read_ensemble(models[0].source.parent)
        models, rule = models[0].members, report["rule"]
        weights = list(report.get("weights") or [1.0] * len(models))
    given = Preprocessing.of_data(data)
    for model in models:
        model.check_classes(data.classes, key, "distil on the teacher's data set and classes")
    fed = [model.fed(given, key, say) for model in models]
    teacher = fed[0] if len(fed) == 1 else FusedModel(fed, "average" if rule == "vote" else rule, weights)
    what = f"{len(models)} models fused by {rule}" if len(models) > 1 else str(models[0].source)
    return place_frozen(teacher, settings), what
