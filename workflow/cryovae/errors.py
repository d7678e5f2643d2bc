"""The one exception type for bad input, and how the command line reports it."""


class InputError(Exception):
    """Bad input: the message names the file, line, particle or key, and what was expected.

    The command line prints the message alone (no traceback) and exits with status 2.
    """
