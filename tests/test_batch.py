"""Batch conversion (`ocrconv convert --names-from / --all`) over the loopback mirror of the shared fixtures."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import fixture_data
from converter import convert as pipeline
from converter.cli import main
from converter.manifest import load_manifest


@pytest.fixture(scope="module")
def fixture_rows(mirror_tree) -> list[str]:
    """Every fixture row, its tars (materialized ones included) served by the mirror."""
    rows = fixture_data.all_rows()
    for row in rows:
        mirror_tree.add_row(row)
    return rows


def run_cli(*args: str):
    return CliRunner().invoke(main, ["convert", *args], catch_exceptions=False)


def test_names_file_reads_comments_and_canonicalises(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("# fixture rows\nch_ppocr_mobile_v2.0_cls\n\nch_PP-OCRv4_det_infer  # archive stem\n"
                     "ch_ppocr_mobile_v2.0_cls\n")
    assert pipeline.batch_names(names_from=names) == ["ch_ppocr_mobile_v2.0_cls", "ch_PP-OCRv4_det"]
    assert pipeline.batch_names(names_from=names, task="cls") == ["ch_ppocr_mobile_v2.0_cls"]
    every = pipeline.batch_names(all_rows=True)
    assert len(every) == len(load_manifest()) and len(set(every)) == len(every)


def test_markdown_table_lists_every_row():
    data = {"ocrconv_version": "0.1.0", "rows_requested": 2, "rows_run": 2, "seconds": 3.2,
            "counts": {"converted": 1, "failed": 1},
            "rows": [{"name": "a", "artifact": "inference", "family": "f", "status": "converted",
                      "max_abs_diff": 1.5e-6, "seconds": 1.25},
                     {"name": "b", "status": "failed", "error": "404 | gone", "seconds": 0.5}]}
    table = pipeline.markdown_table(data)
    assert "| a | inference | f | converted | 1.5e-06 | 1.2 |" in table
    assert "| b |  |  | failed: 404 \\| gone |  | 0.5 |" in table
    assert "2 of 2 rows run (1 converted, 1 failed)" in table


@pytest.mark.slow
@pytest.mark.paddle
def test_batch_converts_every_fixture_row_and_passes_parity(fixture_rows, mirror_env, tmp_path):
    names = tmp_path / "rows.txt"
    names.write_text("\n".join(fixture_rows) + "\n")
    out, report = tmp_path / "out", tmp_path / "report.json"
    res = run_cli("--names-from", str(names), "--out", str(out), "--report", str(report), "--jobs", "2",
                  "--keep-going")
    assert res.exit_code == 0, res.output
    data = json.loads(report.read_text())
    assert [r["name"] for r in data["rows"]] == [load_manifest().get(r).name for r in fixture_rows]
    bad = {r["name"]: r.get("error") or r.get("max_abs_diff") for r in data["rows"]
           if r["status"] != "converted" or not r["parity_passed"]}
    assert not bad, bad
    assert data["counts"] == {"converted": len(fixture_rows)}
    for row in data["rows"]:
        assert json.loads((out / row["name"] / "parity.json").read_text())["passed"]
        assert row["max_abs_diff"] is not None and row["seconds"] > 0
    md = report.with_suffix(".md").read_text()
    assert all(f"| {r['name']} | inference | {r['family']} | converted |" in md for r in data["rows"])

    # Resumable: a second run finds every output up to date and converts nothing.
    again = run_cli("--names-from", str(names), "--out", str(out), "--report", str(report))
    assert again.exit_code == 0, again.output
    data = json.loads(report.read_text())
    assert data["counts"] == {"up-to-date": len(fixture_rows)}
    assert all(r["max_abs_diff"] is not None for r in data["rows"])

    # --all --keep-going: the rows the mirror lacks fail with the URL that was tried; exit status 1.
    every = run_cli("--all", "--task", "det", "--out", str(out), "--report", str(report), "--keep-going")
    assert every.exit_code == 1
    data = json.loads(report.read_text())
    det_rows = [e.name for e in load_manifest() if e.task == "det"]
    assert [r["name"] for r in data["rows"]] == det_rows
    missing = {r["name"]: r["error"] for r in data["rows"] if r["status"] == "failed"}
    assert set(missing) == {n for n in det_rows if n not in fixture_rows}
    for name, error in missing.items():
        url = load_manifest().get(name).artifacts["inference"].url.split("/", 3)[3]
        assert "404" in error and url in error, error
    assert "failed" in report.with_suffix(".md").read_text()


@pytest.mark.paddle
def test_batch_stops_at_the_first_failure_without_keep_going(mirror_env, tmp_path):
    names = tmp_path / "rows.txt"
    names.write_text("french_mobile_v2.0_rec\nch_ppocr_mobile_v2.0_cls\n")
    res = run_cli("--names-from", str(names), "--out", str(tmp_path / "out"), "--report", str(tmp_path / "r.json"))
    assert res.exit_code == 1
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["rows_requested"] == 2 and data["rows_run"] == 1 and data["failed"] == ["french_mobile_v2.0_rec"]
    assert not (tmp_path / "out" / "ch_ppocr_mobile_v2.0_cls").exists()
