"""The one exception type meant for users: the CLI prints its message and exits non-zero."""

EXIT_USER_ERROR = 2  # a config or input mistake (README "Using shelltrain in CI"; 3 and 4 are sweep.py's)


class UserError(Exception):
    """A problem the user can fix (bad config value, missing data); carries a one-line message."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a run. A KeyboardInterrupt, so that a multirun sweep stops too instead of
    going on with its next job; the CLI prints how to resume and exits 128 + the signal number."""

    def __init__(self, signum: int, run_dir: object = None, saved: bool = True):
        super().__init__(signum)
        self.signum = signum
        self.run_dir = run_dir  # the run directory holding the checkpoint to resume from, if known
        self.saved = saved  # False: a second signal cut the run short without a fresh checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class GateMissed(UserError):
    """A quality gate (`gate.*`) was missed: `cli.run_in_dir(..., raise_on_gate=True)` raises it (the command
    exits 3 instead). `summary` is the run's summary.json, its "gates" verdict included."""

    def __init__(self, failures: list[str], summary: dict):
        super().__init__("gate missed: " + "; ".join(failures))
        self.failures = failures
        self.summary = summary
