"""task=audit: a data-health report of the configured data, and the gates on it.

Stages, one function each: load the splits as a run would (build_data), look at every image (audit_scan: hashes,
thumbnails, sizes; then duplicate pairs within and across splits, and each split's health), find likely label
errors from out-of-fold probabilities (audit_labels, `audit.folds` models), then write audit.json, the pictures
and summary.json (audit_report). summary.json's flat keys `leaks`, `duplicates`, `label_issues` and
`problem_files` are what `gate.leaks_max`, `gate.duplicates_max` and `gate.label_issues_max` read.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torch.utils.data import Dataset

from shelltrain import audit_report
from shelltrain.audit_labels import confident_learning, out_of_fold
from shelltrain.audit_scan import Sample, duplicate_pairs, health, imagehash_module, scan_arrays, scan_files
from shelltrain.console import make_console, say
from shelltrain.data import DataBundle, FileImages, build_data
from shelltrain.data.datasets import TensorImages
from shelltrain.dataroot import data_root
from shelltrain.environment import seed_everything
from shelltrain.errors import UserError

SPLITS = ("train", "val", "test")


def run_audit(cfg: DictConfig, run_dir: Path) -> float:
    """The audit job in `run_dir`; returns the number of problems found (leaks + duplicates + label issues)."""
    started = time.perf_counter()
    console = make_console()
    imagehash_module()  # the one optional library: said before anything is loaded
    seed_everything(cfg.trainer.seed, cfg.trainer.deterministic, cfg.trainer.threads)
    data, samples, classes = load(cfg, console)
    pairs = duplicate_pairs(samples, int(cfg.audit.hash_distance), float(cfg.audit.pixel_tolerance))
    report: dict[str, Any] = {"pairs": pairs, "health": health(samples, classes, float(cfg.audit.outlier_factor))}
    report["seconds_scan"] = round(time.perf_counter() - started, 3)
    if cfg.audit.folds and data is not None:
        probabilities = out_of_fold(cfg, run_dir, data, console)
        report["labels"] = confident_learning(probabilities, data.train.dataset.labels, str(cfg.audit.rank_by))
        report["labels"]["probabilities"] = probabilities
    return audit_report.write(cfg, run_dir, report, samples, data, classes, started, console)


def load(cfg: DictConfig, console: Any) -> tuple[DataBundle | None, list[Sample], list[str]]:
    """The splits as a run loads them, and every image described. An image folder with a file that cannot be read
    (which a run refuses at the first) is scanned file by file instead: every broken file is listed, and the
    label-error search, which trains, is skipped."""
    try:
        data = build_data(cfg.data, cfg.augmentation, cfg.trainer.seed)
    except UserError as exc:
        if cfg.data.name != "imagefolder" or "is not a readable image" not in str(exc):
            raise
        say(console, f"audit: {exc}; scanning every file of data.root instead (no label-error search)")
        samples, classes = scan_folder(data_root(cfg.data))
        return None, samples, classes
    say(console, f"audit: looking at {sum(len(getattr(data, s).dataset) for s in SPLITS)} images of {cfg.data.name}")
    return data, scan(data), data.classes


def scan_folder(root: Path) -> tuple[list[Sample], list[str]]:
    """root/<split>/<class>/<file> read file by file (the image folder layout), broken files included."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    files = sorted(p for p in root.glob("*/*/*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
    classes = sorted({p.parent.name for p in files})
    samples: list[Sample] = []
    for split in SPLITS:
        mine = [p for p in files if p.parent.parent.name == split]
        samples += scan_files(split, [str(p) for p in mine], [classes.index(p.parent.name) for p in mine])
    return samples, classes


def scan(data: DataBundle) -> list[Sample]:
    """Every image of every split, as audit_scan describes it."""
    samples: list[Sample] = []
    for split in SPLITS:
        samples += scan_split(split, getattr(data, split).dataset)
    return samples


def scan_split(split: str, dataset: Dataset) -> list[Sample]:
    """One split's images: files read from disk, in-memory images from their pixels."""
    if not isinstance(dataset, (FileImages, TensorImages)):
        raise UserError(
            f"task=audit reads image folders, manifests and in-memory data sets; the {split} split is a "
            f"{type(dataset).__name__}: audit the files it was made from (data=imagefolder or data=manifest)"
        )
    labels = dataset.labels.tolist()
    if isinstance(dataset, FileImages):
        return scan_files(split, [str(p) for p in dataset.paths], labels)
    return scan_arrays(split, dataset.stacked().numpy(), labels)
