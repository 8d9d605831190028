"""Safe, atomic extraction of model archives (converter.unpack)."""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from converter import unpack
from converter.errors import CorruptArchiveError, OutputError, UnsafeArchiveError, UnsupportedFormatError
from converter.unpack import find_model_dir, safe_extract, safe_extract_hashed

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
    "file, then a file inside it": ([_file("model/a"), _file("model/a/b.pdparams")], "inside 'model/a', which is a file"),
    "file, then a directory of that name": ([_file("model/a"), _special("model/a", tarfile.DIRTYPE)],
                                            "is a file and a directory"),
    "directory, then a file of that name": ([_special("model/a", tarfile.DIRTYPE), _file("model/a")],
                                            "is a file and a directory"),
    "file inside a file's implied directory": ([_file("model/a/b"), _file("model/a")], "is a file and a directory"),
    "file named '.'": ([_file(".")], "named like the target directory"),
    "sparse file": ([_special("model/s.pdiparams", tarfile.GNUTYPE_SPARSE)], "sparse file"),
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


def test_sparse_member_of_a_tiny_tar_is_refused(work):
    """An old-GNU sparse member that tarfile would expand to 100 MiB from a 3 KB plain tar."""
    real = 100 * 1024**2
    info = tarfile.TarInfo("m/inference.pdiparams")
    info.type, info.size = tarfile.GNUTYPE_SPARSE, 512
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[386:398] = b"%011o\0" % (real - 512)  # one 512-byte data chunk at the very end
    header[398:410] = b"%011o\0" % 512
    header[483:495] = b"%011o\0" % real  # the expanded size
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % tarfile.calc_chksums(bytes(header))[0]
    tar = work / "sparse.tar"
    tar.write_bytes(bytes(header) + b"W" * 512 + b"\0" * 1024)
    with tarfile.open(tar) as tf:
        assert tf.getmember("m/inference.pdiparams").isreg()  # tarfile calls it a regular file
    with pytest.raises(UnsafeArchiveError, match="'m/inference.pdiparams' is a sparse file"):
        safe_extract(tar, work / "out" / "target")
    assert os.listdir(work / "out") == []


def test_compression_bomb_is_refused_before_writing(work):
    tar = _make_tar(work / "bomb.tar", [_file("m/inference.pdiparams", bytes(4 * 1024**2))], mode="w:gz")
    assert tar.stat().st_size < 16 * 1024  # 4 MiB of zeros
    with pytest.raises(UnsafeArchiveError, match=r"would expand to 4194304 bytes \(more than 64 times"):
        safe_extract(tar, work / "out" / "target")
    assert os.listdir(work / "out") == []
    weights = _make_tar(work / "weights.tar", [_file("m/inference.pdiparams", os.urandom(1 << 20))], mode="w:gz")
    assert (safe_extract(weights, work / "out" / "target") / "m" / "inference.pdiparams").stat().st_size == 1 << 20


def test_member_limit_applies_while_reading_headers(work):
    """The limit stops the header walk: a tar damaged after its 12th member fails on a limit of 10, before the
    damage is reached (a 1 MB compressed tar can hold 200k headers)."""
    tar = _make_tar(work / "many.tar", [_file(f"m/{i}", b"") for i in range(50)])
    tar.write_bytes(tar.read_bytes()[:12 * tarfile.BLOCKSIZE] + b"\xff" * tarfile.BLOCKSIZE)
    with pytest.raises(CorruptArchiveError):
        safe_extract(tar, work / "out" / "target", max_members=100)
    with pytest.raises(UnsafeArchiveError, match="more than 10 members"):
        safe_extract(tar, work / "out" / "target", max_members=10)
    assert os.listdir(work / "out") == []


def test_write_errors_are_not_blamed_on_the_archive(work, monkeypatch):
    """A full disk is an OutputError naming the member and the target (the archive is fine); a name too long for
    the file system is refused as unsafe; neither leaves anything behind."""
    tar = _make_tar(work / "ok.tar", [_file("m/inference.pdmodel"), _file("m/inference.pdiparams", b"w" * 4096)])
    real_open = open

    def full_disk(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        if "x" in mode and str(path).endswith(".pdiparams"):
            class Full:
                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    handle.close()

                def write(self, data):
                    raise OSError(28, "No space left on device")
            return Full()
        return handle

    monkeypatch.setattr(unpack, "open", full_disk, raising=False)
    with pytest.raises(OutputError, match=r"cannot write member 'm/inference.pdiparams' to .*No space left"):
        safe_extract(tar, work / "out" / "target")
    monkeypatch.undo()
    assert os.listdir(work / "out") == []
    long_tar = _make_tar(work / "long.tar", [_file("m/" + "x" * 300 + "/inference.pdiparams")])
    with pytest.raises(UnsafeArchiveError, match="name too long for this file system"):
        safe_extract(long_tar, work / "out" / "target")
    assert os.listdir(work / "out") == []


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
    with pytest.raises(UnsafeArchiveError, match="more than 4 members"):
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
