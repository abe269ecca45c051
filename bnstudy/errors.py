"""The one exception type the CLI turns into a one-line error message instead of a traceback, and the one way to
quote a library's error inside such a message."""


class UserError(Exception):
    """Bad input or state the user can fix; the message names the problem and the fix in one line."""


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of ``exc``'s message (its type name when empty), shortened at a word boundary."""
    text = str(exc).strip()
    line = text.splitlines()[0].strip() if text else type(exc).__name__
    if len(line) <= limit:
        return line
    return line[:limit].rsplit(" ", 1)[0].rstrip(" ,;:") + " …"
