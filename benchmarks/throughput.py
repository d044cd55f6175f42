"""Training throughput in images/s: shelltrain's engine vs a plain hand-written loop on the same model and data,
DataLoader vs on-device batches (data.on_device), with and without AMP, channels_last and torch.compile.

Every variant gets its own model and optimizer (same seed), one warm-up epoch (compilation, allocator, kernel
selection), then the variants take turns, one epoch each, for several rounds, so all see the same machine
state; the table shows the median. Ratios: shelltrain / plain on the same data path, on-device / DataLoader.

    python benchmarks/throughput.py                                   # CPU: cnn on digits, crop + flip
    python benchmarks/throughput.py --loops shelltrain plain --data-paths loader   # issue 2's overhead check
    python benchmarks/throughput.py --device cuda --data synthetic --image-size 224 --model resnet50 \\
        --batch-size 256 --precision bf16 --compile off on
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from omegaconf import DictConfig, OmegaConf

from shelltrain.data import DataBundle, build_data
from shelltrain.engine import Callback, TrainState, autocast, make_scaler, train_one_epoch, trainable
from shelltrain.models import build_model
from shelltrain.schema import defaults


def option(group: str, name: str) -> DictConfig:
    """A packaged option as Hydra composes it (over its group's schema), detached from the rest of the config."""
    with initialize_config_module(config_module="shelltrain.configs", version_base="1.3"):
        cfg = compose("train", overrides=[f"{group}={name}"])
    return OmegaConf.create(OmegaConf.to_container(cfg[group]))  # unresolved: ${data.image_size} stays


@dataclass(frozen=True)
class Variant:
    loop: str  # shelltrain | plain
    data: str  # loader | device
    precision: str  # 32 | bf16 | 16-mixed
    channels_last: bool
    compile: bool

    @property
    def options(self) -> str:
        extras = [self.precision if self.precision != "32" else "fp32"]
        return " ".join(extras + ["channels_last"] * self.channels_last + ["compile"] * self.compile)

    @property
    def label(self) -> str:
        return f"{self.loop:<10} {self.data:<6} {self.options}"


class Runner:
    """One variant: its model, optimizer and scaler, trained an epoch at a time."""

    def __init__(self, variant: Variant, args: argparse.Namespace, data: DataBundle, device: torch.device):
        self.variant, self.device = variant, device
        self.loader = data.train
        self.limit = args.batches
        torch.manual_seed(0)
        model_cfg = option("model", args.model)
        model_cfg.small_input = args.small_input
        model = build_model(model_cfg, data.num_classes, data.in_channels)
        self.settings = defaults(
            "trainer",
            epochs=1,
            device=device,
            precision=variant.precision,
            channels_last=variant.channels_last,
            compile=variant.compile,
            limit_train_batches=args.batches,
        )
        self.model = trainable(model, self.settings)  # to the device, memory format, compiled: the same for both
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.scaler = make_scaler(self.settings)
        self.epoch = 0

    def epoch_images_per_second(self) -> float:
        self.epoch += 1
        _synchronize(self.device)
        start = time.perf_counter()
        if self.variant.loop == "shelltrain":
            row = train_one_epoch(
                self.model,
                self.loader,
                self.optimizer,
                None,
                self.settings,
                TrainState(),
                self.epoch,
                Callback(),
                self.scaler,
            )
            seen = row["images_per_second"] * row["seconds"]
        else:
            seen = self._plain_epoch()
        _synchronize(self.device)
        return seen / (time.perf_counter() - start)

    def _plain_epoch(self) -> int:
        """What one writes by hand: no metrics, no checks, nothing but the step."""
        model, optimizer, scaler, settings = self.model, self.optimizer, self.scaler, self.settings
        model.train()
        seen = 0
        for i, (images, targets) in enumerate(self.loader):
            if self.limit is not None and i == self.limit:
                break
            images = images.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            if settings.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(settings):
                loss = F.cross_entropy(model(images), targets)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            seen += images.shape[0]
        return seen


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_data(args: argparse.Namespace, device: torch.device | None) -> DataBundle:
    data = option("data", args.data)
    data.image_size, data.batch_size, data.num_workers = args.image_size, args.batch_size, args.workers
    data.drop_last = True  # every batch the same shape: no recompiles, and the same images/epoch on both paths
    data.persistent_workers = args.workers > 0
    data.on_device = device is not None
    if args.data == "synthetic":
        data.num_samples, data.mean, data.std = args.samples, [0.5], [0.29]
    augmentation = option("augmentation", args.augmentation)
    cfg = OmegaConf.create({"data": data, "augmentation": augmentation})
    pin = args.device.startswith("cuda")
    return build_data(cfg.data, cfg.augmentation, seed=0, pin_memory=pin, device=device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn", help="a configs/model option: cnn, resnet18, resnet50, ...")
    parser.add_argument("--small-input", action="store_true", help="model.small_input (CIFAR-style stem)")
    parser.add_argument("--data", default="digits", help="an in-memory configs/data option: digits, synthetic, ...")
    parser.add_argument("--samples", type=int, default=2048, help="synthetic: number of images")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--augmentation", default="basic", help="a configs/augmentation option with on-device support")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the loader path")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--loops", nargs="+", default=["shelltrain", "plain"], choices=["shelltrain", "plain"])
    parser.add_argument("--data-paths", nargs="+", default=["loader", "device"], choices=["loader", "device"])
    parser.add_argument("--precision", nargs="+", default=["32"], choices=["32", "bf16", "16-mixed"])
    parser.add_argument("--channels-last", nargs="+", default=["on"], choices=["on", "off"])
    parser.add_argument("--compile", nargs="+", default=["off"], choices=["on", "off"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=None, help="at most this many batches per epoch")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    bundles = {path: make_data(args, device if path == "device" else None) for path in args.data_paths}
    variants = [
        Variant(loop, path, precision, cl == "on", compiled == "on")
        for precision, cl, compiled, path, loop in itertools.product(
            args.precision, args.channels_last, args.compile, args.data_paths, args.loops
        )
    ]
    runners = [Runner(v, args, bundles[v.data], device) for v in variants]
    started = time.perf_counter()
    for runner in runners:
        runner.epoch_images_per_second()  # warm-up (compiles); not counted
    warm_up = time.perf_counter() - started
    print(f"warm-up (compiling, if asked) {warm_up:.1f}s; measuring {args.rounds} rounds", flush=True)
    results: dict[Variant, list[float]] = {v: [] for v in variants}
    for round_number in range(args.rounds):
        for runner in runners:
            results[runner.variant].append(runner.epoch_images_per_second())
        print(f"round {round_number + 1}: " + ", ".join(f"{r[-1]:.0f}" for r in results.values()), flush=True)
    report(args, device, variants, results, len(bundles[args.data_paths[0]].train), warm_up)


def report(
    args: argparse.Namespace,
    device: torch.device,
    variants: list[Variant],
    results: dict[Variant, list[float]],
    batches: int,
    warm_up: float,
) -> None:
    median = {v: statistics.median(values) for v, values in results.items()}
    batches = min(batches, args.batches or batches)
    print(
        f"model={args.model} data={args.data} image_size={args.image_size} batch_size={args.batch_size} "
        f"augmentation={args.augmentation} device={device} threads={torch.get_num_threads()} "
        f"batches/epoch={batches} rounds={args.rounds} warm-up={warm_up:.1f}s torch={torch.__version__}"
    )
    print(f"{'variant':<48} {'images/s':>10}  runs")
    for v in variants:
        print(f"{v.label:<48} {median[v]:10.1f}  {', '.join(f'{x:.0f}' for x in results[v])}")
    print("ratios:")
    for v in variants:
        if v.loop == "shelltrain":
            plain = Variant("plain", v.data, v.precision, v.channels_last, v.compile)
            if plain in median:
                print(f"  shelltrain / plain     {v.data:<10} {v.options:<28} {median[v] / median[plain]:.3f}")
    for v in variants:
        if v.data == "device":
            loader = Variant(v.loop, "loader", v.precision, v.channels_last, v.compile)
            if loader in median:
                print(f"  on-device / DataLoader {v.loop:<10} {v.options:<28} {median[v] / median[loader]:.3f}")


if __name__ == "__main__":
    main()
