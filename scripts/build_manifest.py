#!/usr/bin/env python3
"""Build ``model_manifest.csv`` from PaddleOCR's model table (``../shared/seeds/models_list.md``).

One CSV row per downloadable archive (100 unique ``.tar`` URLs). The table has known defects; each one is
handled here *by name* and logged, and any defect the script does not know about stops the build, so a changed
table is looked at by a person instead of being guessed at:

* duplicated rows (``en_number_mobile_v2.0_rec`` twice; the release/2.0 and release/2.1 multilingual sections both
  list french/german/korean/japan/te/ta) -> one row per archive, the other listing noted;
* a broken markdown link (``inference model](...)`` on ``ch_PP-OCRv3_det``) -> URL recovered;
* table names that differ from their archive names (``latin_mobile_v2.0_rec`` -> ``latin_ppocr_mobile_v2.0_rec_*.tar``,
  same for arabic / cyrillic / devanagari; also the v4 server and multilingual det naming) -> archive name kept
  as alias;
* two names for one language (``ch_tra`` / ``chinese_cht``, ``kn`` / ``ka``; distinct archives) -> both rows kept,
  same ``language`` and a ``same_language_as`` link;
* ``ch_PP-OCRv2_rec``'s inference URL ``.../ch_PP-OCRv2_infer.tar`` (PaddleOCR's paddleocr.py uses
  ``.../ch_PP-OCRv2_rec_infer.tar``) -> table URL kept, the other recorded in ``alt_urls``.

Recognition rows get their dictionary (path under ``ppocr/utils``) and its sha256 from ``../shared/REFERENCE.md`` §1:
the training-era (paddleocr 2.0.6) files for the v2.0 rows.

Usage: ``python scripts/build_manifest.py [--table PATH] [--reference PATH] [--check]``. Writes
``model_manifest.csv`` at the repository root and the identical package copy ``converter/data/model_manifest.csv``.
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger("build_manifest")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("OCRCONV_SHARED", REPO_ROOT.parent / "shared"))
DEFAULT_TABLE = SHARED / "seeds" / "models_list.md"
DEFAULT_REFERENCE = SHARED / "REFERENCE.md"
OUTPUTS = (REPO_ROOT / "model_manifest.csv", REPO_ROOT / "converter" / "data" / "model_manifest.csv")

COLUMNS = (
    "name", "task", "language", "artifact", "url", "alt_urls", "filename", "family", "dict", "dict_sha256",
    "size_hint", "section", "aliases", "same_language_as", "notes",
)

ARTIFACT_LABELS = {"inference model": "inference", "trained model": "trained", "pre-trained model": "pretrained"}
TASK_BY_HEADING = {"Text Detection Model": "det", "Text Recognition Model": "rec",
                   "Text Angle Classification Model": "cls"}

# --- Known table defects, handled by name --------------------------------------------------------------------

# Rows listed more than once with the same archives. Value: which listing's size/description to keep and why.
DUPLICATE_ROWS = {
    "en_number_mobile_v2.0_rec": ("last", "listed twice (v2.0 2.56M and v2.1 2.6M) with the same URLs; the hosted "
                                          "archive is the v2.1 one (97 classes, en_dict.txt), kept that listing"),
    "french_mobile_v2.0_rec": ("first", "listed under release/2.0 and again under release/2.1 (same URLs)"),
    "german_mobile_v2.0_rec": ("first", "listed under release/2.0 and again under release/2.1 (same URLs)"),
    "korean_mobile_v2.0_rec": ("first", "listed under release/2.0 and again under release/2.1 (same URLs)"),
    "japan_mobile_v2.0_rec": ("first", "listed under release/2.0 and again under release/2.1 (same URLs)"),
    "te_mobile_v2.0_rec": ("first", "listed under release/2.0 and again under release/2.1 (same URLs)"),
    "ta_mobile_v2.0_rec": ("first", "listed under release/2.0 and again under release/2.1 (same URLs)"),
}

# Rows whose download cell has a link missing its opening '['.
BROKEN_LINK_ROWS = {"ch_PP-OCRv3_det"}

# Table names that differ from the prefix of their archive file names (prefix = stem minus _infer/_train/...).
ARCHIVE_PREFIX = {
    "ch_PP-OCRv4_server_det": "ch_PP-OCRv4_det_server",
    "ch_PP-OCRv4_server_rec": "ch_PP-OCRv4_rec_server",
    "ml_PP-OCRv3_det": "Multilingual_PP-OCRv3_det",
    "latin_mobile_v2.0_rec": "latin_ppocr_mobile_v2.0_rec",
    "arabic_mobile_v2.0_rec": "arabic_ppocr_mobile_v2.0_rec",
    "cyrillic_mobile_v2.0_rec": "cyrillic_ppocr_mobile_v2.0_rec",
    "devanagari_mobile_v2.0_rec": "devanagari_ppocr_mobile_v2.0_rec",
}
# The table-name defect proper (the other entries above are PaddleOCR's own naming convention).
NAME_MISMATCH_DEFECTS = {"latin_mobile_v2.0_rec", "arabic_mobile_v2.0_rec", "cyrillic_mobile_v2.0_rec",
                         "devanagari_mobile_v2.0_rec"}

# (model, artifact) -> (URL the table gives, alternatives to try when it is missing, why).
ALT_URLS = {
    ("ch_PP-OCRv2_rec", "inference"): (
        "https://paddleocr.bj.bcebos.com/PP-OCRv2/chinese/ch_PP-OCRv2_infer.tar",
        ("https://paddleocr.bj.bcebos.com/PP-OCRv2/chinese/ch_PP-OCRv2_rec_infer.tar",),
        "table URL .../ch_PP-OCRv2_infer.tar kept; PaddleOCR's paddleocr.py uses .../ch_PP-OCRv2_rec_infer.tar "
        "(recorded in alt_urls, tried when the first is missing)",
    ),
}

# Table language prefix -> canonical language, for languages listed under two names (distinct archives).
SAME_LANGUAGE = {"ch_tra": "chinese_cht", "kn": "ka"}

# Family of every non-multilingual row (the 13 family names of the team brief).
FAMILY_BY_NAME = {
    "ch_PP-OCRv4_det": "PP-OCRv4_mobile_det",
    "ch_PP-OCRv4_server_det": "PP-OCRv4_server_det",
    "ch_PP-OCRv3_det": "PP-OCRv3_det",
    "en_PP-OCRv3_det": "PP-OCRv3_det",
    "ml_PP-OCRv3_det": "PP-OCRv3_det",
    "ch_ppocr_mobile_v2.0_det": "ppocr_mobile_v2.0_det",
    "ch_ppocr_server_v2.0_det": "ppocr_server_v2.0_det",
    "ch_PP-OCRv2_det": "PP-OCRv2_det",
    "ch_PP-OCRv4_rec": "PP-OCRv4_mobile_rec",
    "en_PP-OCRv4_rec": "PP-OCRv4_mobile_rec",
    "ch_PP-OCRv4_server_rec": "PP-OCRv4_server_rec",
    "ch_PP-OCRv3_rec": "PP-OCRv3_rec",
    "en_PP-OCRv3_rec": "PP-OCRv3_rec",
    "ch_ppocr_mobile_v2.0_rec": "ppocr_mobile_v2.0_rec",
    "ch_ppocr_server_v2.0_rec": "ppocr_server_v2.0_rec",
    "ch_PP-OCRv2_rec": "PP-OCRv2_rec",
    "en_number_mobile_v2.0_rec": "ppocr_mobile_v2.0_rec",
    "ch_ppocr_mobile_v2.0_cls": "ppocr_mobile_v2.0_cls",
}
MULTILINGUAL_FAMILY = "ppocr_mobile_v2.0_rec"
MULTILINGUAL_SECTIONS = ("release/2.0", "release/2.1")
LANGUAGE_BY_PREFIX = {"ch": "ch", "en": "en", "ml": "multilingual"}

_LINK = re.compile(r"(\[?)([A-Za-z][A-Za-z -]*?)\]\((https?://[^)\s]+)\)")
_STEM_SUFFIXES = ("_distill_train", "_train", "_infer", "_pre")
_HASH = re.compile(r"`([0-9a-f]{64})`")


class TableError(ValueError):
    """The table has a defect this script does not know how to handle."""


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _heading_text(line: str) -> str:
    text = line.lstrip("#").strip()
    link = re.fullmatch(r"\[([^\]]+)\]\([^)]*\)", text)
    if link:
        text = link.group(1)
    text = re.sub(r"^\d+\.\s*", "", text)
    return re.sub(r"（.*?）|\(.*?\)", "", text).strip()


def parse_table(text: str, fixes: list[str]) -> list[dict]:
    """Every model row of the markdown table, in table order, with its section, task and links."""
    rows = []
    headings: dict[int, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            headings = {k: v for k, v in headings.items() if k < level}
            headings[level] = _heading_text(line)
            continue
        if not line.lstrip().startswith("|"):
            continue
        cells = _cells(line)
        if len(cells) != 4 or cells[0] in ("model name", "model type") or set(cells[0]) <= set("-: "):
            continue
        name, _description, size, download = cells
        task = TASK_BY_HEADING.get(headings.get(2, ""))
        if task is None:
            raise TableError(f"line {lineno}: row {name!r} is not under a known section ({headings})")
        links = {}
        for bracket, label, url in _LINK.findall(download):
            kind = ARTIFACT_LABELS.get(label.strip())
            if kind is None:
                raise TableError(f"line {lineno}: {name}: unknown link label {label!r}")
            if not bracket:
                if name not in BROKEN_LINK_ROWS:
                    raise TableError(f"line {lineno}: {name}: unexpected broken link {label!r}]({url})")
                fixes.append(f"broken-link: {name}: '{label}]({url})' lacks its '['; URL recovered")
            links[kind] = url
        if len(links) != download.count("](") or not links:
            raise TableError(f"line {lineno}: {name}: could not read every link of {download!r}")
        section = " / ".join(headings[k] for k in sorted(headings) if k >= 2)
        rows.append({"name": name, "task": task, "size_hint": size, "section": section, "links": links,
                     "lineno": lineno})
    return rows


def merge_duplicates(rows: list[dict], fixes: list[str]) -> list[dict]:
    """One entry per model name; known duplicates are merged (same URLs required), unknown ones are an error."""
    by_name: dict[str, list[dict]] = {}
    for row in rows:
        by_name.setdefault(row["name"], []).append(row)
    merged = []
    for name, listings in by_name.items():
        if len(listings) == 1:
            merged.append(listings[0])
            continue
        if name not in DUPLICATE_ROWS:
            raise TableError(f"{name} is listed {len(listings)} times (lines {[r['lineno'] for r in listings]})")
        if any(r["links"] != listings[0]["links"] for r in listings):
            raise TableError(f"{name}: duplicated rows point to different archives")
        keep, why = DUPLICATE_ROWS[name]
        chosen = dict(listings[0] if keep == "first" else listings[-1])
        chosen["notes"] = [f"{why} (table lines {', '.join(str(r['lineno']) for r in listings)})"]
        fixes.append(f"duplicate-row: {name}: {why}")
        merged.append(chosen)
    missing = set(DUPLICATE_ROWS) - {n for n, ls in by_name.items() if len(ls) > 1}
    if missing:
        raise TableError(f"expected duplicated rows not found: {sorted(missing)}")
    return merged


def _stem(url: str) -> str:
    return Path(urlparse(url).path).name.removesuffix(".tar")


def _archive_prefix(stem: str) -> str:
    for suffix in _STEM_SUFFIXES:
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    raise TableError(f"archive {stem}.tar has none of the suffixes {_STEM_SUFFIXES}")


def parse_reference_dicts(text: str) -> dict[str, tuple[str, str]]:
    """``{model name: (dict path under ppocr/utils, sha256)}`` from REFERENCE.md §1 (training-era rows only)."""
    dicts = {}
    in_section = False
    for line in text.splitlines():
        if line.startswith("## "):
            in_section = line.startswith("## 1.")
            continue
        if not in_section or not line.startswith("|"):
            continue
        cells = _cells(line)
        sha = _HASH.search(cells[-1])
        if sha is None or "(" in cells[0]:  # header, or a non-training-era dictionary variant
            continue
        model = cells[0]
        names = [model]
        if "/" in model:  # "ch_tra/chinese_cht_mobile_v2.0_rec": two table names, one dictionary
            first, rest = model.split("/", 1)
            names = [first + "_mobile" + rest.split("_mobile", 1)[1], rest]
        for name in names:
            dicts[name] = (cells[1], sha.group(1))
    return dicts


def _language(name: str, section: str, fixes: list[str]) -> tuple[str, str]:
    """(language, same_language_as) of a row; logs the two-names-for-one-language defect once per pair."""
    prefix = name.split("_mobile_v2.0_rec")[0] if section.endswith(MULTILINGUAL_SECTIONS) else name.split("_")[0]
    if prefix in SAME_LANGUAGE:
        canonical = SAME_LANGUAGE[prefix]
        twin = name.replace(prefix, canonical, 1)
        fixes.append(f"same-language: {name} and {twin} are both '{canonical}' ({prefix} = {canonical}; "
                     f"distinct archives, both kept)")
        return canonical, twin
    if prefix in SAME_LANGUAGE.values():
        other = next(k for k, v in SAME_LANGUAGE.items() if v == prefix)
        return prefix, name.replace(prefix, other, 1)
    return LANGUAGE_BY_PREFIX.get(prefix, prefix), ""


def build_rows(table_text: str, reference_text: str) -> tuple[list[dict[str, str]], list[str]]:
    """Manifest rows (one per archive, table order) and the list of defects fixed on the way."""
    fixes: list[str] = []
    models = merge_duplicates(parse_table(table_text, fixes), fixes)
    dicts = parse_reference_dicts(reference_text)
    seen_alt = set()
    out = []
    for model in models:
        name, section = model["name"], model["section"]
        notes = list(model.get("notes", []))
        if name in FAMILY_BY_NAME:
            family = FAMILY_BY_NAME[name]
        elif model["task"] == "rec" and section.endswith(MULTILINGUAL_SECTIONS):
            family = MULTILINGUAL_FAMILY
        else:
            raise TableError(f"{name}: no family known for this row")
        language, same_language_as = _language(name, section, fixes)
        if same_language_as:
            notes.append(f"same language as {same_language_as} (table uses two names for '{language}')")

        prefixes = set()
        for kind, url in model["links"].items():
            if (name, kind) in ALT_URLS:
                continue
            prefixes.add(_archive_prefix(_stem(url)))
        aliases = sorted(p for p in prefixes if p != name)
        expected = ARCHIVE_PREFIX.get(name)
        if aliases != ([expected] if expected else []):
            raise TableError(f"{name}: archive names {sorted(prefixes)} differ from the table name "
                             f"(known: {expected})")
        if name in NAME_MISMATCH_DEFECTS:
            fixes.append(f"name-mismatch: {name}: archives are named {expected}_*.tar; table name kept, "
                         f"{expected} added as alias")
            notes.append(f"table name differs from its archives ({expected}_*.tar)")

        dict_path = dict_sha = ""
        if model["task"] == "rec":
            found = dicts.get(name) or dicts.get(expected or "")
            if found is None:
                raise TableError(f"{name}: no dictionary for this recognition row in REFERENCE.md §1")
            dict_path, dict_sha = found

        for kind, url in model["links"].items():
            row_notes = list(notes)
            alt_urls: tuple[str, ...] = ()
            if (name, kind) in ALT_URLS:
                table_url, alt_urls, why = ALT_URLS[(name, kind)]
                if url != table_url:
                    raise TableError(f"{name} {kind}: expected the table URL {table_url}, found {url}")
                fixes.append(f"alt-url: {name} {kind}: {why}")
                row_notes.append(why)
                seen_alt.add((name, kind))
            if name in BROKEN_LINK_ROWS and kind == "inference":
                row_notes.append("table link markup broken ('inference model](...)'), URL recovered")
            out.append({
                "name": name, "task": model["task"], "language": language, "artifact": kind, "url": url,
                "alt_urls": ";".join(alt_urls), "filename": Path(urlparse(url).path).name, "family": family,
                "dict": dict_path, "dict_sha256": dict_sha, "size_hint": model["size_hint"], "section": section,
                "aliases": ";".join(aliases), "same_language_as": same_language_as, "notes": "; ".join(row_notes),
            })
    if seen_alt != set(ALT_URLS):
        raise TableError(f"expected alternative-URL rows not found: {sorted(set(ALT_URLS) - seen_alt)}")
    urls = [r["url"] for r in out]
    if len(urls) != len(set(urls)):
        raise TableError("two manifest rows share one URL")
    return out, fixes


def render_csv(rows: list[dict[str, str]]) -> str:
    """The CSV text of ``rows`` (fixed column order, '\\n' line ends)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", type=Path, default=DEFAULT_TABLE)
    parser.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE)
    parser.add_argument("--check", action="store_true", help="only compare with the committed files")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    rows, fixes = build_rows(args.table.read_text(encoding="utf-8"), args.reference.read_text(encoding="utf-8"))
    for fix in fixes:
        log.info("fixed %s", fix)
    text = render_csv(rows)
    log.info("%d archives, %d models", len(rows), len({r["name"] for r in rows}))
    if args.check:
        stale = [str(p) for p in OUTPUTS if not p.is_file() or p.read_text(encoding="utf-8") != text]
        for path in stale:
            log.error("%s is out of date; run scripts/build_manifest.py", path)
        return 1 if stale else 0
    for path in OUTPUTS:
        _write_atomic(path, text)
        log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
