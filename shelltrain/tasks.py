"""The tasks that use a trained model and train nothing: `task=evaluate`, `task=predict`, `task=export`.

Each loads the model named by `model.weights` (a run directory or checkpoint), does its work and
writes summary.json (and its own files) in the task's own run directory.
"""

from __future__ import annotations

import copy
import csv
import io
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from torch.utils.data import DataLoader
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from shelltrain import rundir, summary
from shelltrain.cam import FOLDER as CAM_FOLDER
from shelltrain.cam import Cam, write_overlays
from shelltrain.console import print_summary, say, show
from shelltrain.data import DataBundle, FileImages, build_data
from shelltrain.data.loader import Loader, worker_count
from shelltrain.data.transforms import to_float_transforms
from shelltrain.dataroot import user_path
from shelltrain.engine import predict
from shelltrain.errors import UserError
from shelltrain.export import FORMATS, INSTALL_HINT, export_model, inference_metadata, run_exported
from shelltrain.imagesize import plain_size
from shelltrain.metrics import confusion_matrix, per_class_metrics, split_metrics
from shelltrain.model_card import source_card
from shelltrain.multilabel import LOSS, decide
from shelltrain.multilabel_run import labelled_figures
from shelltrain.painting import Painter
from shelltrain.plots import plot_confusion_matrix
from shelltrain.predictions import confused_table, error_analysis, sample_ids, write_label_predictions
from shelltrain.preprocess import Preprocessing
from shelltrain.rundir import write_text
from shelltrain.schema import TrainerConfig
from shelltrain.trained import TrainedModel, open_trained
from shelltrain.tta import with_tta

EXPORT_CHECK_BATCH = 8  # images of the export check; the example the exporter traces has another size


def run_task(
    cfg: DictConfig, run_dir: Path, settings: TrainerConfig, console: Console, overrides: list[str] | None = None
) -> float | None:
    """Run `cfg.task` (evaluate, predict or export); returns evaluate's accuracy for sweepers. `overrides` (the
    command line's) tell which data settings the user chose on purpose over the checkpoint's preprocessing."""
    started = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    trained = open_trained(str(cfg.model.weights))
    say(console, f"{cfg.task}: model from [bold]{trained.source}[/bold] ({len(trained.classes)} classes)")
    if trained.temperature is not None:
        applied = f"its logits divided by T={trained.temperature:.4g}"
        say(console, f"{cfg.task}: the run's calibration is applied ({applied})")
    if trained.thresholds is not None:  # a multi-label model: sigmoid outputs, its per-class thresholds
        settings = replace(settings, loss=LOSS, label_smoothing=0.0)
        say(console, f"{cfg.task}: multi-label, a class is predicted above its threshold (tuned on val)")
    if cfg.task == "evaluate":
        cfg = OmegaConf.merge(cfg, {"data": run_data(cfg.data, trained, overrides or [], console)})
        cfg = OmegaConf.merge(cfg, {"data": checkpoint_data(cfg.data, trained.preprocessing, overrides or [], console)})
    task = {"evaluate": evaluate_task, "predict": predict_task, "export": export_task}[cfg.task]
    found, result = task(cfg, run_dir, settings, console, trained)
    result_summary = summary.build({"task": cfg.task, **found, "weights": str(trained.source)}, run_dir, started)
    summary.write(result_summary, run_dir)
    print_summary(console, result_summary, cfg.report.per_job)
    say(console, f"run directory: [bold]{run_dir}[/bold]")
    return result


def evaluate_task(
    cfg: DictConfig, run_dir: Path, settings: TrainerConfig, console: Console, trained: TrainedModel
) -> tuple[dict[str, Any], float]:
    """Accuracy, loss, top-5 and per-class scores on `evaluate.split` of the configured data."""
    split = cfg.evaluate.split
    multi = trained.thresholds is not None
    pin = settings.device.type == "cuda"
    data = build_data(cfg.data, cfg.augmentation, seed=cfg.trainer.seed, pin_memory=pin, multi_label=multi)
    trained.check_classes(data.classes, "model.weights", "evaluate on data with the classes the model was trained on")
    if trained.preprocessing.channels != data.in_channels:
        wanted = trained.preprocessing.channels
        raise UserError(
            f"the model takes {wanted}-channel images and the data gives {data.in_channels}; set data.channels={wanted}"
        )
    loader = _unaugmented(data, split)
    tested = with_tta(trained.module, cfg.evaluate.tta)
    logits, targets = predict(tested, loader, settings, limit=cfg.trainer.get(f"limit_{split}_batches"))
    if multi:
        return _evaluate_labels(cfg, run_dir, settings, console, trained, data, loader, logits, targets)
    confusion = confusion_matrix(logits, targets, data.num_classes)
    if cfg.plots:
        plot_confusion_matrix(confusion, data.classes, run_dir / rundir.PLOTS / rundir.CONFUSION_PLOT, title=split)
    metrics = split_metrics(logits, targets, settings, split)
    say(console, f"{cfg.data.name} {split}: {len(targets)} images, accuracy {metrics[f'{split}_acc']:.4f}")
    per_class = per_class_metrics(confusion, data.classes)
    cam = None
    if cfg.report.cam:  # the top-loss gallery's Grad-CAM overlays
        cam = Cam(trained.module, cfg.report.cam_layer, "report.cam_layer", console, trained.kind)
    painter = Painter(processes=0) if cfg.plots else None  # drawn here: nothing else runs meanwhile
    confused = error_analysis(run_dir, logits, targets, loader.dataset, data, split, per_class, painter, cam)
    if confused and cfg.report.per_job != "line":
        show(console, confused_table(confused, split))
    figures = {
        "split": split,
        "data": cfg.data.name,
        "tta": cfg.evaluate.tta,
        **metrics,
        "device": str(trained.runs_on(settings).device),
        "per_class": per_class,
        "confused_pairs": confused,
    }
    return figures, metrics[f"{split}_acc"]


def _evaluate_labels(
    cfg: DictConfig,
    run_dir: Path,
    settings: TrainerConfig,
    console: Console,
    trained: TrainedModel,
    data: DataBundle,
    loader: DataLoader,
    logits: torch.Tensor,
    targets: torch.Tensor,
) -> tuple[dict[str, Any], float]:
    """A multi-label model's figures on the split at its thresholds (mAP, F1, per class) and predictions.csv."""
    split = cfg.evaluate.split
    ids = sample_ids(loader.dataset, len(targets))
    write_label_predictions(run_dir / rundir.PREDICTIONS, ids, logits, trained.thresholds, data.classes, targets, split)
    metrics = {**split_metrics(logits, targets, settings, split)}
    metrics.update(labelled_figures(logits, targets, trained.thresholds, data.classes, split))
    say(console, f"{cfg.data.name} {split}: {len(targets)} images, mAP {metrics[f'{split}_map']:.4f}")
    figures = {"split": split, "data": cfg.data.name, "tta": cfg.evaluate.tta, **metrics}
    return {**figures, "device": str(trained.runs_on(settings).device)}, metrics[f"{split}_map"]


def predict_task(
    cfg: DictConfig, run_dir: Path, settings: TrainerConfig, console: Console, trained: TrainedModel
) -> tuple[dict[str, Any], None]:
    """predictions.csv: file (relative to predict.input), class, probability, for every image under the folder."""
    folder = user_path(str(cfg.predict.input))
    if not folder.is_dir():
        raise UserError(f"predict.input: '{folder}' is not a folder; point it at a folder of images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())
    if not files:
        raise UserError(f"predict.input: no images ({', '.join(IMG_EXTENSIONS)}) under '{folder}'")
    pre = trained.preprocessing
    mode = "RGB" if pre.channels == 3 else "L"
    labels = torch.zeros(len(files), dtype=torch.long)  # unknown; the loader needs some
    transform = v2.Compose(to_float_transforms(pre.mean, pre.std))
    images = FileImages([str(p) for p in files], labels, mode, pre.image_size, transform, key="predict.input")
    loader = Loader(images, batch_size=cfg.predict.batch_size, num_workers=worker_count(cfg.data.num_workers))
    logits, _ = predict(trained.module, loader, settings)
    classes = trained.classes
    output = run_dir / rundir.PREDICTIONS
    if cfg.predict.cam:  # the predicted class's (multi-label: the most probable label's) Grad-CAM overlay
        request = Cam(trained.module, cfg.predict.cam_layer, "predict.cam_layer", console, trained.kind)
        names = [path.relative_to(folder).as_posix() for path in files]
        top = logits.argmax(1).tolist()
        if write_overlays(request, images, names, top, pre, run_dir / CAM_FOLDER, cfg.predict.batch_size):
            say(console, f"Grad-CAM overlays of the predicted classes in [bold]{run_dir / CAM_FOLDER}[/bold]")
    if trained.thresholds is not None:  # file, labels above their thresholds, their probabilities
        return _predict_labels(cfg, console, trained, settings, files, folder, logits, output)
    probability, index = logits.softmax(1).max(1)
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["file", "class", "probability"])
    for path, k, p in zip(files, index.tolist(), probability.tolist()):
        writer.writerow([path.relative_to(folder).as_posix(), classes[k], f"{p:.6f}"])
    write_text(text.getvalue(), output)
    counts = {str(name): 0 for name in classes}
    for k in index.tolist():
        counts[str(classes[k])] += 1
    say(console, f"{len(files)} images from {folder}: predictions in [bold]{output}[/bold]")
    figures = {
        "images": len(files),
        "input": str(folder),
        "predictions": str(output),
        "device": str(trained.runs_on(settings).device),
    }
    return {**figures, "predicted_counts": counts}, None


def _predict_labels(
    cfg: DictConfig,
    console: Console,
    trained: TrainedModel,
    settings: TrainerConfig,
    files: list[Path],
    folder: Path,
    logits: torch.Tensor,
    output: Path,
) -> tuple[dict[str, Any], None]:
    """A multi-label model's predictions.csv (file, labels, scores) and how many images got each label."""
    names = [path.relative_to(folder).as_posix() for path in files]
    write_label_predictions(output, names, logits, trained.thresholds, trained.classes)
    chosen = decide(logits, trained.thresholds)[1].sum(0).tolist()
    say(console, f"{len(files)} images from {folder}: predictions in [bold]{output}[/bold]")
    figures = {"images": len(files), "input": str(folder), "predictions": str(output)}
    counts = {str(name): int(n) for name, n in zip(trained.classes, chosen)}
    return {**figures, "device": str(trained.runs_on(settings).device), "predicted_counts": counts}, None


def export_task(
    cfg: DictConfig, run_dir: Path, settings: TrainerConfig, console: Console, trained: TrainedModel
) -> tuple[dict[str, Any], None]:
    """The model as ONNX or TorchScript, checked against PyTorch's logits on a seeded random batch."""
    fmt, tolerance = cfg.export.format, float(cfg.export.tolerance)
    shape = trained.preprocessing.shape
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(2, *shape, generator=generator)
    check = torch.randn(EXPORT_CHECK_BATCH, *shape, generator=generator)
    path = run_dir / FORMATS[fmt]
    metadata = inference_metadata(
        trained.classes, trained.preprocessing.as_dict(), str(cfg.model.weights), trained.thresholds
    )
    exported = export_model(trained.module, fmt, path, example, metadata)
    figures: dict[str, Any] = {"format": fmt, "path": str(path), "tolerance": tolerance}
    card = source_card(trained.source)
    if card is not None:  # the source run's model card travels with the exported file
        figures["model_card"] = str(run_dir / rundir.MODEL_CARD)
        write_text(card.read_text(encoding="utf-8"), run_dir / rundir.MODEL_CARD)
    with torch.no_grad():
        reference = exported(check).float()
    outputs = run_exported(fmt, path, check)
    if outputs is None:
        figures["max_abs_diff"] = None
        say(console, f"exported [bold]{path}[/bold]; not checked: onnxruntime is missing ({INSTALL_HINT})")
        return figures, None
    diff = (outputs - reference).abs().max().item()
    figures["max_abs_diff"] = diff
    say(console, f"exported [bold]{path}[/bold]: max |logit difference| from PyTorch {diff:.3g} on {len(check)} images")
    if not diff <= tolerance:
        raise UserError(
            f"export: the {fmt} model's logits differ from PyTorch's by {diff:.3g} > export.tolerance={tolerance:g}"
        )
    return figures, None


PREPROCESSING_KEYS = ("image_size", "channels", "mean", "std")


def run_data(data: DictConfig, trained: TrainedModel, overrides: list[str], console: Console) -> DictConfig:
    """The data a run is evaluated on: its own data config (the checkpoint's, so an image folder's root, splits and
    options need no repeating) unless the command line names another data set; `data.*` keys the command line
    sets win. Said in one line."""
    config = trained.config or {}
    run = config["data"] if "data" in config else None
    given = [str(o).split("=", 1)[0].lstrip("+~") for o in overrides]
    if not run or ("data" in given and data.name != run.get("name")):
        return data  # another data set, named on purpose (or a checkpoint without its config)
    chosen = {key.split(".")[1] for key in given if key.startswith("data.")}
    followed = OmegaConf.merge(data, {k: v for k, v in run.items() if k in data and k not in chosen})
    where = f" (data.root={followed.root})" if followed.get("root") not in (None, "???") else ""
    say(console, f"data: {followed.name}{where} as the run was trained on; name data=... to evaluate on other data")
    return followed


def checkpoint_data(
    data: DictConfig, preprocessing: Preprocessing, overrides: list[str], console: Console
) -> dict[str, Any]:
    """The model's preprocessing (image size, channels, mean/std) for the data it is evaluated on, so that a run's
    own figures come back without repeating its data options; a key the command line sets is the user's choice
    and wins, said in one line."""
    pre = preprocessing.as_dict()
    given = {str(o).split("=", 1)[0].lstrip("+~") for o in overrides}
    chosen = {}
    for key in PREPROCESSING_KEYS:
        if f"data.{key}" not in given:
            chosen[key] = pre[key]
        elif _as_recorded(key, data[key]) != pre[key]:
            say(
                console,
                f"note: data.{key}={_as_recorded(key, data[key])} from the command line; "
                f"the model was trained with {pre[key]}",
            )
    return chosen


def _as_recorded(key: str, value: Any) -> Any:
    """A data key's value as a checkpoint's preprocessing records it ([32, 32] is the square 32)."""
    value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    return plain_size(value) if key == "image_size" and value is not None else value


def _unaugmented(data: DataBundle, split: str) -> DataLoader:
    """The split's loader; for train, its images through the test transforms (no augmentation, no shuffle)."""
    if split != "train":
        return getattr(data, split)
    images = copy.copy(data.train.dataset)
    images.transform = data.test.dataset.transform
    return Loader(images, batch_size=data.test.batch_size, num_workers=data.test.num_workers)
