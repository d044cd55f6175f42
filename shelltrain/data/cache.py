"""`data.cache`: image files decoded and resized once into a uint8 N x C x H x W array that later epochs, runs and
sweep jobs read instead of the files (imagefolder; the torchvision sets and digits are in memory already).

The array is a .npy under `data.cache_dir` (outside the run directory by configuration; default the user's cache
folder), named by the split's root, file list and resize settings; a `.json` beside it holds the key of its
contents: every file's path, size and modification time plus the image size and mode, and with
`data.cache_check=hash` a blake2b hash of every file's bytes (a change that keeps size and mtime, as `cp -p` and
many sync tools make, is seen only then). A key that differs (a file changed, added or removed) rebuilds it, and the
log says so; so does a damaged array or key file (cut short, overwritten, of another shape). `disk` reads it
memory-mapped (through the page cache, for folders larger than memory); `memory` loads it into RAM unless it
exceeds `data.cache_max_memory` GiB.

The build decodes in parallel processes, each writing its share into the memory-mapped temporary file; under a
file lock (two runs building the same cache wait for one another, and the second reuses the first's), then an
os.replace puts the finished file in place. The decode processes die with the process that started them, even a
SIGKILLed one (signals.leave_stop_signals_to_main), and the next build removes the temporary file a killed one left.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from shelltrain.console import make_console, say
from shelltrain.data.sources import decode
from shelltrain.data.transforms import fit_size
from shelltrain.dataroot import default_cache_dir
from shelltrain.errors import UserError
from shelltrain.imagesize import plain_size, size_hw
from shelltrain.rundir import PLACE_ERRNOS
from shelltrain.signals import leave_stop_signals_to_main

FORMAT = 1  # bump when the array's layout or the decode changes meaning
CHUNK = 64  # images per task of the parallel build
HASH_THREADS = 4  # files hashed at once with data.cache_check=hash
HASH_BLOCK = 1 << 20  # bytes read per call while hashing


def cache_key(paths: list[str], mode: str, size: int | list[int], check: str) -> dict:
    """What the decoded array depends on: every file (path, size, mtime, and with `check` "hash" the hash of its
    bytes) and the resize settings."""
    files = []
    for path in paths:
        stat = os.stat(path)
        files.append([path, stat.st_size, stat.st_mtime_ns])
    if check == "hash":
        with ThreadPoolExecutor(HASH_THREADS) as pool:  # hashlib releases the GIL while it hashes
            for entry, digest in zip(files, pool.map(file_hash, paths)):
                entry.append(digest)
    return {"format": FORMAT, "mode": mode, "size": size, "check": check, "files": files}


def file_hash(path: str) -> str:
    """blake2b (128 bits) of the file's bytes: fast, and no content change goes unseen in practice."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def cache_path(cache_dir: Path, folder: str, mode: str, size: int | list[int]) -> Path:
    """The array's file: one name per (image folder, settings); the key inside says whether it is still valid."""
    name = hashlib.sha256(json.dumps([os.path.abspath(folder), mode, size, FORMAT]).encode()).hexdigest()[:24]
    return cache_dir / f"{name}.npy"


def cached_images(
    folder: str,
    paths: list[str],
    mode: str,
    size: int | list[int],
    how: str,
    cache_dir: str | None,
    max_memory_gib: float,
    workers: int,
    check: str,
) -> torch.Tensor:
    """The images of `paths` (all the files of `folder`) decoded to uint8 N x C x H x W (C from `mode`, H x W
    from `size`: data.image_size), from the cache when its key still matches, else built now. `how`: "memory" or
    "disk"; `check`: "stat" or "hash" (data.cache_check)."""
    from filelock import FileLock

    size = plain_size(size)  # the name and key record a square size as the int they always did, else [H, W]

    where = Path(os.path.abspath(cache_dir or default_cache_dir()))
    path = cache_path(where, folder, mode, size)
    key = cache_key(paths, mode, size, check)
    with _in_cache_dir(where):
        where.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path) + ".lock")
        lock.acquire()
    try:
        stale = _stale(path, key, _shape(paths, mode, size))
        if stale is None:
            say(make_console(), f"data.cache: reused decoded cache {path}")
        else:
            if stale:
                say(make_console(), f"data.cache: {stale}; rebuilding {path}")
            started = time.perf_counter()
            with _in_cache_dir(where):
                _remove_leftovers(path)
                path.with_suffix(".json").unlink(missing_ok=True)  # no key may describe a half-replaced array
                _build(path, paths, mode, size, workers)
                _write_key(key, path.with_suffix(".json"))
            seconds = time.perf_counter() - started  # the log records what the run wrote outside its directory
            say(make_console(), f"data.cache: decoded {len(paths)} images into {path} in {seconds:.1f} s")
    finally:
        lock.release()
    return _open(path, how, max_memory_gib)


@contextlib.contextmanager
def _in_cache_dir(where: Path) -> Iterator[None]:
    """A folder that cannot hold the cache (not writable, full, not a folder) is named with the key that moves it,
    data.cache_dir, not the run directory's."""
    try:
        yield
    except OSError as exc:
        named = Path(os.path.abspath(exc.filename)) if isinstance(exc.filename, str) else None
        if exc.errno not in PLACE_ERRNOS or (named is not None and named != where and where not in named.parents):
            raise  # e.g. an image file that cannot be read: not the cache folder's doing
        raise UserError(
            f"data.cache_dir: cannot write the decoded cache in '{where}' ({exc.strerror or exc}); set "
            "data.cache_dir to a writable folder with room for the decoded images, or use data.cache=none"
        ) from None


def _stale(path: Path, key: dict, shape: tuple[int, int, int, int]) -> str | None:
    """None when the cache at `path` holds `key`'s images; else why not ("" when there is none yet). A key built
    with data.cache_check=hash also serves `stat` (its hashes are not compared then). A damaged array or key file
    (truncated, overwritten, of another shape) is a reason to rebuild, not an error."""
    meta = path.with_suffix(".json")
    if not path.exists() or not meta.exists():
        return ""
    old = _read_key(meta)
    if old is None:
        return f"its key file {meta.name} is damaged"
    damaged = _damaged_array(path, (len(old["files"]), *shape[1:]))  # one row per file of the key it was built for
    if damaged:
        return damaged
    width = len(key["files"][0]) if key["files"] else 3
    if key["check"] == "hash" and old.get("check") != "hash":
        return "data.cache_check=hash: the cache was built without the files' hashes"
    old_files = [entry[:width] for entry in old["files"]]
    settings = {name: value for name, value in key.items() if name not in ("files", "check")}
    if all(old.get(name) == value for name, value in settings.items()) and old_files == key["files"]:
        return None
    before = {f[0]: f[1:] for f in old_files}
    now = {f[0]: f[1:] for f in key["files"]}
    added, removed = len(now.keys() - before.keys()), len(before.keys() - now.keys())
    changed = sum(1 for name in now.keys() & before.keys() if now[name] != before[name])
    return f"the image files changed since the cache was built ({changed} changed, {added} added, {removed} removed)"


def _read_key(meta: Path) -> dict | None:
    """The key file's contents, or None when it is not a key (cut short, overwritten, not JSON)."""
    try:
        old = json.loads(meta.read_text())
    except ValueError:  # not JSON, or not UTF-8
        return None
    files = old.get("files") if isinstance(old, dict) else None
    if not isinstance(files, list) or not all(isinstance(f, list) and f and isinstance(f[0], str) for f in files):
        return None
    return old


def _damaged_array(path: Path, shape: tuple[int, ...]) -> str:
    """Why the array file cannot be the cache of `shape` uint8 images ("" when it can): its header is read, and
    numpy checks that the file is long enough for the rows it announces."""
    try:
        mapped = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError, zipfile.BadZipFile):  # "mmap length is greater than file size", not a .npy
        return "the cached array is damaged (cut short or overwritten)"
    if not isinstance(mapped, np.ndarray):
        mapped.close()  # an .npz archive
        return "the cached array is damaged (not a .npy array)"
    found = (tuple(mapped.shape), str(mapped.dtype))
    del mapped
    if found != (shape, "uint8"):
        return f"the cached array is damaged (it holds {found[1]} {list(found[0])}, not uint8 {list(shape)})"
    return ""


def _remove_leftovers(path: Path) -> None:
    """Delete the temporary files of builds of `path` that were killed. Called under the cache's lock, which every
    build of `path` holds while its temporary files exist: any found now belong to a dead build."""
    for leftover in path.parent.glob(f"{path.stem}.*.tmp.*"):
        leftover.unlink(missing_ok=True)
        say(make_console(), f"data.cache: removed {leftover.name}, left by a build that was killed")


def _write_key(key: dict, meta: Path) -> None:
    """The key beside the array, written whole or not at all (a temporary file, then a rename)."""
    tmp = meta.with_name(f"{meta.stem}.{os.getpid()}.tmp.json")
    tmp.write_text(json.dumps(key))
    os.replace(tmp, meta)


def _build(path: Path, paths: list[str], mode: str, size: int | list[int], workers: int) -> None:
    """Decode every file into a temporary memory-mapped .npy, in parallel, then move it into place. The decode
    processes ignore SIGINT and SIGTERM (this process stops them) and die with it, even when it is SIGKILLed."""
    from rich.progress import Progress

    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
    _allocate(tmp, _shape(paths, mode, size))
    chunks = [range(start, min(start + CHUNK, len(paths))) for start in range(0, len(paths), CHUNK)]
    pool = ProcessPoolExecutor(
        max(1, workers),
        mp_context=get_context("fork"),
        initializer=leave_stop_signals_to_main,
        initargs=(None, os.getpid(), 0),
    )
    try:
        with Progress(console=make_console(), transient=True) as progress:
            task = progress.add_task(f"decoding {len(paths)} images into the cache", total=len(paths))
            jobs = [pool.submit(_decode_chunk, str(tmp), paths, chunk, mode, size) for chunk in chunks]
            for job in jobs:
                progress.advance(task, job.result())
        os.replace(tmp, path)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # a stop or a failure waits for the running chunks only
        tmp.unlink(missing_ok=True)


def _shape(paths: list[str], mode: str, size: int | list[int]) -> tuple[int, int, int, int]:
    """The cached array's shape: N x C x H x W, C from the PIL mode."""
    return (len(paths), 3 if mode == "RGB" else 1, *size_hw(size))


def _allocate(tmp: Path, shape: tuple[int, ...]) -> None:
    """The empty array file with its disk space allocated now: a full disk is then an error here (ENOSPC, named
    with data.cache_dir) instead of a decode process killed by SIGBUS when it writes into a page the disk has no
    room for. A file that could not be made whole is removed."""
    try:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        del array  # the workers write through their own maps
        if hasattr(os, "posix_fallocate"):  # not on macOS or Windows: there the file fills as it is written
            _reserve(tmp)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def _reserve(tmp: Path) -> None:
    fd = os.open(tmp, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system that cannot reserve: write as it comes
            raise OSError(exc.errno, exc.strerror, str(tmp)) from None
    finally:
        os.close(fd)


def _decode_chunk(tmp: str, paths: list[str], chunk: range, mode: str, size: int | list[int]) -> int:
    """In a build process: decode the files of `chunk` into their rows of the temporary array."""
    torch.set_num_threads(1)
    array = np.load(tmp, mmap_mode="r+")
    for i in chunk:
        array[i] = fit_size(decode(paths[i], mode), size).numpy()
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
