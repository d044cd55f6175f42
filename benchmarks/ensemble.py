"""Evaluating same-architecture ensemble members: one model after another vs all at once with vmap
(ensemble.StackedMembers), on the same loader, in one process, alternating. Prints images/s of both, their ratio
and the largest difference between their logits. `ensemble.vmap=auto` uses vmap on CUDA only; this is the
measurement behind that choice.

    python benchmarks/ensemble.py [--models cnn,resnet18] [--members 3] [--samples 256] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig
from torch.utils.data import DataLoader, TensorDataset

from shelltrain import configs
from shelltrain.fusion import member_logits
from shelltrain.models import build_model
from shelltrain.schema import TrainerConfig, defaults


def model_option(name: str, small_input: bool) -> DictConfig:
    """The model group as `model=<name>` composes it (a packaged option, else model=torchvision model.name=<name>)."""
    options = {p.stem for p in (Path(configs.__file__).parent / "model").glob("*.yaml")}
    chosen = [f"model={name}"] if name in options else ["model=torchvision", f"model.name={name}"]
    with initialize_config_module(config_module="shelltrain.configs", version_base="1.3"):
        return compose(config_name="train", overrides=[*chosen, f"model.small_input={str(small_input).lower()}"]).model


def images_per_second(models: list, loader: DataLoader, settings: TrainerConfig, stacked: bool) -> float:
    started = time.perf_counter()
    logits, _ = member_logits(models, loader, settings, limit=None, stacked=stacked)
    if settings.device.type == "cuda":
        torch.cuda.synchronize()
    return logits.shape[1] / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="cnn,resnet18", help="comma-separated model names (build_model's)")
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    settings = defaults("trainer", epochs=0, device=device)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.samples, 3, args.image_size, args.image_size, generator=generator)
    loader = DataLoader(
        TensorDataset(images, torch.randint(0, 10, (args.samples,), generator=generator)), batch_size=args.batch_size
    )
    print(
        f"{args.members} members, {args.samples} images of {args.image_size}x{args.image_size}, batch "
        f"{args.batch_size}, {device}, {torch.get_num_threads()} threads, best of {args.rounds} rounds"
    )
    print(f"{'model':<20} {'loop img/s':>11} {'vmap img/s':>11} {'vmap/loop':>10} {'max |diff|':>11}")
    for name in args.models.split(","):
        torch.manual_seed(0)
        model_cfg = model_option(name, small_input=name.startswith("resnet"))
        models = [build_model(model_cfg, 10, 3).to(device).eval() for _ in range(args.members)]
        loop, _ = member_logits(models, loader, settings, limit=None)  # warm-up, and the reference
        stacked, _ = member_logits(models, loader, settings, limit=None, stacked=True)
        speeds: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.rounds):
            for mode in (False, True):
                speeds[mode].append(images_per_second(models, loader, settings, mode))
        best = {mode: max(values) for mode, values in speeds.items()}
        spread = statistics.pstdev(speeds[True]) / statistics.mean(speeds[True])
        print(
            f"{name:<20} {best[False]:>11.0f} {best[True]:>11.0f} {best[True] / best[False]:>9.2f}x "
            f"{(stacked - loop).abs().max().item():>11.2e}   (vmap spread {spread:.0%})"
        )


if __name__ == "__main__":
    main()
