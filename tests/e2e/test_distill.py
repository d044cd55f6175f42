"""Knowledge distillation (distill=logits): the teacher's signal reaches the student, the loss is the KL term
computed by hand, a label-set mismatch is one line, and a distilled run resumes exactly."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import interrupt_at_step, run_in_process

from shelltrain import distill
from shelltrain.errors import Interrupted, UserError
from shelltrain.trained import open_trained

TINY = ["model=cnn", "data.image_size=16", "trainer.threads=1"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A trained teacher on digits (about 97% test accuracy)."""
    run_dir = tmp_path_factory.mktemp("teacher")
    run_in_process(run_dir, *TINY, "model.width=16", "trainer.epochs=4")
    return run_dir


def test_a_student_of_the_teacher_alone_learns_and_minimises_the_kl_term(tmp_path, monkeypatch, teacher):
    """alpha=1: no label reaches the loss, yet the student learns digits; the loss the engine minimises on a
    batch equals KL(teacher_T || student_T) * T^2 computed by hand from the teacher rebuilt independently."""
    seen = {}
    real = distill.Distiller.__call__

    def spy(self, images, logits, targets, settings):
        loss = real(self, images, logits, targets, settings)
        seen.setdefault("batch", (images.detach().clone(), logits.detach().clone(), targets.clone(), loss.item()))
        return loss

    monkeypatch.setattr(distill.Distiller, "__call__", spy)
    distilled = ["distill=logits", f"distill.teacher={teacher}", "distill.alpha=1", "distill.temperature=3"]
    summary = run_in_process(tmp_path, *TINY, "model.width=8", "trainer.epochs=3", *distilled)
    assert summary["test_acc"] > 0.8  # chance is 0.1: the teacher's outputs alone taught the task

    images, student_logits, _, loss = seen["batch"]
    model = open_trained(teacher).module
    with torch.no_grad():
        teacher_logits = model.eval()(images)
    p_teacher = torch.softmax(teacher_logits.double() / 3, 1)
    p_student = torch.softmax(student_logits.double() / 3, 1)
    by_hand = (p_teacher * (p_teacher.log() - p_student.log())).sum(1).mean() * 3**2
    assert loss == pytest.approx(by_hand.item(), rel=1e-4)
    # no hard-label term: the hand computation above never read `targets`


def _plain():
    from shelltrain.schema import defaults

    return defaults("trainer")


def test_distillation_loss_mixes_the_hard_label_loss_by_alpha():
    torch.manual_seed(0)
    student, teacher, targets = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    settings = _plain()
    soft = distill.distillation_loss(student, teacher, targets, settings, temperature=2.0, alpha=1.0)
    hard = F.cross_entropy(student, targets)
    mixed = distill.distillation_loss(student, teacher, targets, settings, temperature=2.0, alpha=0.25)
    assert mixed.item() == pytest.approx(0.25 * soft.item() + 0.75 * hard.item(), rel=1e-5)
    same = distill.distillation_loss(teacher, teacher, targets, settings, temperature=2.0, alpha=1.0)
    assert same.item() == pytest.approx(0.0, abs=1e-6)


def test_a_teacher_of_other_classes_is_one_line_before_training(tmp_path, teacher):
    three = tmp_path / "three"
    run_in_process(three, *TINY, "model.width=8", "debug=smoke", "data.classes=[0,1,2]")
    with pytest.raises(UserError) as caught:
        run_in_process(
            tmp_path / "student", *TINY, "model.width=8", "debug=smoke", "distill=logits", f"distill.teacher={three}"
        )
    message = str(caught.value)
    assert "\n" not in message and "distill.teacher" in message and "3 classes" in message
    assert not (tmp_path / "student" / "checkpoints").exists()  # nothing trained


@pytest.mark.parametrize("bad, key", [("distill.temperature=0", "distill.temperature"), ("distill.alpha=1.5", "alpha")])
def test_bad_distill_values_name_their_key(tmp_path, teacher, bad, key):
    with pytest.raises(UserError, match=key):
        run_in_process(tmp_path, *TINY, "debug=smoke", "distill=logits", f"distill.teacher={teacher}", bad)


def test_distill_needs_a_teacher(tmp_path):
    with pytest.raises(UserError, match="distill.teacher="):
        run_in_process(tmp_path, *TINY, "debug=smoke", "distill=logits")


# Deterministic and exercising every RNG (augmentation, dropout), with mid-epoch checkpoints: as test_resume.py.
EXACT = [
    *TINY,
    "model.width=8",
    "model.dropout=0.2",
    "augmentation=seed",
    "trainer.deterministic=true",
    "trainer.epochs=2",
    "trainer.limit_train_batches=6",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.checkpoint_every_n_steps=4",
    "distill=logits",
    "distill.alpha=0.7",
]


# augmentation=none caches the teacher's logits: 6 batches are the whole (limited) train split, so the
# uninterrupted run reads epoch 2's logits from the cache and the resumed run, its cache empty, recomputes them.
CACHED = ["augmentation=none", "data.limit_samples=192", "data.batch_size=32"]


@pytest.mark.parametrize("extra", [[], CACHED], ids=["augmented", "cached"])
def test_distillation_resumes_exactly_after_an_interruption(tmp_path, monkeypatch, teacher, extra):
    """SIGINT mid-epoch 2, then trainer.resume: the same weights and metrics as the uninterrupted run."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    overrides = [*EXACT, f"distill.teacher={teacher}", *extra]
    run_in_process(straight, *overrides)
    with monkeypatch.context() as patch:
        interrupt_at_step(patch, 6 + 3, "sigint")
        with pytest.raises(Interrupted):
            run_in_process(resumed, *overrides)
    assert torch.load(resumed / "checkpoints/last.pt", weights_only=True)["step"] == 9
    run_in_process(resumed, *overrides, f"trainer.resume={resumed}")
    a, b = (torch.load(d / "checkpoints/last.pt", weights_only=True) for d in (straight, resumed))
    assert a["step"] == b["step"] == 12
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert without_timings(straight) == without_timings(resumed)


def test_cached_teacher_logits_train_the_same_student_as_computing_them_every_epoch(tmp_path, monkeypatch, teacher):
    """augmentation=none: the teacher runs once over the train split, every batch of both epochs reads its logits
    from the cache (no teacher call), and the student's weights after 2 epochs are identical to those of a run that
    calls the teacher on every batch."""
    caches = []
    real = distill.TeacherCache.logits

    def spy(self, teacher_model, images):
        caches.append(self)
        return real(self, teacher_model, images)

    monkeypatch.setattr(distill.TeacherCache, "logits", spy)
    common = [*TINY, "model.width=8", "trainer.epochs=2", *CACHED, "distill=logits", f"distill.teacher={teacher}"]
    cached = run_in_process(tmp_path / "cached", *common)
    assert caches and caches[-1].misses == 192 and caches[-1].hits == 2 * 192  # one pass computes, both epochs read
    calls = len(caches)
    plain = run_in_process(tmp_path / "plain", *common, "distill.cache=false")
    assert len(caches) == calls  # distill.cache=false: the teacher runs on every batch
    a, b = (torch.load(tmp_path / d / "checkpoints/last.pt", weights_only=True)["model"] for d in ("cached", "plain"))
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert cached["test_acc"] == plain["test_acc"]


def test_a_teacher_cache_refuses_augmented_images(tmp_path, teacher):
    with pytest.raises(UserError, match="distill.cache=true needs augmentation=none"):
        run_in_process(
            tmp_path,
            *TINY,
            "debug=smoke",
            "augmentation=basic",
            "distill=logits",
            f"distill.teacher={teacher}",
            "distill.cache=true",
        )


def without_timings(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return [
            {k: v for k, v in row.items() if k not in ("seconds", "images_per_second")} for row in csv.DictReader(f)
        ]


def test_an_ensemble_run_teaches_with_its_fused_prediction(tmp_path, capsys, teacher):
    """An ensemble run directory as the teacher (its members rebuilt and fused), with gradient accumulation,
    bf16 autocast and a fine-tune policy starting from the teacher's weights: the student still learns."""
    ensemble = tmp_path / "ensemble"
    run_in_process(ensemble, *TINY, "model.width=8", "ensemble=average", "ensemble.members=2", "trainer.epochs=2")
    student = run_in_process(
        tmp_path / "student",
        *TINY,
        "model.width=16",
        f"model.weights={teacher}",
        "finetune=freeze_backbone",
        "trainer.epochs=1",
        "trainer.accumulate=2",
        "trainer.precision=bf16",
        "distill=logits",
        f"distill.teacher={ensemble}",
    )
    assert student["test_acc"] > 0.8
    assert "distilling from 2 models fused by average" in capsys.readouterr().out


def test_every_cross_validation_fold_distils(tmp_path, capsys, teacher):
    summary = run_in_process(
        tmp_path, *TINY, "model.width=8", "debug=smoke", "cv.folds=2", "distill=logits", f"distill.teacher={teacher}"
    )
    assert summary["cv"]["folds"] == 2
    assert capsys.readouterr().out.count("distilling from") == 3  # two folds and the refit


@pytest.mark.parametrize("on", [True, False])
def test_prune_distill_fine_tunes_each_round_against_the_unpruned_model(tmp_path, monkeypatch, on):
    teachers = []
    real = distill.Distiller.__call__

    def spy(self, images, logits, targets, settings):
        teachers.append((sum(p.numel() for p in self.teacher.parameters()), self.temperature, self.alpha))
        return real(self, images, logits, targets, settings)

    monkeypatch.setattr(distill.Distiller, "__call__", spy)
    summary = run_in_process(
        tmp_path,
        *TINY,
        "model.width=8",
        "debug=smoke",
        "prune=structured",
        "prune.schedule=iterative",
        "prune.steps=2",
        f"prune.distill={str(on).lower()}",
        "prune.distill_temperature=2",
    )
    if not on:
        assert teachers == []
        return
    assert teachers  # the fine-tuning batches of every round
    # every round: the unpruned model teaches, with prune.distill_temperature and the default alpha
    assert set(teachers) == {(summary["prune"]["before"]["params"], 2.0, 0.5)}
    assert summary["prune"]["after"]["params"] < teachers[0][0]


def test_several_compression_steps_run_in_order_and_each_is_reported(tmp_path):
    """prune=structured prune.then=[quantize]: channels removed, then int8; prune.json reports each step against
    its input and the chain against the trained model; the checkpoint rebuilds both steps."""
    summary = run_in_process(
        tmp_path, *TINY, "model.width=8", "debug=smoke", "prune=structured", "prune.then=[quantize]"
    )
    report = json.loads((tmp_path / "prune.json").read_text())
    assert report["method"] == summary["prune_method"] == "structured+quantize"
    assert [step["method"] for step in report["steps"]] == ["structured", "quantize"]
    assert report["before"] == report["steps"][0]["before"]  # the trained model
    assert report["steps"][1]["before"]["params"] == report["steps"][0]["after"]["params"]
    trained = open_trained(tmp_path)
    model, payload = trained.module, trained.checkpoint
    assert [op["op"] for op in payload["pruning"]["ops"]] == ["structured", "quantize"]
    assert sum(p.numel() for p in model.parameters()) < report["before"]["params"]


def test_quantize_must_be_the_last_compression_step(tmp_path):
    with pytest.raises(UserError, match="quantize must be the last step"):
        run_in_process(tmp_path, *TINY, "debug=smoke", "prune=quantize", "prune.then=[structured]")
