"""The one error type users see: input they can fix, with a message that says how."""


class UserError(Exception):
    """Bad input (a file, a value, a folder): the CLI prints the message on one line and exits non-zero.

    Library code raises a subclass with a message naming the file or value and what to do;
    anything else reaching the CLI is a bug and keeps its traceback.
    """


def first_line(e: BaseException | str, limit: int = 200) -> str:
    """The first non-empty line of an exception's message (or of a text), at most ``limit`` characters; the
    exception's type name when the message is empty, so a one-line report never ends in nothing."""
    text = e if isinstance(e, str) else str(e)
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    if not line and isinstance(e, BaseException):
        line = type(e).__name__
    return line[:limit]
