"""Download and cache the manifest's archives.

Cache layout (``OCRCONV_CACHE``, default ``~/.cache/ocrconv``)::

    archives/<filename>          verified archives (``<filename>.part`` while downloading, ``.lock`` file locks)
    index.json                   size + sha256 of every archive downloaded (trust on first use), written atomically
    unpacked/<stem>/             extracted archives, ``unpacked/<stem>.json`` records what was extracted from which sha,
                                 and each file's sha256 as hashed while it was written (see :func:`recorded_sha256`)

Downloads stream to ``<filename>.part`` and are renamed only when complete and verified; an interrupted download is
resumed with an HTTP Range request guarded by ``If-Range`` (the ETag or Last-Modified the first answer gave, kept in
``<filename>.part.json``), so a file changed on the server in between is downloaded whole instead of spliced; without
such a validator (or expected sha256) the download starts over. Connection errors and 5xx answers are retried with
exponential backoff; an attempt that received bytes does not use up the retry budget. A mirror (``OCRCONV_MIRROR`` /
``mirror=``) serves the same paths as the real host. There are no upstream checksums: the index records what was
downloaded first and later copies must match it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from filelock import FileLock, Timeout

from converter.errors import CorruptArchiveError, DownloadError, IntegrityError, UnsafeArchiveError
from converter.manifest import Artifact, ModelEntry, get_model
from converter.unpack import find_model_dir, safe_extract_hashed

if TYPE_CHECKING:
    import requests

log = logging.getLogger(__name__)

RETRIES = 4  # extra attempts after the first one
BACKOFF_S = 1.0  # first wait; doubles each retry (tests set this to ~0)
TIMEOUT_S = (15.0, 60.0)  # connect, read
CHUNK = 1 << 16
_USER_AGENT = "ocrconv (+https://github.com/PaddlePaddle/PaddleOCR models)"


class HTTPStatusError(DownloadError):
    """The server answered with an HTTP error status (``status``) that retrying will not fix."""

    def __init__(self, message: str, status: int, url: str):
        super().__init__(message)
        self.status = status
        self.url = url


def cache_root(path: str | Path | None = None) -> Path:
    """The cache root: ``path``, else ``$OCRCONV_CACHE``, else ``~/.cache/ocrconv``."""
    chosen = path or os.environ.get("OCRCONV_CACHE") or Path.home() / ".cache" / "ocrconv"
    return Path(chosen).expanduser()


def mirror_url(url: str, mirror: str | None = None) -> str:
    """``url`` on the mirror (``mirror``, else ``$OCRCONV_MIRROR``): same path on another base URL."""
    base = mirror if mirror is not None else os.environ.get("OCRCONV_MIRROR", "")
    if not base:
        return url
    parsed = urlparse(url)
    return base.rstrip("/") + parsed.path + (f"?{parsed.query}" if parsed.query else "")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_json_atomic(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class CacheIndex:
    """``index.json``: filename -> {url, size, sha256, ...}; every update is locked and atomic."""

    def __init__(self, root: Path):
        self.path = root / "index.json"
        self._lock = FileLock(str(self.path) + ".lock")

    def read(self) -> dict[str, dict]:
        """The whole index (empty if none yet)."""
        if not self.path.is_file():
            return {}
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise IntegrityError(f"cache index {self.path} is not valid JSON ({exc}); delete it to start over") \
                from exc

    def get(self, filename: str) -> dict | None:
        """The record of ``filename`` or None."""
        return self.read().get(filename)

    def remove(self, filename: str) -> None:
        """Forget ``filename`` (its download turned out to be unusable)."""
        with self._lock:
            data = self.read()
            if data.pop(filename, None) is not None:
                _write_json_atomic(self.path, data)

    def put(self, filename: str, record: dict) -> None:
        """Add or replace the record of ``filename``."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            data = self.read()
            data[filename] = record
            _write_json_atomic(self.path, data)


@contextmanager
def _locked(path: Path, what: str):
    """Hold the file lock ``path``; says so when another process holds it (instead of waiting silently)."""
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning("waiting for another ocrconv process working on %s (lock %s)", what, path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _progress(total: int | None, initial: int, desc: str, quiet: bool | None):
    if quiet or (quiet is None and not _is_tty()):
        return nullcontext(None)
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                file=sys.stderr, leave=False)


def _total_from_response(response: requests.Response, offset: int) -> int | None:
    if response.status_code == 206:
        content_range = response.headers.get("Content-Range", "")
        try:
            span, total = content_range.split(" ", 1)[1].split("/")
            start = int(span.split("-")[0])
        except (IndexError, ValueError):
            raise DownloadError(f"{response.url}: unreadable Content-Range {content_range!r}") from None
        if start != offset:
            raise DownloadError(f"{response.url}: asked for bytes from {offset}, got {content_range!r}")
        return int(total) if total != "*" else None
    length = response.headers.get("Content-Length")
    return int(length) if length is not None else None


def _part_info(part: Path) -> Path:
    """Where the partial download ``part`` keeps the URL and validator it was started with."""
    return part.with_name(part.name + ".json")


def _discard_part(part: Path) -> None:
    part.unlink(missing_ok=True)
    _part_info(part).unlink(missing_ok=True)


def _validator(response: requests.Response) -> str | None:
    """A validator for ``If-Range``: a strong ETag, else Last-Modified (None when the answer has neither)."""
    etag = response.headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return response.headers.get("Last-Modified")


def _resume_point(part: Path, url: str, trusted: bool) -> tuple[int, str | None]:
    """Byte offset to resume ``part`` from (0: start over) and the ``If-Range`` validator to send.

    A partial file is resumed only when it was started from ``url`` with a validator, or when ``trusted`` (an
    expected sha256 will check the result); never when it was received content-encoded."""
    offset = part.stat().st_size if part.exists() else 0
    if not offset:
        return 0, None
    try:
        info = json.loads(_part_info(part).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        info = {}
    info = info if isinstance(info, dict) else {}
    if info.get("url") == url and info.get("resumable", True) and (info.get("validator") or trusted):
        return offset, info.get("validator")
    log.info("%s: the partial download %s cannot be checked against the file on the server (no ETag or "
             "Last-Modified recorded for this URL); starting over", url, part)
    return 0, None


def _fetch_once(session: requests.Session, url: str, part: Path, hasher, quiet: bool | None, trusted: bool,
                received: list[int]) -> int:
    """One request: resume ``part`` if it can be (see :func:`_resume_point`), stream the rest into it. Returns the
    final size; adds the bytes received to ``received[0]``."""
    import requests

    offset, validator = _resume_point(part, url, trusted)
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if validator:
            headers["If-Range"] = validator
    with session.get(url, headers=headers, stream=True, timeout=TIMEOUT_S) as response:
        if response.status_code == 416 and offset:
            log.warning("%s: server refused to resume at byte %d; restarting", url, offset)
            _discard_part(part)
            return _fetch_once(session, url, part, hasher, quiet, trusted, received)
        if response.status_code >= 400:
            raise HTTPStatusError(f"HTTP {response.status_code} {response.reason} for {url}",
                                  response.status_code, url)
        if response.status_code == 200 and offset:
            log.info("%s: the file changed on the server or Range was ignored; downloading the whole file again", url)
            offset = 0
        elif response.status_code == 206:
            log.info("resuming %s at byte %d", url, offset)
        elif response.status_code != 200:
            raise DownloadError(f"unexpected HTTP {response.status_code} for {url}")
        # a content-encoded body: requests decodes it, Content-Length counts the encoded bytes, no resuming
        encoded = response.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity")
        total = _total_from_response(response, offset)
        if not offset:
            _write_json_atomic(_part_info(part), {"url": url, "validator": _validator(response),
                                                  "resumable": not encoded})
        else:  # the hash must cover the bytes already on disk
            with open(part, "rb") as f:
                while chunk := f.read(1 << 20):
                    hasher.update(chunk)
        size = offset
        with open(part, "ab" if offset else "wb") as out, \
                _progress(None if encoded else total, offset, part.name.removesuffix(".part"), quiet) as bar:
            # read1: whatever has arrived, so a dropped connection loses no byte that was received
            while chunk := response.raw.read1(CHUNK, decode_content=True):
                out.write(chunk)
                hasher.update(chunk)
                size += len(chunk)
                received[0] += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        on_the_wire = offset + response.raw.tell() if encoded else size
    if total is not None and on_the_wire != total:
        raise requests.ConnectionError(f"{url}: connection ended at byte {on_the_wire} of {total}")
    return size


def download_url(url: str, dest: str | Path, *, expected_sha256: str | None = None, quiet: bool | None = None,
                 retries: int | None = None, backoff_s: float | None = None) -> tuple[int, str]:
    """Download ``url`` to ``dest`` via ``dest.part`` (resumed if present); returns (size, sha256).

    Retries connection errors and 5xx answers (``retries`` times in a row without receiving any byte); raises
    HTTPStatusError on other HTTP errors, IntegrityError when ``expected_sha256`` does not match (the partial file
    is removed). ``dest`` appears only when complete.
    """
    import requests  # imported on first download: a conversion from the cache never needs the network
    import urllib3

    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    retries = RETRIES if retries is None else retries
    backoff_s = BACKOFF_S if backoff_s is None else backoff_s
    dest.parent.mkdir(parents=True, exist_ok=True)
    resumed_once = False
    with requests.Session() as session:
        stalled = tries = 0  # stalled: failed attempts in a row that received nothing
        while True:
            hasher = hashlib.sha256()
            resumed = part.exists() and part.stat().st_size > 0
            received = [0]
            tries += 1
            try:
                size = _fetch_once(session, url, part, hasher, quiet, bool(expected_sha256), received)
            except HTTPStatusError as exc:
                stalled += 1
                if exc.status < 500 and exc.status != 429 or stalled > retries:
                    raise
                reason = str(exc)
            except (requests.ConnectionError, requests.Timeout, urllib3.exceptions.HTTPError) as exc:
                stalled = 0 if received[0] else stalled + 1  # the retry budget counts attempts without progress
                if stalled > retries:
                    raise DownloadError(f"{url}: failed after {tries} attempts ({stalled} in a row without "
                                        f"progress): {exc}") from exc
                reason = f"{type(exc).__name__}: {exc}"
            except requests.RequestException as exc:  # a malformed URL and the like: retrying cannot help
                raise DownloadError(f"{url}: {type(exc).__name__}: {exc}") from exc
            else:
                digest = hasher.hexdigest()
                if expected_sha256 and digest != expected_sha256.lower():
                    _discard_part(part)
                    if resumed and not resumed_once:  # the old partial may have come from another file version
                        log.warning("%s: sha256 mismatch after resuming; downloading again from the start", url)
                        resumed_once = True
                        continue
                    raise IntegrityError(f"{url}: sha256 {digest} does not match the expected {expected_sha256}")
                os.replace(part, dest)
                _part_info(part).unlink(missing_ok=True)
                return size, digest
            if not stalled:
                log.warning("%s: %s; resuming at once (%d bytes received)", url, reason, received[0])
                continue
            delay = backoff_s * 2 ** (stalled - 1)
            log.warning("%s: %s; retry %d/%d in %.1fs", url, reason, stalled, retries, delay)
            time.sleep(delay)


def _verify_cached(path: Path, record: dict | None) -> bool:
    if record is None or not path.is_file():
        return False
    if path.stat().st_size != record["size"]:
        log.warning("%s: cached size %d differs from the recorded %d; downloading again",
                    path, path.stat().st_size, record["size"])
        return False
    if sha256_file(path) != record["sha256"]:
        log.warning("%s: cached file does not match its recorded sha256; downloading again", path)
        return False
    return True


def fetch_archive(entry: ModelEntry, artifact: str = "inference", *, cache_dir: str | Path | None = None,
                  mirror: str | None = None, offline: bool = False, quiet: bool | None = None,
                  expected_sha256: str | None = None) -> Path:
    """The verified archive of ``entry``'s ``artifact`` in the cache, downloaded if needed.

    Tries the table URL, then the recorded alternatives (on 404 / 403 / 410). The first download is recorded in
    the index (size, sha256); later downloads and cached copies must match it.
    """
    art: Artifact = entry.artifact(artifact)
    root = cache_root(cache_dir)
    path = root / "archives" / art.filename
    path.parent.mkdir(parents=True, exist_ok=True)
    index = CacheIndex(root)
    with _locked(Path(str(path) + ".lock"), art.filename):
        record = index.get(art.filename)
        if expected_sha256 and record and record["sha256"] != expected_sha256.lower():
            raise IntegrityError(f"{entry.name} {artifact}: the cache index records sha256 {record['sha256']} for "
                                 f"{art.filename}, not the expected {expected_sha256}")
        if _verify_cached(path, record):
            log.info("%s %s: using cached %s", entry.name, artifact, path)
            return path
        if offline:
            state = ("is not in the cache" if not path.exists() else "has no record in the cache index"
                     if record is None else "does not match its record in the cache index (damaged)")
            raise DownloadError(f"offline: {entry.name} {artifact} archive {art.filename} {state} ({path}); "
                                f"run without --offline to download {art.url}")
        if path.exists():
            path.unlink()
        want = expected_sha256 or (record["sha256"] if record else None)
        failures = []
        for url in art.urls:
            source = mirror_url(url, mirror)
            if failures:
                log.warning("%s %s: %s; trying the recorded alternative %s", entry.name, artifact, failures[-1],
                            source)
            try:
                size, digest = download_url(source, path, expected_sha256=want, quiet=quiet)
            except HTTPStatusError as exc:
                if exc.status not in (403, 404, 410):
                    raise DownloadError(f"{entry.name} {artifact}: {exc}") from exc
                failures.append(f"HTTP {exc.status} for {source}")
                continue
            except IntegrityError as exc:
                if expected_sha256:
                    raise IntegrityError(f"{entry.name} {artifact}: {exc}") from exc
                raise IntegrityError(f"{entry.name} {artifact}: {exc}. The cache index {index.path} recorded "
                                     f"another file earlier; delete its entry '{art.filename}' to accept the new "
                                     f"one") from exc
            if url != art.url:
                log.warning("%s %s: downloaded from the alternative URL %s", entry.name, artifact, source)
            index.put(art.filename, {
                "model": entry.name, "artifact": artifact, "url": url, "source": source, "size": size,
                "sha256": digest, "downloaded": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            })
            log.info("%s %s: downloaded %s (%d bytes, sha256 %s)", entry.name, artifact, path, size, digest)
            return path
        raise DownloadError(f"{entry.name} {artifact}: not found: " + "; ".join(failures))


def _unpack_record_matches(marker: Path, target: Path, sha: str) -> bool:
    """True when ``target`` was extracted from the archive with sha256 ``sha`` and none of its files has changed
    since (same size, inode, mtime and ctime as recorded right after extraction)."""
    if not marker.is_file() or not target.is_dir():
        return False
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
        if record["archive_sha256"] != sha:
            return False
        for name, digest in record["digests"].items():
            path = target / name
            if not path.is_file() or digest["stat"] != _identity(path):
                log.info("%s changed since it was extracted; extracting again", path)
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def fetch_artifact(entry: ModelEntry | str, artifact: str = "inference", *, cache_dir: str | Path | None = None,
                   mirror: str | None = None, offline: bool = False, quiet: bool | None = None,
                   expected_sha256: str | None = None) -> Path:
    """Download (or reuse) and unpack an archive; returns the directory holding its model files.

    An unpacked directory is reused, without reading the archive again (offline too), when it was extracted from
    the archive whose sha256 the index records and none of its files has changed since; otherwise the archive is
    verified (downloaded if needed) and extracted again. An archive that turns out corrupt or unsafe is dropped
    from the cache. ``entry`` may also be a name (table name, alias or archive stem).
    """
    if isinstance(entry, str):
        entry = get_model(entry)
    root = cache_root(cache_dir)
    stem = entry.artifact(artifact).filename.removesuffix(".tar")
    target = root / "unpacked" / stem
    marker = target.with_name(stem + ".json")
    target.parent.mkdir(parents=True, exist_ok=True)
    index = CacheIndex(root)
    lock = Path(str(target) + ".lock")

    def unpacked_if_current(sha: str) -> Path | None:
        if not _unpack_record_matches(marker, target, sha):
            return None
        log.info("%s %s: using unpacked %s", entry.name, artifact, target)
        return find_model_dir(target)

    with _locked(lock, f"unpacked/{stem}"):
        record = index.get(stem + ".tar")
        if record is not None and (not expected_sha256 or record["sha256"] == expected_sha256.lower()):
            found = unpacked_if_current(record["sha256"])
            if found is not None:
                return found
    archive = fetch_archive(entry, artifact, cache_dir=root, mirror=mirror, offline=offline, quiet=quiet,
                            expected_sha256=expected_sha256)
    record = index.get(archive.name)
    if record is None:  # another process dropped it as corrupt in the meantime
        raise DownloadError(f"{entry.name} {artifact}: {archive.name} left the cache index while in use; run again")
    with _locked(lock, f"unpacked/{stem}"):
        found = unpacked_if_current(record["sha256"])
        if found is not None:
            return found
        if marker.exists():
            marker.unlink()
        try:
            _, digests = safe_extract_hashed(archive, target)
        except (CorruptArchiveError, UnsafeArchiveError) as exc:
            with _locked(Path(str(archive) + ".lock"), archive.name):
                archive.unlink(missing_ok=True)
                index.remove(archive.name)
            log.warning("%s %s: removed the %s archive %s and its index record from the cache; the next "
                        "download fetches it again", entry.name, artifact,
                        "corrupt" if isinstance(exc, CorruptArchiveError) else "unsafe", archive)
            raise type(exc)(f"{exc} (downloaded from {record.get('source') or record.get('url')}; removed from "
                            f"the cache)") from exc
        files = {str(p.relative_to(target)): p.stat().st_size for p in sorted(target.rglob("*")) if p.is_file()}
        hashed = {name: {"sha256": digest, "stat": _identity(target / name)} for name, digest in digests.items()}
        _write_json_atomic(marker, {"archive": archive.name, "archive_sha256": record["sha256"], "files": files,
                                    "digests": hashed})
    return find_model_dir(target)


def _identity(path: Path) -> list[int]:
    """What changes whenever a file's content may have: size, inode, mtime and ctime (ns). ctime cannot be set
    back by tools that preserve timestamps, and a replaced file has another inode."""
    st = path.stat()
    return [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]


def recorded_sha256(path: str | Path) -> str | None:
    """The sha256 of ``path`` recorded when the cache extracted it, if ``path`` is a file of an unpacked archive
    that has not changed since (same size, inode, mtime and ctime); else None (the caller hashes the file).

    This is what makes a conversion from a warm cache skip re-hashing its source.
    """
    path = Path(path).absolute()
    folder = next((parent for parent in path.parents if parent.parent.name == "unpacked"), None)
    if folder is None:
        return None
    try:
        record = json.loads(folder.with_name(folder.name + ".json").read_text(encoding="utf-8"))
        entry = record["digests"][path.relative_to(folder).as_posix()]
        if entry["stat"] == _identity(path):
            return entry["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.debug("%s: no usable recorded sha256 (%s)", path, exc)
    return None

