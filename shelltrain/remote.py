"""Data and outputs behind a URL: `s3://` and any other fsspec protocol (`gs://`, `az://`, `http://`, ...) for
data.root, data.manifest, shard URLs and output.mirror. Credentials are the protocol library's own business (for
s3:// botocore's: AWS_* environment variables, ~/.aws/credentials, an instance role; AWS_ENDPOINT_URL for an S3 API
that is not AWS): nothing here reads, passes or records them, so none reaches the run directory.

Torch-free: config checks ask `exists` before torch is imported."""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any

from shelltrain.errors import UserError

_EXTRAS = {"s3": "s3", "s3a": "s3"}  # protocol -> the shelltrain extra that installs its library


def is_url(spec: Any) -> bool:
    """Whether a path the user wrote is a URL (`s3://bucket/key`), not a local path (`file://` is local)."""
    text = str(spec)
    return "://" in text and not text.startswith("file://")


def filesystem(url: str, key: str) -> tuple[Any, str]:
    """The fsspec filesystem serving `url` and the path inside it; a missing library is one line naming `key`."""
    try:
        import fsspec
    except ImportError as e:
        raise UserError(f'{key}: {url} needs fsspec; pip install "shelltrain[s3]"') from e
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:  # the protocol's own library is missing, or fsspec does not know it
        extra = _EXTRAS.get(url.split("://", 1)[0], "s3")
        raise UserError(
            f'{key}: cannot open {url} ({e}); pip install "shelltrain[{extra}]" or its fsspec library'
        ) from e


def open_url(url: str, key: str) -> IO[bytes]:
    """`url` opened for reading (a stream: shards are read front to back, never downloaded whole first)."""
    fs, path = filesystem(url, key)
    try:
        return fs.open(path, "rb")
    except Exception as e:  # each backend its own types (OSError, botocore's NoCredentialsError, ...): one fix
        raise UserError(f"{key}: cannot read {url} ({one_line(e)}); check the URL and your credentials") from e


def exists(url: str, key: str, folder: bool = False) -> bool:
    """Whether `url` names an object (or, with `folder`, a prefix that holds objects)."""
    fs, path = filesystem(url, key)
    try:
        return fs.isdir(path) if folder else fs.isfile(path)
    except Exception as e:  # no access, no endpoint, no credentials: each backend its own types, one fix
        raise UserError(f"{key}: cannot reach {url} ({one_line(e)}); check the URL and your credentials") from e


def local_copy(url: str, key: str, cache_dir: Path) -> Path:
    """A local copy of the file or folder at `url` under `cache_dir`/remote/, kept between runs: only objects whose
    size differs from the copy's (or that it lacks) are downloaded again. Image folders and label files are read
    many times per run, so they are read from disk; shards stream from the URL instead (`open_url`)."""
    fs, path = filesystem(url, key)
    protocol = url.split("://", 1)[0]
    local = cache_dir / "remote" / protocol / path.strip("/")
    try:
        if not fs.isdir(path):
            _fetch(fs, path, local)
            return local
        for name, info in fs.find(path, detail=True).items():
            _fetch(fs, name, local / os.path.relpath(name, path), info["size"])
    except Exception as e:  # as in `exists`
        raise UserError(f"{key}: cannot copy {url} ({one_line(e)}); check the URL and your credentials") from e
    return local


def _fetch(fs: Any, path: str, local: Path, size: int | None = None) -> None:
    size = fs.size(path) if size is None else size
    if local.is_file() and local.stat().st_size == size:
        return
    local.parent.mkdir(parents=True, exist_ok=True)
    partial = local.with_name(local.name + ".partial")
    fs.get_file(path, str(partial))
    partial.replace(local)  # never a half-written file under the final name


def upload(folder: Path, url: str, key: str) -> int:
    """Copy every file under `folder` to the prefix `url` (its layout kept); the number of files copied."""
    fs, path = filesystem(url, key)
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    try:
        for file in files:
            fs.put_file(str(file), f"{path.rstrip('/')}/{file.relative_to(folder).as_posix()}")
    except Exception as e:  # as in `exists`
        raise UserError(f"{key}: cannot write to {url} ({one_line(e)}); check the URL and your credentials") from e
    return len(files)


def one_line(error: BaseException) -> str:
    """An exception's text on one line, for the one-line messages users get."""
    return " ".join(str(error).split()) or type(error).__name__
