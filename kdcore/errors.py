"""The product's own exceptions: anything a user can cause is a DataError with a one-line fix."""

import sys


class KDCoreError(Exception):
    """Base class for every error kdcore raises on purpose."""


class DataError(KDCoreError, ValueError):
    """Bad user input. The message is one line: the file, the column or row, and the fix."""


def report(exc: KDCoreError) -> int:
    """Print the error as one line on stderr; the exit status: 2 for bad input, 1 otherwise."""
    print(f"error: {exc}", file=sys.stderr)
    return 2 if isinstance(exc, DataError) else 1
