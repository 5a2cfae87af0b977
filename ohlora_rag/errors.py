"""The library's exceptions: every user-facing failure is an OhloraError with a one-line message that says the fix."""

from __future__ import annotations


class OhloraError(Exception):
    """Base class: the CLI prints the message (no traceback) and exits non-zero."""

    exit_code = 1


class UsageError(OhloraError):
    """A bad option value (the CLI exits 2, like a bad flag)."""

    exit_code = 2


class DataFormatError(OhloraError):
    """An input file (concept DB, training set) is unreadable or malformed."""


class IndexNotFoundError(OhloraError):
    """No usable index where one was expected."""


class IndexMismatchError(OhloraError):
    """The index was built with another encoder than the one that would query it."""


class ModelNotFoundError(OhloraError):
    """A model reference resolves to nothing usable."""


class ModelImportError(OhloraError):
    """A built-in model could not be converted from its wheel."""
