"""Saving and loading checkpoint files (checkpoint.py): weights-only round trips and one-line refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shelltrain.checkpoint import load_checkpoint, load_model_state, peek, save_checkpoint
from shelltrain.errors import UserError


def payload() -> dict:
    return {"model": nn.Linear(3, 2).state_dict(), "epoch": 2, "step": 8, "config": {"model": {"name": "cnn"}}}


def test_round_trip_loads_weights_only(tmp_path):
    saved = payload()
    save_checkpoint(saved, tmp_path / "c.pt")
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)  # what any user can do with the file
    assert torch.equal(loaded["model"]["weight"], saved["model"]["weight"])
    assert load_checkpoint(tmp_path / "c.pt")["epoch"] == 2
    assert peek(tmp_path / "c.pt")["step"] == 8


def test_a_truncated_file_is_refused_in_one_line(tmp_path):
    save_checkpoint(payload(), tmp_path / "c.pt")
    data = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "c.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"cannot be loaded safely .*not a complete PyTorch archive") as caught:
        load_checkpoint(tmp_path / "c.pt")
    assert "\n" not in str(caught.value)
    assert peek(tmp_path / "c.pt") is None


def test_a_pickled_object_is_refused(tmp_path):
    torch.save({"model": {}, "module": nn.Linear(1, 1)}, tmp_path / "c.pt")
    with pytest.raises(UserError, match=r"holds a pickled Python object \(torch.nn.modules.linear.Linear\)"):
        load_checkpoint(tmp_path / "c.pt")


def test_a_foreign_file_is_named_by_what_it_holds(tmp_path):
    torch.save({"state_dict": {}, "epoch": 1}, tmp_path / "c.pt")
    with pytest.raises(UserError, match=r"is not a shelltrain checkpoint: it holds a dict with keys state_dict, epoch"):
        load_checkpoint(tmp_path / "c.pt")
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_another_model_is_refused_with_its_shapes(tmp_path):
    saved = payload()
    with pytest.raises(UserError, match=r"shapes differ: weight \(2, 3\) in the checkpoint vs \(2, 4\)") as caught:
        load_model_state(saved["model"], tmp_path / "c.pt", nn.Linear(4, 2), saved["config"])
    assert "trained with model=cnn" in str(caught.value)


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from shelltrain import rundir

    save_checkpoint(payload(), tmp_path / "c.pt")
    monkeypatch.setattr(rundir, "_write_durably", lambda tmp, data: (_ for _ in ()).throw(OSError(28, "full")))
    with pytest.raises(UserError, match="cannot write"):
        save_checkpoint({**payload(), "epoch": 3}, tmp_path / "c.pt")
    assert load_checkpoint(tmp_path / "c.pt")["epoch"] == 2


def test_a_long_refusal_reason_is_cut_at_a_sentence_end_never_mid_sentence():
    from shelltrain.checkpoint import _whole_sentences

    first = "Unsupported operand 149 in the pickle stream."
    assert _whole_sentences(f"{first} {'More detail follows here. ' * 20}") == first + " More detail follows here." * 5
    long = "word " * 60
    cut = _whole_sentences(long)
    assert len(cut) <= 200 and cut.endswith("word...")
