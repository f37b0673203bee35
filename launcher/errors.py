"""Errors raised by the launcher."""
from __future__ import annotations


class LaunchError(RuntimeError):
    """A job failed: a worker raised, died, or the runtime could not start it.

    `rank` is the failing worker's rank (None when no single rank is to blame) and
    `details` the worker's traceback or the runtime's explanation.
    """

    def __init__(self, message: str, rank: int | None = None, details: str = "") -> None:
        self.rank = rank
        self.details = details
        text = message if not details else f"{message}\n{details.rstrip()}"
        super().__init__(text)


def require_ray() -> None:
    """Raise a clear error when the optional `ray` extra is missing."""
    try:
        import ray  # noqa: F401
    except ImportError as e:
        raise LaunchError(
            "the Ray launcher needs the `ray` extra: pip install 'sparsetrain[ray]' "
            f"(or use --set launch.backend=torchrun / inline) [{e}]"
        ) from None
