"""The one exception type a user sees: its message is the whole answer (what is wrong, what to do); and the two
checks of a TOML table that every file reader makes."""
from __future__ import annotations

from typing import Any


class UserError(Exception):
    """Bad input or an impossible setting. The CLI prints str(err) as one line and exits non-zero."""

    exit_code = 2


def no_unknown(table: dict, allowed: set[str], where: str, what: str) -> None:
    for key in table:
        if key not in allowed:
            raise UserError(f"{where}: unknown {what} {key!r}; expected one of {', '.join(sorted(allowed))}")


def check_table(value: Any, where: str, key: str) -> None:
    if not isinstance(value, dict):
        raise UserError(f"{where}: {key} must be a table, got {type(value).__name__}")
