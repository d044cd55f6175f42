"""`data.cache`: image files decoded and resized once into a uint8 N x C x S x S array that later epochs, runs and
sweep jobs read instead of the files (imagefolder; the torchvision sets and digits are in memory already).

The array is a .npy under `data.cache_dir` (outside the run directory by configuration; default the user's cache
folder), named by the split's root, file list and resize settings; a `.json` beside it holds the key of its
contents: every file's path, size and modification time plus the image size and mode. A key that differs (a file
changed, added or removed) rebuilds it, and the log says so. `disk` reads it memory-mapped (through the page cache,
for folders larger than memory); `memory` loads it into RAM unless it exceeds `data.cache_max_memory` GiB.

The build decodes in parallel processes, each writing its share into the memory-mapped temporary file; under a
file lock (two runs building the same cache wait for one another, and the second reuses the first's), then an
os.replace puts the finished file in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from shelltrain import rundir
from shelltrain.console import make_console, say
from shelltrain.data.sources import decode
from shelltrain.data.transforms import square

FORMAT = 1  # bump when the array's layout or the decode changes meaning
CHUNK = 64  # images per task of the parallel build


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/shelltrain, else ~/.cache/shelltrain."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "shelltrain"


def cache_key(paths: list[str], mode: str, size: int) -> dict:
    """What the decoded array depends on: every file (path, size, mtime) and the resize settings."""
    files = []
    for path in paths:
        stat = os.stat(path)
        files.append([path, stat.st_size, stat.st_mtime_ns])
    return {"format": FORMAT, "mode": mode, "size": size, "files": files}


def cache_path(cache_dir: Path, folder: str, mode: str, size: int) -> Path:
    """The array's file: one name per (image folder, settings); the key inside says whether it is still valid."""
    name = hashlib.sha256(json.dumps([os.path.abspath(folder), mode, size, FORMAT]).encode()).hexdigest()[:24]
    return cache_dir / f"{name}.npy"


def cached_images(
    folder: str,
    paths: list[str],
    mode: str,
    size: int,
    how: str,
    cache_dir: str | None,
    max_memory_gib: float,
    workers: int,
) -> torch.Tensor:
    """The images of `paths` (all the files of `folder`) decoded to uint8 N x C x `size` x `size` (C from `mode`),
    from the cache when its key still matches, else built now. `how`: "memory" or "disk"."""
    from filelock import FileLock

    where = Path(cache_dir) if cache_dir else default_cache_dir()
    where.mkdir(parents=True, exist_ok=True)
    path = cache_path(where, folder, mode, size)
    key = cache_key(paths, mode, size)
    with FileLock(str(path) + ".lock"):
        stale = _stale(path, key)
        if stale is None:
            say(make_console(), f"data.cache: reused decoded cache {path}")
        else:
            if stale:
                say(make_console(), f"data.cache: {stale}; rebuilding {path}")
            started = time.perf_counter()
            _build(path, paths, mode, size, workers)
            rundir.write_json(key, path.with_suffix(".json"))
            seconds = time.perf_counter() - started  # the log records what the run wrote outside its directory
            say(make_console(), f"data.cache: decoded {len(paths)} images into {path} in {seconds:.1f} s")
    return _open(path, how, max_memory_gib)


def _stale(path: Path, key: dict) -> str | None:
    """None when the cache at `path` holds `key`'s images; else why not ("" when there is none yet)."""
    meta = path.with_suffix(".json")
    if not path.exists() or not meta.exists():
        return ""
    old = json.loads(meta.read_text())
    if old == key:
        return None
    before = {f[0]: f[1:] for f in old.get("files", [])}
    now = {f[0]: f[1:] for f in key["files"]}
    added, removed = len(now.keys() - before.keys()), len(before.keys() - now.keys())
    changed = sum(1 for name in now.keys() & before.keys() if now[name] != before[name])
    return f"the image files changed since the cache was built ({changed} changed, {added} added, {removed} removed)"


def _build(path: Path, paths: list[str], mode: str, size: int, workers: int) -> None:
    """Decode every file into a temporary memory-mapped .npy, in parallel, then move it into place."""
    from rich.progress import Progress

    channels = 3 if mode == "RGB" else 1
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), channels, size, size))
    del array  # the workers write through their own maps
    chunks = [range(start, min(start + CHUNK, len(paths))) for start in range(0, len(paths), CHUNK)]
    try:
        with Progress(console=make_console(), transient=True) as progress:
            task = progress.add_task(f"decoding {len(paths)} images into the cache", total=len(paths))
            with ProcessPoolExecutor(max(1, workers), mp_context=get_context("fork")) as pool:
                jobs = [pool.submit(_decode_chunk, str(tmp), paths, chunk, mode, size) for chunk in chunks]
                for job in jobs:
                    progress.advance(task, job.result())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _decode_chunk(tmp: str, paths: list[str], chunk: range, mode: str, size: int) -> int:
    """In a build process: decode the files of `chunk` into their rows of the temporary array."""
    torch.set_num_threads(1)
    array = np.load(tmp, mmap_mode="r+")
    for i in chunk:
        array[i] = square(decode(paths[i], mode), size).numpy()
    array.flush()
    return len(chunk)


def _open(path: Path, how: str, max_memory_gib: float) -> torch.Tensor:
    """The array as a tensor: in RAM (`memory`, when it fits data.cache_max_memory) or memory-mapped."""
    mapped = np.load(path, mmap_mode="c")  # copy-on-write: writable for torch, never written back
    if how == "memory" and mapped.nbytes <= max_memory_gib * 2**30:
        return torch.from_numpy(np.array(mapped, copy=True))
    if how == "memory":
        say(
            make_console(),
            f"data.cache=memory: the decoded images take {mapped.nbytes / 2**30:.1f} GiB, over "
            f"data.cache_max_memory={max_memory_gib:g}; reading them memory-mapped from {path}",
        )
    images = torch.from_numpy(mapped)
    images.is_mapped = True  # data.__init__ keeps it whole and reads a split's rows as they are drawn
    return images
