"""s3:// input and output against a local S3 API server (moto's server mode, on 127.0.0.1, as s3fs's own tests
run), never a real cloud: an image folder read from s3://, the finished run mirrored to an s3:// prefix, shards
streamed from s3://; the fake credentials reach no file the run writes, locally or mirrored."""

from __future__ import annotations

import json
import socket
import urllib.request

import pytest
import torch
from conftest import compose_config, shelltrain
from fixtures_data import make_imagefolder, make_manifest_images, write_manifest
from shard_fixtures import ids_of, overrides, write_shards

from shelltrain.data import build_data

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

KEY_ID, SECRET = "AKIAFAKEKEYID4TESTS", "fake-secret-never-to-be-written-9f3c"


@pytest.fixture
def s3(monkeypatch):
    """A moto S3 server on a free local port, the environment pointing botocore at it, and an s3fs client."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()  # fsspec keeps clients per process: none for an earlier test's port
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("data")
    fs.mkdir("runs")
    yield fs, env
    urllib.request.urlopen(urllib.request.Request(f"{env['AWS_ENDPOINT_URL']}/moto-api/reset", method="POST"))
    server.stop()  # moto's buckets live in this process: reset them first, for the next test's server


def _leaks(files: dict[str, bytes]) -> list[str]:
    return [name for name, data in files.items() if SECRET.encode() in data or KEY_ID.encode() in data]


def test_an_s3_image_folder_trains_and_the_run_is_mirrored_without_credentials(tmp_path, s3):
    fs, env = s3
    make_imagefolder(tmp_path / "images", classes=("cat", "dog"), per_class=12, size=(12, 12))
    fs.put(str(tmp_path / "images") + "/", "data/images/", recursive=True)
    args = ["data=imagefolder", "data.root=s3://data/images", f"data.cache_dir={tmp_path / 'cache'}"]
    args += ["model=cnn", "model.width=4", "data.image_size=12", "trainer.epochs=1", "trainer.device=cpu"]
    args += ["data.num_workers=0", "plots=false", "logger=[csv,jsonl,mlflow]", "output.mirror=s3://runs/exp"]
    work = tmp_path / "work"
    work.mkdir()
    result = shelltrain(*args, "hydra.run.dir=run", cwd=work, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    local = {str(p.relative_to(work)): p.read_bytes() for p in work.rglob("*") if p.is_file()}
    mirrored = {name: fs.cat(name) for name in fs.find("runs/exp/run")}
    assert set(mirrored) == {f"runs/exp/{name}" for name in local if name.startswith("run/")}
    assert json.loads(mirrored["runs/exp/run/summary.json"])["test_acc"] is not None
    assert (tmp_path / "cache/remote/s3/data/images/train/cat/0.png").is_file()  # read from the local copy
    written = {**local, **mirrored, **{str(p): p.read_bytes() for p in (tmp_path / "cache").rglob("*") if p.is_file()}}
    assert "run/.hydra/config.yaml" in written and "mlflow.db" in " ".join(written)  # MLflow's store is searched too
    assert _leaks(written) == []
    assert "output.mirror: copied the run directory" in result.stdout + result.stderr


def test_shards_stream_from_s3_with_brace_expansion(tmp_path, s3):
    fs, _ = s3
    written = write_shards(tmp_path / "shards", "train", shards=3, per_shard=4)
    write_shards(tmp_path / "shards", "val", shards=1, per_shard=2, start=100)
    write_shards(tmp_path / "shards", "test", shards=1, per_shard=2, start=200)
    fs.put(str(tmp_path / "shards") + "/", "data/shards/", recursive=True)
    cfg = compose_config(*overrides("s3://data/shards", 3), "data.batch_size=4", "data.num_workers=0")
    bundle = build_data(cfg.data, cfg.augmentation, seed=0)
    served = [i for images, _ in bundle.train for i in ids_of(images)]
    assert sorted(served) == written and bundle.train.dataset.urls[0] == "s3://data/shards/train-000000.tar"
    assert ids_of(torch.cat([x for x, _ in bundle.test])) == [200, 201]


def test_a_missing_s3_root_is_one_line_naming_the_key(tmp_path, s3):
    _, env = s3
    result = shelltrain("data=imagefolder", "data.root=s3://data/nothing-here", cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("shelltrain: error: data.root: s3://data/nothing-here")


def test_an_hf_dataset_at_an_s3_url_is_copied_to_the_data_cache_and_read(tmp_path, s3):
    pytest.importorskip("datasets")
    from hf_fixtures import HF, save

    fs, _ = s3
    fs.put(str(save(tmp_path / "ds")) + "/", "data/ds/", recursive=True)
    cfg = compose_config(*HF, "data.hf.path=s3://data/ds", f"data.cache_dir={tmp_path / 'cache'}")
    bundle = build_data(cfg.data, cfg.augmentation, seed=0)
    assert bundle.classes == ["dark", "light"] and len(bundle.train.dataset) == 40
    assert (tmp_path / "cache/remote/s3/data/ds/dataset_dict.json").is_file()


def test_a_label_file_at_an_s3_url_is_read_with_the_images_beside_it(tmp_path, s3):
    fs, _ = s3
    write_manifest(tmp_path / "set" / "labels.csv", make_manifest_images(tmp_path / "set", per_class=6))
    fs.put(str(tmp_path / "set") + "/", "data/set/", recursive=True)
    cfg = compose_config("data=manifest", "data.manifest=s3://data/set/labels.csv", f"data.cache_dir={tmp_path / 'c'}")
    bundle = build_data(cfg.data, cfg.augmentation, seed=0)
    assert bundle.classes == ["cat", "dog", "fox"]
    assert sum(len(split.dataset) for split in (bundle.train, bundle.val, bundle.test)) == 18
