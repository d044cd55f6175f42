"""shelltrain's training engine vs a plain hand-written PyTorch loop: images/s on the same work.

Same model, data, batch size, optimizer and seed; one epoch each, alternating, several rounds in one
process, so both see the same machine state. Prints the median images/s of each and the ratio.

    python benchmarks/overhead.py [--model cnn] [--rounds 5] [--image-size 32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from shelltrain.data import build_data
from shelltrain.engine import TrainSettings, train_one_epoch, Callback, TrainState, make_scaler
from shelltrain.models import build_model

CONFIGS = "configs"


def make_data(image_size: int, batch_size: int):
    cfg = OmegaConf.create(
        {
            "data": OmegaConf.load(f"{CONFIGS}/data/digits.yaml"),
            "augmentation": OmegaConf.load(f"{CONFIGS}/augmentation/none.yaml"),
        }
    )
    cfg.data.image_size, cfg.data.batch_size = image_size, batch_size
    return build_data(cfg.data, cfg.augmentation, seed=0)


def fresh(model_name: str, data) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    cfg = OmegaConf.create({"name": model_name, "small_input": False, "dropout": 0.0, "width": 32})
    model = build_model(cfg, data.num_classes, data.in_channels).to(memory_format=torch.channels_last)
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def plain_epoch(model, optimizer, loader) -> float:
    """What a user would write by hand."""
    model.train()
    seen, start = 0, time.perf_counter()
    for images, targets in loader:
        images = images.contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += images.shape[0]
    return seen / (time.perf_counter() - start)


def engine_epoch(model, optimizer, loader) -> float:
    settings = TrainSettings(epochs=1, device=torch.device("cpu"), channels_last=True)
    row = train_one_epoch(
        model, loader, optimizer, None, settings, TrainState(), 1, Callback(), make_scaler(settings)
    )
    return row["images_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    data = make_data(args.image_size, args.batch_size)
    results: dict[str, list[float]] = {"plain loop": [], "shelltrain": []}
    warm_model, warm_opt = fresh(args.model, data)
    plain_epoch(warm_model, warm_opt, data.train)  # warm-up: allocator, oneDNN primitives
    for _ in range(args.rounds):
        for name, epoch in (("plain loop", plain_epoch), ("shelltrain", engine_epoch)):
            model, optimizer = fresh(args.model, data)
            results[name].append(epoch(model, optimizer, data.train))
    print(f"model={args.model} image_size={args.image_size} batch_size={args.batch_size} "
          f"threads={torch.get_num_threads()} rounds={args.rounds} ({len(data.train.dataset)} images/epoch)")
    for name, values in results.items():
        print(f"{name:>11}: {statistics.median(values):8.1f} images/s  (runs: {', '.join(f'{v:.0f}' for v in values)})")
    ratio = statistics.median(results["shelltrain"]) / statistics.median(results["plain loop"])
    print(f"ratio shelltrain / plain: {ratio:.3f}")


if __name__ == "__main__":
    main()
