"""Errors a user can cause and fix (a bad flag, file or missing package).

The CLI prints them as one line naming what was expected and what was found, without a traceback; any other
exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input or setup; the message says which file/flag and how to fix it."""


def require_at_least(flag: str, value, least: int = 1) -> int:
    """``value`` when it is an integer >= ``least``; else the one-line error every command gives for a count."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise UserError(f"{flag}: expected an integer >= {least}, found {value!r}")
    return value
