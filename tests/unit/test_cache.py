"""data.cache: the decoded array's key, invalidation, reuse, a concurrent build, and equality with the files."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shelltrain.data import FileImages
from shelltrain.data.cache import cache_key, cache_path, cached_images


def noisy_folder(root: Path, count: int = 12, side: int = 20) -> list[str]:
    """root/<class>/<i>.(png|jpg) of random pixels, of two sizes (one non-square), so that resizing matters."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        shape = (side, side + 6 * (i % 3), 3)
        path = folder / f"{i}.{'jpg' if i % 4 == 0 else 'png'}"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
        paths.append(str(path))
    return sorted(paths)


def build(root: Path, paths: list[str], cache_dir: Path, how: str = "disk", size: int = 8) -> torch.Tensor:
    return cached_images(str(root), paths, "RGB", size, how, str(cache_dir), 1.0, 2)


def test_the_key_changes_when_a_file_is_touched_added_or_removed_or_the_size_changes(tmp_path):
    paths = noisy_folder(tmp_path / "images")
    key = cache_key(paths, "RGB", 8)
    assert cache_key(paths, "RGB", 8) == key
    assert cache_key(paths, "RGB", 16) != key and cache_key(paths, "L", 8) != key
    stat = os.stat(paths[0])
    os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert cache_key(paths, "RGB", 8) != key
    assert cache_key(paths[1:], "RGB", 8) != key and cache_key([*paths, paths[0]], "RGB", 8) != key
    assert cache_path(tmp_path, "x", "RGB", 8) != cache_path(tmp_path, "x", "RGB", 16)


def test_a_second_build_reuses_the_cache_and_a_touched_file_rebuilds_it(tmp_path, capsys):
    root = tmp_path / "images"
    paths = noisy_folder(root)
    first = build(root, paths, tmp_path / "cache")
    out = capsys.readouterr().out
    assert "reused" not in out
    again = build(root, paths, tmp_path / "cache")
    assert "data.cache: reused decoded cache" in capsys.readouterr().out and torch.equal(again, first)

    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(paths[1])
    os.utime(paths[1], ns=(0, os.stat(paths[1]).st_mtime_ns + 5_000_000_000))
    rebuilt = build(root, paths, tmp_path / "cache")
    out = capsys.readouterr().out
    assert "1 changed, 0 added, 0 removed" in out and "rebuilding" in out
    assert rebuilt[1].sum() == 0 and torch.equal(rebuilt[2:], first[2:])

    removed = build(root, paths[:-1], tmp_path / "cache")
    assert "0 changed, 0 added, 1 removed" in capsys.readouterr().out and len(removed) == len(paths) - 1


@pytest.mark.parametrize("how", ["memory", "disk"])
def test_the_cached_images_equal_the_decoded_files(tmp_path, how):
    root = tmp_path / "images"
    paths = noisy_folder(root)
    images = build(root, paths, tmp_path / "cache", how=how)
    assert getattr(images, "is_mapped", False) == (how == "disk")
    files = FileImages(paths, torch.zeros(len(paths)), "RGB", 8, None)
    assert images.shape == (len(paths), 3, 8, 8) and images.dtype == torch.uint8
    assert torch.equal(images, torch.stack([files.load(i) for i in range(len(paths))]))


def test_memory_over_the_budget_is_read_memory_mapped(tmp_path, capsys):
    root = tmp_path / "images"
    paths = noisy_folder(root)
    images = cached_images(str(root), paths, "RGB", 8, "memory", str(tmp_path / "cache"), 1e-9, 1)
    assert getattr(images, "is_mapped", False) and "over data.cache_max_memory" in capsys.readouterr().out


def _build_in_child(root: str, paths: list[str], cache_dir: str, out: str) -> None:
    images = cached_images(root, paths, "RGB", 8, "disk", cache_dir, 1.0, 2)
    torch.save(images.clone(), out)


def test_two_processes_building_the_same_cache_at_once_both_succeed(tmp_path):
    root = tmp_path / "images"
    paths = noisy_folder(root, count=40)
    context = multiprocessing.get_context("fork")
    children = [
        context.Process(target=_build_in_child, args=(str(root), paths, str(tmp_path / "cache"), tmp_path / f"{i}.pt"))
        for i in range(2)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(120)
        assert child.exitcode == 0
    results = [torch.load(tmp_path / f"{i}.pt") for i in range(2)]
    assert torch.equal(results[0], results[1])
    files = FileImages(paths, torch.zeros(len(paths)), "RGB", 8, None)
    assert torch.equal(results[0], torch.stack([files.load(i) for i in range(len(paths))]))
    assert not list((tmp_path / "cache").glob("*.tmp.npy"))  # no temporary file left behind
    array = np.load(next((tmp_path / "cache").glob("*.npy")))
    assert array.shape == (len(paths), 3, 8, 8)


def test_a_memory_cache_is_served_in_whole_batches_equal_to_the_loader_path(tmp_path, capsys):
    """data.cache=memory gathers and normalizes each batch in the main process (no per-sample work in workers):
    the same images, normalized alike, as the DataLoader path over the memory-mapped (disk) cache."""
    from conftest import compose_config

    from shelltrain.data import build_data
    from shelltrain.data.device import DeviceBatches

    root = tmp_path / "images"
    noisy_folder(root / "train", count=24)
    common = ["data=imagefolder", f"data.root={root}", "data.image_size=8", f"data.cache_dir={tmp_path / 'c'}"]
    bundles = {}
    for how in ("memory", "disk"):
        cfg = compose_config(*common, f"data.cache={how}", "data.num_workers=0", "augmentation=basic")
        bundles[how] = build_data(cfg.data, cfg.augmentation, 0)
    memory, disk = bundles["memory"], bundles["disk"]
    assert isinstance(memory.train, DeviceBatches) and memory.train.images.device.type == "cpu"
    assert not isinstance(disk.train, DeviceBatches)  # a memory-mapped array is read per sample by workers
    assert "no batched form" not in capsys.readouterr().out  # augmentation=basic (crop + flip) is batched
    for split in ("val", "test"):
        batched = torch.cat([images for images, _ in getattr(memory, split)])
        per_sample = torch.cat([images for images, _ in getattr(disk, split)])
        torch.testing.assert_close(batched, per_sample)
    torch.manual_seed(0)
    first = next(iter(memory.train))[0]
    torch.manual_seed(1)
    assert not torch.equal(first, next(iter(memory.train))[0])  # augmented from torch's RNG, per draw


def test_a_memory_cache_with_an_augmentation_without_batched_form_uses_loaders(tmp_path, capsys):
    from conftest import compose_config
    from fixtures_data import make_imagefolder

    from shelltrain.data import build_data
    from shelltrain.data.device import DeviceBatches

    root = make_imagefolder(tmp_path / "images", per_class=4)
    cfg = compose_config(
        "data=imagefolder",
        f"data.root={root}",
        "data.image_size=8",
        f"data.cache_dir={tmp_path / 'c'}",
        "data.cache=memory",
        "data.num_workers=0",
        "augmentation=trivialaugment",
    )
    bundle = build_data(cfg.data, cfg.augmentation, 0)
    assert not isinstance(bundle.train, DeviceBatches)
    assert "data.cache=memory: " in capsys.readouterr().out
