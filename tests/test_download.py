"""Downloader and cache (converter.download) against the loopback mirror, and ``ocrconv download``."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import converter.download as dl
from converter import unpack
from converter.cli import main
from converter.errors import (CorruptArchiveError, DownloadError, IntegrityError, OutputError, UnknownModelError,
                              UnsafeArchiveError)
from converter.manifest import get_model

CLS = "ch_ppocr_mobile_v2.0_cls"
CLS_INFER_PATH = "/dygraph_v2.0/ch/ch_ppocr_mobile_v2.0_cls_infer.tar"
CLS_TRAIN_PATH = "/dygraph_v2.0/ch/ch_ppocr_mobile_v2.0_cls_train.tar"
REPO = Path(__file__).resolve().parents[1]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def cls_infer_tar(fixtures_root) -> Path:
    return fixtures_root / CLS / f"{CLS}_infer.tar"


@pytest.fixture
def cls_train_tar(fixtures_root) -> Path:
    return fixtures_root / CLS / f"{CLS}_train.tar"


def _no_partials(cache: Path) -> bool:
    return not [p for p in cache.rglob("*") if p.name.endswith((".part", ".part.json", ".partial", ".tmp"))]


def _interrupted_download(monkeypatch, mirror, path: str, action: str = "drop") -> Path:
    """Leave a partial download of ``path`` in the cache, as a run killed mid-way would (with its resume record)."""
    monkeypatch.setattr(dl, "RETRIES", 0)
    mirror.misbehave(path, action, "reset")  # received bytes are resumed at once; then a connection with none
    with pytest.raises(DownloadError, match=r"failed after 2 attempts \(1 in a row without progress\)"):
        dl.fetch_archive(get_model(CLS), "trained" if "train" in path else "inference")
    monkeypatch.setattr(dl, "RETRIES", 4)
    part = Path(os.environ["OCRCONV_CACHE"]) / "archives" / (Path(path).name + ".part")
    assert part.stat().st_size > 0 and part.with_name(part.name + ".json").is_file()
    mirror.reset()
    return part


def test_download_and_unpack_through_the_mirror(mirror_env, mirror, cls_infer_tar):
    model_dir = dl.fetch_artifact(get_model(CLS), "inference")
    assert model_dir == mirror_env / "unpacked" / f"{CLS}_infer" / f"{CLS}_infer"
    with tarfile.open(cls_infer_tar) as tf:
        for name in ("inference.pdmodel", "inference.pdiparams", "inference.pdiparams.info"):
            assert (model_dir / name).read_bytes() == tf.extractfile(f"{CLS}_infer/{name}").read()
    assert not (model_dir / "._inference.pdmodel").exists()
    archive = mirror_env / "archives" / f"{CLS}_infer.tar"
    assert archive.read_bytes() == cls_infer_tar.read_bytes()
    record = json.loads((mirror_env / "index.json").read_text())[f"{CLS}_infer.tar"]
    assert record["sha256"] == _sha(cls_infer_tar) and record["size"] == cls_infer_tar.stat().st_size
    assert record["url"] == "https://paddleocr.bj.bcebos.com" + CLS_INFER_PATH
    assert record["source"] == mirror.url + CLS_INFER_PATH
    assert _no_partials(mirror_env)
    # second call: cache and unpacked dir reused, nothing requested
    assert dl.fetch_artifact(get_model(CLS), "inference") == model_dir
    assert len(mirror.requests_for(CLS_INFER_PATH)) == 1


def test_resume_after_dropped_connection(mirror_env, mirror, cls_train_tar, caplog):
    mirror.misbehave(CLS_TRAIN_PATH, "drop")
    with caplog.at_level(logging.INFO, logger="converter.download"):
        archive = dl.fetch_archive(get_model(CLS), "trained")
    assert archive.read_bytes() == cls_train_tar.read_bytes()
    first, second = mirror.requests_for(CLS_TRAIN_PATH)
    size = cls_train_tar.stat().st_size
    assert (first.action, first.range, first.bytes_sent) == ("drop", None, size // 2)
    offset = int(second.range.removeprefix("bytes=").rstrip("-"))
    assert 0 < offset <= first.bytes_sent
    assert (second.status, second.bytes_sent) == (206, size - offset)  # only the missing bytes came again
    assert "resuming" in caplog.text
    assert _no_partials(mirror_env)


def test_resume_falls_back_when_range_is_ignored(mirror_env, mirror, cls_train_tar, monkeypatch):
    size = cls_train_tar.stat().st_size
    part = _interrupted_download(monkeypatch, mirror, CLS_TRAIN_PATH)
    kept = part.stat().st_size
    mirror.misbehave(CLS_TRAIN_PATH, "ignore_range")
    assert dl.fetch_archive(get_model(CLS), "trained").read_bytes() == cls_train_tar.read_bytes()
    (request,) = mirror.requests_for(CLS_TRAIN_PATH)
    assert (request.range, request.status, request.bytes_sent) == (f"bytes={kept}-", 200, size)
    # and with a server that honours Range, only the rest is fetched
    dl.CacheIndex(mirror_env).remove(f"{CLS}_train.tar")
    (mirror_env / "archives" / f"{CLS}_train.tar").unlink()
    part = _interrupted_download(monkeypatch, mirror, CLS_TRAIN_PATH)
    assert dl.fetch_archive(get_model(CLS), "trained").read_bytes() == cls_train_tar.read_bytes()
    (request,) = mirror.requests_for(CLS_TRAIN_PATH)
    assert (request.status, request.bytes_sent) == (206, size - kept)
    assert _no_partials(mirror_env)


def test_complete_leftover_partial_is_restarted(mirror_env, mirror, cls_train_tar, monkeypatch):
    part = _interrupted_download(monkeypatch, mirror, CLS_TRAIN_PATH)
    part.write_bytes(cls_train_tar.read_bytes() + b"extra")  # longer than the file: Range not satisfiable
    assert dl.fetch_archive(get_model(CLS), "trained").read_bytes() == cls_train_tar.read_bytes()
    assert [(r.status, r.range) for r in mirror.requests_for(CLS_TRAIN_PATH)] == [
        (416, f"bytes={cls_train_tar.stat().st_size + 5}-"), (200, None)]
    assert _no_partials(mirror_env)


def test_partial_without_a_resume_record_starts_over(mirror_env, mirror, cls_train_tar, monkeypatch, caplog):
    """A .part whose origin cannot be checked (no record, another URL, no validator from the server) is never
    resumed: its bytes may belong to another version of the file."""
    part = mirror_env / "archives" / f"{CLS}_train.tar.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\0" * 100_000)  # e.g. left by an older ocrconv
    with caplog.at_level(logging.INFO, logger="converter.download"):
        assert dl.fetch_archive(get_model(CLS), "trained").read_bytes() == cls_train_tar.read_bytes()
    assert [(r.status, r.range) for r in mirror.requests_for(CLS_TRAIN_PATH)] == [(200, None)]
    assert "cannot be checked against the file on the server" in caplog.text
    for leftover in ("another URL", "no validator"):
        dl.CacheIndex(mirror_env).remove(f"{CLS}_train.tar")
        (mirror_env / "archives" / f"{CLS}_train.tar").unlink()
        part = _interrupted_download(monkeypatch, mirror, CLS_TRAIN_PATH)
        record = part.with_name(part.name + ".json")
        info = json.loads(record.read_text())
        info.update({"url": "http://elsewhere.invalid/x.tar"} if leftover == "another URL" else {"validator": None})
        record.write_text(json.dumps(info))
        assert dl.fetch_archive(get_model(CLS), "trained").read_bytes() == cls_train_tar.read_bytes()
        assert [(r.status, r.range) for r in mirror.requests_for(CLS_TRAIN_PATH)] == [(200, None)], leftover
    # a server that sends no validator: a dropped download starts over rather than resuming
    dl.CacheIndex(mirror_env).remove(f"{CLS}_train.tar")
    (mirror_env / "archives" / f"{CLS}_train.tar").unlink()
    mirror.reset()
    mirror.misbehave(CLS_TRAIN_PATH, "drop+no_validators", "no_validators")
    assert dl.fetch_archive(get_model(CLS), "trained").read_bytes() == cls_train_tar.read_bytes()
    assert [(r.status, r.range) for r in mirror.requests_for(CLS_TRAIN_PATH)] == [(200, None), (200, None)]
    assert _no_partials(mirror_env)


def test_a_file_replaced_on_the_server_is_not_spliced(mirror_env, mirror, mirror_tree, cls_train_tar, fixtures_root,
                                                      monkeypatch):
    """Resuming sends If-Range with the first answer's validator: when the file changed in between, the server
    sends the new file whole, and the cache never pins half of each."""
    _interrupted_download(monkeypatch, mirror, CLS_TRAIN_PATH)
    newer = fixtures_root / "ch_ppocr_mobile_v2.0_det" / "ch_ppocr_mobile_v2.0_det_train.tar"
    mirror_tree.add(CLS_TRAIN_PATH, newer)  # a new upload under the same URL
    try:
        archive = dl.fetch_archive(get_model(CLS), "trained")
    finally:
        mirror_tree.add(CLS_TRAIN_PATH, cls_train_tar)
    assert archive.read_bytes() == newer.read_bytes()
    (request,) = mirror.requests_for(CLS_TRAIN_PATH)
    assert request.range is not None and request.status == 200
    assert dl.CacheIndex(mirror_env).get(archive.name)["sha256"] == _sha(newer)


def test_content_encoded_answer_is_decoded_and_checked(mirror_env, mirror, cls_infer_tar):
    mirror.misbehave(CLS_INFER_PATH, "gzip")  # Content-Encoding: gzip although identity was asked for
    assert dl.fetch_archive(get_model(CLS)).read_bytes() == cls_infer_tar.read_bytes()
    (request,) = mirror.requests_for(CLS_INFER_PATH)
    assert request.bytes_sent < cls_infer_tar.stat().st_size
    assert _no_partials(mirror_env)


def test_server_error_is_retried(mirror_env, mirror, cls_infer_tar, caplog):
    mirror.misbehave(CLS_INFER_PATH, "500", "500")
    with caplog.at_level(logging.WARNING, logger="converter.download"):
        archive = dl.fetch_archive(get_model(CLS))
    assert archive.read_bytes() == cls_infer_tar.read_bytes()
    assert [r.status for r in mirror.requests_for(CLS_INFER_PATH)] == [500, 500, 200]
    assert "retry 2/4" in caplog.text


def test_retries_are_bounded(mirror_env, mirror, monkeypatch):
    monkeypatch.setattr(dl, "RETRIES", 2)
    mirror.misbehave(CLS_INFER_PATH, "500", "500", "500", "500")
    with pytest.raises(DownloadError, match="HTTP 500"):
        dl.fetch_archive(get_model(CLS))
    assert len(mirror.requests_for(CLS_INFER_PATH)) == 3
    assert not (mirror_env / "archives" / f"{CLS}_infer.tar").exists()
    assert not (mirror_env / "index.json").exists()


def test_dropped_connections_past_the_retry_budget(mirror_env, mirror, monkeypatch):
    monkeypatch.setattr(dl, "RETRIES", 1)
    mirror.misbehave(CLS_INFER_PATH, "drop", "reset", "reset")
    with pytest.raises(DownloadError, match=r"failed after 3 attempts \(2 in a row without progress\)"):
        dl.fetch_archive(get_model(CLS))
    assert not (mirror_env / "archives" / f"{CLS}_infer.tar").exists()
    part = mirror_env / "archives" / f"{CLS}_infer.tar.part"
    assert 0 < part.stat().st_size < 716800  # kept to resume later, never under the final name


def test_attempts_that_make_progress_do_not_use_up_the_retries(mirror_env, mirror, cls_infer_tar, monkeypatch):
    """A flaky link that drops every connection part-way still completes a large download."""
    monkeypatch.setattr(dl, "RETRIES", 1)
    mirror.misbehave(CLS_INFER_PATH, *["drop"] * 6)  # each answer sends half of what is left
    assert dl.fetch_archive(get_model(CLS)).read_bytes() == cls_infer_tar.read_bytes()
    assert [r.status for r in mirror.requests_for(CLS_INFER_PATH)] == [200] + [206] * 6


def test_malformed_mirror_url_is_a_download_error(mirror_env):
    with pytest.raises(DownloadError, match="not-a-url"):
        dl.fetch_archive(get_model(CLS), mirror="not-a-url")


def test_404_names_url_and_model(mirror_env, mirror):
    # No fixture exists for this row, so no test can have added it to the session's mirror tree
    # (other suites add materialized rows to it, e.g. the server det row).
    entry = get_model("it_mobile_v2.0_rec")
    with pytest.raises(DownloadError) as info:
        dl.fetch_artifact(entry, "inference")
    message = str(info.value)
    assert "it_mobile_v2.0_rec inference" in message
    assert f"HTTP 404 for {mirror.url}/dygraph_v2.0/multilingual/it_mobile_v2.0_rec_infer.tar" in message
    assert not (mirror_env / "archives" / "it_mobile_v2.0_rec_infer.tar").exists()


def test_alternative_url_is_tried_when_the_table_url_is_missing(mirror_env, mirror, fixtures_root, caplog):
    entry = get_model("ch_PP-OCRv2_rec")
    with caplog.at_level(logging.WARNING, logger="converter.download"):
        model_dir = dl.fetch_artifact(entry, "inference")
    assert [(r.path, r.status) for r in mirror.log] == [
        ("/PP-OCRv2/chinese/ch_PP-OCRv2_infer.tar", 404), ("/PP-OCRv2/chinese/ch_PP-OCRv2_rec_infer.tar", 200)]
    assert "trying the recorded alternative" in caplog.text
    assert "downloaded from the alternative URL" in caplog.text
    assert (model_dir / "inference.pdiparams").is_file()
    record = dl.CacheIndex(mirror_env).get("ch_PP-OCRv2_infer.tar")
    assert record["url"] == "https://paddleocr.bj.bcebos.com/PP-OCRv2/chinese/ch_PP-OCRv2_rec_infer.tar"
    assert record["sha256"] == _sha(fixtures_root / "ch_PP-OCRv2_rec" / "ch_PP-OCRv2_rec_infer.tar")


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete_unpacked_file"])
def test_damaged_cache_is_detected_and_repaired(mirror_env, mirror, cls_infer_tar, damage, caplog):
    model_dir = dl.fetch_artifact(get_model(CLS))
    archive = mirror_env / "archives" / f"{CLS}_infer.tar"
    if damage == "flip":
        data = bytearray(archive.read_bytes())
        data[5000] ^= 0xFF
        archive.write_bytes(bytes(data))
    elif damage == "truncate":
        archive.write_bytes(archive.read_bytes()[:1000])
    else:
        (model_dir / "inference.pdiparams").unlink()
    with caplog.at_level(logging.WARNING, logger="converter.download"):
        # the unpacked files are unchanged since extraction: used as they are, the archive is not read
        assert dl.fetch_artifact(get_model(CLS)) == model_dir
        assert len(mirror.requests_for(CLS_INFER_PATH)) == 1
        assert dl.fetch_archive(get_model(CLS)) == archive  # the archive itself is verified when asked for
    assert archive.read_bytes() == cls_infer_tar.read_bytes()
    assert (model_dir / "inference.pdiparams").is_file()
    expected_requests = 1 if damage == "delete_unpacked_file" else 2
    assert len(mirror.requests_for(CLS_INFER_PATH)) == expected_requests
    if damage != "delete_unpacked_file":
        assert "downloading again" in caplog.text


def test_edited_unpacked_file_is_extracted_again(mirror_env, mirror, cls_infer_tar, caplog):
    model_dir = dl.fetch_artifact(get_model(CLS))
    params = model_dir / "inference.pdiparams"
    original, stat = params.read_bytes(), params.stat()
    edited = bytearray(original)
    edited[len(edited) // 2] ^= 1
    params.write_bytes(bytes(edited))
    os.utime(params, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime
    with caplog.at_level(logging.INFO, logger="converter.download"):
        assert dl.fetch_artifact(get_model(CLS)) == model_dir
    assert params.read_bytes() == original
    assert "changed since it was extracted" in caplog.text
    assert len(mirror.requests_for(CLS_INFER_PATH)) == 1  # from the cached archive


def test_unsafe_archive_is_dropped_from_the_cache(mirror_env, mirror, tmp_path):
    """An archive refused as unsafe is not kept (pinned in the index) for the next run to fail on again."""
    hostile = tmp_path / f"{CLS}_infer.tar"
    with tarfile.open(hostile, "w") as tf:
        link = tarfile.TarInfo(f"{CLS}_infer/inference.pdiparams")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    archive = mirror_env / "archives" / hostile.name
    archive.parent.mkdir(parents=True)
    archive.write_bytes(hostile.read_bytes())
    dl.CacheIndex(mirror_env).put(hostile.name, {"url": "https://example.invalid/x.tar", "source": "http://evil/x.tar",
                                                 "size": hostile.stat().st_size, "sha256": _sha(hostile)})
    with pytest.raises(UnsafeArchiveError, match=r"symlink.*downloaded from http://evil/x.tar; removed"):
        dl.fetch_artifact(get_model(CLS))
    assert not archive.exists() and dl.CacheIndex(mirror_env).get(hostile.name) is None
    assert (dl.fetch_artifact(get_model(CLS)) / "inference.pdiparams").is_file()  # the next run downloads anew


def test_write_error_while_unpacking_keeps_the_archive(mirror_env, mirror, monkeypatch):
    archive = dl.fetch_archive(get_model(CLS))

    def disk_full(path, mode="r", *args, **kwargs):
        if "x" in mode:
            raise OSError(28, "No space left on device")
        return open(path, mode, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(unpack, "open", disk_full, raising=False)
        with pytest.raises(OutputError, match="No space left"):
            dl.fetch_artifact(get_model(CLS))
    assert archive.is_file() and dl.CacheIndex(mirror_env).get(archive.name) is not None
    assert (dl.fetch_artifact(get_model(CLS)) / "inference.pdiparams").is_file()
    assert len(mirror.requests_for(CLS_INFER_PATH)) == 1


def test_waiting_for_another_process_is_said(mirror_env, mirror, caplog):
    from filelock import FileLock

    archive = mirror_env / "archives" / f"{CLS}_infer.tar"
    archive.parent.mkdir(parents=True)
    held = FileLock(str(archive) + ".lock")
    held.acquire()
    result = []
    worker = threading.Thread(target=lambda: result.append(dl.fetch_archive(get_model(CLS))))
    with caplog.at_level(logging.WARNING, logger="converter.download"):
        worker.start()
        deadline = time.time() + 10
        while "waiting for another ocrconv process" not in caplog.text and time.time() < deadline:
            time.sleep(0.02)
        held.release()
        worker.join(30)
    assert f"waiting for another ocrconv process working on {archive.name}" in caplog.text
    assert result == [archive]


def test_truncated_download_is_never_used(mirror_env, mirror, cls_infer_tar, caplog):
    mirror.misbehave(CLS_INFER_PATH, "truncate")  # 200 with a consistent Content-Length, half the file
    with pytest.raises(CorruptArchiveError, match=f"{CLS}_infer"):
        dl.fetch_artifact(get_model(CLS))
    assert not (mirror_env / "archives" / f"{CLS}_infer.tar").exists()
    assert dl.CacheIndex(mirror_env).get(f"{CLS}_infer.tar") is None
    assert not (mirror_env / "unpacked" / f"{CLS}_infer").exists()
    model_dir = dl.fetch_artifact(get_model(CLS))  # the next run downloads a good copy
    assert (model_dir / "inference.pdmodel").is_file()
    assert dl.CacheIndex(mirror_env).get(f"{CLS}_infer.tar")["sha256"] == _sha(cls_infer_tar)


def test_download_must_match_recorded_sha(mirror_env, mirror, cls_infer_tar):
    dl.fetch_archive(get_model(CLS))
    archive = mirror_env / "archives" / f"{CLS}_infer.tar"
    archive.write_bytes(b"garbage")
    mirror.misbehave(CLS_INFER_PATH, "truncate")
    with pytest.raises(IntegrityError, match="delete its entry"):
        dl.fetch_archive(get_model(CLS))
    assert not archive.exists()
    assert dl.CacheIndex(mirror_env).get(f"{CLS}_infer.tar")["sha256"] == _sha(cls_infer_tar)


def test_expected_sha256(mirror_env, mirror, cls_infer_tar):
    with pytest.raises(IntegrityError, match="does not match the expected 0000") as info:
        dl.fetch_archive(get_model(CLS), expected_sha256="0" * 64)
    assert "cache index" not in str(info.value)  # the expectation came from the caller, not from the index
    assert not (mirror_env / "archives" / f"{CLS}_infer.tar").exists()
    assert dl.fetch_archive(get_model(CLS), expected_sha256=_sha(cls_infer_tar)).is_file()
    with pytest.raises(IntegrityError, match="cache index records"):
        dl.fetch_archive(get_model(CLS), expected_sha256="1" * 64)


def test_offline_uses_only_the_cache(mirror_env, mirror):
    with pytest.raises(DownloadError, match=f"offline: {CLS} inference archive {CLS}_infer.tar is not in the cache"):
        dl.fetch_artifact(get_model(CLS), offline=True)
    assert mirror.log == []
    model_dir = dl.fetch_artifact(get_model(CLS))
    mirror.reset()
    assert dl.fetch_artifact(get_model(CLS), offline=True) == model_dir
    archive = mirror_env / "archives" / f"{CLS}_infer.tar"
    archive.write_bytes(archive.read_bytes()[:-10])
    with pytest.raises(DownloadError, match="does not match its record in the cache index"):
        dl.fetch_archive(get_model(CLS), offline=True)
    assert dl.fetch_artifact(get_model(CLS), offline=True) == model_dir  # the unpacked files are intact
    archive.unlink()
    assert dl.fetch_artifact(get_model(CLS), offline=True) == model_dir
    (model_dir / "inference.pdmodel").write_bytes(b"edited")
    with pytest.raises(DownloadError, match="is not in the cache"):
        dl.fetch_artifact(get_model(CLS), offline=True)
    dl.fetch_archive(get_model(CLS))
    (mirror_env / "index.json").unlink()
    mirror.reset()
    with pytest.raises(DownloadError, match="has no record in the cache index"):
        dl.fetch_archive(get_model(CLS), offline=True)
    assert mirror.log == []


_CHILD = """
import sys
from converter.download import fetch_archive
from converter.manifest import get_model
print("ready", flush=True)
print(fetch_archive(get_model(sys.argv[1]), cache_dir=sys.argv[2], mirror=sys.argv[3], quiet=True), flush=True)
"""


def test_two_processes_download_one_archive(mirror, tmp_path, cls_infer_tar):
    mirror.reset()
    mirror.misbehave(CLS_INFER_PATH, "hold", "hold")  # a download stops halfway until mirror.release()
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def start():
        return subprocess.Popen([sys.executable, "-c", _CHILD, CLS, str(cache), mirror.url], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    procs = [start()]
    try:
        mirror.wait_for_request(CLS_INFER_PATH)  # the first process is downloading (and holds the lock)
        procs.append(start())
        assert procs[1].stdout.readline() == "ready\n"
        time.sleep(0.5)  # time for the second process to ask for the archive too (it must wait instead)
        (held,) = mirror.requests_for(CLS_INFER_PATH)
        assert held.bytes_sent == cls_infer_tar.stat().st_size // 2 and held.finished == 0.0  # still held
    finally:
        mirror.release()
    outputs = [p.stdout.read() for p in procs]
    assert [p.wait(timeout=60) for p in procs] == [0, 0], outputs
    paths = [out.split()[-1] for out in outputs]
    assert paths[0] == paths[1] == str(cache / "archives" / f"{CLS}_infer.tar")
    assert Path(paths[0]).read_bytes() == cls_infer_tar.read_bytes()
    (request,) = mirror.requests_for(CLS_INFER_PATH)  # the second process reused the first one's file
    assert request.bytes_sent == cls_infer_tar.stat().st_size
    assert _no_partials(cache)
    mirror.reset()


def test_mirror_and_cache_settings(monkeypatch, tmp_path):
    url = "https://paddleocr.bj.bcebos.com/PP-OCRv4/chinese/ch_PP-OCRv4_det_infer.tar"
    monkeypatch.delenv("OCRCONV_MIRROR", raising=False)
    assert dl.mirror_url(url) == url
    assert dl.mirror_url(url, "http://m.example/base/") == \
        "http://m.example/base/PP-OCRv4/chinese/ch_PP-OCRv4_det_infer.tar"
    monkeypatch.setenv("OCRCONV_MIRROR", "http://127.0.0.1:9")
    assert dl.mirror_url(url) == "http://127.0.0.1:9/PP-OCRv4/chinese/ch_PP-OCRv4_det_infer.tar"
    assert dl.mirror_url(url, "") == url
    monkeypatch.delenv("OCRCONV_CACHE", raising=False)
    assert dl.cache_root() == Path.home() / ".cache" / "ocrconv"
    monkeypatch.setenv("OCRCONV_CACHE", str(tmp_path))
    assert dl.cache_root() == tmp_path
    assert dl.cache_root(tmp_path / "x") == tmp_path / "x"


def test_progress_bar_only_when_asked_or_on_a_terminal(mirror_env, mirror, capfd):
    dl.fetch_archive(get_model(CLS), "trained")  # stderr is not a TTY under pytest: quiet
    assert "ch_ppocr_mobile_v2.0_cls_train.tar" not in capfd.readouterr().err
    dl.fetch_archive(get_model(CLS), quiet=False)
    err = capfd.readouterr().err
    assert "ch_ppocr_mobile_v2.0_cls_infer.tar:" in err and "/700k" in err  # tqdm's bar, sized from the answer


def test_cli_download(mirror, tmp_path, cls_infer_tar):
    runner = CliRunner()
    cache = tmp_path / "cache"
    base = ["download", "--mirror", mirror.url, "--cache", str(cache), "--quiet"]
    result = runner.invoke(main, base + [CLS, "--artifact", "all"])
    assert result.exit_code == 0, result.output
    paths = result.output.split()
    assert paths == [str(cache / "unpacked" / f"{CLS}_{k}" / f"{CLS}_{k}") for k in ("infer", "train")]
    assert (Path(paths[1]) / "best_accuracy.pdparams").is_file()
    result = runner.invoke(main, base + ["--offline", f"{CLS}_train"])  # a file stem implies the artifact
    assert (result.exit_code, result.output.split()) == (0, [paths[1]])
    result = runner.invoke(main, base + [CLS, "--artifact", "pretrained"])
    assert result.exit_code == 1
    assert f"error: model {CLS} has no 'pretrained' archive; it has: inference, trained" in result.output
    result = runner.invoke(main, base + [CLS, "ch_ppocr_mobile_v2.0_clss"])
    assert result.exit_code == 1 and "nearest: ch_ppocr_mobile_v2.0_cls" in result.output
    result = runner.invoke(main, base + ["--offline", "ch_PP-OCRv4_det"])
    assert result.exit_code == 1 and "offline: ch_PP-OCRv4_det inference archive" in result.output
    assert isinstance(UnknownModelError("x"), KeyError)


def test_mirror_serves_added_files_and_rows(mirror, mirror_tree, tmp_path, fixtures_root):
    import requests

    extra = tmp_path / "extra.bin"
    extra.write_bytes(bytes(range(256)) * 4)
    url = "https://paddleocr.bj.bcebos.com/test/extra.bin"
    assert mirror_tree.add(url, extra) == "/test/extra.bin"
    mirror.reset()
    full = requests.get(mirror.url_for(url), timeout=10)
    assert (full.status_code, full.content) == (200, extra.read_bytes())
    part = requests.get(mirror.url_for(url), headers={"Range": "bytes=1000-"}, timeout=10)
    assert (part.status_code, part.content, part.headers["Content-Range"]) == (206, extra.read_bytes()[1000:],
                                                                                "bytes 1000-1023/1024")
    mirror.misbehave(url, "404")
    assert requests.get(mirror.url_for(url), timeout=10).status_code == 404
    mirror_tree.remove(url)
    assert requests.get(mirror.url_for(url), timeout=10).status_code == 404
    assert [r.status for r in mirror.requests_for(url)] == [200, 206, 404, 404]
    with pytest.raises(ValueError, match="unknown actions"):
        mirror.misbehave(url, "explode")
    row = "ch_ppocr_mobile_v2.0_det"
    assert mirror_tree.add_row(row) == [f"/dygraph_v2.0/ch/{row}_infer.tar", f"/dygraph_v2.0/ch/{row}_train.tar"]
    assert mirror_tree.path_for(f"/dygraph_v2.0/ch/{row}_infer.tar").read_bytes() == \
        (fixtures_root / row / f"{row}_infer.tar").read_bytes()
    mirror.reset()


def test_fetch_artifact_accepts_a_name(mirror_env, mirror):
    model_dir = dl.fetch_artifact("ch_ppocr_mobile_v2.0_det_train", "trained")
    assert model_dir.name == "ch_ppocr_mobile_v2.0_det_train"
    assert (model_dir / "best_accuracy.pdparams").is_file()


def test_unpacked_files_keep_the_sha256_hashed_while_extracting(mirror_env, mirror, cls_train_tar):
    """The cache records each extracted file's sha256; a conversion from the warm cache uses it without hashing
    the file again, and any change to the file (even with its size and mtime restored) makes it hash again."""
    from converter import paddle_io
    from converter.convert import convert

    model_dir = dl.fetch_artifact(get_model(CLS), "trained")
    checkpoint = model_dir / "best_accuracy.pdparams"
    assert dl.recorded_sha256(checkpoint) == _sha(checkpoint)
    assert dl.recorded_sha256(model_dir / "missing.pdparams") is None
    assert dl.recorded_sha256(cls_train_tar) is None  # outside the cache

    def no_hashing(self):
        raise AssertionError("the weight file was hashed again")

    original = paddle_io.PaddleWeights.sha256
    paddle_io.PaddleWeights.sha256 = property(no_hashing)
    try:
        result = convert(model_dir, out=mirror_env / "out", check=False)
    finally:
        paddle_io.PaddleWeights.sha256 = original
    assert result.source_sha256 == _sha(checkpoint)

    stat = checkpoint.stat()
    data = bytearray(checkpoint.read_bytes())
    data[len(data) // 2] ^= 1  # a bit of some weight; same size
    checkpoint.write_bytes(bytes(data))
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert dl.recorded_sha256(checkpoint) is None
    changed = convert(model_dir, out=mirror_env / "out2", check=False)
    assert changed.source_sha256 == _sha(checkpoint) != result.source_sha256
