"""The one exception type that reaches the user as a one-line message instead of a traceback."""


class UserError(Exception):
    """A problem with the user's input that the user can fix.

    The message names the input and the fix, in one line; the CLI prints it and exits with status 2.
    """
