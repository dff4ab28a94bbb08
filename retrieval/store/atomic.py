"""The one way the project writes a file into a run or index folder: whole or not at all.

The new content goes to a temporary file beside the target (same folder, so the rename
never crosses file systems; a unique name, so writers racing on one target, such as the
DDP ranks writing one ``images.parquet``, never share a temporary file), is flushed to
disk, renamed over the target, and the folder's entry is flushed too. A reader sees the
old file or the whole new one; a crash (even of the machine) never leaves half of one;
a write that fails midway leaves the old file as it was and removes its temporary file.
A killed writer's temporary files match :func:`partial_glob` and are cleared by the next
writer of that folder.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

PARTIAL_SUFFIX = ".tmp"


def partial_glob(name: str = "*") -> str:
    """The glob of the temporary files :func:`write_atomic` makes for targets ``name``."""
    return f".{name}.*{PARTIAL_SUFFIX}"


def write_atomic(path: Path, write: Callable[[Path], object]) -> Path:
    """Writes ``path`` through ``write(tmp)``, ``tmp`` a fresh temporary path beside it,
    then puts it in place (see the module docstring). Returns ``path``."""
    path = Path(path)
    tmp = _new_partial(path)
    try:
        write(tmp)
        _fsync(tmp, os.O_RDONLY)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    return path


def replace_atomically(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """:func:`write_atomic` for a writer of an open binary file (``np.savez``, faiss)."""

    def to_file(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            write(f)

    return write_atomic(path, to_file)


def _new_partial(path: Path) -> Path:
    """A new, empty temporary file beside ``path``, created with the permissions a plain
    ``open`` gives (``mkstemp``'s are private to the owner, which the target would keep)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
