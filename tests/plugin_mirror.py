"""Loopback HTTP mirror of paddleocr.bj.bcebos.com for tests (pytest plugin, registered in conftest.py).

Fixtures:

* ``mirror_tree`` (session): a :class:`MirrorTree` holding every shared fixture tar at its real URL path (host
  stripped: ``https://paddleocr.bj.bcebos.com/PP-OCRv4/chinese/x.tar`` -> ``<root>/PP-OCRv4/chinese/x.tar``; the
  manifest maps each tar's file name to its URL, alternative URLs included). ``mirror_tree.add(url, file)`` serves
  another file, ``mirror_tree.add_row(row)`` the (materialized) tars of a fixture row.
* ``mirror`` (session): a :class:`MirrorServer` on 127.0.0.1 (ephemeral port) serving ``mirror_tree``;
  ``mirror.url`` / ``str(mirror)`` is the base URL to pass as ``--mirror`` / ``OCRCONV_MIRROR``. It honours Range
  requests (``If-Range`` included: each file has a strong ETag and a Last-Modified date, which change when the
  file is replaced), logs every request (``mirror.log``) and misbehaves on request:
  ``mirror.misbehave(url, "drop", "500")`` queues one action per following request of that path (``"a+b"``: both).
* ``mirror_env`` (function): fresh cache dir in ``OCRCONV_CACHE``, ``OCRCONV_MIRROR`` = the mirror, short retry
  backoff, mirror log and queued misbehaviour cleared; returns the cache dir.
"""
from __future__ import annotations

import email.utils
import gzip
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

import fixture_data

# What a queued action does to one request:
ACTIONS = {
    "drop": "send the headers of the full answer, half the body, then close the connection",
    "ignore_range": "answer 200 with the whole file even when a Range was asked for",
    "500": "answer 500 Internal Server Error",
    "404": "answer 404 Not Found",
    "truncate": "answer 200 with only the first half of the file, Content-Length matching that half",
    "slow": "serve normally, sleeping MirrorServer.slow_chunk_s after every 16 KiB",
    "hold": "send half the body, then wait until mirror.release() (at most 60 s) before sending the rest",
    "reset": "send the headers of the answer, then close the connection before any byte of the body",
    "no_validators": "serve normally but without ETag and Last-Modified headers",
    "gzip": "answer 200 with the whole file gzip-compressed in transit (Content-Encoding: gzip), ignoring Range",
}
_SLOW_CHUNK = 16 * 1024


def url_path(url_or_path: str) -> str:
    """The path part of a URL (``/PP-OCRv4/chinese/x.tar``); a bare path is returned normalized."""
    path = urlparse(url_or_path).path if "://" in url_or_path else url_or_path
    return "/" + unquote(path).lstrip("/")


class MirrorTree:
    """A directory laid out like the download host: files at their URL paths."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, url_or_path: str) -> Path:
        """Where the file for a URL lives in the tree (no '..' allowed)."""
        rel = url_path(url_or_path).lstrip("/")
        if ".." in Path(rel).parts:
            raise ValueError(f"refusing {url_or_path!r}")
        return self.root / rel

    def add(self, url_or_path: str, source: str | Path) -> str:
        """Serve ``source`` at ``url_or_path`` (symlinked, replacing what was there); returns the URL path."""
        target = self.path_for(url_or_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() or target.is_symlink():
            target.unlink()
        target.symlink_to(Path(source).resolve())
        return url_path(url_or_path)

    def remove(self, url_or_path: str) -> None:
        """Stop serving ``url_or_path`` (later requests get 404)."""
        self.path_for(url_or_path).unlink(missing_ok=True)

    def add_tar(self, tar: str | Path) -> list[str]:
        """Serve a release-named tar at every manifest URL path with its file name; returns those paths."""
        paths = [self.add(p, tar) for p in _paths_by_filename().get(Path(tar).name, [])]
        if not paths:
            raise KeyError(f"{Path(tar).name} is not the file name of any manifest URL")
        return paths

    def add_row(self, row: str, seed: int | None = None) -> list[str]:
        """Serve both tars of a fixture row (materialized via ``fixture_data.row_dir`` when needed)."""
        folder = fixture_data.row_dir(row, seed)
        return [p for tar in sorted(folder.glob("*.tar")) for p in self.add_tar(tar)]


def _paths_by_filename() -> dict[str, list[str]]:
    from converter.manifest import load_manifest

    paths: dict[str, list[str]] = {}
    for _entry, art in load_manifest().archives:
        for url in art.urls:
            paths.setdefault(Path(urlparse(url).path).name, []).append(url_path(url))
    return paths


@dataclass
class RequestRecord:
    """One request the mirror answered."""

    method: str
    path: str
    range: str | None
    status: int = 0
    action: str | None = None
    bytes_sent: int = 0
    finished: float = field(default=0.0)


class MirrorServer:
    """ThreadingHTTPServer on 127.0.0.1 serving a :class:`MirrorTree`, with a request log and misbehaviour."""

    def __init__(self, tree: MirrorTree):
        self.tree = tree
        self.log: list[RequestRecord] = []
        self.slow_chunk_s = 0.03
        self._released = threading.Event()
        self._queued: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="mirror", daemon=True)
        self._thread.start()

    def __str__(self) -> str:
        return self.url

    def url_for(self, url_or_path: str) -> str:
        """The mirror URL of a real URL or URL path."""
        return self.url + url_path(url_or_path)

    def misbehave(self, url_or_path: str, *actions: str) -> None:
        """Queue ``actions`` (keys of ACTIONS), one per following request of that path."""
        unknown = [a for action in actions for a in action.split("+") if a not in ACTIONS]
        if unknown:
            raise ValueError(f"unknown actions {unknown}; known: {sorted(ACTIONS)}")
        with self._lock:
            self._queued.setdefault(url_path(url_or_path), []).extend(actions)

    def next_action(self, path: str) -> str | None:
        """Pop the next queued action for ``path`` (None: behave)."""
        with self._lock:
            queue = self._queued.get(path)
            return queue.pop(0) if queue else None

    def requests_for(self, url_or_path: str, method: str = "GET") -> list[RequestRecord]:
        """Logged requests of one path."""
        path = url_path(url_or_path)
        return [r for r in self.log if r.path == path and r.method == method]

    def release(self) -> None:
        """Let every request held by a "hold" action finish."""
        self._released.set()

    def wait_for_request(self, url_or_path: str, timeout: float = 30.0) -> RequestRecord:
        """Block until the mirror has received a GET for the path; return its record."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = self.requests_for(url_or_path)
            if found:
                return found[0]
            time.sleep(0.01)
        raise TimeoutError(f"no request for {url_or_path} within {timeout} s")

    def reset(self) -> None:
        """Clear the log and every queued action; held requests are released."""
        with self._lock:
            self.log.clear()
            self._queued.clear()
        self._released.set()
        self._released = threading.Event()

    def close(self) -> None:
        """Stop serving."""
        self._httpd.shutdown()
        self._httpd.server_close()


def _handler_for(server: MirrorServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # noqa: A002 - keep pytest output clean
            pass

        def do_GET(self):
            self._serve()

        def _error(self, record: RequestRecord, status: int, extra: dict | None = None) -> None:
            body = f"{status}\n".encode()
            record.status = status  # before the answer: the client may look at the log as soon as it has it
            self.send_response(status)
            for key, value in (extra or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _serve(self) -> None:
            path = url_path(self.path)
            record = RequestRecord(self.command, path, self.headers.get("Range"))
            record.action = server.next_action(path)
            with server._lock:
                server.log.append(record)
            try:
                self._answer(record)
            finally:
                record.finished = time.time()

        def _answer(self, record: RequestRecord) -> None:
            actions = set((record.action or "").split("+"))
            try:
                file = server.tree.path_for(record.path)
            except ValueError:
                return self._error(record, 400)
            if actions & {"500", "404"}:
                return self._error(record, int(record.action))
            if not file.is_file():
                return self._error(record, 404)
            stat = file.stat()
            data_size = stat.st_size
            etag = f'"{stat.st_ino:x}-{stat.st_mtime_ns:x}-{data_size:x}"'
            last_modified = email.utils.formatdate(stat.st_mtime, usegmt=True)
            if "gzip" in actions:
                return self._send_gzip(record, file)
            if_range = self.headers.get("If-Range")
            start, end, status = 0, data_size, 200
            if record.range and "ignore_range" not in actions and if_range in (None, etag, last_modified):
                spec = record.range.removeprefix("bytes=")
                first, _, last = spec.partition("-")
                start = int(first)
                end = int(last) + 1 if last else data_size
                if start >= data_size:
                    return self._error(record, 416, {"Content-Range": f"bytes */{data_size}"})
                status = 206
            length = end - start
            if "truncate" in actions:
                length = (end - start) // 2
            record.status = status
            self.send_response(status)
            self.send_header("Content-Type", "application/x-tar")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(length))
            if "no_validators" not in actions:
                self.send_header("ETag", etag)
                self.send_header("Last-Modified", last_modified)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{data_size}")
            if actions & {"drop", "reset"}:
                self.send_header("Connection", "close")
            self.end_headers()
            if "reset" in actions:
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            to_send = length // 2 if "drop" in actions else length
            hold_at = length - length // 2 if "hold" in actions else None  # bytes left when holding
            with open(file, "rb") as f:
                f.seek(start)
                while to_send > 0:
                    if to_send == hold_at:
                        self.wfile.flush()
                        server._released.wait(60)
                    step = to_send - hold_at if hold_at is not None and to_send > hold_at else to_send
                    chunk = f.read(min(_SLOW_CHUNK, step))
                    if not chunk:
                        break
                    try:
                        self.wfile.write(chunk)
                    except (BrokenPipeError, ConnectionResetError):
                        break
                    record.bytes_sent += len(chunk)
                    to_send -= len(chunk)
                    if "slow" in actions:
                        time.sleep(server.slow_chunk_s)
            if "drop" in actions:
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)

        def _send_gzip(self, record: RequestRecord, file: Path) -> None:
            body = gzip.compress(file.read_bytes())
            record.status = 200
            self.send_response(200)
            self.send_header("Content-Type", "application/x-tar")
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            record.bytes_sent = len(body)

    return Handler


@pytest.fixture(scope="session")
def mirror_tree(tmp_path_factory, fixtures_root) -> MirrorTree:
    """Mirror tree with every shared fixture tar at its real URL path(s)."""
    tree = MirrorTree(tmp_path_factory.mktemp("mirror"))
    by_name = _paths_by_filename()
    for tar in sorted(fixtures_root.glob("*/*.tar")):
        for path in by_name.get(tar.name, []):
            tree.add(path, tar)
    return tree


@pytest.fixture(scope="session")
def mirror(mirror_tree) -> MirrorServer:
    """Running loopback mirror serving ``mirror_tree``."""
    server = MirrorServer(mirror_tree)
    yield server
    server.close()


@pytest.fixture
def mirror_env(mirror, tmp_path, monkeypatch) -> Path:
    """Fresh cache in OCRCONV_CACHE, OCRCONV_MIRROR set to the mirror, short retry backoff; returns the cache."""
    import converter.download

    cache = tmp_path / "cache"
    monkeypatch.setenv("OCRCONV_CACHE", str(cache))
    monkeypatch.setenv("OCRCONV_MIRROR", mirror.url)
    monkeypatch.setattr(converter.download, "BACKOFF_S", 0.01)
    mirror.reset()
    yield cache
    mirror.reset()
