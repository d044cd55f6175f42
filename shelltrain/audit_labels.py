"""task=audit's likely label errors: out-of-fold predicted probabilities from `audit.folds` models trained by the
cross-validation machinery (runner.train_and_test with fold=(k, K), one sub-run each in cv/fold_<k>/, each
predicting the fold it did not train on), ranked by confident learning (Northcutt, Jiang and Chuang, "Confident
Learning: Estimating Uncertainty in Dataset Labels", JAIR 2021), implemented here from the paper:

- per-class threshold t_j: the mean self-confidence p(j | x) over the images labelled j;
- the confident joint C[i][j]: an image labelled i counts in column j, the class of highest probability among those
  whose probability reaches their threshold (no class reaches it: it is not counted);
- the label issues: the images off the diagonal of the confident joint, ranked by self-confidence p(given | x) or
  by the normalized margin p(given | x) - max_{k != given} p(k | x), lowest first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from shelltrain import rundir
from shelltrain.console import say
from shelltrain.data import DataBundle, cv_fold
from shelltrain.engine import predict
from shelltrain.environment import resolve_device
from shelltrain.preprocess import Preprocessing
from shelltrain.runner import train_and_test, train_settings
from shelltrain.trained import open_trained

# what a fold model of the audit writes: its checkpoints and summary, not the pictures and pages of a real run
FOLD_SETTINGS = {"plots": False, "report": {"html": False, "model_card": False, "cam": False, "per_job": "line"}}


def out_of_fold(cfg: DictConfig, run_dir: Path, data: DataBundle, console: Any) -> torch.Tensor:
    """Each train image's class probabilities from the fold model that did not train on it (N x classes)."""
    folds = int(cfg.audit.folds)
    fold_cfg = OmegaConf.merge(cfg, FOLD_SETTINGS)
    probabilities = torch.full((len(data.train.dataset), data.num_classes), float("nan"))
    settings = train_settings(cfg.trainer, resolve_device(cfg.trainer.device))
    for k in range(folds):
        say(console, f"[bold]audit: fold model {k + 1}/{folds}[/bold] (trained on the other folds)")
        fold_dir = rundir.fold_dir(run_dir, k)
        fold_dir.mkdir(parents=True, exist_ok=True)
        train_and_test(fold_cfg, fold_dir, fold=(k, folds))
        trained = open_trained(fold_dir, "audit.folds")
        held = cv_fold(data, folds=folds, fold=k, seed=cfg.data.split_seed).val
        model = trained.fed(Preprocessing.of_data(data), "audit.folds", lambda line: say(console, line))
        logits, _ = predict(model, held, trained.runs_on(settings))
        probabilities[torch.as_tensor(held.dataset.indices)] = logits.float().softmax(1)
    return probabilities


def confident_learning(probabilities: torch.Tensor, labels: torch.Tensor, rank_by: str) -> dict[str, Any]:
    """The per-class thresholds, the confident joint, and the label issues ranked (most likely error first) with
    each image's suggested class; `order` ranks every image by the same score (for precision/recall at k)."""
    n, classes = probabilities.shape
    rows = torch.arange(n)
    self_confidence = probabilities[rows, labels]
    thresholds = torch.stack(
        [
            self_confidence[labels == j].mean() if (labels == j).any() else torch.tensor(float("inf"))
            for j in range(classes)
        ]
    )
    above = probabilities >= thresholds[None, :]
    confident = torch.where(above, probabilities, torch.tensor(-1.0)).argmax(1)
    counted = above.any(1)
    joint = torch.zeros(classes, classes, dtype=torch.long)
    joint.index_put_((labels[counted], confident[counted]), torch.ones(int(counted.sum()), dtype=torch.long), True)
    others = probabilities.clone()
    others[rows, labels] = -1.0
    score = self_confidence if rank_by == "self_confidence" else self_confidence - others.max(1).values
    flagged = torch.nonzero(counted & (confident != labels)).flatten()
    flagged = flagged[score[flagged].argsort()]
    suggested = torch.where(counted, confident, others.argmax(1))
    return {
        "thresholds": thresholds.tolist(),
        "confident_joint": joint.tolist(),
        "issues": flagged.tolist(),
        "suggested": suggested.tolist(),
        "score": score.tolist(),
        "order": score.argsort().tolist(),
    }
