"""Input pipeline on a real image folder: a plain hand-written loop vs shelltrain's DataLoader path vs the decoded
cache (data.cache=memory, data.cache=disk with on-device augmentation), model=cnn at data.image_size=64, 3 epochs.

It writes a folder of JPEGs (scikit-learn's digits upscaled to --side px, default 96, RGB with noise: two noisy
copies of the 1,437 train digits, one of the 360 test digits) into a temporary directory, then runs the cases in
turns (seed by seed), each as its own process, and prints per case: img/s in the epochs after the first (the
first pays for worker start-up and cache building), the epoch time, the first epoch's extra time (its seconds
minus a later epoch's, plus the set-up before training: imports, decoding the cache), and test accuracy.

    python benchmarks/input_pipeline.py [--seeds 3] [--epochs 3] [--side 96] [--compile] [--out FILE.md]

--width (model.width, default 8) keeps the model's share small; the model alone on one fixed batch is printed for
scale: with the input's cost gone, a case trains about that fast. Every case trains Adam at 0.03 with a one-cycle
schedule (the cnn reaches ~0.8 test accuracy in 3 epochs).

(a) plain: torchvision ImageFolder, PIL, ToTensor/Normalize, DataLoader with persistent workers, the same cnn,
    Adam and OneCycleLR; (b) shelltrain data=imagefolder (defaults: workers=auto, persistent, decode_image);
    b_loader_crop: (b) with a random crop in the workers; (c) + data.cache=memory; (d) + data.cache=disk
    data.on_device=true with the same random crop, batched on the device (its accuracy compares with
    b_loader_crop's); (e) data.cache=memory over data.cache_max_memory: a folder larger than the memory budget,
    read memory-mapped through the page cache.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CASES = ("a_plain", "b_loader", "b_loader_crop", "c_cache_memory", "d_cache_disk_on_device", "e_cache_over_memory")
# augmentation=basic without its flip (a flipped digit is another symbol): a random 64 px crop of the image padded
# by 4 px, reflected; (d) runs it on the device, b_loader_crop in the loader workers, for (d)'s accuracy
CROP = [
    "augmentation=basic",
    "augmentation.train=[{_target_:torchvision.transforms.v2.RandomCrop,size:64,padding:4,padding_mode:reflect}]",
]
COMMON = [
    "data=imagefolder",
    "data.image_size=64",
    "data.batch_size=64",
    "data.val_fraction=0.1",
    "data.mean=[0.5]",
    "data.std=[0.25]",
    "model=cnn",
    "optimizer=adam",
    "optimizer.lr=0.03",
    "scheduler=onecycle",
    "trainer.device=cpu",
    "plots=false",
]
SHELLTRAIN = {
    "b_loader": ["augmentation=none"],
    "b_loader_crop": CROP,
    "c_cache_memory": ["augmentation=none", "data.cache=memory"],
    "d_cache_disk_on_device": [*CROP, "data.cache=disk", "data.on_device=true"],
    # a folder larger than the memory budget (40 MB decoded > 0.01 GiB): read memory-mapped, per sample, by workers
    "e_cache_over_memory": ["augmentation=none", "data.cache=memory", "data.cache_max_memory=0.01"],
}


def make_folder(root: Path, side: int = 96) -> int:
    """root/train/<digit>/*.jpg (two noisy copies of each train digit) and root/test/<digit>/*.jpg; the count."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16 * 255).astype(np.float32)
    train, test, y_train, y_test = train_test_split(images, digits.target, test_size=0.2, random_state=0)
    rng = np.random.default_rng(0)
    count = 0
    for split, pictures, labels, copies in (("train", train, y_train, 2), ("test", test, y_test, 1)):
        for copy in range(copies):
            for i, (picture, label) in enumerate(zip(pictures, labels)):
                big = np.kron(picture, np.ones((side // 8, side // 8), dtype=np.float32))
                rgb = np.stack([big * w for w in (1.0, 0.8, 0.6)], -1) + rng.normal(0, 20, (side, side, 3))
                folder = root / split / str(label)
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(folder / f"{copy}_{i}.jpg", quality=90)
                count += 1
    return count


def run_shelltrain(
    case: str, root: Path, work: Path, seed: int, epochs: int, cache_dir: Path, width: int, extra: list[str]
) -> dict:
    run_dir = work / f"{case}_{seed}"
    args = [
        *COMMON,
        f"model.width={width}",
        *SHELLTRAIN[case],
        *extra,
        f"data.root={root}",
        f"data.cache_dir={cache_dir}",
    ]
    args += [f"trainer.seed={seed}", f"trainer.epochs={epochs}", f"hydra.run.dir={run_dir}"]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "shelltrain", *args], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{case} failed:\n{done.stderr[-2000:]}")
    if case == "e_cache_over_memory" and "reading them memory-mapped" not in done.stdout:
        raise SystemExit("e_cache_over_memory: the cache was not read memory-mapped")
    import csv

    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    summary = json.loads((run_dir / "summary.json").read_text())
    seconds = [float(r["seconds"]) for r in rows]
    rates = [float(r["images_per_second"]) for r in rows]
    return {"wall": wall, "seconds": seconds, "rates": rates, "test_acc": summary["test_acc"]}


def run_plain(root: Path, seed: int, epochs: int, width: int) -> dict:
    """The standard hand-written loop, in a process of its own (the same cnn as model=cnn)."""
    code = PLAIN.format(root=str(root), seed=seed, epochs=epochs, workers=len(os.sched_getaffinity(0)), width=width)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"plain loop failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall"] = time.perf_counter() - start
    return result


MODEL = """
from hydra import compose, initialize_config_module
from shelltrain.models import build_model
with initialize_config_module(config_module="shelltrain.configs", version_base="1.3"):
    cfg = compose("train", overrides=["model=cnn", "model.width={width}", "data.image_size=64"])
model = build_model(cfg.model, 10, 3)
"""
PLAIN = (
    """
import json, time, torch, torch.nn.functional as F
from torch.utils.data import DataLoader, random_split
from torchvision import datasets, transforms
torch.manual_seed({seed})
tf = transforms.Compose([transforms.Resize(64), transforms.CenterCrop(64), transforms.ToTensor(),
                         transforms.Normalize([0.5] * 3, [0.25] * 3)])
train = datasets.ImageFolder("{root}/train", tf)
test = datasets.ImageFolder("{root}/test", tf)
train, _ = random_split(train, [0.9, 0.1], generator=torch.Generator().manual_seed(0))
kw = dict(num_workers={workers}, persistent_workers=True)
loader = DataLoader(train, batch_size=64, shuffle=True, **kw)
test_loader = DataLoader(test, batch_size=128, **kw)
"""
    + MODEL
    + """
opt = torch.optim.Adam(model.parameters(), lr=0.03)
schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.03, total_steps={epochs} * len(loader), pct_start=0.25)
seconds, rates = [], []
for epoch in range({epochs}):
    model.train(); start = time.perf_counter(); seen = 0
    for x, y in loader:
        opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step(); schedule.step(); seen += len(y)
    seconds.append(time.perf_counter() - start); rates.append(seen / seconds[-1])
model.eval(); right = total = 0
with torch.no_grad():
    for x, y in test_loader:
        right += (model(x).argmax(1) == y).sum().item(); total += len(y)
print(json.dumps(dict(seconds=seconds, rates=rates, test_acc=right / total)))
"""
)


MODEL_ALONE = (
    """
import time, torch, torch.nn.functional as F
"""
    + MODEL
    + """
model = model.to(memory_format=torch.channels_last)
model = torch.compile(model) if {compile} else model
opt = torch.optim.Adam(model.parameters(), lr=0.03)
x = torch.randn(64, 3, 64, 64).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 10, (64,))
for steps in (10, 100):  # warm-up, then timed
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()
print(64 * steps / (time.perf_counter() - start))
"""
)


def model_alone(width: int, compile: bool) -> float:
    """img/s of the train step alone on one fixed batch (channels_last, as shelltrain runs it): about what a case
    reaches once its input costs nothing (it is measured apart, so on a noisy machine a case may beat it)."""
    done = subprocess.run(
        [sys.executable, "-c", MODEL_ALONE.format(width=width, compile=compile)], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"model-alone step failed:\n{done.stderr[-2000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def summarize(results: dict[str, list[dict]]) -> list[str]:
    lines = [
        "| case | img/s after epoch 1 | vs (b) | epoch s (after 1st) | 1st epoch + set-up extra s | test acc |",
        "|---|---|---|---|---|---|",
    ]
    later = {
        c: statistics.median(r for run in runs for r in run["rates"][1:] or run["rates"]) for c, runs in results.items()
    }
    for case, runs in results.items():
        epoch = statistics.median(s for run in runs for s in run["seconds"][1:] or run["seconds"])
        extra = statistics.median(run["wall"] - sum(run["seconds"][1:]) - epoch for run in runs)
        accs = [run["test_acc"] for run in runs]
        acc = f"{statistics.mean(accs):.3f}" + (f" ± {statistics.stdev(accs):.3f}" if len(accs) > 1 else "")
        ratio = later[case] / later["b_loader"] if "b_loader" in later else float("nan")
        lines.append(f"| {case} | {later[case]:.0f} | {ratio:.2f}x | {epoch:.2f} | {extra:.1f} | {acc} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--width", type=int, default=8, help="model.width: small, so that the input sets the pace")
    parser.add_argument(
        "--compile", action="store_true", help="shelltrain's cases (and the model alone) with trainer.compile=true"
    )
    parser.add_argument("--side", type=int, default=96, help="the JPEGs' side in px (a multiple of 8; trained at 64)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/input_pipeline.md"))
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    results: dict[str, list[dict]] = {case: [] for case in args.cases}
    with tempfile.TemporaryDirectory() as tmp:
        root, work = Path(tmp) / "images", Path(tmp) / "runs"
        count = make_folder(root, args.side)
        print(f"{count} JPEGs ({args.side}x{args.side}) in {root}")
        alone = []
        for seed in range(args.seeds):
            alone.append(model_alone(args.width, args.compile))
            for case in args.cases:  # in turns; every seed's first cached run builds its cache anew
                cache_dir = Path(tmp) / f"cache_{case}_{seed}"
                if case == "a_plain":
                    result = run_plain(root, seed, args.epochs, args.width)
                else:
                    extra = ["trainer.compile=true"] if args.compile else []
                    result = run_shelltrain(case, root, work, seed, args.epochs, cache_dir, args.width, extra)
                results[case].append(result)
                print(case, seed, json.dumps({k: v for k, v in result.items()}), flush=True)
    load_after = os.getloadavg()[0]
    table = summarize(results)
    cores = len(os.sched_getaffinity(0))
    note = (
        f"{count} JPEGs {args.side}x{args.side} -> 64 px, model=cnn model.width={args.width}"
        f"{' (trainer.compile=true for shelltrain)' if args.compile else ''}, batch 64, "
        f"{args.epochs} epochs, {args.seeds} seed(s), CPU, {cores} cores; "
        f"load average {load_before:.1f} before / {load_after:.1f} after. "
        "The model alone (its train step on one fixed batch, no input pipeline; once per seed) runs at "
        f"{', '.join(f'{c:.0f}' for c in alone)} img/s."
    )
    text = "\n".join(["# Input pipeline (benchmarks/input_pipeline.py)", "", note, "", *table, ""])
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
