"""The one error type users see: input they can fix, with a message that says how."""


class UserError(Exception):
    """Bad input (a file, a value, a folder): the CLI prints the message on one line and exits non-zero.

    Library code raises a subclass with a message naming the file or value and what to do;
    anything else reaching the CLI is a bug and keeps its traceback.
    """
