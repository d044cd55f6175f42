"""Speed / size / accuracy trade-off of every pruning and quantization option on ONE trained model.

Trains the model once exactly as `shelltrain` does (default: resnet18 on digits, the default config),
then, for each option, prunes a deep copy through the same stage the CLI runs (fine-tuning, checkpoint,
report), reloads the saved checkpoint with weights_only=True and checks that it reproduces the test
accuracy and the reported sparsity exactly (the "reload" column). Prints a table (markdown) and writes
it as CSV.

    python benchmarks/prune.py [--model resnet18] [--options "structured 0.5 l1,quantize int8 (static)"]
                               [--csv FILE] [--workdir DIR] [--trained DIR/trained/checkpoints/best.pt] [KEY=VALUE ...]

Extra KEY=VALUE arguments are Hydra overrides applied to every run (e.g. trainer.epochs=4).
CPU latency: batch 32, 1 thread, median of 10 forward passes (each option's prune.latency_* keys), the
trained and the pruned model taking turns, so a busy machine slows both alike.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from shelltrain.checkpoint import load_checkpoint
from shelltrain.console import make_console
from shelltrain.data import build_data
from shelltrain.engine import TrainState, evaluate
from shelltrain.environment import seed_everything
from shelltrain.jobs import run
from shelltrain.models import build_model, first_forward
from shelltrain.prune import rebuild
from shelltrain.prune.measure import sparsity
from shelltrain.prune.stage import prune_stage
from shelltrain.runner import train_settings
from shelltrain.silence import quiet

# option label -> overrides of the prune group (each runs on a copy of the same trained model)
OPTIONS: dict[str, list[str]] = {
    "threshold 0.02": ["prune=threshold", "prune.threshold=0.02"],
    "magnitude 0.5": ["prune=magnitude", "prune.amount=0.5"],
    "magnitude 0.9 iterative x3": ["prune=magnitude", "prune.amount=0.9", "prune.schedule=iterative", "prune.steps=3"],
    "magnitude 0.9 adaptive": ["prune=magnitude", "prune.amount=0.9", "prune.schedule=adaptive"],
    "random 0.5": ["prune=random", "prune.amount=0.5"],
    "structured 0.5 l1": ["prune=structured", "prune.ratio=0.5"],
    "structured 0.5 l1 global": ["prune=structured", "prune.ratio=0.5", "prune.global=true"],
    "structured 0.5 hierarchical": [
        "prune=structured",
        "prune.ratio=0.5",
        "prune.schedule=hierarchical",
        "prune.finetune_epochs=1",
    ],
    "structured adaptive": ["prune=structured", "prune.ratio=0.7", "prune.schedule=adaptive"],
    "layer 2 blocks": ["prune=layer", "prune.blocks=2"],
    "quantize int8 (static)": ["prune=quantize"],
    "quantize 4-bit (fake)": ["prune=quantize", "prune.bits=4"],
}

COLUMNS = [
    "option",
    "params",
    "nonzero",
    "sparsity",
    "MACs",
    "size MB",
    "ckpt MB",
    "latency ms",
    "speed-up",
    "test acc",
    "pruned",
    "fine-tuned",
    "drop (pts)",
    "reload",
    "seconds",
]


def config(overrides: list[str]) -> DictConfig:
    with initialize_config_module(config_module="shelltrain.configs", version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def train_once(base: list[str], workdir: Path) -> tuple[DictConfig, Path]:
    cfg = config([*base, "prune=none"])
    run_dir = workdir / "trained"
    print(f"training once: {' '.join(base)}", flush=True)
    run(cfg, run_dir)
    return cfg, run_dir / "checkpoints" / "best.pt"


def one_option(label: str, overrides: list[str], base: list[str], trained: Path, workdir: Path) -> dict:
    cfg = config([*base, *overrides])
    device = torch.device("cpu")
    seed_everything(cfg.trainer.seed, cfg.trainer.deterministic, cfg.trainer.threads)
    data = build_data(cfg.data, cfg.augmentation, seed=cfg.trainer.seed)
    model = build_model(cfg.model, data.num_classes, data.in_channels)
    first_forward(model, next(iter(data.val))[0][:2])
    model.load_state_dict(load_checkpoint(trained)["model"])
    settings = train_settings(cfg.trainer, device)
    checkpoints = workdir / label.replace(" ", "_") / "checkpoints"
    started = time.perf_counter()
    result = prune_stage(cfg, model, data, settings, TrainState(), checkpoints.parent, {"config": {}}, make_console())
    seconds = time.perf_counter() - started
    report = result.report

    # what a user gets back: the checkpoint alone, loaded safely and rebuilt
    with quiet():  # quantized tensors warn when loaded
        ckpt = torch.load(checkpoints / "best.pt", weights_only=True)
    fresh = rebuild(build_model(cfg.model, data.num_classes, data.in_channels), ckpt, next(iter(data.val))[0][:1])
    fresh.load_state_dict(ckpt["model"])
    reloaded = evaluate(fresh, data.test, settings, limit=cfg.trainer.limit_test_batches)["acc"]

    b, a, c, acc = report["before"], report["after"], report["change"], report["accuracy"]
    return {
        "option": label,
        "params": a["params"],
        "nonzero": a["nonzero_params"],
        "sparsity": a["sparsity"],
        "MACs": a["macs"],
        "size MB": a["size_bytes"] / 1e6,
        "ckpt MB": a["checkpoint_bytes"] / 1e6,
        "latency ms": a["latency_ms"],
        "speed-up": c["speedup"],
        "test acc": acc["before"]["test"],
        "pruned": acc["pruned"]["test"],
        "fine-tuned": acc["finetuned"]["test"],
        "drop (pts)": 100 * (acc["before"]["test"] - acc["finetuned"]["test"]),
        "reload": "exact"
        if (reloaded, sparsity(fresh)) == (acc["finetuned"]["test"], a["sparsity"])
        else f"DIFFERS (acc {reloaded:.4f}, sparsity {sparsity(fresh):.4f})",
        "seconds": seconds,
        "_baseline": b,
    }


def fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, int) and value >= 10_000:
        return f"{value / 1e6:.2f}M"
    return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--options", default=",".join(OPTIONS), help="comma-separated labels of OPTIONS")
    parser.add_argument("--csv", default="prune_benchmark.csv")
    parser.add_argument("--trained", help="reuse this best.pt instead of training (same model and overrides!)")
    parser.add_argument("--workdir", help="keep the trained run and pruned checkpoints here (default: a temp dir)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    base = [f"model={args.model}", "trainer.device=cpu", *args.overrides]
    labels = [label.strip() for label in args.options.split(",") if label.strip()]
    unknown = [label for label in labels if label not in OPTIONS]
    if unknown:
        sys.exit(f"unknown options {unknown}; known: {list(OPTIONS)}")

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        trained = Path(args.trained) if args.trained else train_once(base, workdir)[1]
        rows: list[dict] = []
        for label in labels:
            print(f"\n=== {label} ===", flush=True)
            rows.append(one_option(label, OPTIONS[label], base, trained, workdir))
            table = [baseline_row(rows[0], args.model), *rows]
            write_csv(table, args.csv)  # after every option: an interrupted run keeps what it measured

    print(f"\nmodel={args.model} overrides={args.overrides} latency: CPU, batch 32, 1 thread, median of 10")
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in table:
        print("| " + " | ".join(fmt(row[c]) for c in COLUMNS) + " |")
    print(f"\nwritten: {args.csv}")


def baseline_row(first: dict, model: str) -> dict:
    b = first["_baseline"]
    return {
        "option": f"trained {model} (no pruning)",
        "params": b["params"],
        "nonzero": b["nonzero_params"],
        "sparsity": b["sparsity"],
        "MACs": b["macs"],
        "size MB": b["size_bytes"] / 1e6,
        "ckpt MB": "",
        "latency ms": b["latency_ms"],
        "speed-up": 1.0,
        "test acc": first["test acc"],
        "pruned": "",
        "fine-tuned": "",
        "drop (pts)": "",
        "reload": "",
        "seconds": "",
    }


def write_csv(table: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(table)


if __name__ == "__main__":
    main()
