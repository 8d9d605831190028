"""The model manifest: generation from the table, its defects, lookup, and ``ocrconv list``."""
from __future__ import annotations

import csv
import importlib.util
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

import fixture_data
from converter.cli import main
from converter.errors import OcrconvError, UnknownModelError
from converter.manifest import (PACKAGE_MANIFEST, REPO_MANIFEST, load_manifest, manifest_path, read_manifest)

TABLE = fixture_data.SHARED / "seeds" / "models_list.md"
REFERENCE = fixture_data.SHARED / "REFERENCE.md"
FAMILIES = {
    "ppocr_mobile_v2.0_det", "ppocr_server_v2.0_det", "PP-OCRv2_det", "PP-OCRv3_det", "PP-OCRv4_mobile_det",
    "PP-OCRv4_server_det", "ppocr_mobile_v2.0_rec", "ppocr_server_v2.0_rec", "PP-OCRv2_rec", "PP-OCRv3_rec",
    "PP-OCRv4_mobile_rec", "PP-OCRv4_server_rec", "ppocr_mobile_v2.0_cls",
}
HOST = "https://paddleocr.bj.bcebos.com"


@pytest.fixture(scope="module")
def builder():
    spec = importlib.util.spec_from_file_location(
        "build_manifest", Path(__file__).resolve().parents[1] / "scripts" / "build_manifest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def table_text() -> str:
    if not TABLE.is_file():
        pytest.skip(f"{TABLE} not found")
    return TABLE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def built(builder, table_text):
    return builder.build_rows(table_text, REFERENCE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def rows() -> list[dict[str, str]]:
    with open(REPO_MANIFEST, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def manifest():
    return load_manifest()


def test_committed_manifest_is_regenerated_identically(builder, built):
    rows, _fixes = built
    text = builder.render_csv(rows)
    assert REPO_MANIFEST.read_text(encoding="utf-8") == text
    assert PACKAGE_MANIFEST.read_bytes() == REPO_MANIFEST.read_bytes()
    assert manifest_path() == PACKAGE_MANIFEST


def test_one_row_per_unique_table_url(rows, table_text):
    table_urls = set(re.findall(r"https://[^)\s]+\.tar", table_text))
    assert len(table_urls) == 100
    assert len(rows) == 100
    assert len({r["url"] for r in rows}) == 100
    assert {r["url"] for r in rows} == table_urls
    assert len({r["filename"] for r in rows}) == 100
    for r in rows:
        assert r["url"].startswith(HOST + "/") and r["url"].endswith("/" + r["filename"])
        assert r["task"] in ("det", "rec", "cls") and r["artifact"] in ("inference", "trained", "pretrained")
        assert r["family"] in FAMILIES
        if r["task"] == "rec":
            assert r["dict"].endswith(".txt") and re.fullmatch(r"[0-9a-f]{64}", r["dict_sha256"]), r["name"]
        else:
            assert r["dict"] == r["dict_sha256"] == ""


def test_every_family_and_task_is_covered(manifest):
    assert {e.family for e in manifest} == FAMILIES
    assert len(manifest) == 49
    assert [e.name for e in manifest.by_task("det")] == [
        "ch_PP-OCRv4_det", "ch_PP-OCRv4_server_det", "ch_PP-OCRv3_det", "ch_ppocr_mobile_v2.0_det",
        "ch_ppocr_server_v2.0_det", "ch_PP-OCRv2_det", "en_PP-OCRv3_det", "ml_PP-OCRv3_det"]
    assert [e.name for e in manifest.by_task("cls")] == ["ch_ppocr_mobile_v2.0_cls"]
    assert manifest.get("en_PP-OCRv3_det").family == manifest.get("ml_PP-OCRv3_det").family == "PP-OCRv3_det"
    assert manifest.get("en_PP-OCRv4_rec").family == "PP-OCRv4_mobile_rec"
    assert manifest.get("en_number_mobile_v2.0_rec").family == "ppocr_mobile_v2.0_rec"
    assert set(manifest.get("ch_ppocr_server_v2.0_rec").artifacts) == {"inference", "trained", "pretrained"}


def test_duplicated_rows_are_merged_and_reported(built, table_text, manifest):
    rows, fixes = built
    assert table_text.count("|en_number_mobile_v2.0_rec|") == 2
    en_number = [r for r in rows if r["name"] == "en_number_mobile_v2.0_rec"]
    assert [r["artifact"] for r in en_number] == ["inference", "trained"]
    assert {r["size_hint"] for r in en_number} == {"2.6M"}  # the hosted v2.1 listing
    for lang in ("french", "german", "korean", "japan", "te", "ta"):
        name = f"{lang}_mobile_v2.0_rec"
        assert len(re.findall(rf"\| {name}\s+\|", table_text)) == 2
        assert [r["artifact"] for r in rows if r["name"] == name] == ["inference", "trained"]
        assert manifest.get(name).section.endswith("release/2.0")
        assert any(f.startswith(f"duplicate-row: {name}:") for f in fixes)
    assert any(f.startswith("duplicate-row: en_number_mobile_v2.0_rec:") for f in fixes)


def test_broken_link_is_recovered_and_reported(built, table_text, manifest):
    _rows, fixes = built
    assert "|3.8M|inference model](https://paddleocr.bj.bcebos.com/PP-OCRv3/chinese/ch_PP-OCRv3_det_infer.tar)" \
        in table_text
    entry = manifest.get("ch_PP-OCRv3_det")
    assert entry.artifacts["inference"].url == f"{HOST}/PP-OCRv3/chinese/ch_PP-OCRv3_det_infer.tar"
    assert entry.artifacts["trained"].url == f"{HOST}/PP-OCRv3/chinese/ch_PP-OCRv3_det_distill_train.tar"
    assert [f for f in fixes if f.startswith("broken-link:")] == [
        f for f in fixes if f.startswith("broken-link: ch_PP-OCRv3_det:")]
    assert len([f for f in fixes if f.startswith("broken-link:")]) == 1


@pytest.mark.parametrize("lang", ["latin", "arabic", "cyrillic", "devanagari"])
def test_table_name_differs_from_archives(built, manifest, lang):
    _rows, fixes = built
    entry = manifest.get(f"{lang}_mobile_v2.0_rec")
    assert entry.aliases == (f"{lang}_ppocr_mobile_v2.0_rec",)
    assert entry.artifacts["inference"].filename == f"{lang}_ppocr_mobile_v2.0_rec_infer.tar"
    assert entry.artifacts["trained"].filename == f"{lang}_ppocr_mobile_v2.0_rec_train.tar"
    assert manifest.get(f"{lang}_ppocr_mobile_v2.0_rec") is entry
    assert manifest.resolve(f"{lang}_ppocr_mobile_v2.0_rec_train") == (entry, "trained")
    assert any(f.startswith(f"name-mismatch: {lang}_mobile_v2.0_rec:") for f in fixes)
    assert entry.dict == f"dict/{lang}_dict.txt"


@pytest.mark.parametrize("alias, canonical", [("ch_tra", "chinese_cht"), ("kn", "ka")])
def test_two_names_for_one_language_keep_both_archives(built, manifest, alias, canonical):
    _rows, fixes = built
    a = manifest.get(f"{alias}_mobile_v2.0_rec")
    b = manifest.get(f"{canonical}_mobile_v2.0_rec")
    assert a is not b
    assert a.artifacts["inference"].url != b.artifacts["inference"].url
    assert a.language == b.language == canonical
    assert (a.same_language_as, b.same_language_as) == (b.name, a.name)
    assert a.dict == b.dict == f"dict/{'chinese_cht' if canonical == 'chinese_cht' else 'ka'}_dict.txt"
    assert a.dict_sha256 == b.dict_sha256
    assert any(f.startswith(f"same-language: {a.name} and {b.name}") for f in fixes)


def test_ppocrv2_rec_keeps_table_url_and_records_alternative(built, manifest):
    _rows, fixes = built
    art = manifest.get("ch_PP-OCRv2_rec").artifacts["inference"]
    assert art.url == f"{HOST}/PP-OCRv2/chinese/ch_PP-OCRv2_infer.tar"
    assert art.alt_urls == (f"{HOST}/PP-OCRv2/chinese/ch_PP-OCRv2_rec_infer.tar",)
    assert art.urls == (art.url, *art.alt_urls)
    assert manifest.resolve("ch_PP-OCRv2_rec_infer") == (manifest.get("ch_PP-OCRv2_rec"), "inference")
    assert any(f.startswith("alt-url: ch_PP-OCRv2_rec inference:") for f in fixes)
    assert sum(1 for _e, a in manifest.archives if a.alt_urls) == 1


def test_an_unknown_table_defect_stops_the_build(builder, table_text):
    reference = REFERENCE.read_text(encoding="utf-8")
    row = next(line for line in table_text.splitlines() if line.startswith("|ch_PP-OCRv4_det|"))
    with pytest.raises(builder.TableError, match="ch_PP-OCRv4_det is listed 2 times"):
        builder.build_rows(table_text.replace(row, row + "\n" + row), reference)
    broken = row.replace("[trained model]", "trained model]")
    with pytest.raises(builder.TableError, match="unexpected broken link"):
        builder.build_rows(table_text.replace(row, broken), reference)
    with pytest.raises(builder.TableError, match="ch_PP-OCRv2_rec inference: expected the table URL"):
        builder.build_rows(table_text.replace("ch_PP-OCRv2_infer.tar", "ch_PP-OCRv2_rec_infer.tar"), reference)


def test_recognition_dictionaries_are_the_training_era_files(manifest):
    # values from REFERENCE.md §1 (paddleocr 2.0.6 for the v2.0 rows; the newer files are wrong for them)
    expect = {
        "german_mobile_v2.0_rec": ("dict/german_dict.txt",
                                   "79f9988bf85879b0ded6204c0aadfca91eb86f1e4c98268be7fe194ccc670962"),
        "ug_mobile_v2.0_rec": ("dict/ug_dict.txt", "149fd4076d7aaacf9223f218c0a5f2c800c2f4c22309ba40f7aced229e81ed3d"),
        "kn_mobile_v2.0_rec": ("dict/ka_dict.txt", "eda0e31e10ab72afc7ef9858ee0d8de8bf13e4ffe014b6737faebffb80c1715e"),
        "ta_mobile_v2.0_rec": ("dict/ta_dict.txt", "232cde4872dd465c3da4a2ab39e7e489361d4755b44b7260d53a5e5cc9396a9a"),
        "arabic_mobile_v2.0_rec": ("dict/arabic_dict.txt",
                                   "c5b6970f5e115a4d15a5cedf007a5ea61bacce9d63f908b72160b856b14abbbd"),
        "es_mobile_v2.0_rec": ("dict/xi_dict.txt", "d665d9df4d49f96ff3cd1dcf2d53084d00fe1670747dd9a93b58b9dda10efa15"),
        "en_number_mobile_v2.0_rec": ("en_dict.txt",
                                      "5662df9d2d03f0e8ca0d3b0649d6acbab904b6a14b3d3521463c71c37c668ce3"),
        "ch_PP-OCRv4_server_rec": ("ppocr_keys_v1.txt",
                                   "28b2362ad4ab2dc38769aa72feb535e3a9ddb3fd2a7585a05920e6393b1dc7f7"),
    }
    for name, (path, sha) in expect.items():
        entry = manifest.get(name)
        assert (entry.dict, entry.dict_sha256) == (path, sha), name
    multilingual = [e for e in manifest if e.section.endswith(("release/2.0", "release/2.1"))]
    assert len(multilingual) == 31 and all(e.dict.startswith("dict/") for e in multilingual)


@pytest.mark.parametrize("typed, name, kind", [
    ("ch_PP-OCRv4_rec", "ch_PP-OCRv4_rec", None),
    ("ch_PP-OCRv4_rec_infer", "ch_PP-OCRv4_rec", "inference"),
    ("ch_PP-OCRv4_det_server_infer", "ch_PP-OCRv4_server_det", "inference"),
    ("ch_PP-OCRv4_det_server", "ch_PP-OCRv4_server_det", None),
    ("ch_PP-OCRv4_rec_server_train.tar", "ch_PP-OCRv4_server_rec", "trained"),
    ("Multilingual_PP-OCRv3_det_infer", "ml_PP-OCRv3_det", "inference"),
    ("ch_PP-OCRv3_det_distill_train", "ch_PP-OCRv3_det", "trained"),
    ("ch_ppocr_mobile_v2.0_rec_pre", "ch_ppocr_mobile_v2.0_rec", "pretrained"),
    ("CH_PP-OCRV4_REC", "ch_PP-OCRv4_rec", None),
])
def test_lookup_by_the_names_people_type(manifest, typed, name, kind):
    entry, implied = manifest.resolve(typed)
    assert (entry.name, implied) == (name, kind)
    assert typed in manifest


def test_unknown_name_lists_nearest(manifest):
    with pytest.raises(UnknownModelError) as info:
        manifest.get("ch_PP-OCRv4_rek")
    assert isinstance(info.value, OcrconvError)
    assert "'ch_PP-OCRv4_rek'" in str(info.value) and "nearest: ch_PP-OCRv4_rec" in str(info.value)
    with pytest.raises(UnknownModelError, match="ch_PP-OCRv4_det has no 'pretrained' archive; it has: inference, "
                                                "trained"):
        manifest.get("ch_PP-OCRv4_det").artifact("pretrained")


def test_manifest_loads_from_any_copy(tmp_path):
    copy = tmp_path / "m.csv"
    copy.write_bytes(REPO_MANIFEST.read_bytes())
    loaded = read_manifest(copy)
    assert [e.name for e in loaded] == [e.name for e in load_manifest()]
    assert loaded.source == copy


def test_cli_list(manifest):
    runner = CliRunner()
    result = runner.invoke(main, ["list", "--task", "det"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["name", "task", "family"]
    assert [line.split()[0] for line in lines[1:]] == [e.name for e in manifest.by_task("det")]
    assert "PP-OCRv4_server_det" in lines[2] and lines[2].endswith("inference,trained")
    result = runner.invoke(main, ["list", "--json"])
    assert result.exit_code == 0
    data = json.loads(result.output)
    assert len(data) == 49 and sum(len(d["artifacts"]) for d in data) == 100
    v2 = next(d for d in data if d["name"] == "ch_PP-OCRv2_rec")
    assert v2["artifacts"]["inference"]["alt_urls"] == [f"{HOST}/PP-OCRv2/chinese/ch_PP-OCRv2_rec_infer.tar"]
    assert v2["family"] == "PP-OCRv2_rec" and v2["dict"] == "ppocr_keys_v1.txt"
