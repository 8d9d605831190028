"""Vendored PaddleOCR dictionaries: integrity, PaddleOCR's parsing, class-count resolution, manifest rows."""
from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest

import fixture_data
from converter import dictionaries
from converter.errors import DictionaryError

REFERENCE = fixture_data.SHARED / "REFERENCE.md"


def reference_rows() -> list[dict]:
    """REFERENCE.md §1's table rows for the wheels we vendor from (2.0.6 / 2.7.3)."""
    rows = []
    for line in REFERENCE.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 8 or not re.fullmatch(r"`[0-9a-f]{64}`", cells[7]):
            continue
        model, path, wheel, n_lines, n_points, by_line, by_point, sha = cells
        if wheel not in ("2.0.6", "2.7.3"):
            continue
        rows.append({"model": model, "path": f"ppocr/utils/{path}", "lines": int(n_lines), "code_points": int(n_points),
                     "by_line": [int(v) for v in by_line.split("/")], "by_point": [int(v) for v in by_point.split("/")],
                     "sha256": sha.strip("`")})
    return rows


@pytest.fixture(scope="module")
def ref_rows():
    if not REFERENCE.is_file():
        pytest.skip(f"{REFERENCE} not found")
    rows = reference_rows()
    assert len(rows) >= 35
    return rows


def test_license_and_notice_ship_with_the_files():
    assert "Apache License" in (dictionaries.DICT_ROOT / "LICENSE").read_text()
    notice = (dictionaries.DICT_ROOT / "NOTICE").read_text()
    assert "paddleocr==2.0.6" in notice and "Apache" in notice


def test_index_matches_every_vendored_file():
    files = {p.relative_to(dictionaries.DICT_ROOT).as_posix() for p in dictionaries.DICT_ROOT.rglob("*.txt")}
    assert files == set(dictionaries.vendored())
    for entry in dictionaries.vendored().values():
        data = entry.path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry.sha256, entry.name
        lines = dictionaries.parse_lines(data)
        assert (len(lines), len("".join(lines))) == (entry.lines, entry.code_points), entry.name


def test_counts_and_hashes_agree_with_reference(ref_rows):
    table = dictionaries.vendored()
    for row in ref_rows:
        entry = table[row["path"]]
        assert entry.sha256 == row["sha256"], row["model"]
        assert (entry.lines, entry.code_points) == (row["lines"], row["code_points"]), row["model"]


def test_every_reference_head_size_resolves(ref_rows):
    for row in ref_rows:
        lines, entry = dictionaries.load_vendored(row["path"])
        for space, n in zip((False, True), row["by_line"] if len(row["by_line"]) == 2 else [None, row["by_line"][0]]):
            if n is None:
                continue
            got = dictionaries.resolve(lines, n, source=entry.name, sha256=entry.sha256, prefer="lines")
            assert got.num_classes == n and got.mode == "lines" and got.use_space_char is space, row["model"]
        for space, n in zip((False, True), row["by_point"] if len(row["by_point"]) == 2 else [None, row["by_point"][0]]):
            if n is None:
                continue
            got = dictionaries.resolve(lines, n, source=entry.name, sha256=entry.sha256, prefer="code_points")
            assert got.num_classes == n and got.mode == "code_points" and got.use_space_char is space, row["model"]


def test_two_code_point_line_is_split_only_in_code_point_mode():
    lines, entry = dictionaries.load_vendored("dict/german_dict.txt")
    assert (entry.lines, entry.code_points) == (143, 144)
    as_lines = dictionaries.resolve(lines, 144, source=entry.name, sha256=entry.sha256)
    assert as_lines.mode == "lines" and not as_lines.use_space_char and "p\t" in as_lines.characters
    as_points = dictionaries.resolve(lines, 146, source=entry.name, sha256=entry.sha256)
    assert as_points.mode == "code_points" and as_points.use_space_char
    assert "\t" in as_points.characters and as_points.characters[-1] == " "
    # 145 fits both "lines + space" and "code points without space": the 2.0-era preference decides, the
    # other reading is recorded.
    era = dictionaries.resolve(lines, 145, source=entry.name, sha256=entry.sha256,
                               prefer=dictionaries.preferred_mode("ppocr_mobile_v2.0_rec"))
    assert (era.mode, era.use_space_char, era.alternatives) == ("code_points", False, ["lines + space"])
    modern = dictionaries.resolve(lines, 145, source=entry.name, sha256=entry.sha256,
                                  prefer=dictionaries.preferred_mode("PP-OCRv4_mobile_rec"))
    assert (modern.mode, modern.use_space_char) == ("lines", True)


def test_head_size_outside_the_accepted_set_is_refused():
    lines, entry = dictionaries.load_vendored("ppocr_keys_v1.txt")
    with pytest.raises(DictionaryError) as err:
        dictionaries.resolve(lines, 6626, source=entry.name, sha256=entry.sha256)
    message = str(err.value)
    assert "6626" in message and "6624 / 6625" in message and "ppocr_keys_v1.txt" in message


def test_names_are_canonicalised_and_unknown_names_suggest_nearest():
    expected = "ppocr/utils/dict/french_dict.txt"
    for spelling in ("dict/french_dict.txt", expected, "paddleocr/ppocr/utils/dict/french_dict.txt", "french_dict"):
        assert dictionaries.canonical_name(spelling) == expected
    assert dictionaries.canonical_name("en_dict.txt") == "ppocr/utils/en_dict.txt"
    with pytest.raises(DictionaryError, match="french_dict.txt"):
        dictionaries.canonical_name("frensh_dict")


def test_arabic_dictionary_is_read_right_to_left():
    got = dictionaries.resolve_for_head("dict/arabic_dict.txt", 164, "ppocr_mobile_v2.0_rec")
    assert got.reverse and got.postprocess_facts()["reverse"] is True
    assert not dictionaries.resolve_for_head("dict/ar_dict.txt", 120, "ppocr_mobile_v2.0_rec").reverse


def test_dict_txt_round_trip_keeps_tabs_and_spaces(tmp_path):
    from architectures.pretrained import read_characters

    lines, entry = dictionaries.load_vendored("dict/ru_dict.txt")
    resolved = dictionaries.resolve(lines, 127, source=entry.name, sha256=entry.sha256)
    assert "ы " in resolved.characters and resolved.characters[-1] == " "
    dictionaries.write_dict_txt(resolved.characters, tmp_path / "dict.txt")
    assert read_characters(tmp_path) == resolved.characters


def test_guess_for_head_needs_a_unique_fit():
    assert dictionaries.guess_for_head(6625, "PP-OCRv4_mobile_rec").source == "ppocr/utils/ppocr_keys_v1.txt"
    v4_dicts = ["ppocr_keys_v1.txt", "en_dict.txt"]
    assert dictionaries.guess_for_head(97, "PP-OCRv4_mobile_rec", v4_dicts).source == "ppocr/utils/en_dict.txt"
    with pytest.raises(DictionaryError, match="oc_dict.txt, ppocr/utils/en_dict.txt.*--dict"):
        dictionaries.guess_for_head(97, "ppocr_mobile_v2.0_rec")  # oc (96 lines) fits as well
    with pytest.raises(DictionaryError, match="none"):
        dictionaries.guess_for_head(97, "PP-OCRv4_mobile_rec", ["ppocr_keys_v1.txt"])


def test_every_manifest_rec_row_names_a_vendored_dictionary_with_its_sha256():
    manifest = pytest.importorskip("converter.manifest")
    rec = [e for e in manifest.load_manifest() if e.task == "rec"]
    assert len(rec) >= 40
    table = dictionaries.vendored()
    for entry in rec:
        assert entry.dict, f"{entry.name} has no dictionary"
        assert table[dictionaries.canonical_name(entry.dict)].sha256 == entry.dict_sha256, entry.name


def test_fixture_heads_fit_their_manifest_dictionary():
    manifest = pytest.importorskip("converter.manifest")
    checked = 0
    for row in fixture_data.all_rows():
        entry = manifest.get_model(row)
        npz = fixture_data.EXPECTED / f"{row}.npz"
        if entry.task != "rec" or not npz.is_file():
            continue
        with np.load(npz) as z:
            num_classes = z["y0"].shape[-1]
        resolved = dictionaries.resolve_for_head(entry.dict, num_classes, entry.family)
        assert resolved.num_classes == num_classes and resolved.use_space_char
        checked += 1
    assert checked == 6


@pytest.mark.real
def test_real_v4_rec_head_fits_ppocr_keys(real_models):
    from converter import paddle_io

    weights = paddle_io.load(real_models / "ch_PP-OCRv4_rec_infer")
    ctc_bias = [v for k, v in weights.items() if k.endswith("ctc_head.fc.bias")]
    assert len(ctc_bias) == 1
    resolved = dictionaries.resolve_for_head("ppocr_keys_v1.txt", ctc_bias[0].shape[0], "PP-OCRv4_mobile_rec")
    assert (resolved.num_classes, resolved.mode, resolved.use_space_char) == (6625, "lines", True)


def test_a_tie_goes_to_the_reading_with_the_space_class_where_the_space_never_varied():
    """Ten v2.0 dictionaries have a two-code-point line, so a head of L + 2 also fits "C + 1 code points without
    space". Their models always had the space class (REFERENCE: only french / german / japan / korean flipped
    it), so L + 2 is one class per line + space; taking the code points shifted every class after that line."""
    tied = 0
    for entry in dictionaries.vendored().values():
        if entry.code_points != entry.lines + 1 or entry.name in dictionaries.SPACE_FLAG_VARIES:
            continue
        tied += 1
        at_lines = dictionaries.resolve_for_head(entry.name, entry.lines + 2, "ppocr_mobile_v2.0_rec")
        assert (at_lines.mode, at_lines.use_space_char) == ("lines", True), entry.name
        at_points = dictionaries.resolve_for_head(entry.name, entry.code_points + 2, "ppocr_mobile_v2.0_rec")
        assert (at_points.mode, at_points.use_space_char) == ("code_points", True), entry.name
    assert tied == 9  # ar, be, fa, oc, rsc, uk, ka, ta (p<TAB>) and ru ("ы "); german is the tenth, flag varied
    german = dictionaries.resolve_for_head("dict/german_dict.txt", 145, "ppocr_mobile_v2.0_rec")
    assert (german.mode, german.use_space_char, german.alternatives) == ("code_points", False, ["lines + space"])


def test_the_reading_depends_on_the_bytes_not_on_the_name(tmp_path, monkeypatch):
    """A local copy of ru_dict.txt (``--dict ./ru_dict.txt``) was read another way than the vendored name, and a
    file ``dict/ru_dict.txt`` under the working directory shadowed a manifest row's dictionary."""
    lines, entry = dictionaries.load_vendored("dict/ru_dict.txt")
    copy = tmp_path / "dict" / "ru_dict.txt"
    copy.parent.mkdir()
    copy.write_bytes(entry.path.read_bytes())
    by_name = dictionaries.resolve_for_head("ru_dict", 127, "ppocr_mobile_v2.0_rec")
    by_path = dictionaries.resolve_for_head(copy, 127, "ppocr_mobile_v2.0_rec")
    assert (by_path.mode, by_path.use_space_char, by_path.characters) == \
        (by_name.mode, by_name.use_space_char, by_name.characters) == ("lines", True, by_name.characters)
    copy.write_text("x\n" * 125, encoding="utf-8")  # another file in the working directory, same relative name
    monkeypatch.chdir(tmp_path)
    row = dictionaries.resolve_for_head("dict/ru_dict.txt", 127, "ppocr_mobile_v2.0_rec", vendored_only=True)
    assert row.source == entry.name and row.characters == by_name.characters
