"""What task=audit leaves: audit.json (every pair, problem and ranked label issue), plots/audit_label_issues.png
(the top candidates, given vs suggested label), plots/audit_duplicates.png (the pairs, leaks first), summary.json
(the counts the gates read, plus an `audit` section) and the console summary."""

from __future__ import annotations

import io
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from rich.table import Table

from shelltrain import rundir, summary
from shelltrain.audit_scan import Sample
from shelltrain.console import say, show
from shelltrain.data import DataBundle
from shelltrain.environment import provenance, resolve_device

PICTURE = 64  # side of a file's picture in the galleries when the folder was not loaded as a data set


def write(
    cfg: DictConfig,
    run_dir: Path,
    report: dict[str, Any],
    samples: list[Sample],
    data: DataBundle | None,
    classes: list[str],
    started: float,
    console: Any,
) -> float:
    """audit.json, the pictures, summary.json and the console summary; returns the problem count. `data`: the
    splits as loaded (None: image files found on disk, when the folder could not be loaded as a data set)."""
    train = [s for s in samples if s.split == "train"]
    issues = label_issues(report.get("labels"), train, classes)
    pairs = sorted(report["pairs"], key=lambda p: (not p["leak"], p["kind"] != "exact"))
    counts = {
        "leaks": sum(p["leak"] for p in pairs),
        "duplicates": sum(not p["leak"] for p in pairs),
        "label_issues": len(issues) if "labels" in report else None,
        "problem_files": sum(len(h["problems"]) for k, h in report["health"].items() if k != "imbalance_ratio"),
        "imbalance_ratio": report["health"]["imbalance_ratio"],
    }
    record = {
        "data": str(cfg.data.name),
        "classes": classes,
        "settings": OmegaConf.to_container(cfg.audit, resolve=True),
        **counts,
        "pairs": pairs,
        "health": report["health"],
        "candidates": issues,
        "seconds_scan": report["seconds_scan"],
        "seconds": round(time.perf_counter() - started, 3),
    }
    if "labels" in report:
        record.update({k: report["labels"][k] for k in ("thresholds", "confident_joint")})
        record["ranked"] = report["labels"]["order"]  # every train image, most likely mislabelled first
        record["folds"] = int(cfg.audit.folds)
    rundir.write_json(record, run_dir / rundir.AUDIT_REPORT)
    if cfg.plots and int(cfg.audit.gallery):
        draw(run_dir, data, issues, pairs, int(cfg.audit.gallery))
    section = {k: record[k] for k in ("seconds_scan", "folds") if k in record}
    figures = {**counts, "audit": {**section, "report": rundir.AUDIT_REPORT}}
    result = summary.build(figures, run_dir, started, provenance(resolve_device(cfg.trainer.device), run_dir))
    summary.write(result, run_dir)
    show(console, table(record))
    say(console, f"audit: {rundir.AUDIT_REPORT} and plots/audit_*.png in [bold]{run_dir}[/bold]")
    return float(counts["leaks"] + counts["duplicates"] + (counts["label_issues"] or 0))


def label_issues(labels: dict[str, Any] | None, train: list[Sample], classes: list[str]) -> list[dict[str, Any]]:
    """The flagged train images, most likely error first: id, given and suggested class, score."""
    if labels is None:
        return []
    probabilities = labels["probabilities"]
    out = []
    for i in labels["issues"]:
        s, suggested = train[i], labels["suggested"][i]
        out.append(
            {
                **s.brief(),
                "given": classes[s.label],
                "suggested": classes[suggested],
                "score": round(labels["score"][i], 5),
                "suggested_probability": round(float(probabilities[i, suggested]), 5),
            }
        )
    return out


def table(record: dict[str, Any]) -> Table:
    """The console summary: one row per finding."""
    grid = Table(title=f"data audit: {record['data']}", show_header=True)
    grid.add_column("finding")
    grid.add_column("count", justify="right")
    grid.add_column("detail")
    pairs = record["pairs"]
    detail = "; ".join(
        f"{p['a']['split']}:{p['a']['id']} = {p['b']['split']}:{p['b']['id']} ({p['kind']})" for p in pairs[:3]
    )
    grid.add_row("leaks (pairs across splits)", str(record["leaks"]), detail if record["leaks"] else "")
    grid.add_row("duplicate pairs within a split", str(record["duplicates"]), "")
    broken = [p for k, h in record["health"].items() if k != "imbalance_ratio" for p in h["problems"]]
    names = "; ".join(f"{p['id']} ({p['problem']})" for p in broken[:3])
    grid.add_row("unreadable or zero-byte files", str(record["problem_files"]), names)
    for split, h in record["health"].items():
        if split == "imbalance_ratio":
            continue
        notes = [f"missing classes: {', '.join(h['missing_classes'])}"] if h["missing_classes"] else []
        notes += [f"{h['grey']} grey, {h['colour']} colour"] if h["grey"] and h["colour"] else []
        grid.add_row(f"{split}: images / size outliers", f"{h['images']} / {len(h['outliers'])}", "; ".join(notes))
    ratio = record["imbalance_ratio"]
    grid.add_row("train imbalance (largest / smallest class)", f"{ratio:.2f}" if ratio else "-", "")
    if record["label_issues"] is not None:
        top = "; ".join(f"{i['id']}: {i['given']} -> {i['suggested']}" for i in record["candidates"][:3])
        grid.add_row(f"likely label errors ({record.get('folds')} fold models)", str(record["label_issues"]), top)
    return grid


def draw(run_dir: Path, data: DataBundle | None, issues: list[dict], pairs: list[dict], count: int) -> None:
    """plots/audit_label_issues.png and plots/audit_duplicates.png (when there is something to show)."""
    plots = run_dir / rundir.PLOTS
    if issues:
        tiles = [(picture(data, i),) for i in issues[:count]]
        titles = [f"given {i['given']}\nsuggested {i['suggested']}" for i in issues[:count]]
        _grid(
            tiles,
            titles,
            f"Likely label errors, most likely first ({len(issues)} found)",
            plots / rundir.AUDIT_LABELS_PLOT,
        )
    if pairs:
        tiles = [(picture(data, p["a"]), picture(data, p["b"])) for p in pairs[:count]]
        titles = [
            f"{p['kind']}{' LEAK' if p['leak'] else ''}\n{p['a']['split']} / {p['b']['split']}" for p in pairs[:count]
        ]
        _grid(tiles, titles, f"Duplicate pairs, leaks first ({len(pairs)} found)", plots / rundir.AUDIT_PAIRS_PLOT)


def picture(data: DataBundle | None, sample: dict[str, Any]) -> np.ndarray:
    """A sample (audit_scan.Sample.brief) as the run reads it, or its file when there is no data set (H x W x 3 in
    [0, 1])."""
    if data is None:
        with Image.open(sample["id"]) as image:
            return np.asarray(image.convert("RGB").resize((PICTURE, PICTURE)), dtype=np.float32) / 255.0
    image = getattr(data, sample["split"]).dataset.load(sample["index"]).float().div(255).permute(1, 2, 0).numpy()
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image[:, :, :3]


def _grid(tiles: list[tuple[np.ndarray, ...]], titles: list[str], heading: str, name: Path) -> None:
    """One tile per entry (a pair: two images side by side), titled, in rows of up to 8."""
    from matplotlib.figure import Figure

    columns = min(8 if len(tiles[0]) == 1 else 4, len(tiles))
    rows = math.ceil(len(tiles) / columns)
    width = len(tiles[0])
    fig = Figure(figsize=(1.6 * columns * width, 1.9 * rows + 0.4), layout="constrained")
    fig.suptitle(heading)
    for k, (tile, title) in enumerate(zip(tiles, titles)):
        ax = fig.add_subplot(rows, columns, k + 1)
        gap = np.ones((tile[0].shape[0], max(1, tile[0].shape[1] // 8), 3))  # white between a pair's images
        ax.imshow(
            np.concatenate([part for image in tile for part in (image, gap)][:-1], axis=1), interpolation="nearest"
        )
        ax.set_title(title, fontsize=8)
        ax.set_axis_off()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=80, format="png")
    rundir.write_atomic(buffer.getvalue(), name)
