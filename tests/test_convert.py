"""The conversion pipeline and the `convert` / `check` commands: outputs, provenance, parity, bad input."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

import fixture_data
from architectures import build
from architectures.pretrained import load_pretrained
from converter import __version__, convert as pipeline, paddle_io, parity
from converter.cli import main
from converter.errors import (DictionaryError, DownloadError, FamilyError, OcrconvError, OutputError, ParityError,
                              UnknownModelError, UnsafeCheckpointError)

CLS = "ch_ppocr_mobile_v2.0_cls"
CLS_FAMILY = "ppocr_mobile_v2.0_cls"
REC = "ch_ppocr_mobile_v2.0_rec"
HAVE_PADDLE = parity.paddle_available()


def entries(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


@pytest.fixture(scope="session")
def converted_cls(tmp_path_factory) -> pipeline.ConvertResult:
    out = tmp_path_factory.mktemp("cls") / "out"
    return pipeline.convert(fixture_data.infer_tar(CLS), out=out)


@pytest.fixture(scope="session")
def converted_rec(tmp_path_factory) -> pipeline.ConvertResult:
    out = tmp_path_factory.mktemp("rec") / "out"
    return pipeline.convert(fixture_data.infer_tar(REC), out=out)


# ------------------------------------------------------------------------------------------------- outputs

def test_output_directory_holds_weights_config_and_parity(converted_cls):
    out = converted_cls.out
    expected_files = {"model.safetensors", "config.json"} | ({"parity.json"} if HAVE_PADDLE else set())
    assert entries(out) == expected_files
    assert entries(out.parent) == {"out"}  # no temp directories left next to it
    assert oct(out.stat().st_mode & 0o777) != oct(0o700)


def test_safetensors_metadata_records_provenance(converted_cls):
    tar = fixture_data.infer_tar(CLS)
    with safe_open(str(converted_cls.out / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert meta["source"] == str(tar.resolve())
    assert meta["source_sha256"] == paddle_io.load(tar).sha256 and len(meta["source_sha256"]) == 64
    assert (meta["artifact"], meta["family"], meta["form"], meta["task"]) == ("inference", CLS_FAMILY, "fused", "cls")
    assert meta["ocrconv_version"] == __version__ and meta["dtype"] == "float32"
    assert dtypes == {torch.float32} or dtypes == {torch.float32, torch.int64}


def test_config_json_records_the_same_provenance_as_the_weights(converted_cls):
    config = json.loads((converted_cls.out / "config.json").read_text())
    with safe_open(str(converted_cls.out / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert config["ocrconv"]["source_sha256"] == meta["source_sha256"] == converted_cls.source_sha256
    assert {k: config["ocrconv"][k] for k in meta if k != "format"} == {k: v for k, v in meta.items() if k != "format"}


def _mixed_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(8, 3, 3, 3, generator=generator),
        "fc.weight": torch.randn(5, 7, generator=generator).T,  # not contiguous
        "head.fc.weight": torch.randn(600, 700, generator=generator).T,  # not contiguous, written in 2 row blocks
        "half": torch.randn(4, generator=generator).half(),
        "bf16": torch.randn(3, 2, generator=generator).bfloat16(),
        "bn.num_batches_tracked": torch.tensor(3, dtype=torch.long),  # 0-d
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "odd": torch.arange(3, dtype=torch.int16),  # 6 bytes: later offsets are not 8-aligned
    }


def test_streamed_safetensors_reads_back_identically(tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = _mixed_tensors()
    path = tmp_path / "model.safetensors"
    pipeline.write_safetensors(path, tensors, {"format": "pt", "name": "résumé", "sha": lambda: "ab" * 32})
    loaded = load_file(str(path))
    assert set(loaded) == set(tensors)
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "name": "résumé", "sha": "ab" * 32}

    def layout(file: Path) -> tuple[int, dict[str, tuple[str, list[int], bytes]]]:
        data = file.read_bytes()
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + size])
        header.pop("__metadata__", None)
        return size, {k: (v["dtype"], v["shape"], data[8 + size + v["data_offsets"][0]:8 + size + v["data_offsets"][1]])
                      for k, v in header.items()}

    # the same dtype names, shapes and bytes per tensor as safetensors' own writer
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "reference.safetensors"))
    size, ours = layout(path)
    assert size % 8 == 0  # tensor data 8-byte aligned
    assert ours == layout(tmp_path / "reference.safetensors")[1]
    assert entries(tmp_path) == {"model.safetensors", "reference.safetensors"}


def test_streamed_safetensors_casts_only_floating_tensors(tmp_path):
    from safetensors.torch import load_file

    tensors = _mixed_tensors()
    pipeline.write_safetensors(tmp_path / "m.safetensors", tensors, {}, float_dtype=torch.float16)
    loaded = load_file(str(tmp_path / "m.safetensors"))
    for key, value in tensors.items():
        expected = value.half() if value.is_floating_point() else value
        assert loaded[key].dtype == expected.dtype and torch.equal(loaded[key], expected), key


def test_streamed_safetensors_late_metadata(tmp_path):
    from safetensors.torch import load_file

    tensors = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    path = tmp_path / "short.safetensors"
    pipeline.write_safetensors(path, tensors, {"digest": lambda: "abc"})  # shorter than reserved: padded
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"digest": "abc"}
    assert torch.equal(load_file(str(path))["w"], tensors["w"])
    with pytest.raises(ValueError, match="at most 64 characters"):
        pipeline.write_safetensors(tmp_path / "long.safetensors", tensors, {"digest": lambda: "x" * 65})
    with pytest.raises(TypeError, match="must be strings.*count"):
        pipeline.write_safetensors(tmp_path / "int.safetensors", tensors, {"count": 3})

    def hash_fails():
        raise OSError(5, "Input/output error")

    with pytest.raises(OSError, match="Input/output error"):
        pipeline.write_safetensors(tmp_path / "failed.safetensors", tensors, {"digest": hash_fails})
    assert entries(tmp_path) == {"short.safetensors"}  # nothing half-written, no temp file left


def test_config_builds_the_model_and_states_preprocessing(converted_cls):
    config = json.loads((converted_cls.out / "config.json").read_text())
    assert config["family"] == CLS_FAMILY and config["task"] == "cls"
    assert config["preprocess"]["image_shape"] == [3, 48, 192]
    assert config["preprocess"]["mean"] == [0.5, 0.5, 0.5] and config["preprocess"]["std"] == [0.5, 0.5, 0.5]
    assert config["postprocess"]["label_list"] == ["0", "180"]
    model = build({k: v for k, v in config.items() if k != "ocrconv"})
    assert sum(p.numel() for p in model.parameters()) > 1000


def test_load_pretrained_reproduces_paddle_outputs(converted_cls):
    model = load_pretrained(converted_cls.out)
    assert not model.training and model.characters is None
    expected = fixture_data.expected(CLS)
    with torch.no_grad():
        for x, y in (("x0", "y0"), ("x1", "y1")):
            got = model(torch.from_numpy(expected[x])).numpy()
            assert np.abs(got - expected[y]).max() <= 1e-5


def test_rec_output_ships_the_resolved_dictionary(converted_rec):
    out = converted_rec.out
    config = json.loads((out / "config.json").read_text())
    post = config["postprocess"]
    assert post["blank_index"] == 0 and post["num_classes"] == 6625 and post["use_space_char"] is True
    assert post["dict_sha256"] == "28b2362ad4ab2dc38769aa72feb535e3a9ddb3fd2a7585a05920e6393b1dc7f7"
    assert post["reverse"] is False and config["preprocess"]["image_shape"] == [3, 32, 320]
    model = load_pretrained(out)
    assert len(model.characters) + 1 == 6625 and model.characters[-1] == " "
    lines = (out / "dict.txt").read_text(encoding="utf-8").split("\n")
    assert lines[:-1] == model.characters and lines[-1] == ""
    expected = fixture_data.expected(REC)
    with torch.no_grad():
        got = model(torch.from_numpy(expected["x0"])).numpy()
    assert got.shape == expected["y0"].shape and (got.argmax(-1) == expected["y0"].argmax(-1)).all()


@pytest.mark.paddle
def test_parity_json_passes_for_cls_and_rec(converted_cls, converted_rec):
    for result, task in ((converted_cls, "cls"), (converted_rec, "rec")):
        data = json.loads((result.out / "parity.json").read_text())
        assert data["passed"] and result.status == "converted"
        assert data["task"] == task and data["tolerance"]["atol"] == 1e-5
        assert data["reference"].startswith("Paddle Inference") and data["paddle_version"]
        inputs = [c["input"] for c in data["cases"]]
        assert any(i.startswith("rendered text") for i in inputs) and len(inputs) >= 3
        assert all(c["argmax_agreement"] == 1.0 for c in data["cases"])
    rec_cases = json.loads((converted_rec.out / "parity.json").read_text())["cases"]
    assert all(c["decoded_agreement"] == 1.0 for c in rec_cases)
    assert {c["outputs"][0]["shape"][0] for c in rec_cases} == {1, 3}


@pytest.mark.paddle
def test_float16_output_stores_half_weights_and_reports_their_effect(tmp_path):
    result = pipeline.convert(fixture_data.infer_tar(CLS), out=tmp_path / "half", dtype="float16")
    with safe_open(str(result.out / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["dtype"] == "float16"
        assert {f.get_tensor(k).dtype for k in f.keys() if f.get_tensor(k).is_floating_point()} == {torch.float16}
    data = json.loads((result.out / "parity.json").read_text())
    assert data["passed"] and data["dtype"] == "float16"
    assert 0 < data["float16_weights"]["max_abs_diff"] < 0.05
    assert load_pretrained(result.out).backbone is not None


@pytest.mark.paddle
def test_name_conversion_downloads_through_the_mirror_and_records_the_url(mirror_env, tmp_path):
    result = pipeline.convert(CLS, out=tmp_path / "named")
    assert result.artifact == "inference" and "artifact: inference (available: inference, trained)" in result.notes
    assert result.source == "https://paddleocr.bj.bcebos.com/dygraph_v2.0/ch/ch_ppocr_mobile_v2.0_cls_infer.tar"
    assert result.parity["passed"]
    assert (mirror_env / "archives" / "ch_ppocr_mobile_v2.0_cls_infer.tar").is_file()


@pytest.mark.paddle
def test_trained_conversion_is_compared_with_the_released_inference_weights(mirror_env, tmp_path):
    result = pipeline.convert(CLS, out=tmp_path / "trained", artifact="trained")
    assert result.artifact == "trained" and result.status == "converted"
    weights = result.weights_vs_inference
    assert weights["identical"] and weights["max_abs_diff"] == 0.0 and weights["differing_tensors"] == 0
    data = json.loads((result.out / "parity.json").read_text())
    assert data["passed"] and data["weights_vs_inference"]["identical"]


@pytest.mark.paddle
def test_alternative_url_is_used_after_a_404(mirror, mirror_env, tmp_path):
    entry = pipeline._manifest().get_model("ch_PP-OCRv2_rec")
    art = entry.artifacts["inference"]
    assert art.alt_urls
    result = pipeline.convert("ch_PP-OCRv2_rec", out=tmp_path / "v2rec")
    assert [r.status for r in mirror.requests_for(art.url)] == [404]
    assert mirror.requests_for(art.alt_urls[0]) and result.parity["passed"]


# ---------------------------------------------------------------------------------------------- bad input

def test_unknown_name_suggests_the_nearest_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnknownModelError, match="nearest: .*ch_PP-OCRv4_det"):
        pipeline.convert("ch_PP-OCRv4_dett")
    assert entries(tmp_path) == set()


def test_unreachable_host_names_the_url(mirror_env, tmp_path, monkeypatch):
    monkeypatch.setenv("OCRCONV_MIRROR", "http://127.0.0.1:9")
    with pytest.raises(DownloadError, match=r"127\.0\.0\.1:9/dygraph_v2\.0/ch/ch_ppocr_mobile_v2\.0_cls_infer\.tar"):
        pipeline.convert(CLS, out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_missing_archive_404_names_the_url(mirror_env, tmp_path):
    with pytest.raises(DownloadError, match=r"404.*french_mobile_v2\.0_rec_infer\.tar|french_mobile_v2\.0_rec_infer\.tar.*404"):
        pipeline.convert("french_mobile_v2.0_rec", out=tmp_path / "x")
    assert entries(tmp_path) == {"cache"}


def test_corrupt_tar_is_refused(tmp_path):
    data = fixture_data.infer_tar(CLS).read_bytes()
    bad = tmp_path / "ch_ppocr_mobile_v2.0_cls_infer.tar"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(OcrconvError, match="ch_ppocr_mobile_v2.0_cls_infer.tar"):
        pipeline.convert(bad, out=tmp_path / "x")
    assert entries(tmp_path) == {bad.name}


def test_corrupt_download_is_refused(mirror, mirror_tree, mirror_env, tmp_path):
    art = pipeline._manifest().get_model("it_mobile_v2.0_rec").artifacts["inference"]
    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(4096))
    mirror_tree.add(art.url, junk)
    try:
        with pytest.raises(OcrconvError, match="it_mobile_v2.0_rec_infer"):
            pipeline.convert("it_mobile_v2.0_rec", out=tmp_path / "x")
    finally:
        mirror_tree.remove(art.url)
    assert not (tmp_path / "x").exists()


def test_hostile_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ckpt = tmp_path / "best_accuracy.pdparams"
    ckpt.write_bytes(pickle.dumps({"backbone.conv1.weight": Evil()}, protocol=2))
    with pytest.raises(UnsafeCheckpointError, match="system"):
        pipeline.convert(ckpt, out=tmp_path / "x", family=CLS_FAMILY)
    assert not marker.exists() and not (tmp_path / "x").exists()


def test_checkpoint_of_the_wrong_family_is_refused(tmp_path):
    with pytest.raises(FamilyError, match="ppocr_mobile_v2.0_det"):
        pipeline.convert(fixture_data.infer_tar(CLS), out=tmp_path / "x", family="ppocr_mobile_v2.0_det", check=False)
    with pytest.raises(FamilyError, match="unknown family 'ppocr_mobile_v2_cls'.*nearest: ppocr_mobile_v2.0_cls"):
        pipeline.convert(fixture_data.infer_tar(CLS), out=tmp_path / "x", family="ppocr_mobile_v2_cls")
    assert entries(tmp_path) == set()


def test_dictionary_that_does_not_fit_the_head_is_an_error(tmp_path):
    with pytest.raises(DictionaryError, match="french_dict.txt.*6625 classes"):
        pipeline.convert(fixture_data.infer_tar(REC), out=tmp_path / "x", dictionary="dict/french_dict.txt",
                         check=False)
    assert entries(tmp_path) == set()


def test_existing_output_needs_force(converted_cls, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="already exists.*--force"):
        pipeline.convert(fixture_data.infer_tar(CLS), out=out)
    assert entries(out) == {"keep.txt"}


def test_disk_write_failure_leaves_no_partial_output(tmp_path, monkeypatch):
    def failing_save(*args, **kwargs):
        Path(args[0]).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline, "write_safetensors", failing_save)
    with pytest.raises(OutputError, match="No space left on device"):
        pipeline.convert(fixture_data.infer_tar(CLS), out=tmp_path / "x", check=False)
    assert entries(tmp_path) == set()
    # With --force the old output survives a failed rewrite untouched.
    monkeypatch.undo()
    old = pipeline.convert(fixture_data.infer_tar(CLS), out=tmp_path / "old", check=False).out
    before = (old / "model.safetensors").read_bytes()
    monkeypatch.setattr(pipeline, "write_safetensors", failing_save)
    with pytest.raises(OutputError):
        pipeline.convert(fixture_data.infer_tar(CLS), out=old, force=True, check=False)
    assert entries(tmp_path) == {"old"} and (old / "model.safetensors").read_bytes() == before


def test_force_replaces_an_existing_output(tmp_path):
    out = tmp_path / "out"
    pipeline.convert(fixture_data.infer_tar(CLS), out=out, check=False, dtype="float16")
    (out / "parity.json").write_text("{}")
    result = pipeline.convert(fixture_data.infer_tar(CLS), out=out, force=True, check=False)
    assert result.parity is None and entries(out) == {"model.safetensors", "config.json"}
    assert pipeline.read_output_metadata(out)["dtype"] == "float32"
    assert entries(tmp_path) == {"out"}
    # An empty directory is replaced as well: nothing in it can be lost.
    (tmp_path / "empty").mkdir()
    pipeline.convert(fixture_data.infer_tar(CLS), out=tmp_path / "empty", force=True, check=False)
    assert entries(tmp_path / "empty") == {"model.safetensors", "config.json"}


def _not_ocrconv_outputs(tmp_path: Path) -> dict[str, Path]:
    """Paths --force must never replace, each holding something of the user's."""
    user_dir = tmp_path / "victim"
    user_dir.mkdir()
    (user_dir / "thesis.tex").write_text("years of work")
    mixed = pipeline.convert(fixture_data.infer_tar(CLS), out=tmp_path / "mixed", check=False).out
    (mixed / "notes.txt").write_text("mine")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(foreign / "model.safetensors"), metadata={"format": "pt"})
    (foreign / "config.json").write_text("{}")
    a_file = tmp_path / "afile"
    a_file.write_text("not a directory")
    link = tmp_path / "link"
    link.symlink_to(user_dir)
    return {"user_dir": user_dir, "mixed": mixed, "foreign": foreign, "file": a_file, "link": link}


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", ["user_dir", "mixed", "foreign", "file", "link"])
def test_force_refuses_to_replace_anything_but_an_ocrconv_output(case, tmp_path):
    target = _not_ocrconv_outputs(tmp_path)[case]
    before = _snapshot(tmp_path)
    with pytest.raises(OutputError, match="--force replaces only"):
        pipeline.convert(fixture_data.infer_tar(CLS), out=target, force=True, check=False)
    assert _snapshot(tmp_path) == before  # nothing replaced, no temp or .old- directory left


@pytest.mark.parametrize("out", [".", "..", "{cwd}"])
def test_force_refuses_the_current_directory_and_its_parents(out, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "mine.txt").write_text("mine")
    monkeypatch.chdir(work)
    before = _snapshot(tmp_path)
    res = CliRunner().invoke(main, ["convert", str(fixture_data.infer_tar(CLS)), "--out", out.format(cwd=work),
                                    "--force", "--no-check"])
    assert res.exit_code == 1 and "error:" in res.output and "current directory" in res.output, res.output
    assert isinstance(res.exception, SystemExit), res.exception
    assert _snapshot(tmp_path) == before


def test_missing_paddle_skips_parity_in_convert_and_fails_check(converted_cls, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "paddle", None)
    result = pipeline.convert(fixture_data.infer_tar(CLS), out=tmp_path / "x", check=True)
    assert result.parity is None and "pip install 'ocrconv[parity]'" in result.parity_skipped
    assert entries(result.out) == {"model.safetensors", "config.json"}
    with pytest.raises(ParityError, match=r"pip install 'ocrconv\[parity\]'"):
        pipeline.check(converted_cls.out)
    runner = CliRunner()
    res = runner.invoke(main, ["check", str(converted_cls.out)])
    assert res.exit_code == 1 and "error: the parity check needs PaddlePaddle" in res.output


# ---------------------------------------------------------------------------------------------------- CLI

def test_cli_convert_writes_output_and_reports(tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    res = runner.invoke(main, ["convert", str(fixture_data.infer_tar(CLS)), "--out", str(out), "--no-check"])
    assert res.exit_code == 0, res.output
    assert f"-> {out}" in res.output and "family ppocr_mobile_v2.0_cls" in res.output
    assert (out / "model.safetensors").is_file()
    again = runner.invoke(main, ["convert", str(fixture_data.infer_tar(CLS)), "--out", str(out), "--no-check"])
    assert again.exit_code == 1 and "error: output directory" in again.output
    unknown = runner.invoke(main, ["convert", "ch_PP-OCRv4_dett", "--no-check"])
    assert unknown.exit_code == 1 and "unknown model" in unknown.output
    usage = runner.invoke(main, ["convert"])
    assert usage.exit_code == 2 and "NAME|PATH" in usage.output


@pytest.mark.paddle
def test_cli_check_prints_the_table_and_rewrites_parity_json(converted_cls):
    before = (converted_cls.out / "parity.json").stat().st_mtime_ns
    res = CliRunner().invoke(main, ["check", str(converted_cls.out)])
    assert res.exit_code == 0, res.output
    assert "PASS: max abs diff" in res.output and "rendered text line" in res.output
    assert (converted_cls.out / "parity.json").stat().st_mtime_ns >= before
    data = json.loads((converted_cls.out / "parity.json").read_text())
    assert data["passed"]


def test_config_json_states_its_format_version(converted_cls):
    assert json.loads((converted_cls.out / "config.json").read_text())["format_version"] == 1


@pytest.mark.paddle
def test_cli_prints_architecture_errors_without_a_traceback(converted_cls, tmp_path):
    """``check DIR`` on an output written by a newer ocrconv: the message of ``architectures``, exit 1."""
    newer = tmp_path / "newer"
    newer.mkdir()
    for path in converted_cls.out.iterdir():
        (newer / path.name).write_bytes(path.read_bytes())
    config = json.loads((newer / "config.json").read_text())
    (newer / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    res = CliRunner().invoke(main, ["check", str(newer)])
    assert res.exit_code == 1
    assert "format_version 99, newer than this copy of `architectures`" in res.output
    assert res.exc_info[0] is SystemExit  # printed, not raised


@pytest.mark.paddle
def test_check_fails_a_wrong_class_bias_that_probabilities_hide(converted_rec, tmp_path):
    """A review found this passing: the blank class's bias raised by half (its probability +66 %) moves the
    probabilities of a 6625-class head by 1e-4 at most, within 32 x the float32 floor; the relative limit fails it."""
    from safetensors.torch import load_file, save_file

    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for path in converted_rec.out.iterdir():
        (wrong / path.name).write_bytes(path.read_bytes())
    with safe_open(str(wrong / "model.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(wrong / "model.safetensors"))
    tensors["head.fc.bias"][0] *= 1.5
    save_file(tensors, str(wrong / "model.safetensors"), metadata=metadata)
    report = pipeline.check(wrong, reference=fixture_data.infer_tar(REC), write=False)
    assert not report.passed
    random_cases = [c for c in report.to_dict()["cases"] if c["input"].startswith("random")]
    assert all(o["max_abs_diff"] < 3e-4 and o["max_rel_diff"] > 0.5 for c in random_cases for o in c["outputs"])


@pytest.mark.paddle
def test_check_name_converts_in_memory(mirror_env):
    report = pipeline.check(CLS)
    assert report.passed and report.to_dict()["task"] == "cls"


@pytest.mark.paddle
@pytest.mark.real
def test_real_cls_model_from_rapidocr(real_models, tmp_path):
    result = pipeline.convert(real_models / "ch_ppocr_mobile_v2_cls_infer", out=tmp_path / "cls")
    assert result.family == CLS_FAMILY and any("detected" in n for n in result.notes)
    assert result.parity["passed"] and result.max_abs_diff <= 1e-5
    digest = hashlib.sha256((real_models / "ch_ppocr_mobile_v2_cls_infer" / "inference.pdiparams").read_bytes())
    assert result.source_sha256 == digest.hexdigest()


@pytest.mark.paddle
@pytest.mark.slow
def test_train_form_of_a_v4_checkpoint_keeps_the_branches_and_passes_parity(tmp_path):
    row = "ch_PP-OCRv4_det"
    result = pipeline.convert(fixture_data.train_tar(row), out=tmp_path / "train", train_form=True,
                              reference=fixture_data.infer_tar(row))
    assert (result.artifact, result.form, result.status) == ("trained", "train", "converted")
    config = json.loads((result.out / "config.json").read_text())
    assert config["form"] == "train" and config["ocrconv"]["form"] == "train"
    with safe_open(str(result.out / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert any(".conv_kxk." in k for k in keys) and not any("reparam_conv" in k for k in keys)
    data = json.loads((result.out / "parity.json").read_text())
    assert data["passed"] and data["tolerance"]["atol"] == pipeline.ATOL_TRAIN_FORM
    weights = data["weights_vs_inference"]  # compared in the deploy form: the release holds fused convs
    assert weights["identical"] and weights["max_abs_diff"] < 1e-5
    assert all(k.startswith("head.thresh.") for k in weights["only_trained"])
    with pytest.raises(FamilyError, match="cannot convert to the training form"):
        pipeline.convert(fixture_data.infer_tar(row), out=tmp_path / "x", train_form=True, check=False)


def test_unrecognised_local_checkpoint_asks_for_a_family(tmp_path):
    ckpt = tmp_path / "my_model.pdparams"
    ckpt.write_bytes(pickle.dumps({"foo.weight": np.zeros((3, 3), np.float32)}, protocol=2))
    with pytest.raises(FamilyError, match="pass --family, one of: .*PP-OCRv4_mobile_det.*ppocr_mobile_v2.0_cls"):
        pipeline.convert(ckpt, out=tmp_path / "x")
    assert entries(tmp_path) == {ckpt.name}


def test_from_pretrained_converts_a_name_once_into_the_cache(mirror_env):
    from architectures import from_pretrained

    model = from_pretrained(CLS)
    out = mirror_env / "converted" / CLS
    assert not model.training and (out / "model.safetensors").is_file()
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    again = from_pretrained(CLS)
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    x = torch.from_numpy(fixture_data.expected(CLS)["x0"])
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    assert from_pretrained(out).ocrconv_config["family"] == CLS_FAMILY


@pytest.mark.paddle
def test_check_of_a_named_output_fetches_its_inference_model_through_the_cache(mirror_env, tmp_path):
    result = pipeline.convert(CLS, out=tmp_path / "named", check=False)
    assert not (result.out / "parity.json").exists()
    report = pipeline.check(result.out)
    assert report.passed and report.to_dict()["reference_program"].startswith(str(mirror_env))
    assert json.loads((result.out / "parity.json").read_text())["passed"]


# ------------------------------------------------------------------------------- names, paths and options

def test_archive_stem_converts_that_archive(mirror, mirror_env, tmp_path):
    trained = pipeline._manifest().get_model(CLS).artifacts["trained"]
    result = pipeline.convert(f"{CLS}_train", out=tmp_path / "named", check=False)
    assert (result.artifact, result.name) == ("trained", CLS)
    assert result.source == trained.url and mirror.requests_for(trained.url)
    assert f"artifact: trained (named by {CLS}_train)" in result.notes
    # --artifact still wins over what the name implies, as for `ocrconv download`
    explicit = pipeline.convert(f"{CLS}_train", out=tmp_path / "explicit", artifact="inference", check=False)
    assert explicit.artifact == "inference"


@pytest.mark.paddle
def test_check_of_an_archive_stem_checks_that_archive(mirror, mirror_env):
    trained = pipeline._manifest().get_model(CLS).artifacts["trained"]
    report = pipeline.check(f"{CLS}_train")
    assert report.passed and mirror.requests_for(trained.url)


def test_missing_local_path_is_not_looked_up_as_a_model_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for target in ("/nonexistent/path.pdparams", "missing_dir/inference", "my_model.pdparams"):
        with pytest.raises(OcrconvError, match="no such file or directory") as caught:
            pipeline.convert(target, check=False)
        assert not isinstance(caught.value, UnknownModelError)
    runner = CliRunner()
    for args in (["convert", "/nonexistent/path.pdparams", "--no-check"], ["check", "/nonexistent/dir"],
                 ["info", "/nonexistent/path.pdparams"]):
        res = runner.invoke(main, args)
        assert res.exit_code == 1 and "/nonexistent/" in res.output, res.output
        assert "no such file or directory" in res.output and "unknown model" not in res.output, res.output
    assert entries(tmp_path) == set()


def test_inference_prefix_path_converts(tmp_path):
    import tarfile

    with tarfile.open(fixture_data.infer_tar(CLS)) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    prefix = next((tmp_path / "unpacked").rglob("inference.pdmodel")).with_suffix("")
    result = pipeline.convert(prefix, out=tmp_path / "out", check=False)
    assert (result.name, result.family) == (CLS, CLS_FAMILY)


@pytest.mark.paddle
def test_check_of_an_output_from_a_local_directory_uses_that_directory(tmp_path, monkeypatch):
    """The directory's program prefix (``.../inference``) is recorded, which is no file: `check DIR` went to the
    manifest row of the same name (a download; offline an error) instead of the model it was converted from."""
    import tarfile

    with tarfile.open(fixture_data.infer_tar(CLS)) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    folder = next((tmp_path / "unpacked").rglob("inference.pdmodel")).parent
    pipeline.convert(folder, out=tmp_path / "out", check=False)
    monkeypatch.setenv("OCRCONV_CACHE", str(tmp_path / "empty-cache"))
    report = pipeline.check(tmp_path / "out", offline=True)
    assert report.passed and report.data["reference_program"].startswith(str(folder))


def test_output_path_below_a_file_is_an_error_not_a_traceback(tmp_path):
    (tmp_path / "afile").write_text("x")
    res = CliRunner().invoke(main, ["convert", str(fixture_data.infer_tar(CLS)), "--out",
                                    str(tmp_path / "afile" / "sub"), "--no-check"])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.exception
    assert "error: cannot create the output directory" in res.output and "is not a directory" in res.output
    assert entries(tmp_path) == {"afile"}


@pytest.mark.parametrize("command", ["convert", "check"])
def test_cache_and_mirror_options_are_validated_before_any_work(command, tmp_path, monkeypatch):
    monkeypatch.delenv("OCRCONV_MIRROR", raising=False)
    monkeypatch.delenv("OCRCONV_CACHE", raising=False)
    (tmp_path / "afile").write_text("x")
    runner = CliRunner()
    extra = ["--no-check"] if command == "convert" else []
    res = runner.invoke(main, [command, CLS, "--cache", str(tmp_path / "afile"), *extra])
    assert res.exit_code == 2 and "Invalid value for '--cache'" in res.output and "is a file" in res.output
    for bad in ("not-a-url", "ftp://host/x", "http://"):
        res = runner.invoke(main, [command, CLS, "--mirror", bad, "--cache", str(tmp_path / "cache"), *extra])
        assert res.exit_code == 2 and "Invalid value for '--mirror'" in res.output, res.output
    res = runner.invoke(main, [command, CLS, "--cache", str(tmp_path / "cache"), *extra],
                        env={"OCRCONV_MIRROR": "not-a-url"})
    assert res.exit_code == 2 and "not an http:// or https:// URL" in res.output
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("command", ["convert", "check"])
@pytest.mark.parametrize("atol", ["-1", "nan", "inf"])
def test_atol_must_be_a_finite_non_negative_number(command, atol):
    res = CliRunner().invoke(main, [command, CLS, "--atol", atol])
    assert res.exit_code == 2 and "Invalid value for '--atol'" in res.output, res.output


def test_library_refuses_a_non_finite_tolerance(tmp_path):
    with pytest.raises(OcrconvError, match="finite number >= 0"):
        pipeline.convert(fixture_data.infer_tar(CLS), out=tmp_path / "x", atol=float("nan"))
    assert entries(tmp_path) == set()


# -------------------------------------------------------------------------------------------------- float16

def _cls_checkpoint_with(tmp_path: Path, key_part: str, value: float) -> tuple[Path, str]:
    """The cls trained checkpoint re-pickled with every element of one BN variance set to ``value``."""
    weights = paddle_io.load(fixture_data.train_tar(CLS))
    arrays = {k: np.array(v) for k, v in weights.items()}
    key = next(k for k in arrays if key_part in k)
    arrays[key] = np.full_like(arrays[key], value)
    folder = tmp_path / f"{CLS}_train"
    folder.mkdir()
    (folder / "best_accuracy.pdparams").write_bytes(pickle.dumps(arrays, protocol=2))
    return folder / "best_accuracy.pdparams", key


def test_float16_refuses_weights_beyond_its_range(tmp_path):
    ckpt, key = _cls_checkpoint_with(tmp_path, "_variance", 1e6)
    with pytest.raises(OutputError, match=r"exceed the float16 range.*max \|value\| 1e\+06.*--dtype float32") as caught:
        pipeline.convert(ckpt, out=tmp_path / "half", dtype="float16", check=False)
    assert "running_var" in str(caught.value)
    assert entries(tmp_path) == {ckpt.parent.name}
    assert pipeline.convert(ckpt, out=tmp_path / "full", check=False).status == "converted"  # float32 holds it


@pytest.mark.real
def test_float16_of_the_real_v4_det_is_refused(real_models, tmp_path):
    with pytest.raises(OutputError, match=r"head\.binarize\.conv_bn1\.running_var \(max \|value\| 9\.79e\+07\)"):
        pipeline.convert(real_models / "ch_PP-OCRv4_det_infer", family="PP-OCRv4_mobile_det", out=tmp_path / "d",
                         dtype="float16", check=False)
    assert entries(tmp_path) == set()


@pytest.mark.paddle
def test_float16_effect_beyond_its_limit_fails_the_conversion(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "FLOAT16_ATOL", 1e-9)  # the cls fixture moves by ~1e-3 in float16
    out = tmp_path / "half"
    res = CliRunner().invoke(main, ["convert", str(fixture_data.infer_tar(CLS)), "--out", str(out),
                                    "--dtype", "float16"])
    assert res.exit_code == 1 and "parity check failed (float16 weights move the outputs by up to" in res.output
    assert "use --dtype float32" in res.output and "FAIL: max abs diff" in res.output
    data = json.loads((out / "parity.json").read_text())
    assert not data["passed"] and data["float16_weights"]["passed"] is False
    assert data["float16_weights"]["limit"] == 1e-9 and data["max_abs_diff"] <= 1e-5  # float32 itself passed
    assert pipeline.parity_failure(data).startswith("float16 weights move the outputs")
