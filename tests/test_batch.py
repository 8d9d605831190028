"""Batch conversion (`ocrconv convert --names-from / --all`) over the loopback mirror of the shared fixtures."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import fixture_data
from converter import convert as pipeline
from converter.cli import main
from converter.errors import OcrconvError, OutputError, UnknownModelError
from converter.manifest import load_manifest

CLS = "ch_ppocr_mobile_v2.0_cls"


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
    assert data["stopped"] and "1 rows not run (--keep-going converts them all)" in res.output
    failed = data["rows"][0]  # a failed row still says what it was
    assert (failed["artifact"], failed["family"], failed["task"]) == ("inference", "ppocr_mobile_v2.0_rec", "rec")
    assert "| french_mobile_v2.0_rec | inference | ppocr_mobile_v2.0_rec | failed: " in (tmp_path / "r.md").read_text()


def names_file(tmp_path: Path, *names: str) -> Path:
    path = tmp_path / "rows.txt"
    path.write_text("".join(f"{n}\n" for n in names))
    return path


def report_rows(path: Path) -> dict[str, dict]:
    return {row["name"]: row for row in json.loads(path.read_text())["rows"]}


# ----------------------------------------------------------------------------------- choosing the rows

def test_names_file_errors_name_the_file_and_line(tmp_path):
    names = tmp_path / "rows.txt"
    names.write_text(f"# rows\n{CLS}\n\nch_PP-OCRv4_dett\n")
    with pytest.raises(UnknownModelError, match=r"rows\.txt:4: unknown model 'ch_PP-OCRv4_dett'.*nearest"):
        pipeline.batch_names(names_from=names)
    names.write_text("# only comments\n\n")
    with pytest.raises(OcrconvError, match="names no model"):
        pipeline.batch_names(names_from=names)
    res = run_cli("--names-from", str(names), "--out", str(tmp_path / "out"))
    assert res.exit_code == 1 and "error: " in res.output and "names no model" in res.output
    names.write_text(f"{CLS}\n")
    with pytest.raises(OcrconvError, match="no det model among the rows asked for"):
        pipeline.batch_names(names_from=names, task="det")
    assert not (tmp_path / "out").exists()


def test_names_file_keeps_a_non_default_archive_stem(mirror_env, tmp_path):
    names = names_file(tmp_path, f"{CLS}_train", f"{CLS}_infer")
    assert pipeline.batch_names(names_from=names) == [f"{CLS}_train", CLS]
    res = run_cli("--names-from", str(names), "--out", str(tmp_path / "out"), "--report", str(tmp_path / "r.json"),
                  "--no-check")
    assert res.exit_code == 0, res.output
    rows = report_rows(tmp_path / "r.json")
    assert rows[f"{CLS}_train"]["artifact"] == "trained" and rows[CLS]["artifact"] == "inference"
    assert pipeline.read_output_metadata(tmp_path / "out" / f"{CLS}_train")["artifact"] == "trained"


def test_task_alone_is_a_batch_of_that_task(mirror_env, tmp_path):
    cls_rows = [e.name for e in load_manifest() if e.task == "cls"]
    for selection in (["--task", "cls"], ["--all", "--task", "cls"]):
        report = tmp_path / f"{len(selection)}.json"
        res = run_cli(*selection, "--out", str(tmp_path / "out"), "--report", str(report), "--no-check")
        assert res.exit_code == 0, res.output
        assert list(report_rows(report)) == cls_rows
    res = run_cli("--all", "--names-from", str(names_file(tmp_path, CLS)))
    assert res.exit_code == 2 and "not both" in res.output
    res = run_cli(CLS, "--task", "cls")
    assert res.exit_code == 2 and "apply to a batch" in res.output


# ------------------------------------------------------------------------------------- the report path

def test_report_path_ending_in_md_is_refused(tmp_path):
    res = run_cli("--names-from", str(names_file(tmp_path, CLS)), "--out", str(tmp_path / "out"),
                  "--report", str(tmp_path / "report.md"), "--no-check")
    assert res.exit_code == 2 and "Invalid value for '--report'" in res.output and "report.json" in res.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "report.md").exists()
    data = {"ocrconv_version": "0", "rows_requested": 0, "rows_run": 0, "counts": {}, "seconds": 0.0, "rows": []}
    with pytest.raises(OutputError, match="overwritten by its Markdown table"):
        pipeline.write_batch_report(data, tmp_path / "report.md")
    assert pipeline.write_batch_report(data, tmp_path / "report") == tmp_path / "report.md"
    assert json.loads((tmp_path / "report").read_text())["rows"] == []


def test_unwritable_report_path_fails_before_any_row_runs(tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "repdir").mkdir()
    (tmp_path / "taken.md").mkdir()
    names = str(names_file(tmp_path, CLS))
    before = sorted(p.name for p in tmp_path.iterdir())
    for report, exit_code, message in ((tmp_path / "repdir", 2, "is a directory"),
                                       (tmp_path / "afile" / "r.json", 1, "cannot write the report"),
                                       (tmp_path / "taken.json", 1, "taken.md: it is a directory")):
        res = run_cli("--names-from", names, "--out", str(tmp_path / "out"), "--report", str(report), "--no-check")
        assert res.exit_code == exit_code and message in res.output, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no row ran, no temp file left
    assert list((tmp_path / "repdir").iterdir()) == []
    for report in (tmp_path / "repdir", Path("/proc/ocrconv-report.json")):
        with pytest.raises(OutputError, match="cannot write the report"):
            pipeline.check_report_path(report)


# ------------------------------------------------------------------------------------------- resuming

def test_rerun_with_another_dtype_or_form_is_not_up_to_date(tmp_path):
    source = fixture_data.infer_tar(CLS)
    out = tmp_path / "out" / CLS
    pipeline.convert(source, out=out, check=False)
    again = pipeline.convert(source, out=out, check=False, skip_up_to_date=True)
    assert again.status == "up-to-date" and again.task == "cls"
    for option, message in (({"dtype": "float16"}, "dtype float32 (this run: float16)"),
                            ({"train_form": True}, "form fused (this run: train)")):
        with pytest.raises(OutputError, match=re.escape(f"exists with another {message}; use --force")):
            pipeline.convert(source, out=out, check=False, skip_up_to_date=True, **option)
    forced = pipeline.convert(source, out=out, check=False, skip_up_to_date=True, force=True, dtype="float16")
    assert forced.status == "converted" and pipeline.read_output_metadata(out)["dtype"] == "float16"


@pytest.mark.paddle
def test_rerun_redoes_a_missing_or_failed_parity_check(tmp_path):
    source = fixture_data.infer_tar(CLS)
    out = tmp_path / "out" / CLS
    pipeline.convert(source, out=out, check=False)
    checked = pipeline.convert(source, out=out, check=True, skip_up_to_date=True)
    assert checked.status == "converted" and checked.parity["passed"]
    assert any("no parity.json and this run checks parity" in n for n in checked.notes)
    assert pipeline.convert(source, out=out, check=True, skip_up_to_date=True).status == "up-to-date"

    stored = json.loads((out / "parity.json").read_text())
    (out / "parity.json").write_text(json.dumps({**stored, "passed": False}))  # as a failed check leaves it
    kept = pipeline.convert(source, out=out, check=False, skip_up_to_date=True)
    assert kept.status == "parity-failed" and not kept.ok  # not checking: the recorded failure stands
    redone = pipeline.convert(source, out=out, check=True, skip_up_to_date=True)
    assert redone.status == "converted" and redone.parity["passed"]
    assert json.loads((out / "parity.json").read_text())["passed"]
    tighter = pipeline.convert(source, out=out, check=True, skip_up_to_date=True, atol=1e-4)
    assert tighter.status == "converted" and tighter.parity["tolerance"]["atol"] == 1e-4


@pytest.mark.paddle
def test_batch_rerun_after_a_failed_parity_check_is_not_up_to_date(mirror_env, tmp_path):
    names, out, report = str(names_file(tmp_path, CLS)), str(tmp_path / "b1"), tmp_path / "b1" / "report.json"
    assert run_cli("--names-from", names, "--out", out, "--report", str(report)).exit_code == 0
    parity_json = tmp_path / "b1" / CLS / "parity.json"
    parity_json.write_text(json.dumps({**json.loads(parity_json.read_text()), "passed": False}))
    res = run_cli("--names-from", names, "--out", out, "--report", str(report), "--no-check")
    assert res.exit_code == 1 and json.loads(report.read_text())["failed"] == [CLS]
    res = run_cli("--names-from", names, "--out", out, "--report", str(report))
    assert res.exit_code == 0, res.output
    row = report_rows(report)[CLS]
    assert row["status"] == "converted" and row["parity_passed"] and row["task"] == "cls"


# ------------------------------------------------------------------------------ stopping and interrupting

PARALLEL_ROWS = ("french_mobile_v2.0_rec", CLS, "ch_ppocr_mobile_v2.0_det", "en_number_mobile_v2.0_rec",
                 "ch_PP-OCRv2_det", "ch_ppocr_mobile_v2.0_rec")


def inference_url(name: str) -> str:
    return load_manifest().get(name).artifacts["inference"].url


def test_parallel_batch_stops_at_the_first_failure_and_reports_it(mirror, mirror_env, tmp_path):
    # Row 1 fails (404) while rows 2 and 3 hold both workers in their downloads: rows 4-6 are still queued when
    # the failure arrives, and are cancelled.
    failing, second, third = (inference_url(n) for n in PARALLEL_ROWS[:3])
    for url in (second, third):
        mirror.misbehave(url, "hold")

    def release_once_the_failure_is_in():
        mirror.wait_for_request(failing, timeout=120)
        try:
            mirror.wait_for_request(third, timeout=10)  # the worker of row 1 took the next row: row 1 is reported
        except TimeoutError:  # the worker saw the batch stopping first and skipped row 3
            pass
        time.sleep(1)
        mirror.release()

    releaser = threading.Thread(target=release_once_the_failure_is_in, daemon=True)
    releaser.start()
    report = tmp_path / "r.json"
    try:
        res = run_cli("--names-from", str(names_file(tmp_path, *PARALLEL_ROWS)), "--out", str(tmp_path / "out"),
                      "--jobs", "2", "--report", str(report), "--no-check")
    finally:
        mirror.release()
        releaser.join()
    assert res.exit_code == 1, res.output
    data = json.loads(report.read_text())
    assert data["failed"] == ["french_mobile_v2.0_rec"] and data["rows_run"] < len(PARALLEL_ROWS)
    assert data["stopped"] and "--keep-going converts them all" in res.output
    assert "french_mobile_v2.0_rec_infer.tar" in res.output  # the failure itself is shown
    assert not (tmp_path / "out" / PARALLEL_ROWS[-1]).exists()


def test_ctrl_c_in_a_serial_batch_writes_a_partial_report(tmp_path, monkeypatch):
    convert = pipeline.convert

    def interrupted_on_the_second_row(target, **kwargs):
        if target != CLS:
            raise KeyboardInterrupt
        return convert(fixture_data.infer_tar(CLS), **kwargs)

    monkeypatch.setattr(pipeline, "convert", interrupted_on_the_second_row)
    report = tmp_path / "r.json"
    names = names_file(tmp_path, CLS, "ch_ppocr_mobile_v2.0_det", "en_number_mobile_v2.0_rec")
    res = run_cli("--names-from", str(names), "--out", str(tmp_path / "out"), "--report", str(report), "--no-check")
    assert res.exit_code == 130 and "interrupted: 1 of 3 rows done; partial report" in res.output
    data = json.loads(report.read_text())
    assert data["interrupted"] and list(report_rows(report)) == [CLS] and data["rows_requested"] == 3
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [CLS]


def test_ctrl_c_stops_a_parallel_batch_at_once_and_writes_a_partial_report(mirror, mirror_env, tmp_path):
    held = [inference_url(n) for n in (CLS, "ch_ppocr_mobile_v2.0_det")]
    for url in held:
        mirror.misbehave(url, "hold")  # both workers stay busy downloading until Ctrl-C
    rows = (CLS, "ch_ppocr_mobile_v2.0_det", "en_number_mobile_v2.0_rec", "ch_PP-OCRv2_det", "ch_PP-OCRv3_det")
    out, report = tmp_path / "out", tmp_path / "r.json"
    command = [sys.executable, "-c", "from converter.cli import main; main()", "convert", "--names-from",
               str(names_file(tmp_path, *rows)), "--out", str(out), "--jobs", "2", "--report", str(report),
               "--no-check"]
    proc = subprocess.Popen(command, cwd=tmp_path, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        for url in held:
            mirror.wait_for_request(url, timeout=120)
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
        interrupted_at = time.monotonic()
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        mirror.release()
    assert proc.returncode == 130, output
    assert time.monotonic() - interrupted_at < 20  # the queued rows were not converted first
    assert "interrupted: 0 of 5 rows done; partial report" in output
    data = json.loads(report.read_text())
    assert data["interrupted"] and data["rows_run"] == 0 and data["rows_requested"] == 5
    assert not out.exists() or list(out.iterdir()) == []  # no queued row ran, no temp directory left
