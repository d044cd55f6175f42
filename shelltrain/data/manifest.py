"""`data=manifest`: a label file (CSV, TSV or JSON lines) that names each image's path and label, and optionally its
split (train/val/test) and group (a patient, a scene: whole groups stay on one side of every carved split). Only
the rows are read here, and each file is checked to exist; the pixels are decoded later, in the loader workers (or
once by data.cache). A bad row is one line naming file:line and the fix, or, with data.manifest_errors=skip,
skipped and counted in one log line."""

from __future__ import annotations

import csv
import json
import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from shelltrain.console import make_console, say
from shelltrain.dataroot import data_root, local_copy
from shelltrain.errors import UserError
from shelltrain.multilabel import SEPARATOR
from shelltrain.remote import is_url

SPLITS = ("train", "val", "test")  # the values a manifest's split column may hold
_FORMATS = {".csv": ",", ".tsv": "\t", ".jsonl": None, ".ndjson": None}  # suffix -> CSV delimiter (None: JSON lines)


@dataclass
class Manifest:
    """The manifest's good rows as parallel lists (path resolved, label, split, group; `None` where the file has no
    such column), and what was skipped, by reason, with the first skipped row's place."""

    paths: list[str] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    splits: list[str] | None = None
    groups: list[str] | None = None
    skipped: Counter = field(default_factory=Counter)
    first_skipped: str = ""


class _Rows:
    """Bad rows: raised at once (data.manifest_errors=error) or counted (skip)."""

    def __init__(self, name: str, skip: bool) -> None:
        self.name, self.skip, self.found = name, skip, Manifest()

    def bad(self, line: int, reason: str, problem: str, fix: str) -> None:
        where = f"{self.name}:{line}"
        if not self.skip:
            raise UserError(f"data.manifest: {where}: {problem}; {fix} (or set data.manifest_errors=skip)")
        self.found.skipped[reason] += 1
        self.found.first_skipped = self.found.first_skipped or f"{where}: {problem}"


def manifest_path(data: DictConfig) -> Path:
    """data.manifest as an absolute path (a relative one is taken from where the run was launched); a URL's local
    copy, with the whole folder it sits in when the images' paths start there (no data.root)."""
    if OmegaConf.is_missing(data, "manifest") or data.manifest is None:
        raise UserError("data.manifest: not set; set data.manifest=PATH to a CSV, TSV or JSON-lines label file")
    spec = str(data.manifest)
    if is_url(spec) and data.root is None:
        folder, name = spec.rsplit("/", 1)
        path = local_copy(folder, "data.manifest", data) / name
    else:
        path = local_copy(spec, "data.manifest", data)
    if path.suffix.lower() not in _FORMATS:
        raise UserError(
            f"data.manifest: '{path}' is not a .csv, .tsv, .jsonl or .ndjson file; rename it to say its format"
        )
    if not path.is_file():
        raise UserError(f"data.manifest: '{path}' does not exist; point data.manifest at your label file")
    return path


def image_base(data: DictConfig, manifest: Path) -> str:
    """Where relative image paths start: data.root when it is set, else the manifest's own folder."""
    return str(manifest.parent if data.root is None else data_root(data))


def read_manifest(data: DictConfig, check_files: bool = True, multi_label: bool = False) -> Manifest:
    """The checked rows of data.manifest. `check_files=False` skips the per-file existence check (benchmarks time
    it apart from parsing). `multi_label`: a label cell holds labels joined by `|` (one 0/1 column per class,
    data.label_column=[...], arrives joined the same way)."""
    path = manifest_path(data)
    rows = _Rows(path.name, data.manifest_errors == "skip")
    records = _records(path, data)
    _check_rows(records, rows, image_base(data, path), data, multi_label or _label_columns(data) is not None)
    if check_files:
        drop_missing(rows)
    return rows.found


def _records(path: Path, data: DictConfig):
    """(line, path, label, split or None, group or None) for every row of the file, in order."""
    delimiter = _FORMATS[path.suffix.lower()]
    flags = _label_columns(data)
    label = SEPARATOR.join(flags) if flags else data.label_column  # one 0/1 column per class: joined into labels
    columns = (data.path_column, label, "split", "group")
    records = _json_records(path, columns) if delimiter is None else _table_records(path, delimiter, columns, data)
    return records if flags is None else _flag_records(records, path, flags, delimiter is None)


def _table_records(path: Path, delimiter: str, columns: tuple[str, ...], data: DictConfig):
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        header = next(reader, None) or []
        for key, name in (("path_column", columns[0]), *(("label_column", c) for c in columns[1].split(SEPARATOR))):
            if name not in header:
                shown = ", ".join(header) or "empty"
                raise UserError(
                    f"data.{key}: '{name}' is not a column of {path.name} (its header: {shown}); "
                    f"set data.{key} to the column that holds the image {key.split('_')[0]}s"
                )
        at = [header.index(name) if name in header else None for name in columns]
        flags = [header.index(name) for name in columns[1].split(SEPARATOR)]
        width = len(header)
        for row in reader:
            if not row:
                continue
            if len(row) != width:
                yield reader.line_num, None, f"{len(row)} fields where the header has {width}", None, None
                continue
            line, path, label, split, group = reader.line_num, *(row[i] if i is not None else None for i in at)
            yield line, path, label if len(flags) == 1 else [row[i] for i in flags], split, group


def _json_records(path: Path, columns: tuple[str, ...]):
    with open(path, encoding="utf-8") as handle:
        for line, text in enumerate(handle, 1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except ValueError as e:
                yield line, None, f"not a JSON object ({e.args[0]})", None, None
                continue
            if not isinstance(record, dict):
                yield line, None, "not a JSON object", None, None
                continue
            values = [record.get(name) for name in columns]  # a row of the user's file, not a config node
            names = columns[1].split(SEPARATOR)
            label = [record.get(name) for name in names] if len(names) > 1 else _text(values[1])
            yield line, _text(values[0]), label, *values[2:]


def _text(value: object) -> str | None:
    return None if value is None else str(value)


_FLAGS = {"1": True, "1.0": True, "true": True, "0": False, "0.0": False, "false": False, "": False}


def _flag_records(records, path: Path, columns: list[str], json: bool):
    """Rows with one 0/1 column per class: each row's label cell becomes its classes joined by `|`; a value other
    than 0/1 (or a missing key in JSON lines) makes the row unreadable."""
    for line, image, label, split, group in records:
        if image is None:
            yield line, image, label, split, group
            continue
        values = [_FLAGS.get(str(v).strip().lower()) if v is not None else None for v in label]
        bad = next((i for i, v in enumerate(values) if v is None), None)
        if bad is not None:
            shown = "no such key" if label[bad] is None else f"'{label[bad]}'"
            yield line, None, f"class column {columns[bad]} holds {shown}, not 0 or 1", None, None
        elif not any(values):
            yield line, None, f"every class column ({', '.join(columns)}) is 0", None, None
        else:
            yield line, image, SEPARATOR.join(c for c, v in zip(columns, values) if v), split, group


def _check_rows(records, rows: _Rows, base: str, data: DictConfig, multi: bool) -> None:
    """Keep each good row; name (or count) an unreadable row, an empty path or label, a label outside data.classes,
    a split other than train/val/test, and a path given twice. `multi`: a label cell holds `|`-joined labels."""
    known = None if data.classes is None else {str(c) for c in data.classes}
    seen: set[str] = set()
    found, join, normpath = rows.found, os.path.join, os.path.normpath
    has_split = has_group = None
    for line, path, label, split, group in records:
        if path is None:  # an unreadable row: `label` says why
            rows.bad(line, "unreadable", label, "fix the row")
            continue
        if has_split is None:
            has_split, has_group = split is not None, group is not None
            found.splits, found.groups = ([] if has_split else None), ([] if has_group else None)
        if not path:
            rows.bad(line, "empty path", f"empty {data.path_column}", "give every row an image path")
            continue
        names = label.split(SEPARATOR) if multi else (label,)
        if not all(names):
            rows.bad(line, "empty label", f"empty {data.label_column} for '{path}'", "give every row a label")
            continue
        unknown = [name for name in names if known is not None and name not in known]
        if unknown:
            rows.bad(line, "unknown label", f"label '{unknown[0]}' is not in data.classes", "add it to data.classes")
            continue
        if has_split and split not in SPLITS:
            rows.bad(line, "unknown split", f"split '{split}' is not train, val or test", "use one of those three")
            continue
        full = normpath(join(base, path))
        if full in seen:
            rows.bad(line, "duplicate", f"'{path}' is listed twice", "keep one row per image")
            continue
        seen.add(full)
        found.paths.append(full)
        found.lines.append(line)
        found.labels.append(label)
        if has_split:
            found.splits.append(split)
        if has_group:
            found.groups.append(str(group) if group not in (None, "") else f"\0row{line}")  # empty: its own group
    if not found.paths:
        raise UserError(f"data.manifest: {rows.name} lists no usable images; add rows of {data.path_column}, label")


def drop_missing(rows: _Rows) -> None:
    """Check that every listed file is a regular file (one stat each): a missing file is named now, not mid-epoch."""
    found = rows.found
    keep = []
    for i, path in enumerate(found.paths):
        try:
            regular = stat.S_ISREG(os.stat(path).st_mode)
        except OSError:
            regular = None
        if not regular:
            problem = f"'{path}' does not exist" if regular is None else f"'{path}' is not a regular file"
            rows.bad(found.lines[i], "missing file", problem, "fix the path (relative to data.root or the file)")
            continue
        keep.append(i)
    if len(keep) < len(found.paths):
        for name in ("paths", "lines", "labels", "splits", "groups"):
            values = getattr(found, name)
            if values is not None:
                setattr(found, name, [values[i] for i in keep])
    if not found.paths:
        raise UserError(f"data.manifest: {rows.name} lists no image that exists; fix the paths or data.root")


def _label_columns(data: DictConfig) -> list[str] | None:
    """data.label_column as a list: one 0/1 column per class (multi-label); None for one label column."""
    column = data.label_column
    return [str(c) for c in column] if OmegaConf.is_list(column) or isinstance(column, list) else None


def manifest_sources(
    data: DictConfig, check_files: bool = True, multi_label: bool = False
) -> tuple[dict, list[str], dict]:
    """data=manifest as a source: per split (the split column's, else all "train"), the image paths and labels, the
    class names (data.classes in its order, else the class columns, else the labels sorted), and each split's group
    codes when the file has a group column ({} when not). Skipped rows are said in one line. `check_files`: as for
    read_manifest. `multi_label` (or class columns): each split's labels are multi-hot float rows (N x classes)."""
    multi_label = multi_label or _label_columns(data) is not None
    found = read_manifest(data, check_files, multi_label)
    if found.skipped:
        counts = ", ".join(f"{n} {reason}" for reason, n in sorted(found.skipped.items()))
        total = sum(found.skipped.values())
        say(make_console(), f"data.manifest_errors=skip: skipped {total} rows ({counts}); first: {found.first_skipped}")
    named = sorted({n for label in found.labels for n in label.split(SEPARATOR)}) if multi_label else None
    given = [str(c) for c in data.classes] if data.classes is not None else _label_columns(data)
    classes = given or named or sorted(set(found.labels))
    if len(classes) < 2:
        raise UserError(f"data.manifest: every row has the label {classes}; a classifier needs at least two classes")
    index = {name: i for i, name in enumerate(classes)}
    codes = {name: i for i, name in enumerate(dict.fromkeys(found.groups or []))}
    splits = found.splits or ["train"] * len(found.paths)
    sources, groups = {}, {}
    for split in SPLITS:
        rows = [i for i, s in enumerate(splits) if s == split]
        if not rows:
            continue
        if multi_label:
            labels = torch.zeros(len(rows), len(classes))
            for r, i in enumerate(rows):
                labels[r, [index[n] for n in found.labels[i].split(SEPARATOR)]] = 1.0
        else:
            labels = torch.tensor([index[found.labels[i]] for i in rows], dtype=torch.long)
        sources[split] = ([found.paths[i] for i in rows], labels)
        if found.groups is not None:
            groups[split] = torch.tensor([codes[found.groups[i]] for i in rows], dtype=torch.long)
    if "train" not in sources:
        raise UserError("data.manifest: no row has split 'train'; mark the training images train (or drop the column)")
    return sources, classes, groups
