"""The product's own exceptions: anything a user can cause is a DataError with a one-line fix."""


class KDCoreError(Exception):
    """Base class for every error kdcore raises on purpose."""


class DataError(KDCoreError, ValueError):
    """Bad user input. The message is one line: the file, the column or row, and the fix."""
