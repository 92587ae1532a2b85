"""The one exception type a user sees: its message is the whole answer (what is wrong, what to do)."""


class UserError(Exception):
    """Bad input or an impossible setting. The CLI prints str(err) as one line and exits non-zero."""

    exit_code = 2
