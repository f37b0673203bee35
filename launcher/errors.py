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


def user_error_types() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input (config, data, checkpoint, diverged loss): one line, never a traceback."""
    from sparsetrain.config import ConfigError
    from sparsetrain.data.errors import DataError

    errs: list[type[BaseException]] = [ConfigError, DataError]
    try:  # these import torch; a driver without it has no checkpoint or trainer errors to report
        from sparsetrain.train.checkpoint import CheckpointError
        from sparsetrain.train.trainer import NonFiniteLossError

        errs += [CheckpointError, NonFiniteLossError]
    except ImportError:
        pass
    return tuple(errs)


def one_line(e: BaseException) -> str:
    """'Type: first line of the message' for a user error."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")
