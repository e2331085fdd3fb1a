"""Errors a user can cause and fix (a bad flag, file or missing package).

The CLI prints them as one line naming what was expected and what was found, without a traceback; any other
exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input or setup; the message says which file/flag and how to fix it."""
