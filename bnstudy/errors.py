"""The one exception type the CLI turns into a one-line error message instead of a traceback."""


class UserError(Exception):
    """Bad input or state the user can fix; the message names the problem and the fix in one line."""
