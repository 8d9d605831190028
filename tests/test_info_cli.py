"""``ocrconv info``: reports on tars, folders, checkpoints and manifest names; refuses hostile pickles."""
from __future__ import annotations

import json
import os
import pickle
import tarfile

from click.testing import CliRunner

import fixture_data as fd
from converter.cli import main


def _run(*args: str):
    return CliRunner().invoke(main, ["info", *args])


def test_info_inference_tar_text():
    result = _run(str(fd.infer_tar("ch_ppocr_mobile_v2.0_cls")), "--limit", "3")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "tensors:  213 (534512 bytes)" in lines
    assert "hint:     program written by Paddle 2.6.2" in lines
    assert "feed:     x [-1, 3, -1, -1] float32" in lines
    assert "fetch:    save_infer_model/scale_0.tmp_0 [-1, 2] float32" in lines
    assert lines[-1] == "... 210 more (--limit 0 shows all)"
    assert lines[-5].split() == ["key", "shape", "dtype"]


def test_info_json_trained_distillation_checkpoint():
    result = _run(str(fd.train_tar("ch_PP-OCRv2_rec")), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["kind"] == "trained" and data["file"] == "ch_PP-OCRv2_rec_train/best_accuracy.pdparams"
    assert set(data["prefixes"]) == {"Student.", "Teacher."}
    assert data["tensors"] == len(data["keys"]) == sum(data["prefixes"].values())
    assert "pickle protocol 4" in data["version_hints"] and "arrays pickled under numpy 1.x" in data["version_hints"]
    first = data["keys"][0]
    assert first["dtype"] == "float32" and first["paddle_name"] and all(d > 0 for d in first["shape"])


def test_info_json_inference_counts_info_only():
    result = _run(str(fd.infer_tar("ch_PP-OCRv4_det")), "--json")
    data = json.loads(result.output)
    assert data["tensors"] == 234 and len(data["info_only"]) == 980 - 234
    assert data["feeds"] == [{"name": "x", "shape": [-1, 3, -1, -1], "dtype": "float32"}]
    convs = sum(n for op, n in data["ops"].items() if op in ("conv2d", "depthwise_conv2d", "conv2d_transpose"))
    assert convs == sum(len(k["shape"]) == 4 for k in data["keys"]) and data["ops"]["feed"] == 1


def test_info_states_values(tmp_path):
    with tarfile.open(fd.train_tar("en_number_mobile_v2.0_rec")) as tar:
        tar.extractall(tmp_path, filter="data")
    result = _run(str(tmp_path / "en_number_mobile_v2.0_rec_train" / "best_accuracy.states"))
    assert result.exit_code == 0, result.output
    assert "value:    epoch = 1" in result.output.splitlines()


def test_info_describes_huge_values_instead_of_printing_them(tmp_path):
    """A 5000-digit integer (beyond Python's int-to-text limit) and a long text in a checkpoint."""
    import numpy as np

    checkpoint = tmp_path / "best_accuracy.pdparams"
    checkpoint.write_bytes(pickle.dumps({"w": np.zeros(2, np.float32), "epoch": 10**5000, "note": "x" * 5000},
                                        protocol=4))
    result = _run(str(checkpoint))
    assert result.exit_code == 0, result.output
    assert "value:    epoch = <int of 16610 bits>" in result.output
    assert "... (5000 characters)" in result.output
    data = json.loads(_run(str(checkpoint), "--json").output)
    assert data["values"]["epoch"] == "<int of 16610 bits>"


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_info_refuses_hostile_pickle(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "best_accuracy.pdparams"
    path.write_bytes(pickle.dumps({"w": _Evil(marker)}, protocol=4))
    result = _run(str(path))
    assert result.exit_code == 1
    assert "refused to load" in result.output and "system'" in result.output
    assert not marker.exists()


def test_info_model_name_uses_the_cache(tmp_path):
    result = _run("ch_ppocr_mobile_v2.0_cls", "--offline", "--cache", str(tmp_path))
    assert result.exit_code == 1 and "offline" in result.output
    assert "ch_ppocr_mobile_v2.0_cls_infer.tar" in result.output
    result = _run("no_such_model_xyz", "--offline", "--cache", str(tmp_path))
    assert result.exit_code == 1 and result.output.startswith("error:")


def test_info_refuses_a_negative_limit():
    result = _run(str(fd.infer_tar("ch_ppocr_mobile_v2.0_cls")), "--limit", "-3")
    assert result.exit_code == 2 and "Invalid value for '--limit'" in result.output


def test_info_missing_path_is_not_an_unknown_model(tmp_path):
    for target in ("/nonexistent/path.pdparams", str(tmp_path / "missing_dir"), "my_model.pdparams"):
        result = _run(target, "--offline", "--cache", str(tmp_path / "cache"))
        assert result.exit_code == 1, result.output
        assert f"error: {target}: no such file or directory" in result.output and "unknown model" not in result.output


def test_info_and_download_refuse_a_mirror_that_is_not_an_http_url(tmp_path):
    for command in ("info", "download"):
        result = CliRunner().invoke(main, [command, "ch_ppocr_mobile_v2.0_cls", "--mirror", "not-a-url",
                                           "--cache", str(tmp_path / "cache")])
        assert result.exit_code == 2 and "Invalid value for '--mirror'" in result.output, result.output
    assert not (tmp_path / "cache").exists()


def test_the_command_line_starts_without_torch_or_requests():
    """`ocrconv --help`, `list`, `download` and `info` took 1.4 s loading torch (and requests) they never use."""
    import subprocess
    import sys

    code = ("import sys; from converter.cli import main; "
            "print(sorted(m for m in ('torch', 'requests', 'paddle') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"
    result = _run(str(fd.infer_tar("ch_ppocr_mobile_v2.0_cls")), "--limit", "1")
    assert result.exit_code == 0 and "tensors:  213" in result.output
