"""Small WebDataset shards whose every image says which sample it is: pixel (0, 0) holds id % 256 and pixel (0, 1)
id // 256, the rest the class's grey level, so a test can tell exactly which samples a loader served."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SIZE = 4  # pixels a side: tiny, and kept as is (data.image_size=4), so the ids survive


def png(sample_id: int, label: int, classes: int) -> bytes:
    pixels = np.full((SIZE, SIZE), 40 + 200 * label // max(1, classes - 1), dtype=np.uint8)
    pixels[0, 0], pixels[0, 1] = sample_id % 256, sample_id // 256
    buffer = io.BytesIO()
    Image.fromarray(pixels, "L").save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(folder: Path, split: str, shards: int, per_shard: int, classes: int = 2, start: int = 0) -> list[int]:
    """`shards` files `<split>-NNNNNN.tar` of `per_shard` samples each (labels as class indices); the ids written."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    ids = list(range(start, start + shards * per_shard))
    with wds.ShardWriter(str(folder / f"{split}-%06d.tar"), maxcount=per_shard, verbose=0) as writer:
        for i in ids:
            writer.write({"__key__": f"s{i:06d}", "png": png(i, i % classes, classes), "cls": str(i % classes)})
    return ids


def ids_of(images: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> list[int]:
    """The sample ids of a batch of grey images normalized with `mean`/`std` (data.mean, data.std)."""
    pixels = ((images[:, 0] * std + mean) * 255).round().long()
    return (pixels[:, 0, 0] + 256 * pixels[:, 0, 1]).tolist()


def overrides(folder: Path, train: int, val: int = 1, test: int = 1) -> list[str]:
    """data=shards pointed at `folder`'s shards, images kept at 4 px, un-normalized (ids readable)."""
    return [
        "data=shards",
        f'data.shards.train="{folder}/train-{{000000..{train - 1:06d}}}.tar"',  # quoted: braces are Hydra syntax too
        f'data.shards.val="{folder}/val-{{000000..{val - 1:06d}}}.tar"',
        f'data.shards.test="{folder}/test-{{000000..{test - 1:06d}}}.tar"',
        f"data.image_size={SIZE}",
        "data.mean=[0]",
        "data.std=[1]",
        "model=cnn",
    ]


def served_under_ddp(rank: int, world: int, port: int, folder: Path, out: Path, workers: int) -> None:
    """One DDP rank (gloo, CPU): build data=shards as a run does and record the sample ids its train loader serves
    in epochs 0 and 1 (rank 0 writes every rank's lists, gathered, to `out` as JSON)."""
    import json
    import os

    import torch.distributed as dist
    from conftest import compose_config

    from shelltrain.data import build_data

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = compose_config(*overrides(folder, 4), "data.batch_size=4", f"data.num_workers={workers}")
        bundle = build_data(cfg.data, cfg.augmentation, seed=7)
        epochs = []
        for epoch in (0, 1):
            bundle.train.set_epoch(epoch)
            epochs.append({"steps": len(bundle.train), "ids": [i for x, _ in bundle.train for i in ids_of(x)]})
        gathered = [None] * world
        dist.all_gather_object(gathered, epochs)
        if rank == 0:
            out.write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()
