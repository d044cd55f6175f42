"""data=shards: the epoch's shards dealt to ranks and workers (each sample once), seeded shuffles, classes and
counts, the writer, and one-line errors for bad shard settings."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose_config
from shard_fixtures import ids_of, overrides, write_shards
from torch.utils.data import DataLoader

from shelltrain.data import build_data
from shelltrain.data.shard_writer import main as write_main
from shelltrain.data.shards import Decoder, ShardStream, StreamLoader, shard_urls
from shelltrain.errors import UserError


def _stream(folder, rank: int, world: int, workers: int, batch: int = 4, buffer: int = 5) -> ShardStream:
    data = compose_config(*overrides(folder, 4), f"data.batch_size={batch}", f"data.shards.buffer={buffer}").data
    urls = shard_urls(data.shards.train, "data.shards.train")
    stream = ShardStream(urls, [6] * 4, Decoder(data.shards, ["0", "1"], "L", 4), data, seed=3, workers=workers)
    stream.rank, stream.world, stream.transform = rank, world, lambda image: image.float() / 255
    return stream


def _epoch(stream: ShardStream, epoch: int, workers: int) -> list[int]:
    stream.set_epoch(epoch)
    loader = DataLoader(stream, batch_size=stream.batch_size, num_workers=workers)
    return [i for images, _ in loader for i in ids_of(images)]


@pytest.mark.parametrize("world, workers", [(1, 0), (2, 0), (2, 2)])
def test_every_train_sample_is_served_once_an_epoch_across_ranks_and_workers(tmp_path, world, workers):
    written = write_shards(tmp_path, "train", shards=4, per_shard=6)
    orders = []
    for epoch in (0, 1):
        served = [_epoch(_stream(tmp_path, rank, world, workers), epoch, workers) for rank in range(world)]
        assert sorted(sum(served, [])) == written  # each sample exactly once
        assert len({len(s) for s in served}) == 1  # the ranks take equal shares here (4 equal shards)
        orders.append(served[0])
    assert orders[0] != orders[1]  # the shards and the buffer are reshuffled every epoch


def test_the_same_seed_and_epoch_give_the_same_order(tmp_path):
    write_shards(tmp_path, "train", shards=4, per_shard=6)
    assert _epoch(_stream(tmp_path, 0, 1, 0), 2, 0) == _epoch(_stream(tmp_path, 0, 1, 0), 2, 0)


def test_uneven_shares_train_as_many_steps_on_every_rank(tmp_path):
    """3 shards on 2 ranks: rank 0 holds two, rank 1 one; both train the smaller count of batches."""
    write_shards(tmp_path, "train", shards=3, per_shard=6)
    data = compose_config(*overrides(tmp_path, 3), "data.batch_size=4").data
    urls = shard_urls(data.shards.train, "data.shards.train")
    streams = [ShardStream(urls, [6] * 3, Decoder(data.shards, ["0", "1"], "L", 4), data, 0, 0) for _ in range(2)]
    for rank, stream in enumerate(streams):
        stream.rank, stream.world = rank, 2
    assert sorted(streams[0].rank_batches(0)) == [2, 3] and streams[0].steps() == streams[1].steps() == 2


def test_build_data_reads_counts_and_classes_from_shards_json_and_decodes_val_and_test(tmp_path):
    write_shards(tmp_path, "train", shards=2, per_shard=5, classes=3)
    val = write_shards(tmp_path, "val", shards=1, per_shard=4, classes=3, start=100)
    write_shards(tmp_path, "test", shards=1, per_shard=3, classes=3, start=200)
    counts = {"train-000000.tar": 5, "train-000001.tar": 5}
    (tmp_path / "shards.json").write_text(json.dumps({"classes": ["ant", "bee", "cat"], "counts": counts}))
    bundle = build_data(compose_config(*overrides(tmp_path, 2), "data.batch_size=3").data, _none(), seed=0)
    assert bundle.classes == ["ant", "bee", "cat"] and bundle.in_channels == 1
    assert len(bundle.train.dataset) == 10 and len(bundle.train) == 4  # 2 + 2 batches of at most 3
    assert ids_of(torch.cat([x for x, _ in bundle.val])) == val
    assert [len(loader.dataset) for loader in (bundle.val, bundle.test)] == [4, 3]
    images, labels = next(iter(bundle.train))
    assert images.shape == (3, 1, 4, 4) and all(i % 3 == y for i, y in zip(ids_of(images), labels.tolist()))


def _none():
    return compose_config("augmentation=none").augmentation


def test_without_shards_json_the_shards_are_counted_and_the_classes_found(tmp_path):
    write_shards(tmp_path, "train", shards=3, per_shard=4, classes=2)
    write_shards(tmp_path, "val", shards=1, per_shard=2, start=50)
    write_shards(tmp_path, "test", shards=1, per_shard=2, start=60)
    bundle = build_data(compose_config(*overrides(tmp_path, 3)).data, _none(), seed=0)
    assert bundle.classes == ["0", "1"] and bundle.train.dataset.counts == [4, 4, 4]


def test_the_writer_shards_an_image_folder_with_every_split_and_an_index(tmp_path, capsys):
    from fixtures_data import make_imagefolder

    make_imagefolder(tmp_path / "images", classes=("a", "b"), per_class=10)
    assert write_main([str(tmp_path / "images"), str(tmp_path / "out"), "--maxcount", "5"]) == 0
    index = json.loads((tmp_path / "out" / "shards.json").read_text())
    assert index["classes"] == ["a", "b"] and sum(index["counts"].values()) == 20
    assert [n for name, n in sorted(index["counts"].items()) if name.startswith("train-")] == [5, 5, 4]
    assert "'data.shards.train=\"" in capsys.readouterr().out


def test_the_writer_shards_a_label_file_and_a_run_reads_them(tmp_path):
    from fixtures_data import make_manifest_images, write_manifest

    rows = make_manifest_images(tmp_path, ("cat", "dog"), per_class=10)
    rows = [{**row, "split": "test" if i % 5 == 0 else "train"} for i, row in enumerate(rows)]
    assert write_main([str(write_manifest(tmp_path / "labels.csv", rows)), str(tmp_path / "out")]) == 0
    index = json.loads((tmp_path / "out" / "shards.json").read_text())
    assert index["counts"]["test-000000.tar"] == 4 and index["classes"] == ["cat", "dog"]
    shards = [f'data.shards.{s}="{tmp_path}/out/{s}-000000.tar"' for s in ("train", "val", "test")]
    bundle = build_data(compose_config("data=shards", *shards, "data.image_size=8").data, _none(), seed=0)
    assert bundle.classes == ["cat", "dog"] and len(bundle.test.dataset) == 4
    assert len(bundle.train.dataset) + len(bundle.val.dataset) == 16  # val carved from the train rows


@pytest.mark.parametrize(
    "setting, message",
    [
        ('data.shards.train="{}/nope-{{000000..000001}}.tar"', "data.shards.train: shard '.*nope-000000.tar' does not"),
        ("data.shards.label_key=txt", "data.shards.label_key: sample 's000000' .* has no 'txt' file"),
        ("data.shards.image_keys=jpg", "data.shards.image_keys: sample 's000000' .* has no jpg file"),
        ("data.cache=memory", "data.cache=memory does not apply to data=shards"),
        ("data.shards.buffer=0", "data.shards.buffer"),
    ],
)
def test_bad_shard_settings_are_one_line_naming_the_key(tmp_path, setting, message):
    for split, start in (("train", 0), ("val", 50), ("test", 60)):
        write_shards(tmp_path, split, shards=1, per_shard=2, start=start)
    cfg = compose_config(*overrides(tmp_path, 1), setting.format(tmp_path))
    with pytest.raises(UserError, match=message) as error:
        build_data(cfg.data, _none(), seed=0)
    assert "\n" not in str(error.value)


def test_the_unsharded_loader_serves_the_whole_stream_as_one_process(tmp_path):
    """After DDP training rank 0 works alone on the whole train split (SWA's BatchNorm pass)."""
    written = write_shards(tmp_path, "train", shards=4, per_shard=6)
    stream = _stream(tmp_path, rank=1, world=2, workers=0)
    loader = StreamLoader(stream, batch_size=4, generator=torch.Generator().manual_seed(0))
    whole = loader.unsharded()
    assert len(loader) == 3 and len(whole) == 6
    assert sorted(i for images, _ in whole for i in ids_of(images)) == written


def test_cross_validation_on_streamed_shards_is_one_line(tmp_path):
    from shelltrain.schema import validate

    cfg = compose_config(*overrides(tmp_path, 1), "cv.folds=2")
    with pytest.raises(UserError, match=r"^cv.folds needs every train label up front and data=shards streams them"):
        validate(cfg)
