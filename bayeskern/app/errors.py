"""The one error type the CLI reports as a single line with exit code 2."""


class UsageError(ValueError):
    """Bad user input: unknown model/dataset/method, missing data, a checkpoint that does not fit."""
