"""MODEL_CARD.md: one page a colleague (or the Hugging Face hub) reads about a trained run.

Written at the end of a training run from what the run measured (its summary.json figures, the split sizes and
its config), never from guesses: a section whose figures the run did not make is left out, and what only the user
knows (intended use, limitations) is a marked placeholder. The YAML front matter is the hub's model-card metadata
(`library_name`, `tags`, `metrics`, `model-index` with the test accuracy). `task=export` copies the card beside
the exported file (`source_card`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from shelltrain import rundir
from shelltrain.imagesize import size_text

WEAK_CLASSES = 3  # the lowest-recall classes the card names
LISTED_CLASSES = 20  # more classes than this are counted, not listed
PLACEHOLDER = "<!-- FILL IN: this section is yours; shelltrain cannot know it -->"


def write_card(config: dict[str, Any], result: dict[str, Any], splits: dict[str, int], run_dir: Path) -> Path:
    """Write MODEL_CARD.md for a finished run: `config` the run's resolved config, `result` its summary.json,
    `splits` the number of images in each split."""
    path = Path(run_dir) / rundir.MODEL_CARD
    rundir.write_text(render(config, result, splits), path)
    return path


def source_card(source: Path) -> Path | None:
    """The MODEL_CARD.md of the run a trained model was read from (a checkpoint under checkpoints/, a checkpoint
    beside its card, or an ensemble's ensemble.json), or None when that run has none."""
    folder = source.parent
    for run in (folder.parent, folder) if folder.name == rundir.CHECKPOINTS else (folder,):
        card = run / rundir.MODEL_CARD
        if card.is_file():
            return card
    return None


def render(config: dict[str, Any], result: dict[str, Any], splits: dict[str, int]) -> str:
    """The card's text: front matter, then task, data, model, training, results and the user's sections."""
    classes = list(result.get("per_class") or {})
    parts = [
        front_matter(config, result),
        f"# {_model_name(config)} on {config['data']['name']}\n\n"
        f"Written by shelltrain at the end of the run in `{result.get('run_dir', '')}` from its summary.json.",
        _task(classes, _multi_label(result)),
        _data(config, splits, classes),
        _model(config, result),
        _training(config, result),
        _results(config, result),
        *_optional_sections(result),
        f"## Intended use\n\n{PLACEHOLDER}\n\nWho should use this model, on which images, for what decisions.",
        f"## Limitations\n\n{PLACEHOLDER}\n\nWhere it fails (see the weakest classes above), data it has not seen, "
        "biases of the training data.",
    ]
    return "\n\n".join(parts) + "\n"


def front_matter(config: dict[str, Any], result: dict[str, Any]) -> str:
    """The Hugging Face hub's model-card metadata, as YAML between --- lines."""
    data = config["data"]["name"]
    metrics = [{"type": "accuracy", "value": round(result["test_acc"], 4), "name": "test accuracy"}]
    multi_label = _multi_label(result)
    if multi_label:
        metrics.insert(0, {"type": "mAP", "value": round(result["test_map"], 4), "name": "test mAP"})
    if result.get("test_loss") is not None:
        loss = "test binary cross-entropy" if multi_label else "test cross-entropy"
        metrics.append({"type": "loss", "value": round(result["test_loss"], 4), "name": loss})
    meta = {
        "library_name": "pytorch",
        "tags": ["image-classification", "shelltrain", _model_name(config)],
        "metrics": ["accuracy"],
        "model-index": [
            {
                "name": f"{_model_name(config)}-{data}",
                "results": [
                    {
                        "task": {"type": "image-classification", "name": "Image Classification"},
                        "dataset": {"type": data, "name": data, "split": "test"},
                        "metrics": metrics,
                    }
                ],
            }
        ],
    }
    return f"---\n{yaml.safe_dump(meta, sort_keys=False)}---"


def _multi_label(result: dict[str, Any]) -> bool:
    """Whether the card describes a multi-label model (trainer.loss=bce): its summary has the multi-label figures."""
    return "test_map" in result


def _task(classes: list[str], multi_label: bool) -> str:
    listed = ", ".join(classes[:LISTED_CLASSES]) + (", ..." if len(classes) > LISTED_CLASSES else "")
    if multi_label:
        return (
            f"## Task\n\nMulti-label image classification over {len(classes)} classes (a sigmoid per class, "
            f"decision thresholds tuned on val): {listed}."
        )
    return f"## Task\n\nImage classification into {len(classes)} classes: {listed}."


def _data(config: dict[str, Any], splits: dict[str, int], classes: list[str]) -> str:
    data = config["data"]
    where = next((f"{key} `{data[key]}`" for key in ("root", "manifest") if data[key]), "built in")
    rows = "\n".join(f"| {split} | {count:,} |" for split, count in splits.items())
    size = f"{size_text(data['image_size'])} px" if data["image_size"] is not None else "at the size of model.weights"
    return (
        f"## Data\n\nData set `{data['name']}` ({where}), {len(classes)} classes, images {size} (height x width).\n\n"
        f"| split | images |\n|---|---|\n{rows}"
    )


def _model(config: dict[str, Any], result: dict[str, Any]) -> str:
    start = (config["model"]["weights"] if "weights" in config["model"] else None) or "a random initialization"
    return f"## Model\n\n{_model_name(config)}, {result['params']:,} parameters, trained from {start}."


def _training(config: dict[str, Any], result: dict[str, Any]) -> str:
    optimizer, trainer, data = config["optimizer"], config["trainer"], config["data"]
    schedule = config["scheduler"]["_target_"] or "none (constant learning rate)"
    decay = f", weight decay {optimizer['weight_decay']}" if "weight_decay" in optimizer else ""  # a user's optimizer
    rows = [
        (
            "optimizer",
            f"{_short(optimizer['_target_'])}, lr {optimizer['lr']}" + decay,
        ),
        ("schedule", _short(schedule)),
        (
            "epochs",
            f"{result.get('epochs_completed')} of {trainer['epochs']}"
            + (" (stopped early)" if result.get("stopped_early") else ""),
        ),
        ("selected epoch", f"{result.get('best_epoch')} by {trainer['monitor']}"),
        ("batch size", data["batch_size"]),
        ("augmentation", config["augmentation"]["name"]),
        ("precision", trainer["precision"]),
        ("seed", trainer["seed"]),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"## Training\n\n| setting | value |\n|---|---|\n{table}"


def _results(config: dict[str, Any], result: dict[str, Any]) -> str:
    rows = [
        ("test mAP", result.get("test_map")),
        ("test micro F1", result.get("test_f1_micro")),
        ("test accuracy", result["test_acc"]),
        ("test loss", result.get("test_loss")),
        ("test top-5 accuracy", result.get("test_top5")),
        ("test expected calibration error", result.get("test_ece")),
        ("best validation accuracy", result.get("best_val_acc")),
    ]
    table = "\n".join(f"| {name} | {_figure(value)} |" for name, value in rows if value is not None)
    seed = config["trainer"]["seed"]
    spread = (
        f"One seed (trainer.seed={seed}): the spread across seeds was not measured; a sweep over trainer.seed "
        "(e.g. `shelltrain -m trainer.seed=0,1,2`) measures it in its summary.csv."
    )
    return f"## Results\n\nOn the test split:\n\n| metric | value |\n|---|---|\n{table}\n\n{spread}\n\n{_weak(result)}"


def _weak(result: dict[str, Any]) -> str:
    per_class = result.get("per_class") or {}
    weakest = sorted(per_class.items(), key=lambda item: item[1]["recall"])[:WEAK_CLASSES]
    rows = "\n".join(
        f"| {name} | {_figure(c['recall'])} | {_figure(c['precision'])} | {c['support']} |" for name, c in weakest
    )
    return (
        f"### Weakest classes\n\nThe {len(weakest)} classes with the lowest test recall:\n\n"
        f"| class | recall | precision | test images |\n|---|---|---|---|\n{rows}"
    )


def _optional_sections(result: dict[str, Any]) -> list[str]:
    """Calibration and pruning, when the run did them."""
    sections = []
    calibration = result.get("calibration")
    if calibration:
        sections.append(
            f"## Calibration\n\ntrainer.calibrate={calibration['method']}: T = {_figure(calibration['temperature'])} "
            f"fitted on the {calibration['fitted_on']} split; test ECE {_figure(calibration['test_ece_before'])} -> "
            f"{_figure(calibration['test_ece_after'])}, test NLL {_figure(calibration['test_nll_before'])} -> "
            f"{_figure(calibration['test_nll_after'])}. The exported model includes the temperature."
        )
    prune = result.get("prune")
    if prune:
        accuracy = prune["accuracy"]
        sections.append(
            f"## Pruning\n\n{prune['method']}: {prune['before']['params']:,} -> {prune['after']['params']:,} "
            f"parameters; test accuracy {_figure(accuracy['before']['test'])} before, "
            f"{_figure(accuracy['pruned']['test'])} right after pruning, "
            f"{_figure(accuracy['finetuned']['test'])} after fine-tuning (the figures above describe the pruned model)."
        )
    return sections


def _figure(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _short(target: str) -> str:
    """`torch.optim.AdamW` -> `AdamW`."""
    return str(target).rsplit(".", 1)[-1]


def _model_name(config: dict[str, Any]) -> str:
    model = config["model"]
    return _short(model["name"] if "name" in model else model["_target_"])  # a user's model: its _target_
