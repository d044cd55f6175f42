"""Cross-validation's data: fold `k` of a stratified K-fold split of the train split, as a DataBundle whose train
and val loaders (or device batches) are that fold's. summary.json's cv section and table are cv.py's."""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch.utils.data import Subset

from shelltrain.data.build import DataBundle
from shelltrain.data.device import DeviceBatches
from shelltrain.data.loader import Loader, loader_settings, train_loader
from shelltrain.data.sources import one_line
from shelltrain.errors import UserError
from shelltrain.multilabel import stratum


def cv_fold(bundle: DataBundle, folds: int, fold: int, seed: int) -> DataBundle:
    """Fold `fold` of a stratified `folds`-fold split of the train split (scikit-learn's StratifiedKFold, shuffled
    with `seed`; StratifiedGroupKFold when the data has groups, so that a group is never on both sides): train on
    the other folds (augmented, as before) and validate on this one (un-augmented, like val). The test split is
    unchanged. Multi-label rows are stratified by each image's rarest label (multilabel.stratum)."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    train_set = bundle.train.dataset
    labels = stratum(train_set.labels).numpy()  # multi-hot rows: each image's rarest label
    groups = None if bundle.train_groups is None else bundle.train_groups.numpy()
    try:
        if groups is None:
            splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        else:
            splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        train_index, val_index = list(splitter.split(labels.reshape(-1, 1), labels, groups))[fold]
    except ValueError as e:  # more folds than images of some class / than images / than groups
        raise UserError(f"cv.folds={folds}: {one_line(e)}; use fewer folds or more data") from e
    if isinstance(bundle.train, DeviceBatches):
        train, held = torch.from_numpy(train_index), torch.from_numpy(val_index)
        return replace(
            bundle,
            train=bundle.train.subset(train, augmented=True, shuffle=True, batch_size=bundle.train.batch_size),
            val=bundle.train.subset(held, augmented=False, shuffle=False, batch_size=bundle.val.batch_size),
        )
    held_out = copy.copy(train_set)
    held_out.transform = bundle.val.dataset.transform
    loader, val_loader = bundle.train, bundle.val
    common = loader_settings(loader.num_workers, loader.persistent_workers, loader.pin_memory)
    generator = torch.Generator().manual_seed(loader.generator.initial_seed())
    train = Picked(train_set, train_index.tolist())
    return replace(
        bundle,
        train=train_loader(train, loader.batch_size, generator, None, loader.drop_last, loader.collate_fn, common),
        val=Loader(Subset(held_out, val_index.tolist()), batch_size=val_loader.batch_size, **common),
    )


class Picked(Subset):
    """A Subset that passes a SeededSampler's (position, seed) keys on as (index, seed)."""

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(key, tuple):
            return self.dataset[(self.indices[key[0]], key[1])]
        return self.dataset[self.indices[key]]

    def __getitems__(self, keys: list) -> list:
        return [self[key] for key in keys]
