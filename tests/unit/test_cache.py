"""data.cache: the decoded array's key, invalidation, reuse, a concurrent build, and equality with the files."""

from __future__ import annotations

import io
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shelltrain.data import FileImages
from shelltrain.data.cache import cache_key, cache_path, cached_images
from shelltrain.errors import UserError


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


def build(
    root: Path, paths: list[str], cache_dir: Path, how: str = "disk", size: int = 8, check: str = "stat"
) -> torch.Tensor:
    return cached_images(str(root), paths, "RGB", size, how, str(cache_dir), 1.0, 2, check)


def test_the_key_changes_when_a_file_is_touched_added_or_removed_or_the_size_changes(tmp_path):
    paths = noisy_folder(tmp_path / "images")
    key = cache_key(paths, "RGB", 8, "stat")
    assert cache_key(paths, "RGB", 8, "stat") == key
    assert cache_key(paths, "RGB", 16, "stat") != key and cache_key(paths, "L", 8, "stat") != key
    stat = os.stat(paths[0])
    os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert cache_key(paths, "RGB", 8, "stat") != key
    assert cache_key(paths[1:], "RGB", 8, "stat") != key and cache_key([*paths, paths[0]], "RGB", 8, "stat") != key
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
    images = cached_images(str(root), paths, "RGB", 8, "memory", str(tmp_path / "cache"), 1e-9, 1, "stat")
    assert getattr(images, "is_mapped", False) and "over data.cache_max_memory" in capsys.readouterr().out


def _build_in_child(root: str, paths: list[str], cache_dir: str, out: str) -> None:
    images = cached_images(root, paths, "RGB", 8, "disk", cache_dir, 1.0, 2, "stat")
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


def _rewrite_keeping_size_and_mtime(path: str) -> None:
    """Replace the file's pixels by black ones with the same byte count and modification time (as `cp -p` of another
    file of that size would): the PNG ends at its IEND chunk, and the padding after it is not read."""
    before = os.stat(path)
    black = io.BytesIO()
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(black, format="PNG")
    data = black.getvalue()
    assert len(data) <= before.st_size
    Path(path).write_bytes(data + b"\0" * (before.st_size - len(data)))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (os.stat(path).st_size, os.stat(path).st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_data_cache_check_hash_sees_a_content_change_that_keeps_size_and_mtime(tmp_path, capsys):
    root = tmp_path / "images"
    paths = noisy_folder(root)
    changed = next(i for i, p in enumerate(paths) if p.endswith(".png"))
    first = build(root, paths, tmp_path / "cache", check="hash")
    assert first[changed].sum() > 0
    _rewrite_keeping_size_and_mtime(paths[changed])
    capsys.readouterr()

    stale = build(root, paths, tmp_path / "cache", check="stat")  # the default compares path, size and mtime only
    assert "reused" in capsys.readouterr().out and torch.equal(stale, first)
    fresh = build(root, paths, tmp_path / "cache", check="hash")
    out = capsys.readouterr().out
    assert "1 changed, 0 added, 0 removed" in out and "rebuilding" in out
    assert fresh[changed].sum() == 0 and torch.equal(fresh[changed + 1 :], first[changed + 1 :])
    assert "reused" in (build(root, paths, tmp_path / "cache", check="hash"), capsys.readouterr().out)[1]


def test_a_cache_built_with_stat_is_rebuilt_when_hash_is_asked_for(tmp_path, capsys):
    root = tmp_path / "images"
    paths = noisy_folder(root)
    build(root, paths, tmp_path / "cache", check="stat")
    capsys.readouterr()
    build(root, paths, tmp_path / "cache", check="hash")
    assert "built without the files' hashes; rebuilding" in capsys.readouterr().out


def test_a_cache_dir_that_cannot_hold_the_cache_names_data_cache_dir(tmp_path):
    root = tmp_path / "images"
    paths = noisy_folder(root, count=2)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError) as caught:
        build(root, paths, tmp_path / "a_file" / "cache")
    message = str(caught.value)
    assert message.startswith("data.cache_dir: cannot write") and "hydra.run.dir" not in message
    assert "\n" not in message


def _damage(cache_dir: Path, how: str) -> None:
    """One kind of damage to the cache's array (.npy) or its key file (.json)."""
    array = next(p for p in cache_dir.glob("*.npy"))
    key = array.with_suffix(".json")
    if how == "array cut short":
        array.write_bytes(array.read_bytes()[:-100])
    elif how == "array of garbage":
        array.write_bytes(os.urandom(array.stat().st_size))
    elif how == "array of another shape":
        np.save(array, np.zeros((3, 3, 8, 8), dtype=np.uint8))
    elif how == "array of another type":
        np.save(array, np.zeros((12, 3, 8, 8), dtype=np.float32))
    elif how == "key cut short":
        key.write_text(key.read_text()[:40])
    elif how == "key of garbage":
        key.write_bytes(os.urandom(200))
    elif how == "key of another shape":
        key.write_text('{"files": [[["a.png"], 1, 2]]}')


DAMAGES = [
    "array cut short",
    "array of garbage",
    "array of another shape",
    "array of another type",
    "key cut short",
    "key of garbage",
    "key of another shape",
]


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_cache_is_rebuilt_with_one_line_saying_so(tmp_path, capsys, damage):
    root = tmp_path / "images"
    paths = noisy_folder(root)
    first = build(root, paths, tmp_path / "cache").clone()
    capsys.readouterr()
    _damage(tmp_path / "cache", damage)
    rebuilt = build(root, paths, tmp_path / "cache")
    lines = [line for line in capsys.readouterr().out.splitlines() if "rebuilding" in line]
    assert len(lines) == 1 and "is damaged" in lines[0].split("; rebuilding")[0], lines
    assert torch.equal(rebuilt, first)
    build(root, paths, tmp_path / "cache")
    assert "data.cache: reused decoded cache" in capsys.readouterr().out


FULL_DISK = """
import resource, sys
from shelltrain.data.cache import cached_images
from shelltrain.errors import UserError

resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))  # files over 2000 bytes fail as on a full disk (EFBIG)
try:
    cached_images(sys.argv[1], sys.argv[2:], "RGB", 16, "disk", sys.argv[1] + "/../cache", 1.0, 1, "stat")
except UserError as e:
    print(e)
    sys.exit(2)
"""


def test_a_cache_dir_without_room_for_the_array_is_one_line_naming_data_cache_dir(tmp_path):
    root = tmp_path / "images"
    paths = noisy_folder(root)  # 12 x 3 x 16 x 16 bytes: more than the file size limit
    done = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(root), *paths], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stdout.startswith("data.cache_dir: cannot write the decoded cache") and done.stdout.count("\n") == 1
    assert not list((tmp_path / "cache").glob("*.npy"))  # nothing half-made is left to be taken for a cache


KILLED_BUILD = """
import os, sys, time
from shelltrain.data import cache

real_decode = cache.decode


def slow_decode(path, mode):  # in a decode process: say who it is, then take long enough to be killed mid-build
    with open(os.path.join(sys.argv[3], str(os.getpid())), "w"):
        pass
    time.sleep(0.5)
    return real_decode(path, mode)


cache.decode = slow_decode
cache.cached_images(sys.argv[1], sys.argv[2].split(","), "RGB", 8, "disk", sys.argv[4], 1.0, 2, "stat")
"""


def _alive(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie waiting for its reaper has stopped)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    return fields[0] != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads processes from /proc")
def test_a_sigkilled_cache_build_leaves_no_decode_process_and_the_next_build_removes_its_temporary_file(
    tmp_path, capsys
):
    root = tmp_path / "images"
    paths = noisy_folder(root, count=130, side=8)  # three chunks: both decode processes busy
    cache_dir, seen = tmp_path / "cache", tmp_path / "workers"
    seen.mkdir()
    builder = subprocess.Popen(
        [sys.executable, "-c", KILLED_BUILD, str(root), ",".join(paths), str(seen), str(cache_dir)],
        start_new_session=True,  # so that nothing but this SIGKILL reaches it
    )
    try:
        deadline = time.monotonic() + 60
        while len(list(seen.iterdir())) < 2 and builder.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = [int(p.name) for p in seen.iterdir()]
        assert len(workers) == 2 and all(_alive(pid) for pid in workers), "the build's decode processes did not start"
    finally:
        builder.kill()
        builder.wait()
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    survivors = [pid for pid in workers if _alive(pid)]
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"decode processes {survivors} outlived the SIGKILLed build"
    leftovers = list(cache_dir.glob("*.tmp.npy"))
    assert leftovers  # the killed build had no chance to remove it

    images = build(root, paths, cache_dir)
    assert f"removed {leftovers[0].name}, left by a build that was killed" in capsys.readouterr().out
    assert not list(cache_dir.glob("*.tmp.*")) and images.shape == (len(paths), 3, 8, 8)


def test_a_memory_cache_for_a_cuda_device_serves_pinned_batches(monkeypatch):
    """data.cache=memory builds each batch in host memory; training on CUDA (`pin_memory`, as the runner passes it
    for a CUDA device) they come out pinned, so the copy to the GPU does not block. Pinning needs CUDA, so
    Tensor.pin_memory is replaced by a stand-in that records which tensors were pinned."""
    from conftest import compose_config

    from shelltrain.data import build_data
    from shelltrain.data.device import DeviceBatches

    pinned: list[int] = []

    def pin_memory(tensor: torch.Tensor) -> torch.Tensor:
        copy = tensor.clone()
        pinned.append(copy.data_ptr())
        return copy

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    cfg = compose_config("data.image_size=8", "data.cache=memory", "data.limit_samples=200", "augmentation=basic")
    for pin in (False, True):
        pinned.clear()
        bundle = build_data(cfg.data, cfg.augmentation, 0, pin_memory=pin)
        assert isinstance(bundle.train, DeviceBatches) and bundle.train.images.device.type == "cpu"
        for split in (bundle.train, bundle.val, bundle.test):
            images, labels = next(iter(split))
            assert (images.data_ptr() in pinned, labels.data_ptr() in pinned) == (pin, pin)
