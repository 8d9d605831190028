"""Temporary siblings of an output being written, and the removal of those a killed process left behind.

An output directory (a conversion, an unpacked archive) is written under a hidden sibling and renamed into place,
so it is never half-written. A process killed meanwhile (SIGKILL, power loss) leaves that sibling. Its name,
``.<name>.<role>-<host>-<space>-<pid>-<random>``, says who made it: ``space`` tells this boot's pid namespace
apart from others (containers sharing a volume and a host name). The next run for the same output removes the
ones whose process no longer runs in its own host and pid space; siblings made elsewhere are left alone.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterable

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _origin() -> str:
    """``<host>-<space>``: the host name, and a digest of this boot and pid namespace ("0" where unknown)."""
    host = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"
    try:
        identity = Path("/proc/sys/kernel/random/boot_id").read_text().strip() + os.readlink("/proc/self/ns/pid")
    except OSError:
        return f"{host}-0"
    return f"{host}-{hashlib.sha256(identity.encode()).hexdigest()[:8]}"


def make_dir(target: Path, role: str) -> Path:
    """A new, empty hidden directory beside ``target`` for ``role`` (e.g. "tmp", "old"), marked with this process."""
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.{role}-{_origin()}-{os.getpid()}-", dir=target.parent))


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # another user's process; a number no pid can be
        return True
    return True


def remove_stale(target: Path, roles: Iterable[str]) -> list[Path]:
    """Remove the siblings of ``target`` of the given roles that a process of this host made and that process is
    gone; returns what was removed."""
    roles = tuple(roles)
    if not roles or not target.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(?:{'|'.join(map(re.escape, roles))})-"
                         rf"{re.escape(_origin())}-(\d+)-")
    removed = []
    for entry in target.parent.iterdir():
        match = pattern.match(entry.name)
        if match and int(match[1]) != os.getpid() and not _running(int(match[1])) \
                and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            log.info("removed %s, left by a process that was stopped while writing %s", entry, target)
            removed.append(entry)
    return removed
