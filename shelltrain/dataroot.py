"""Where a dataset lives on disk: data.root resolved, and checked before torch is imported (a mistyped path fails
in a second, not after the imports); a URL root (s3://, any fsspec protocol) is checked where it is and copied to
the local data cache when the data loads. Torch-free, like schema.py which calls it."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from shelltrain import remote
from shelltrain.errors import UserError

# data.name -> (its name in messages, what torchvision expects under data.root)
DATASET_FILES = {
    "cifar10": ("CIFAR-10", "cifar-10-batches-py/"),
    "cifar100": ("CIFAR-100", "cifar-100-python/"),
    "mnist": ("MNIST", "MNIST/raw/"),
    "fashion_mnist": ("Fashion-MNIST", "FashionMNIST/raw/"),
}
IMAGEFOLDER_LAYOUT = "train/<class>/<image> (val/ and test/ optional)"


def check_data_root(data: DictConfig) -> None:
    if not OmegaConf.is_missing(data, "root") and remote.is_url(data.root):
        _check_remote_root(data)  # copied when the data loads (local_copy), not while the config is checked
        return
    root = data_root(data)
    if root.exists() and not root.is_dir():
        raise UserError(
            f"data.root: '{root}' is a file, not a folder; point data.root at the folder that holds the data"
        )
    if data.name == "imagefolder":
        if not root.is_dir():
            raise UserError(
                f"data.root: '{root}' does not exist; point data.root at a folder laid out as {IMAGEFOLDER_LAYOUT}"
            )
        if not (root / "train").is_dir():
            raise UserError(
                f"data.root: '{root}' has no train/ folder; lay the images out as {root}/{IMAGEFOLDER_LAYOUT}"
            )
    elif not data.download and not root.is_dir():
        raise UserError(
            f"data.root: '{root}' does not exist; point data.root at a folder holding {DATASET_FILES[data.name][0]} "
            "or set data.download=true"
        )


def user_path(spec: str) -> Path:
    """A path the user wrote (data.root, data.manifest, model.weights, predict.input, ...) as an absolute path: `~`
    expanded, a relative one taken from where the user launched the run (Hydra's original working directory)."""
    from hydra.utils import to_absolute_path  # hydra's config machinery: loaded once a job runs, not for --help

    try:
        return Path(to_absolute_path(os.path.expanduser(spec)))
    except ValueError:  # outside a Hydra run: relative to the working directory
        return Path(os.path.expanduser(spec)).absolute()


def _check_remote_root(data: DictConfig) -> None:
    url = str(data.root).rstrip("/")
    if not remote.exists(url, "data.root", folder=True):
        raise UserError(f"data.root: {url} holds nothing; point data.root at the prefix that holds the data")
    if data.name == "imagefolder" and not remote.exists(f"{url}/train", "data.root", folder=True):
        raise UserError(f"data.root: {url} has no train/ prefix; lay the images out as {url}/{IMAGEFOLDER_LAYOUT}")


def local_copy(spec: str, key: str, data: DictConfig) -> Path:
    """A user's path (`user_path`), or for a URL (s3://, any fsspec protocol) its local copy in the data cache
    folder (data.cache_dir, else data.cache's default), refreshed where the remote objects' sizes changed."""
    if not remote.is_url(spec):
        return user_path(spec)
    base = user_path(str(data.cache_dir)) if data.cache_dir else default_cache_dir()
    return remote.local_copy(spec, key, base)


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/shelltrain, else ~/.cache/shelltrain: data.cache_dir=null's folder (decoded caches, local
    copies of remote data)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "shelltrain"


def data_root(data: DictConfig) -> Path:
    """data.root as an absolute path (relative ones are taken from where the user launched the run); a URL's local
    copy, made or refreshed now (`local_copy`)."""
    if OmegaConf.is_missing(data, "root") or data.root is None:
        if data.name == "imagefolder":
            holding = f"an image folder laid out as {IMAGEFOLDER_LAYOUT}"
        else:
            title, expected = DATASET_FILES[data.name]
            holding = f"{title} (it should contain {expected})"
        raise UserError(f"data.root: not set; set data.root to a folder holding {holding}")
    return local_copy(str(data.root), "data.root", data)
