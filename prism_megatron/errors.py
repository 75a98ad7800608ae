"""The base of every error a user can fix (bad config, input, checkpoint or environment).

Command-line entry points print these as one line and exit with status 2 instead of a stack
dump; anything else is a bug and keeps its traceback.
"""


class PrismError(Exception):
    """An error whose message tells the user what to change."""
