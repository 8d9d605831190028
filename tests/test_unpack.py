"""Safe, atomic extraction of model archives (converter.unpack)."""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from converter.errors import CorruptArchiveError, UnsafeArchiveError, UnsupportedFormatError
from converter.unpack import find_model_dir, safe_extract

CLS_ROW = "ch_ppocr_mobile_v2.0_cls"


def _make_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], fmt=tarfile.GNU_FORMAT,
              mode: str = "w") -> Path:
    with tarfile.open(path, mode, format=fmt) as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes = b"payload") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def work(tmp_path) -> Path:
    """A folder holding the archives; extraction targets go to ``work/out/target``."""
    (tmp_path / "out").mkdir()
    return tmp_path


def test_fixture_tar_extracts_and_skips_appledouble(work, fixtures_root):
    tar = fixtures_root / CLS_ROW / f"{CLS_ROW}_infer.tar"
    dest = safe_extract(tar, work / "out" / "target")
    inner = dest / f"{CLS_ROW}_infer"
    assert _listing(dest) == [f"{CLS_ROW}_infer", *(f"{CLS_ROW}_infer/{n}" for n in (
        "inference.pdiparams", "inference.pdiparams.info", "inference.pdmodel"))]
    with tarfile.open(tar) as tf:
        for name in ("inference.pdiparams", "inference.pdiparams.info", "inference.pdmodel"):
            assert (inner / name).read_bytes() == tf.extractfile(f"{CLS_ROW}_infer/{name}").read()
        assert f"{CLS_ROW}_infer/._inference.pdmodel" in tf.getnames()  # the junk really is in the archive
    assert find_model_dir(dest) == inner
    assert sorted(os.listdir(work / "out")) == ["target"]  # no temp dirs left behind


def test_pax_and_xattr_headers_are_ignored(work):
    info, data = _file("model/inference.pdiparams", b"\x00" * 1000)
    info.pax_headers = {"SCHILY.xattr.com.apple.quarantine": "0081;x", "comment": "pax"}
    tar = work / "pax.tar"
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT, pax_headers={"ocrconv": "global"}) as tf:
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
        junk, junk_data = _file("model/._inference.pdiparams", b"\x00\x05\x16\x07junk")
        junk.size = len(junk_data)
        tf.addfile(junk, io.BytesIO(junk_data))
    dest = safe_extract(tar, work / "out" / "target")
    assert _listing(dest) == ["model", "model/inference.pdiparams"]
    assert (dest / "model" / "inference.pdiparams").read_bytes() == data
    assert find_model_dir(dest) == dest / "model"


def test_gzip_tar_and_any_inner_dir_name(work):
    tar = _make_tar(work / "m.tar.gz", [_file("whatever_name/sub/best_accuracy.pdparams", b"w" * 100),
                                        _file("whatever_name/sub/best_accuracy.states", b"s")], mode="w:gz")
    dest = safe_extract(tar, work / "out" / "target")
    assert find_model_dir(dest) == dest / "whatever_name" / "sub"
    assert (dest / "whatever_name/sub/best_accuracy.pdparams").read_bytes() == b"w" * 100


HOSTILE = {
    "absolute path": ([_file("/tmp/ocrconv_evil.pdparams")], "absolute path"),
    "dot-dot": ([_file("model/../../escaped.txt")], "climbs out"),
    "symlink escape": ([_special("model/link", tarfile.SYMTYPE, "../../../etc"),
                        _file("model/link/escaped.txt")], "symlink"),
    "symlink inside": ([_file("model/a.pdparams"), _special("model/b.pdparams", tarfile.SYMTYPE, "a.pdparams")],
                       "links are refused"),
    "hardlink escape": ([_special("model/hard", tarfile.LNKTYPE, "../../outside.txt")], "hardlink"),
    "char device": ([_special("model/null", tarfile.CHRTYPE)], "device file or fifo"),
    "block device": ([_special("model/sda", tarfile.BLKTYPE)], "device file or fifo"),
    "fifo": ([_special("model/pipe", tarfile.FIFOTYPE)], "device file or fifo"),
    "duplicate file": ([_file("model/a.pdparams", b"1"), _file("model/a.pdparams", b"2")], "appears twice"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archives_are_refused_and_write_nothing(work, case):
    members, message = HOSTILE[case]
    # a good member first, so a lazy extractor would already have written something
    tar = _make_tar(work / "hostile.tar", [_file("model/inference.pdmodel"), *members])
    before = _listing(work)
    with pytest.raises(UnsafeArchiveError, match=message) as info:
        safe_extract(tar, work / "out" / "target")
    assert str(tar) in str(info.value)
    assert _listing(work) == before
    assert not Path("/tmp/ocrconv_evil.pdparams").exists()


def test_failed_extraction_keeps_the_previous_directory(work):
    good = _make_tar(work / "good.tar", [_file("m/inference.pdiparams", b"old")])
    dest = safe_extract(good, work / "out" / "target")
    bad = _make_tar(work / "bad.tar", [_file("m/inference.pdiparams", b"new"),
                                       _special("m/x", tarfile.SYMTYPE, "/etc/passwd")])
    with pytest.raises(UnsafeArchiveError):
        safe_extract(bad, dest)
    assert (dest / "m" / "inference.pdiparams").read_bytes() == b"old"
    newer = _make_tar(work / "newer.tar", [_file("n/inference.pdiparams", b"newer")])
    safe_extract(newer, dest)
    assert _listing(dest) == ["n", "n/inference.pdiparams"]
    assert sorted(os.listdir(work / "out")) == ["target"]


def _model_tar(path: Path) -> Path:
    return _make_tar(path, [_file("m/inference.pdmodel", os.urandom(3000)),
                            _file("m/inference.pdiparams", os.urandom(5000))])


@pytest.mark.parametrize("cut, member", [
    (512 + 1000, "m/inference.pdmodel"),  # inside the first member's data
    (512 + 3072 + 512 + 100, "m/inference.pdiparams"),  # inside the second member's data
    (512 + 3072, "m/inference.pdmodel"),  # exactly at a member boundary: the second member is gone
    (512 + 3072 + 200, "m/inference.pdmodel"),  # inside the second header
])
def test_truncated_archive_names_the_member(work, cut, member):
    full = _model_tar(work / "full.tar")
    tar = work / "cut.tar"
    tar.write_bytes(full.read_bytes()[:cut])
    with pytest.raises(CorruptArchiveError, match=f"'{member}'"):
        safe_extract(tar, work / "out" / "target")
    assert os.listdir(work / "out") == []


def test_fixture_tar_truncated_is_corrupt(work, fixtures_root):
    data = (fixtures_root / CLS_ROW / f"{CLS_ROW}_train.tar").read_bytes()
    tar = work / "train.tar"
    tar.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptArchiveError, match=f"{CLS_ROW}_train/best_accuracy.pdparams"):
        safe_extract(tar, work / "out" / "target")
    assert os.listdir(work / "out") == []


def test_not_a_tar(work):
    junk = work / "junk.tar"
    junk.write_bytes(b"<html>404 Not Found</html>" * 40)
    with pytest.raises(CorruptArchiveError, match="not a readable tar"):
        safe_extract(junk, work / "out" / "target")
    assert os.listdir(work / "out") == []


def test_size_and_member_limits(work):
    tar = _make_tar(work / "big.tar", [_file(f"m/{i}.pdparams", b"x" * 600) for i in range(5)])
    with pytest.raises(UnsafeArchiveError, match="5 members exceed the limit of 4"):
        safe_extract(tar, work / "out" / "target", max_members=4)
    with pytest.raises(UnsafeArchiveError, match="more than 2000 bytes"):
        safe_extract(tar, work / "out" / "target", max_total_bytes=2000)
    assert os.listdir(work / "out") == []
    dest = safe_extract(tar, work / "out" / "target", max_members=5, max_total_bytes=3000)
    assert len(list((dest / "m").iterdir())) == 5


def test_find_model_dir(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "._junk.pdparams").write_bytes(b"x")
    with pytest.raises(UnsupportedFormatError, match="no Paddle model files"):
        find_model_dir(tmp_path)
    (tmp_path / "a" / "b" / "student.pdparams").write_bytes(b"x")
    assert find_model_dir(tmp_path) == tmp_path / "a" / "b"
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "best_accuracy.pdparams").write_bytes(b"x")
    with pytest.raises(UnsupportedFormatError, match="several directories"):
        find_model_dir(tmp_path)
    (tmp_path / "c" / "inference.pdiparams").write_bytes(b"x")
    assert find_model_dir(tmp_path) == tmp_path / "c"  # an inference model wins over checkpoints
