"""The one exception type azgpt raises for a user's mistake."""


class AzGPTError(Exception):
    """A problem the user can fix (bad path, bad option, inconsistent files).

    The command line prints its message without a traceback and exits non-zero.
    """
