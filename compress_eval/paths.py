"""Where data and caches live. Configurable by flag or environment, never hard-coded."""

from __future__ import annotations

import os
from pathlib import Path

from compress_eval.errors import UserError

DATA_DIR_ENV = "COMPRESS_EVAL_DATA_DIR"
CACHE_DIR_ENV = "COMPRESS_EVAL_CACHE"
# What `compress-eval data prepare` writes beside the data: each file's sha256 and source.
MANIFEST = "MANIFEST.json"


def cache_dir() -> Path:
    """Root of our own cache (converted packaged models, lm-eval request caches)."""
    root = os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "compress-eval"
    return Path(root)


def prepared_data_dir() -> Path:
    """Where ``compress-eval data prepare`` writes by default (``~/.cache/compress-eval/data``)."""
    return cache_dir() / "data"


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The local evaluation-data directory (layout of ../shared/data), or None to use the Hub.

    In order: ``explicit`` (``--data-dir``), the environment variable, the prepared cache (when
    ``data prepare`` has written its manifest there), else None. A value given that is not a directory
    is an error rather than a silent fall-back to the Hub.
    """
    value = explicit if explicit is not None else os.environ.get(DATA_DIR_ENV)
    if not value:
        prepared = prepared_data_dir()
        return prepared if (prepared / MANIFEST).is_file() else None
    path = Path(value).expanduser()
    if not path.is_dir():
        source = "--data-dir" if explicit is not None else DATA_DIR_ENV
        raise UserError(
            f"data directory {str(path)!r} (from {source}) does not exist; "
            f"point it at a folder laid out like shared/data (wikitext2/, c4/, ...)"
        )
    return path


def data_file(root: Path, rel: str) -> Path:
    """``root / rel``, which must exist: one check of the data directory's layout for every reader."""
    path = root / rel
    if not path.exists():
        raise UserError(f"missing data file {path}: the data directory must be laid out like shared/data "
                        f"(compress-eval data prepare [--dir DIR] [--only TASKS] writes one)")
    return path
