"""Errors a user can cause: shown as one line, never as a traceback."""


class UserError(Exception):
    """Bad params, bad data, no champion yet, a server out of reach: say what, in one line."""
