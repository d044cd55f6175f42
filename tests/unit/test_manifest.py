"""The manifest reader (formats, columns, bad rows) and the group-aware carving of splits."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config
from fixtures_data import make_manifest_images, write_manifest

from shelltrain.data.manifest import manifest_sources, read_manifest
from shelltrain.data.splits import carve_groups
from shelltrain.errors import UserError


def _data(manifest, *extra: str):
    return compose_config("data=manifest", f"data.manifest={manifest}", *extra).data


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_every_format_reads_the_same_rows_relative_to_the_manifest(tmp_path, suffix):
    rows = make_manifest_images(tmp_path, ("a", "b"), per_class=3, groups=2)
    found = read_manifest(_data(write_manifest(tmp_path / f"labels{suffix}", rows)))
    assert found.paths == [str(tmp_path / row["path"]) for row in rows]
    assert found.labels == [row["label"] for row in rows]
    assert found.groups == [row["group"] for row in rows] and found.splits is None
    assert found.lines == list(range(1, 7) if suffix == ".jsonl" else range(2, 8))  # a table's line 1 is its header


def test_paths_start_at_data_root_when_it_is_set(tmp_path):
    rows = make_manifest_images(tmp_path / "images-here", ("a", "b"), per_class=2)
    manifest = write_manifest(tmp_path / "elsewhere.csv", rows)
    found = read_manifest(_data(manifest, f"data.root={tmp_path / 'images-here'}"))
    assert found.paths[0] == str(tmp_path / "images-here" / rows[0]["path"])
    with pytest.raises(UserError, match="elsewhere.csv:2: '.*images/a_0.png' does not exist"):
        read_manifest(_data(manifest))  # without data.root the paths start next to the manifest


def test_a_missing_column_names_the_key_and_the_header(tmp_path):
    manifest = write_manifest(tmp_path / "labels.csv", [{"file": "x.png", "label": "a"}])
    with pytest.raises(UserError, match=r"data.path_column: 'path' is not a column of labels.csv \(its header: file"):
        read_manifest(_data(manifest))
    assert read_manifest(_data(manifest, "data.path_column=file"), check_files=False).paths[0].endswith("x.png")


def test_a_row_that_is_not_json_is_named(tmp_path):
    manifest = tmp_path / "labels.jsonl"
    manifest.write_text('{"path": "a.png", "label": "a"}\n[1, 2]\n')
    with pytest.raises(UserError, match="labels.jsonl:2: not a JSON object"):
        read_manifest(_data(manifest), check_files=False)


def test_skip_counts_each_reason_and_keeps_the_good_rows(tmp_path):
    rows = make_manifest_images(tmp_path, ("a", "b"), per_class=3)
    bad = [{"path": "", "label": "a"}, {"path": rows[0]["path"], "label": "b"}, {"path": "gone.png", "label": "a"}]
    manifest = write_manifest(tmp_path / "labels.csv", rows + bad)
    found = read_manifest(_data(manifest, "data.manifest_errors=skip"))
    assert found.skipped == {"empty path": 1, "duplicate": 1, "missing file": 1}
    assert found.paths == [str(tmp_path / row["path"]) for row in rows]
    assert found.first_skipped.startswith("labels.csv:8: empty path")


def test_a_split_column_makes_the_source_splits_with_their_groups(tmp_path):
    rows = make_manifest_images(tmp_path, ("a", "b"), per_class=4, groups=2)
    for row in rows:
        row["split"] = "test" if row["group"].endswith("g1") else "train"
    sources, classes, groups = manifest_sources(_data(write_manifest(tmp_path / "labels.csv", rows)))
    assert classes == ["a", "b"] and set(sources) == set(groups) == {"train", "test"}
    assert sources["test"][1].tolist() == [0, 0, 1, 1]
    assert not set(groups["train"].tolist()) & set(groups["test"].tolist())


def test_carved_splits_take_whole_groups_stratified():
    generator = torch.Generator().manual_seed(0)
    groups = torch.randint(0, 60, (600,), generator=generator)
    labels = groups % 3  # every group holds one class
    index = torch.arange(600)
    rest, carved = carve_groups(labels, groups, index, 120, seed=0, key="data.test_fraction")
    assert not set(groups[rest].tolist()) & set(groups[carved].tolist())
    assert sorted(rest.tolist() + carved.tolist()) == list(range(600))
    assert 60 <= len(carved) <= 180 and set(labels[carved].tolist()) == {0, 1, 2}


def test_one_group_cannot_be_carved():
    with pytest.raises(UserError, match="data.val_fraction: all 10 images are one group"):
        carve_groups(
            torch.arange(10) % 2, torch.zeros(10, dtype=torch.long), torch.arange(10), 2, 0, "data.val_fraction"
        )
