"""Safe, atomic extraction of model archives.

Policy: only regular files and directories are extracted. Absolute paths, ``..`` components, every symlink and
hardlink (model archives never need them), device files, fifos and sparse files, a file that is also a directory
(or the parent of another member) and archives that would expand past a size or compression-ratio limit are
refused with :class:`UnsafeArchiveError` before anything is written. AppleDouble junk (``._*``, ``__MACOSX/``) is
skipped; pax / xattr headers are read by :mod:`tarfile` and their attributes ignored. Extraction goes to a
temporary directory next to the target that is renamed into place only when complete, so a failed extraction
leaves no half directory; a target that cannot be written (disk full) is an :class:`OutputError`, not a fault of
the archive.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import tarfile
from pathlib import Path, PurePosixPath

from converter import staging
from converter.errors import CorruptArchiveError, OutputError, UnsafeArchiveError, UnsupportedFormatError

log = logging.getLogger(__name__)

MAX_MEMBERS = 10_000
MAX_TOTAL_BYTES = 2 * 1024**3  # the largest release archive is about 0.3 GB
MAX_EXPANSION = 64  # extracted bytes per archive byte (compressed tars); weights compress by far less than this
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
    if member.issparse():
        raise UnsafeArchiveError(f"{tar}: member {member.name!r} is a sparse file (it would take more bytes on "
                                 f"disk than the archive holds); refused")
    if not (member.isreg() or member.isdir()):
        raise UnsafeArchiveError(f"{tar}: member {member.name!r} has unsupported type {member.type!r}; refused")


def _read_members(tar: Path, tf: tarfile.TarFile, max_members: int) -> list[tarfile.TarInfo]:
    """All member headers; CorruptArchiveError (with the last good member) if the archive is damaged,
    UnsafeArchiveError as soon as there are more than ``max_members``."""
    members: list[tarfile.TarInfo] = []
    try:
        for member in tf:
            members.append(member)
            if len(members) > max_members:
                raise UnsafeArchiveError(f"{tar}: more than {max_members} members (the limit); refused")
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
        plan = _plan(tar, _read_members(tar, tf, max_members), max_total_bytes)
        staging.remove_stale(dest, ("partial", "old"))
        with staging.Staged(dest, "partial") as staged:
            tmp = staged.path
            digests: dict[str, str] = {}
            try:
                for member, rel in plan:
                    target = tmp.joinpath(*rel.parts)
                    _make_dirs(tar, member, target if member.isdir() else target.parent)
                    if member.isreg():
                        digests[rel.as_posix()] = _copy_member(tar, tf, member, target)
                _replace_dir(tmp, dest)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    log.info("extracted %s -> %s (%d entries)", tar.name, dest, len(plan))
    return dest, digests


def _plan(tar: Path, members: list[tarfile.TarInfo], max_total_bytes: int) -> list[tuple[tarfile.TarInfo,
                                                                                        PurePosixPath]]:
    """The members to extract with their safe relative paths; UnsafeArchiveError for anything the policy refuses
    (see the module docstring), before anything is written."""
    plan: list[tuple[tarfile.TarInfo, PurePosixPath]] = []
    files: set[PurePosixPath] = set()
    dirs: set[PurePosixPath] = set()
    total = 0
    for member in members:
        rel = _safe_relpath(tar, member)
        if is_junk(member.name):
            log.debug("%s: skipping AppleDouble entry %s", tar, member.name)
            continue
        _check_type(tar, member)
        clash = next((p for p in rel.parents if p in files), None)
        if clash is not None:
            raise UnsafeArchiveError(f"{tar}: member {member.name!r} lies inside {clash.as_posix()!r}, which is a "
                                     f"file; refused")
        if member.isdir() and rel in files:
            raise UnsafeArchiveError(f"{tar}: member {member.name!r} is a file and a directory; refused")
        if member.isreg():
            if rel == PurePosixPath("."):
                raise UnsafeArchiveError(f"{tar}: member {member.name!r} is a file named like the target directory; "
                                         f"refused")
            if rel in files:
                raise UnsafeArchiveError(f"{tar}: member {member.name!r} appears twice; refused")
            if rel in dirs:
                raise UnsafeArchiveError(f"{tar}: member {member.name!r} is a file and a directory; refused")
            files.add(rel)
            total += member.size
            if total > max_total_bytes:
                raise UnsafeArchiveError(f"{tar}: members add up to more than {max_total_bytes} bytes "
                                         f"(at {member.name!r}); refused")
        dirs.update(rel.parents)
        if member.isdir():
            dirs.add(rel)
        plan.append((member, rel))
    archive_bytes = tar.stat().st_size
    if total > MAX_EXPANSION * max(archive_bytes, _BLOCK):
        raise UnsafeArchiveError(f"{tar}: {archive_bytes} archive bytes would expand to {total} bytes (more than "
                                 f"{MAX_EXPANSION} times: a compression bomb, not model weights); refused")
    return plan


def _make_dirs(tar: Path, member: tarfile.TarInfo, folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _write_error(tar, member, folder, exc) from exc


def _write_error(tar: Path, member: tarfile.TarInfo, target: Path, exc: OSError) -> Exception:
    """The error for a member that cannot be written (the archive itself is fine, unless the name is the problem)."""
    if exc.errno == errno.ENAMETOOLONG:
        return UnsafeArchiveError(f"{tar}: member {member.name!r} has a name too long for this file system; refused")
    return OutputError(f"{tar}: cannot write member {member.name!r} to {target}: {exc}")


def _copy_member(tar: Path, tf: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> str:
    """Copy one regular member to ``target``; returns the sha256 (hex) of what was written. A member that cannot
    be read is a CorruptArchiveError; a target that cannot be written (disk full, ...) an OutputError."""
    written = 0
    digest = hashlib.sha256()
    try:
        out = open(target, "xb", buffering=0)  # unbuffered: every write error surfaces at its write()
    except OSError as exc:
        raise _write_error(tar, member, target, exc) from exc
    with out:
        try:
            source = tf.extractfile(member)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise CorruptArchiveError(f"{tar}: member {member.name!r} cannot be read: {exc}") from exc
        with source:
            while written < member.size:
                try:
                    chunk = source.read(min(_CHUNK, member.size - written))
                except (tarfile.TarError, EOFError, OSError) as exc:
                    raise CorruptArchiveError(f"{tar}: member {member.name!r} cannot be read: {exc}") from exc
                if not chunk:
                    break
                try:
                    view = memoryview(chunk)
                    while view:
                        view = view[out.write(view):]
                except OSError as exc:
                    raise _write_error(tar, member, target, exc) from exc
                digest.update(chunk)
                written += len(chunk)
    if written != member.size:
        raise CorruptArchiveError(f"{tar}: member {member.name!r} is truncated ({written} of {member.size} bytes)")
    return digest.hexdigest()


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Move the finished ``tmp`` to ``dest``; an existing ``dest`` is moved aside first, then removed."""
    if not (dest.exists() or dest.is_symlink()):
        os.replace(tmp, dest)
        return
    with staging.Staged(dest, "old") as aside:
        os.replace(dest, aside.path / "x")
        os.replace(tmp, dest)
        shutil.rmtree(aside.path, ignore_errors=True)


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
