"""distill.cache: the teacher's logits of every train image computed once, then read on the device without a host
sync; the rows handed out are copies, not views of a batch."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from shelltrain.data.loader import Loader
from shelltrain.distill import TeacherCache
from shelltrain.schema import defaults

SYNCS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__")


def _cache() -> tuple[TeacherCache, torch.nn.Module, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(50, 1, 4, 4, generator=generator)
    source = Loader(TensorDataset(images, torch.zeros(50, dtype=torch.long)), batch_size=16)
    settings = defaults("trainer", device=torch.device("cpu"), channels_last=False, precision="32")
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    return TeacherCache(source, settings), teacher, images


def test_cached_rows_are_the_teachers_and_share_no_storage_with_the_batch():
    cache, teacher, images = _cache()
    batch = images[torch.randperm(50, generator=torch.Generator().manual_seed(1))[:20]]  # another order and size
    rows = cache.logits(teacher, batch)
    with torch.no_grad():
        torch.testing.assert_close(rows, teacher(batch))
    assert (cache.misses, cache.hits) == (50, 20)  # the teacher ran once over the split, the batch was read
    again = cache.logits(teacher, batch)
    storages = {t.untyped_storage().data_ptr() for t in (batch, cache.table, cache.keys)}
    assert rows.untyped_storage().data_ptr() not in storages | {again.untyped_storage().data_ptr()}
    assert not rows.requires_grad and cache.misses == 50


def test_a_lookup_does_not_sync_with_the_host(monkeypatch):
    """After the one pass that fills it, a lookup reads no value on the host: every way a tensor reaches the host
    raises, and the lookup still runs; on the meta device (tensors without values) it runs too."""
    cache, teacher, images = _cache()
    cache.logits(teacher, images[:8])
    expected = cache.logits(teacher, images[10:30])

    def refuse(self: torch.Tensor, *args: object, **kwargs: object) -> None:
        raise AssertionError("a host sync in the lookup")

    with monkeypatch.context() as patch:
        for name in SYNCS:
            patch.setattr(torch.Tensor, name, refuse)
        got = cache.logits(teacher, images[10:30])
    assert torch.equal(got, expected)
    cache.keys, cache.table, cache.probe = (t.to("meta") for t in (cache.keys, cache.table, cache.probe))
    assert cache.logits(teacher, images[:16].to("meta")).shape == (16, 3)


@pytest.mark.parametrize("size", [1, 2])
def test_a_tiny_split_finds_its_rows(size):
    cache, teacher, images = _cache()
    cache.source = Loader(TensorDataset(images[:size], torch.zeros(size, dtype=torch.long)), batch_size=4)
    with torch.no_grad():
        torch.testing.assert_close(cache.logits(teacher, images[:size].flip(0)), teacher(images[:size].flip(0)))
