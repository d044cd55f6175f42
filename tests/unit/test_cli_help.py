"""`shelltrain --help` without Hydra's slow group listing, and what it leaves to Hydra."""

from __future__ import annotations

from hydra._internal.config_loader_impl import ConfigLoaderImpl

from shelltrain.cli_help import print_help


def test_help_lists_the_groups_without_asking_hydras_loader(monkeypatch, capsys):
    # Each of the loader's group questions deep-copies its whole config repository: the help reads the sources.
    def refuse(*args, **kwargs):
        raise AssertionError("the help asked Hydra's config loader for a group listing")

    monkeypatch.setattr(ConfigLoaderImpl, "get_group_options", refuse)
    monkeypatch.setattr(ConfigLoaderImpl, "list_groups", refuse)
    assert print_help(["model=cnn", "--help"])
    out = capsys.readouterr().out
    assert "optimizer: adam, adamw, momentum, nesterov, rmsprop, sgd\n" in out
    assert "trainer: default\n" in out
    assert "name: cnn" in out.split("== Composed config")[1]
    assert "job_logging" not in out.split("== Composed config")[0]  # Hydra's own groups stay out


def test_help_is_not_asked_for():
    assert not print_help(["model=cnn"])
    assert not print_help(["--config-dir", "/somewhere", "--help"])  # options beyond overrides: Hydra answers
