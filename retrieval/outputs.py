"""One check for every path a result is written to (``export OUT``, ``index build
--out``, ``search --json / --gallery / --sheet``, ``compare --out``), run before any
work: a path under a file, inside a kernel file system (``/proc``, ``/sys``, ``/dev``),
a folder where a file goes (or the reverse), a name too long or a folder without write
permission is one :class:`ConfigError` naming the option and the fix, not an
``OSError`` traceback after the work is done.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from retrieval.errors import ConfigError

#: kernel file systems: writing a result there fails or, worse, talks to the kernel
PSEUDO_FILESYSTEMS = (Path("/proc"), Path("/sys"), Path("/dev"))


def check_output(path: str | Path, key: str, kind: Literal["file", "folder"] = "file") -> Path:
    """``path`` (``~`` expanded) if a ``kind`` can be written there, creating nothing.

    Args:
        path: where the result goes.
        key: the option that named it (``--json``, ``OUT``), for the message.
        kind: ``file`` (an existing file is for the writer to replace or refuse) or
            ``folder`` (missing, or an existing folder).

    Raises:
        ConfigError: the path cannot take a ``kind`` (names it, why, and the fix).
    """
    path = Path(path).expanduser()
    absolute = Path(os.path.abspath(path))

    def refuse(why: str) -> ConfigError:
        return ConfigError(f"{key} {path}: {why}; choose another {key}")

    real = Path(os.path.realpath(absolute))
    for system in PSEUDO_FILESYSTEMS:
        if real == system or system in real.parents:
            raise refuse(f"it is inside {system}, a kernel file system, not storage")
    for part in absolute.parts:
        if len(os.fsencode(part)) > _name_max(absolute):
            raise refuse(f"the name {part[:40]!r}... is too long for the file system")
    if kind == "file" and absolute.is_dir():
        raise refuse("it is a folder; give a file name")
    if kind == "folder" and absolute.exists() and not absolute.is_dir():
        raise refuse("it is a file; give a folder")
    parent = absolute.parent
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise refuse(f"{parent} is a file (or a broken link), so nothing can be made under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise refuse(f"no permission to write in {parent}")
    return path


def _name_max(path: Path) -> int:
    """The longest file name the file system holding ``path`` takes (255 if unknown)."""
    existing = path
    while not os.path.exists(existing) and existing != existing.parent:  # never raises
        existing = existing.parent
    try:
        return os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255
