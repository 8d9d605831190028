"""Temporary siblings of an output being written, and the removal of those a killed process left behind.

An output directory (a conversion, an unpacked archive) is written under a hidden sibling
``.<name>.<role>-<host>-<pid>-<random>`` and renamed into place, so it is never half-written. The process working in
a sibling holds an exclusive ``flock`` on it, which the kernel drops when the process ends however it ends (killed,
power loss, a container stopped), in whatever pid namespace it ran. The next run for the same output removes this
host's siblings whose lock it can take. Siblings another host named are left alone (a shared file system may not
share locks), and where locks cannot be taken (no ``fcntl``, a file system without ``flock`` on directories, as
NFS may be) nothing is removed.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterable

try:
    import fcntl
except ImportError:  # not POSIX: stale siblings are never taken for free
    fcntl = None

log = logging.getLogger(__name__)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"


def _locked(path: Path) -> int | None:
    """A descriptor of the directory ``path`` holding its exclusive lock, or None when another holds it (or locks
    cannot be taken here)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # gone meanwhile, not a directory, not ours to read
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


class Staged:
    """A new, empty hidden directory beside ``target`` for ``role`` (e.g. "tmp", "old"), locked by this process
    until :meth:`release` (or the end of a ``with`` block). The caller moves it into place or removes it."""

    def __init__(self, target: Path, role: str):
        # made under a name remove_stale never matches, locked, then renamed (the lock stays with the directory):
        # another run's remove_stale never sees it unlocked
        prefix = f".{target.name}.{role}~new-"
        fresh = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
        self._fd = _locked(fresh)
        self.path = fresh.with_name(f".{target.name}.{role}-{_host()}-{os.getpid()}-{fresh.name[len(prefix):]}")
        try:
            os.rename(fresh, self.path)
        except OSError:
            self.release()
            fresh.rmdir()
            raise

    def release(self) -> None:
        """Drop the lock (the directory itself is left as it is)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Staged:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def remove_stale(target: Path, roles: Iterable[str]) -> list[Path]:
    """Remove the siblings of ``target`` of the given roles that this host made and no process holds any more;
    returns what was removed."""
    roles = tuple(roles)
    if not roles or not target.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(?:{'|'.join(map(re.escape, roles))})-"
                         rf"{re.escape(_host())}-\d+-")
    removed = []
    for entry in target.parent.iterdir():
        if not pattern.match(entry.name) or entry.is_symlink() or not entry.is_dir():
            continue
        fd = _locked(entry)
        if fd is None:  # a live process works in it (or it cannot be locked or read: left alone)
            continue
        try:
            shutil.rmtree(entry, ignore_errors=True)
        finally:
            os.close(fd)
        if os.path.lexists(entry):
            log.debug("could not remove %s, left by a process that was stopped while writing %s", entry, target)
            continue
        log.info("removed %s, left by a process that was stopped while writing %s", entry, target)
        removed.append(entry)
    return removed
