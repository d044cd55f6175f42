"""Knowledge distillation (Hinton et al., 2015): a student trained to match a teacher's temperature-softened outputs.

The teacher is a trained shelltrain model rebuilt from its checkpoint by the loader `model.weights` uses
(trained.load_trained_model: pruned and int8 checkpoints too), or several fused as an ensemble. The engine knows
nothing of it: the runner hands `Distiller` to `engine.fit` as its training loss, so the teacher sees the very
batch the student sees (augmented, on the training device, under the run's autocast), in eval mode without
gradients. An eval-mode teacher is a pure function of the batch, so a resumed run distils exactly as before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from shelltrain import engine, rundir
from shelltrain.errors import UserError
from shelltrain.fusion import fuse
from shelltrain.members import read_ensemble, sweep_jobs
from shelltrain.placement import place
from shelltrain.schema import TrainerConfig
from shelltrain.trained import load_trained_model


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
    `distillation_loss`. With `cache`, each image's teacher logits are computed once and reused every later
    epoch (`TeacherCache`): only right when the images a sample yields are the same every epoch (no augmentation)."""

    def __init__(self, teacher: nn.Module, temperature: float, alpha: float, description: str = "", cache=False):
        self.teacher, self.temperature, self.alpha = teacher.eval().requires_grad_(False), temperature, alpha
        self.description = description
        self.cache = TeacherCache() if cache else None

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
    """Teacher logits by image content. An eval-mode teacher is a pure function of the image, so the logits kept
    for an image are the logits it would give again: content keys stay right across shuffling and resume (a
    resumed run just fills the cache anew). The key is the image projected on two fixed random directions (float64):
    distinct images collide with negligible probability; a key that differs by rounding only costs a recomputation."""

    def __init__(self) -> None:
        self.rows: dict[tuple[float, float], torch.Tensor] = {}
        self.probe: torch.Tensor | None = None
        self.hits = self.misses = 0

    def logits(self, teacher: nn.Module, images: torch.Tensor) -> torch.Tensor:
        flat = images.detach().flatten(1)
        if self.probe is None:
            generator = torch.Generator().manual_seed(0)
            self.probe = torch.randn(flat.shape[1], 2, generator=generator, dtype=torch.float64).to(flat.device)
        keys = [tuple(row) for row in (flat.to(torch.float64) @ self.probe).tolist()]
        if all(key in self.rows for key in keys):
            self.hits += len(keys)
            return torch.stack([self.rows[key] for key in keys])
        with torch.no_grad():
            computed = teacher(images)
        self.misses += len(keys)
        for key, row in zip(keys, computed.detach()):
            self.rows.setdefault(key, row)
        return computed


class FusedTeacher(nn.Module):
    """Several models as one teacher: the log of their fused probabilities (the ensemble's rule and weights; a
    vote teaches with the members' mean), so softmax(output / T) is the fused distribution sharpened or softened."""

    def __init__(self, models: Sequence[nn.Module], rule: str, weights: Sequence[float]):
        super().__init__()
        self.members = nn.ModuleList(models)
        self.rule, self.weights = rule, list(weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([member(x).float().softmax(1) for member in self.members])
        return fuse(self.rule, probs, self.weights)[0].clamp_min(1e-12).log()


def make_distiller(
    distill: DictConfig | None,
    classes: list[str],
    settings: TrainerConfig,
    say: Callable[[str], None],
    augmentation: DictConfig | None = None,
) -> Distiller | None:
    """The distillation loss of `distill` (the config group), its teacher on the training device; None without
    distillation. A teacher trained on other classes is one line, before training starts. The teacher's logits
    are cached (`distill.cache`, null: whenever `augmentation` changes nothing: the same images every epoch)."""
    if distill is None or distill.name == "none":
        return None
    plain = augmentation is None or not (
        augmentation.get("train") or augmentation.get("mixup_alpha") or augmentation.get("cutmix_alpha")
    )
    cache = plain if distill.get("cache") is None else bool(distill.cache)
    if cache and not plain:
        raise UserError("distill.cache=true needs augmentation=none (augmented images differ every epoch); unset it")
    key = "distill.teacher" if distill.teacher else "distill.sweep"
    paths, rule, weights = _teacher_sources(distill, settings)
    models = []
    for path in paths:
        model, payload, found = load_trained_model(str(path), key)
        if [str(c) for c in payload["classes"]] != [str(c) for c in classes]:
            raise UserError(
                f"{key}: the teacher '{found}' was trained on {len(payload['classes'])} classes "
                f"({_brief(payload['classes'])}) but this run's data has {len(classes)} ({_brief(classes)}); "
                "distil on the teacher's data set and classes"
            )
        models.append(model)
    teacher = models[0] if len(models) == 1 else FusedTeacher(models, rule, weights)
    place(teacher, settings)
    what = f"{len(models)} models fused by {rule}" if len(models) > 1 else str(paths[0])
    description = f"distilling from {what} (temperature {distill.temperature:g}, alpha {distill.alpha:g})"
    say(description + (", teacher logits cached" if cache else ""))
    return Distiller(teacher, float(distill.temperature), float(distill.alpha), description, cache)


def _teacher_sources(distill: DictConfig, settings: TrainerConfig) -> tuple[list[Path], str, list[float]]:
    """The teacher's checkpoints (or run directories) and how they are fused."""
    if distill.sweep:
        jobs = sweep_jobs(distill.sweep, distill.top_k, settings.monitor)
        return [path for path, _ in jobs], "average", [1.0] * len(jobs)
    directory = rundir.ensemble_dir(distill.teacher)
    if directory is None:
        return [Path(str(distill.teacher))], "average", [1.0]
    report = read_ensemble(directory)
    paths = [directory / member["checkpoint"] for member in report["members"]]
    return paths, report["rule"], list(report.get("weights") or [1.0] * len(paths))


def _brief(classes: Sequence[Any]) -> str:
    names = [str(c) for c in classes]
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
