"""The data package's one error type (kept in its own module so every data module can raise it)."""
from __future__ import annotations


class DataError(ValueError):
    """Missing, empty or malformed data; the message names the path."""
