"""The `shelltrain` command's first step: `shelltrain --help` answered before the CLI loads the modules a job needs
(the run-directory locks, the launcher, sweeps, the baseline comparison). The help screen is the command people run
most often, and each of those imports is time they wait for a page of text."""

from __future__ import annotations

import sys

from shelltrain.cli_help import print_help


def main() -> None:
    """Console entry point: the help screen, else the CLI (`shelltrain.cli.main`)."""
    if print_help(sys.argv[1:]):
        return
    from shelltrain.cli import main as run_cli  # the whole CLI: only once a command is more than the help screen

    run_cli()
