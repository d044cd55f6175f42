"""The CLI's one dependency on a private Hydra API, checked so that a Hydra upgrade fails here, loudly."""

from __future__ import annotations

import inspect
import subprocess
import sys

from hydra._internal import utils as hydra_internal

from shelltrain import cli


def test_hydra_still_reports_errors_through_run_and_report(monkeypatch):
    # Hydra 1.3 has no public error-reporting hook: cli.install_error_reporter wraps this private function,
    # which _run_hydra looks up as a module global each time it runs a step.
    assert list(inspect.signature(hydra_internal.run_and_report).parameters) == ["func"]
    assert "run_and_report(" in inspect.getsource(hydra_internal._run_hydra)
    monkeypatch.setattr(hydra_internal, "run_and_report", hydra_internal.run_and_report)
    original = hydra_internal.run_and_report
    cli.install_error_reporter()
    cli.install_error_reporter()  # twice: still one wrapper around Hydra's own
    assert hydra_internal.run_and_report is not original
    assert hydra_internal.run_and_report.__wrapped__ is original
    assert hydra_internal.run_and_report(lambda: 42) == 42


def test_version_names_shelltrain_and_torch_without_importing_torch():
    code = "import sys; from shelltrain.cli import version; print(version()); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    from importlib.metadata import version

    assert out.splitlines() == [
        f"shelltrain {version('shelltrain')} (torch {version('torch')}, torchvision {version('torchvision')}, "
        f"hydra-core {version('hydra-core')})",
        "False",
    ]


def test_help_is_the_text_hydra_prints(tmp_path):
    # cli_help renders --help itself (Hydra's own listing of the groups doubles the start-up time): same text.
    def stdout(code: str) -> str:
        return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True).stdout

    args = ["shelltrain", "--help", "model=cnn", "optimizer=adamw"]
    ours = stdout(f"import sys; sys.argv = {args!r}; from shelltrain.start import main; main()")
    hydras = stdout(f"import sys; sys.argv = {args!r}; from shelltrain.cli import _task; _task()")
    assert "model: cnn, efficientnet_b0" in ours and "_target_: torch.optim.AdamW" in ours
    assert ours == hydras


def test_an_unwritable_log_in_an_existing_run_directory_is_one_line():
    """What logging.config raises when Hydra cannot open train.log in a run directory that already exists."""
    import errno

    from shelltrain.explain import explain

    try:
        try:
            raise OSError(errno.EROFS, "Read-only file system", "/runs/old/train.log")
        except OSError as cause:
            raise ValueError("Unable to configure handler 'file'") from cause
    except ValueError as exc:
        message = explain(exc)
    assert message == (
        "cannot create or write '/runs/old/train.log': Read-only file system; choose a writable place for the run "
        "directory with hydra.run.dir=DIR (hydra.sweep.dir=DIR for -m)"
    )
