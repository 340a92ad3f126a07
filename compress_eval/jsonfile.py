"""Strict JSON files: written atomically with the modes a user expects, read back as one object.

Every JSON file we write (manifests, results, cell records, loop states) goes through here, so a
reader never sees half a file and never a ``NaN`` / ``Infinity`` literal that strict parsers
refuse: a non-finite number is written as ``null`` (a missing value, not a made-up one).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from compress_eval.errors import no_space_is_one_line


def finite_or_null(value: Any) -> Any:
    """``value`` with every NaN / inf float (at any depth) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def dumps(data: Any, indent: int | None = 2) -> str:
    return json.dumps(finite_or_null(data), indent=indent, default=str, allow_nan=False)


def umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def user_modes(path: Path) -> None:
    """The modes ``open`` / ``mkdir`` give under the umask (mkstemp and mkdtemp give 0600 / 0700)."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask())


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` beside ``path`` and rename it into place: a reader sees the old file or the new one."""
    path = Path(path)
    with no_space_is_one_line(str(path), "it keeps what it held before"):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            user_modes(Path(tmp))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write strict JSON atomically."""
    return write_text_atomic(path, dumps(data) + "\n")


class JSONFileError(ValueError):
    """A file that should hold a JSON object and does not (the message says why, in one line)."""


def read_json_object(path: str | Path) -> dict | None:
    """The JSON object in ``path``; None if the file is absent; JSONFileError if it is anything else
    (not UTF-8, not JSON, a list, a directory)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise JSONFileError(f"{path} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise JSONFileError(f"{path} is not valid JSON ({exc})") from None
    except OSError as exc:
        raise JSONFileError(f"{path} cannot be read ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise JSONFileError(f"{path} is not a JSON object (it holds a {type(data).__name__})")
    return data
