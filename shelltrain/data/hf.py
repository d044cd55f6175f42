"""`data=hf`: a Hugging Face dataset written by `save_to_disk` (a Dataset or a DatasetDict), read with
`datasets.load_from_disk`: memory-mapped Arrow files, each image decoded as it is drawn, in the loader workers.
`data.hf.image_column` holds the images (an Image feature or encoded bytes), `data.hf.label_column` the labels (a
ClassLabel, whose names become the classes; integers; or class names). A DatasetDict's splits are picked by
data.hf.train_split / val_split / test_split; a split it lacks is carved out of train as for any data set."""

from __future__ import annotations

import io
from typing import Any

import torch
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from shelltrain.data.loader import seeded
from shelltrain.data.sources import GREY_MODES
from shelltrain.data.transforms import fit_size
from shelltrain.dataroot import local_copy
from shelltrain.errors import UserError
from shelltrain.remote import one_line

_SAMPLED = 64  # images opened to tell grey from colour and the native sizes


class HFTable:
    """One split of the loaded dataset and the column its images are in (what a source split holds in place of a
    list of files)."""

    def __init__(self, table: Any, column: str) -> None:
        self.table, self.column = table, column

    def picture(self, row: int) -> Image.Image:
        """Row `row`'s image as PIL (an Image feature decodes itself; bytes or {"bytes": ...} are opened)."""
        cell = self.table[row][self.column]
        if isinstance(cell, Image.Image):
            return cell
        data = cell.get("bytes") if isinstance(cell, dict) else cell  # the Image feature's undecoded form
        if not isinstance(data, (bytes, bytearray)):
            raise UserError(
                f"data.hf.image_column: row {row} holds a {type(cell).__name__}, not an image; "
                "name the column of images (an Image feature or image bytes)"
            )
        return Image.open(io.BytesIO(data))


class HFImages(Dataset):
    """Rows `rows` of an HFTable, decoded on access, converted to `mode` and fitted to `size`."""

    def __init__(self, table: HFTable, rows: torch.Tensor, labels: torch.Tensor, mode: str, size: Any) -> None:
        self.source, self.rows, self.labels, self.mode, self.size = table, rows, labels, mode, size
        self.transform: v2.Transform | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> torch.Tensor:
        row = int(self.rows[index])
        try:
            with self.source.picture(row) as picture:
                return fit_size(F.pil_to_tensor(picture.convert(self.mode)), self.size)
        except UserError:
            raise
        except Exception as e:  # undecodable bytes: PIL raises several types
            raise UserError(f"data.hf.image_column: row {row} cannot be decoded ({one_line(e)}); fix that row") from e

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = seeded(key)
        return self.transform(self.load(index)), self.labels[index]


def _load(data: DictConfig) -> Any:
    """datasets.load_from_disk of data.hf.path (an fsspec URL is copied to the local cache first)."""
    try:
        import datasets
    except ImportError as e:
        raise UserError('data=hf reads Hugging Face datasets; pip install "shelltrain[hf]"') from e
    path = local_copy(str(data.hf.path), "data.hf.path", data)
    try:
        return datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:  # no folder, or not one save_to_disk wrote
        raise UserError(
            f"data.hf.path: '{path}' is not a dataset written by save_to_disk ({one_line(e)}); point it at that folder"
        ) from e


def _splits(loaded: Any, hf: DictConfig) -> dict[str, Any]:
    """train/val/test -> the loaded dataset's split (a plain Dataset is all train)."""
    if not hasattr(loaded, "keys"):
        return {"train": loaded}
    if hf.train_split not in loaded:
        raise UserError(
            f"data.hf.train_split: '{hf.train_split}' is not a split of the dataset (it has {', '.join(loaded)}); "
            "name the split to train on"
        )
    wanted = {"train": hf.train_split, "val": hf.val_split, "test": hf.test_split}
    return {split: loaded[name] for split, name in wanted.items() if name is not None and name in loaded}


def _classes(splits: dict[str, Any], hf: DictConfig, data: DictConfig) -> tuple[list[str], dict[str, list[Any]]]:
    """The class names and each split's label values (ClassLabel names, else data.classes, else found)."""
    train = splits["train"]
    for name, split in splits.items():
        missing = [c for c in (hf.image_column, hf.label_column) if c not in split.column_names]
        if missing:
            key = "image_column" if missing[0] == hf.image_column else "label_column"
            raise UserError(
                f"data.hf.{key}: '{missing[0]}' is not a column of the {name} split (its columns: "
                f"{', '.join(split.column_names)}); set data.hf.{key}"
            )
    values = {name: list(split[hf.label_column]) for name, split in splits.items()}
    feature = train.features[hf.label_column]
    if data.classes is not None:
        return [str(c) for c in data.classes], values
    if hasattr(feature, "names"):  # a ClassLabel: integers with names
        return list(feature.names), values
    found = {v for column in values.values() for v in column}
    if all(isinstance(v, int) for v in found):
        return [str(i) for i in range(max(found) + 1)], values
    return sorted(map(str, found)), values


def hf_sources(data: DictConfig) -> tuple[dict[str, tuple[HFTable, torch.Tensor]], list[str]]:
    """data=hf as a source: per split, the table and the labels as class indices, and the class names."""
    splits = _splits(_load(data), data.hf)
    classes, values = _classes(splits, data.hf, data)
    if len(classes) < 2:
        raise UserError(f"data.hf.label_column: the dataset holds the classes {classes}; a classifier needs two")
    index = {name: i for i, name in enumerate(classes)}
    sources = {}
    for name, split in splits.items():
        labels = []
        for row, value in enumerate(values[name]):
            if isinstance(value, int) and 0 <= value < len(classes):
                labels.append(value)
            elif str(value) in index:
                labels.append(index[str(value)])
            else:
                raise UserError(
                    f"data.hf.label_column: row {row} of the {name} split has the label {value!r}, not one of the "
                    f"{len(classes)} classes; fix data.classes or the dataset"
                )
        sources[name] = (HFTable(split, data.hf.image_column), torch.tensor(labels, dtype=torch.long))
    return sources, classes


def sample_pictures(table: HFTable) -> tuple[bool, list[int]]:
    """Whether the sampled images (spread over the split) are all grey, and their shorter sides."""
    count = len(table.table)
    grey, sides = True, []
    for row in range(0, count, max(1, count // _SAMPLED)):
        with table.picture(row) as picture:
            grey = grey and picture.mode in GREY_MODES
            sides.append(min(picture.size))
    return grey, sides
