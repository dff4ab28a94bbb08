"""An exclusive lock on a run (or index) folder, so two runs never write one at once.

The lock is ``<run>/.lock``, held with ``fcntl.flock`` for as long as the run writes its
shards; the file says who holds it (pid, host, start time, command). The kernel drops a
flock when its process dies, however it dies, so a lock left by a killed run is free:
the next run takes it, says so in a warning (the file still names the dead holder) and
carries on. A second live run stops at once with an error naming the holder.

The file is removed on release *while still locked*, and a taker checks that the file
it locked is still the one at the path; so a run that opened the old file just before
it was removed cannot hold a lock beside the new one.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import stat
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from retrieval.errors import ConfigError, StoreError

LOCK = ".lock"

log = logging.getLogger("retrieval")


def make_folder(path: Path, key: str) -> Path:
    """Creates ``path`` (and its parents), or says in one message why it cannot be.

    Raises:
        ConfigError: a file is in the way, the name is too long, no permission...
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = {
            errno.EEXIST: "a file of that name is in the way",
            errno.ENOTDIR: "part of the path is a file, not a folder",
            errno.ENAMETOOLONG: "the name is too long for the file system",
        }.get(e.errno or 0, e.strerror or str(e))
        raise ConfigError(
            f"{key}={path}: cannot create that folder ({why}); choose another {key}"
        ) from e
    if not path.is_dir():  # exist_ok=True accepts nothing else, but be explicit
        raise ConfigError(f"{key}={path} is a file, not a folder; choose another {key}")
    return path


def describe(holder: dict[str, Any]) -> str:
    return (
        f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since "
        f"{holder.get('since', '?')}"
    )


class RunLock:
    """``with RunLock(run_dir):`` holds the run folder's lock; see the module docstring.

    Raises (on entry):
        StoreError: another live process holds the lock (names it, and the fix).
        ConfigError: the run folder cannot be created.
    """

    def __init__(
        self,
        folder: str | Path,
        key: str = "run.output_dir",
        holder: str = "another run",
        why: str = "two runs writing one folder would mix their shards",
    ) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self.key = key
        self.holder = holder
        self.why = why
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        make_folder(self.folder, self.key)
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise StoreError(
                    f"{self.folder} is in use by {self.holder} ({describe(holder)}): "
                    f"{self.why}. Wait for it to finish, or choose another {self.key}; if "
                    f"that process is not running any more (another host, a stale network "
                    f"file system lock), delete {self.path}"
                ) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # released and removed while we waited: lock the new file
        stale = _read(fd)
        if stale:
            log.warning(
                "%s: recovered a stale lock left by %s (that run ended without releasing "
                "it); its shards are kept and checked as usual",
                self.folder,
                describe(stale),
            )
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def _open(self) -> int:
        """The lock file, opened without following a symbolic link; anything but a plain
        file at its path (a link to a user's file, a folder, a pipe) is refused untouched.

        Raises:
            StoreError: something other than a plain file is at the lock's path.
        """
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                raise
            fd = None
        if fd is not None and stat.S_ISREG(os.fstat(fd).st_mode):
            return fd
        if fd is not None:
            os.close(fd)
        kind = _kind(self.path)
        raise StoreError(
            f"{self.path} is {kind}, not the lock file this project writes: it was left "
            f"as it is. Remove or rename it (the run's lock is a plain file named {LOCK}), "
            f"or choose another {self.key}"
        )

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # still locked: no one holds the removed file
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def check_unlocked(folder: str | Path, key: str = "run.output_dir") -> None:
    """Fails at once when a live process holds ``folder``'s lock, creating nothing: the
    check a command makes before its slow start (imports, model), so a second run into
    a folder in use says so in a second. The lock itself is still taken later.

    Raises:
        StoreError: the folder is in use (names the holder), or its lock path is not a
            plain file.
    """
    path = Path(folder) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return
    except OSError:
        RunLock(folder, key).acquire().release()  # its own message for what is there
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise StoreError(
            f"{folder} is in use by another run ({describe(_read(fd))}): two runs writing one "
            f"folder would mix their shards. Wait for it to finish, or choose another {key}"
        ) from None
    finally:
        os.close(fd)


def _kind(path: Path) -> str:
    """What is at ``path``, in words, for a message."""
    if path.is_symlink():
        return f"a symbolic link (to {os.readlink(path)})"
    if path.is_dir():
        return "a folder"
    return "not a plain file (a pipe, socket or device)" if path.exists() else "unreadable"


def _read(fd: int) -> dict[str, Any]:
    """What a lock file says about its holder ({} when empty or unreadable)."""
    try:
        holder = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
    except (OSError, ValueError):
        return {"pid": "?", "host": "?", "since": "? (unreadable lock file)"}
    return holder if isinstance(holder, dict) else {}
