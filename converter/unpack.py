"""Safe, atomic extraction of model archives.

Policy: only regular files and directories are extracted. Absolute paths, ``..`` components, every symlink and
hardlink (model archives never need them), device files and fifos are refused with :class:`UnsafeArchiveError`
before anything is written. AppleDouble junk (``._*``, ``__MACOSX/``) is skipped; pax / xattr headers are read
by :mod:`tarfile` and their attributes ignored. Extraction goes to a temporary directory next to the target that
is renamed into place only when complete, so a failed extraction leaves no half directory.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from converter.errors import CorruptArchiveError, UnsafeArchiveError, UnsupportedFormatError

log = logging.getLogger(__name__)

MAX_MEMBERS = 10_000
MAX_TOTAL_BYTES = 8 * 1024**3  # the largest release archive is about 0.3 GB
_CHUNK = 1 << 20
_BLOCK = tarfile.BLOCKSIZE


def is_junk(name: str) -> bool:
    """True for macOS AppleDouble / resource-fork entries (``._x``, ``__MACOSX/...``)."""
    parts = PurePosixPath(name).parts
    return any(p.startswith("._") or p == "__MACOSX" for p in parts)


def _safe_relpath(tar: Path, member: tarfile.TarInfo) -> PurePosixPath:
    name = member.name.replace("\\", "/")
    path = PurePosixPath(name)
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(f"{tar}: member {member.name!r} has an absolute path; refused")
    if ".." in path.parts:
        raise UnsafeArchiveError(f"{tar}: member {member.name!r} climbs out of the target with '..'; refused")
    parts = [p for p in path.parts if p not in ("", ".")]
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


def _check_type(tar: Path, member: tarfile.TarInfo) -> None:
    if member.issym() or member.islnk():
        raise UnsafeArchiveError(
            f"{tar}: member {member.name!r} is a {'symlink' if member.issym() else 'hardlink'} to "
            f"{member.linkname!r}; links are refused (model archives never need them)")
    if member.ischr() or member.isblk() or member.isfifo() or member.isdev():
        raise UnsafeArchiveError(f"{tar}: member {member.name!r} is a device file or fifo; refused")
    if not (member.isreg() or member.isdir()):
        raise UnsafeArchiveError(f"{tar}: member {member.name!r} has unsupported type {member.type!r}; refused")


def _read_members(tar: Path, tf: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """All member headers; CorruptArchiveError (with the last good member) if the archive is damaged."""
    members: list[tarfile.TarInfo] = []
    try:
        for member in tf:
            members.append(member)
        # tarfile stops silently at a damaged or missing header after the first member; a complete archive ends
        # with a zero block right where the next header would be.
        tf.fileobj.seek(tf.offset)
        trailer = tf.fileobj.read(_BLOCK)
    except (tarfile.TarError, EOFError, OSError) as exc:
        last = members[-1].name if members else "(none)"
        raise CorruptArchiveError(f"{tar}: cannot read the archive after member {last!r}: {exc}") from exc
    if len(trailer) < _BLOCK or trailer.count(0) != _BLOCK:
        last = members[-1].name if members else "(none)"
        raise CorruptArchiveError(f"{tar}: truncated or corrupt after member {last!r} (byte {tf.offset}): "
                                  f"no valid header or end-of-archive marker there")
    return members


def safe_extract(tar: str | Path, dest: str | Path, *, max_members: int = MAX_MEMBERS,
                 max_total_bytes: int = MAX_TOTAL_BYTES) -> Path:
    """Extract ``tar`` into the new directory ``dest`` (replacing an old one) safely and atomically."""
    return safe_extract_hashed(tar, dest, max_members=max_members, max_total_bytes=max_total_bytes)[0]


def safe_extract_hashed(tar: str | Path, dest: str | Path, *, max_members: int = MAX_MEMBERS,
                        max_total_bytes: int = MAX_TOTAL_BYTES) -> tuple[Path, dict[str, str]]:
    """:func:`safe_extract`, also returning the sha256 of every extracted file (relative POSIX path -> hex),
    hashed from the bytes as they are written (the files are not read again)."""
    tar, dest = Path(tar), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        tf = tarfile.open(tar, "r:*")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise CorruptArchiveError(f"{tar}: not a readable tar archive: {exc}") from exc
    with tf:
        members = _read_members(tar, tf)
        if len(members) > max_members:
            raise UnsafeArchiveError(f"{tar}: {len(members)} members exceed the limit of {max_members}")
        plan: list[tuple[tarfile.TarInfo, PurePosixPath]] = []
        files_seen: set[PurePosixPath] = set()
        total = 0
        for member in members:
            rel = _safe_relpath(tar, member)
            if is_junk(member.name):
                log.debug("%s: skipping AppleDouble entry %s", tar, member.name)
                continue
            _check_type(tar, member)
            if member.isreg():
                if rel in files_seen:
                    raise UnsafeArchiveError(f"{tar}: member {member.name!r} appears twice; refused")
                files_seen.add(rel)
                total += member.size
                if total > max_total_bytes:
                    raise UnsafeArchiveError(f"{tar}: members add up to more than {max_total_bytes} bytes "
                                             f"(at {member.name!r}); refused")
            plan.append((member, rel))

        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
        digests: dict[str, str] = {}
        try:
            for member, rel in plan:
                target = tmp.joinpath(*rel.parts)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                digests[rel.as_posix()] = _copy_member(tar, tf, member, target)
            _replace_dir(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("extracted %s -> %s (%d entries)", tar.name, dest, len(plan))
    return dest, digests


def _copy_member(tar: Path, tf: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> str:
    """Copy one regular member to ``target``; returns the sha256 (hex) of what was written."""
    written = 0
    digest = hashlib.sha256()
    try:
        source = tf.extractfile(member)
        with source, open(target, "xb") as out:
            while chunk := source.read(min(_CHUNK, member.size - written) or 1):
                out.write(chunk)
                digest.update(chunk)
                written += len(chunk)
                if written >= member.size:
                    break
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise CorruptArchiveError(f"{tar}: member {member.name!r} cannot be read: {exc}") from exc
    if written != member.size:
        raise CorruptArchiveError(f"{tar}: member {member.name!r} is truncated ({written} of {member.size} bytes)")
    return digest.hexdigest()


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Move the finished ``tmp`` to ``dest``; an existing ``dest`` is moved aside first, then removed."""
    old = None
    if dest.exists() or dest.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
        os.replace(dest, old / "x")
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def find_model_dir(root: str | Path) -> Path:
    """The directory under ``root`` holding the model files, whatever the inner directory is called.

    Inference models: the directory with ``*.pdiparams`` (``inference.pdmodel`` / ``.json`` beside it); trained
    checkpoints: the directory with ``*.pdparams``. AppleDouble junk is ignored.
    """
    root = Path(root)
    found: dict[Path, set[str]] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not is_junk(str(path.relative_to(root))) and path.suffix in (".pdiparams", ".pdparams"):
            found.setdefault(path.parent, set()).add(path.suffix)
    for suffix in (".pdiparams", ".pdparams"):
        dirs = [d for d, suffixes in found.items() if suffix in suffixes]
        if len(dirs) == 1:
            return dirs[0]
        if len(dirs) > 1:
            raise UnsupportedFormatError(
                f"{root}: {suffix} files in several directories: {', '.join(str(d) for d in dirs)}")
    raise UnsupportedFormatError(f"{root}: no Paddle model files (*.pdiparams or *.pdparams) found")
