"""The one exception type meant for users: the CLI prints its message and exits non-zero."""


class UserError(Exception):
    """A problem the user can fix (bad config value, missing data); carries a one-line message."""
