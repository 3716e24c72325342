"""Where the local data (benchmarks, training text, long documents) is found: one rule for every command."""

from __future__ import annotations

import os
from pathlib import Path

from linearize.errors import LinearizeError

__all__ = ["DATA_ENV", "DataNotFoundError", "candidates", "default_data_dir", "resolve_data_dir"]

#: Environment variable that names the data directory.
DATA_ENV = "LINEARIZE_DATA"


class DataNotFoundError(LinearizeError, FileNotFoundError):
    """A data directory or file that does not exist."""


def candidates() -> list[tuple[str, Path]]:
    """Places tried after ``$LINEARIZE_DATA``: next to the checkout holding this source file, then next to
    the working directory (a checkout's sibling ``shared/data``)."""
    repo_root = Path(__file__).resolve().parents[2]  # <repo>/src/linearize/data_dir.py
    return [
        ("<repo root>/../shared/data", repo_root.parent / "shared" / "data"),
        ("<cwd>/../shared/data", Path.cwd().parent / "shared" / "data"),
    ]


def default_data_dir() -> Path:
    """``$LINEARIZE_DATA`` (must be a directory when set), else the first of :func:`candidates` that exists.

    Raises :class:`DataNotFoundError` naming every place tried.
    """
    env = os.environ.get(DATA_ENV)
    if env:
        path = Path(env).expanduser()
        if path.is_dir():
            return path.resolve()
        raise DataNotFoundError(f"{DATA_ENV}={env!r} is not a directory. Point it at the shared data directory "
                                "(the one holding piqa/, sharegpt/, c4_demo/, ...) or unset it.")
    tried = []
    for label, path in candidates():
        if path.is_dir():
            return path.resolve()
        tried.append(f"{label} = {path}")
    raise DataNotFoundError(f"No data directory found. Tried: ${DATA_ENV} (unset); " + "; ".join(tried)
                            + f". Set {DATA_ENV} or pass data_dir=.")


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """``data_dir`` as given (it must be a directory), or :func:`default_data_dir` when None."""
    if data_dir is None:
        return default_data_dir()
    p = Path(data_dir).expanduser()
    if not p.is_dir():
        raise LinearizeError(f"Data directory {str(p)!r} does not exist or is not a directory.")
    return p.resolve()
