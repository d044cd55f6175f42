"""Datasets and loaders for every `data` option.

Each source (`sources.py`, `data.source` for a user's own) becomes uint8 C x H x W images of data.image_size
(height x width) with integer labels, split into train/val/test with `data.split_seed` (`splits.py`). Per sample,
the train split runs the `augmentation.train` transforms on the uint8 image, then every split scales to float and
normalizes
(`transforms.py`); with `data.on_device` the splits live on the device and augment there in batches (`device.py`),
and with `data.cache=memory` (image folders decoded once, `cache.py`) likewise on the CPU.

Modules: `build.py` (DataBundle, build_data), `sources.py`, `splits.py`, `transforms.py`, `datasets.py` (the image
datasets), `loader.py` (DataLoaders and their workers), `device.py` and `batched.py` (batches on the device),
`cache.py`, `balance.py`, `folds.py` (cross-validation folds). The names below are the package's public face.
"""

from shelltrain.data.build import DataBundle, build_data, unsharded
from shelltrain.data.datasets import FileImages
from shelltrain.data.folds import cv_fold

__all__ = ["DataBundle", "FileImages", "build_data", "cv_fold", "unsharded"]
