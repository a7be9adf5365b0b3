"""User-facing errors.

Anything a user can cause (a bad path, malformed JSON, a missing optional package) raises
`SeesayError` with a one-line message naming the file and the problem. The CLI prints it
without a traceback; library users can catch it.
"""

from __future__ import annotations


class SeesayError(Exception):
    """An error caused by input or environment, reported to users as one line."""


def missing_extra(package: str, extra: str) -> SeesayError:
    """The error for an optional dependency that is not installed."""
    return SeesayError(f"{package} is not installed; install it with: pip install 'seesay[{extra}]'")
