"""converter.parity: metrics, verdicts, the float32 floor rule, state-dict distances, Paddle's own program."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn

import fixture_data
from converter import parity
from converter.errors import ParityError


class TinyCls(nn.Module):
    """A small cls-shaped model: conv -> global pool -> linear -> softmax over 2 classes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return torch.softmax(self.fc(self.conv(x).mean((2, 3))), -1)


class TinyRec(nn.Module):
    """A small rec-shaped model: (N, 3, H, W) -> softmax (N, W // 8, 5) with confident logits."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 5, 8, stride=8)

    def forward(self, x):
        return torch.softmax(8 * self.conv(x).mean(2).transpose(1, 2), -1)


CLS_CONFIG = {"task": "cls", "family": "tiny", "preprocess": {"mean": [0.5] * 3, "std": [0.5] * 3}}
REC_CONFIG = {"task": "rec", "family": "tiny", "preprocess": {"image_shape": [3, 32, 320]}}


def shifted(model, delta: float, flip_first_step: bool = False):
    """A fake Paddle program: ``model`` in float64 plus ``delta`` (optionally rolling the classes of step 0)."""

    def program(x):
        with torch.no_grad():
            y = model.double()(torch.from_numpy(x).double()).numpy()
        model.float()
        y = y + delta
        if flip_first_step:
            y[:, 0] = np.roll(y[:, 0], 1, axis=-1)
        return [y.astype(np.float32)]

    program.label = "test program"
    return program


def test_compare_arrays_reports_abs_rel_and_limit():
    ref = np.array([1.0, 0.5, 1e-9])
    got = np.array([1.0 + 2e-6, 0.5, 2e-9])
    result = parity.compare_arrays(ref, got, atol=1e-5)
    assert result["max_abs_diff"] == pytest.approx(2e-6, rel=1e-2)
    assert result["max_rel_diff"] == pytest.approx(1e-9 / parity.REL_FLOOR, rel=1e-2)  # floor keeps tiny refs sane
    assert result["passed"] and result["limit"] == 1e-5
    failed = parity.compare_arrays(ref, got + 1e-4, atol=1e-5)
    assert not failed["passed"]
    by_floor = parity.compare_arrays(ref, got + 1e-4, atol=1e-5, float32_floor=2e-5, floor_factor=8,
                                     float32_rel_floor=20.0)
    assert by_floor["passed"] and by_floor["limit"] == pytest.approx(1.6e-4) and by_floor["rel_limit"] == 160.0
    nan = parity.compare_arrays(ref, np.array([np.nan, 0.5, 0]), atol=1.0)
    assert not nan["passed"]
    wrong_shape = parity.compare_arrays(ref, ref[:2], atol=1.0)
    assert not wrong_shape["passed"] and wrong_shape["converted_shape"] == [2]


def test_a_wrong_low_probability_class_fails_on_the_relative_limit():
    """One class of a wide softmax off by 66 %: its absolute difference is below the absolute limit (also when a
    float32 floor raises it), the relative one is not; a relative floor that large would excuse it."""
    ref = np.array([0.9, 0.1 - 1e-5, 1.5e-5], dtype=np.float32)
    got = np.array([0.9, 0.1 - 1e-5, 2.5e-5], dtype=np.float32)
    plain = parity.compare_arrays(ref, got, atol=1e-5)
    assert plain["max_abs_diff"] <= plain["limit"] and plain["max_rel_diff"] == pytest.approx(0.667, rel=1e-2)
    assert not plain["passed"] and plain["rel_limit"] == parity.DEFAULT_RTOL
    raised = parity.compare_arrays(ref * 10, got * 10, atol=1e-5, float32_floor=1e-5, float32_rel_floor=1e-5)
    assert raised["max_abs_diff"] <= raised["limit"] and not raised["passed"]
    excused = parity.compare_arrays(ref, got, atol=1e-5, float32_rel_floor=0.05)
    assert excused["passed"] and excused["rel_limit"] == pytest.approx(1.6)
    det_map = parity.compare_arrays(ref, got, atol=1e-5, rtol=None)  # det maps: absolute limit only
    assert det_map["passed"] and det_map["rel_limit"] is None


def test_relative_limit_applies_to_class_probabilities_only():
    cls = parity.run_parity(TinyCls().eval(), CLS_CONFIG, shifted(TinyCls().eval(), 0.0)).to_dict()
    assert cls["tolerance"]["rtol"] == parity.DEFAULT_RTOL
    assert all(o["rel_limit"] >= parity.DEFAULT_RTOL for c in cls["cases"] for o in c["outputs"])
    assert "1e-05 abs and 0.001 relative" in parity.ParityReport(cls).table()


def test_decode_texts_uses_the_dictionary_and_reverses_arabic():
    probs = np.eye(4)[[0, 2, 2, 0, 2, 3, 3, 1, 0]][None]
    assert parity.decode_texts(probs, ["a", "b", "c"]) == ["bbca"]
    assert parity.decode_texts(probs, ["a", "b", "c"], reverse=True) == ["acbb"]
    assert parity.decode_texts(probs, None) == ["<2><2><3><1>"]


def test_run_parity_passes_within_tolerance_and_fails_beyond():
    model = TinyCls().eval()
    good = parity.run_parity(model, CLS_CONFIG, shifted(model, 3e-6), atol=1e-5)
    assert good.passed and good.max_abs_diff == pytest.approx(3e-6, abs=5e-7)
    labels = [c["input"] for c in good.to_dict()["cases"]]
    assert labels[0].endswith("1x3x48x192") and labels[1].endswith("3x3x48x192") and labels[2].startswith("rendered")
    assert all(c["argmax_agreement"] == 1.0 for c in good.to_dict()["cases"])
    bad = parity.run_parity(model, CLS_CONFIG, shifted(model, 5e-5), atol=1e-5)
    assert not bad.passed and bad.max_abs_diff == pytest.approx(5e-5, abs=5e-7)
    # The float32 floor of this tiny model is ~1e-7: it cannot excuse a 5e-5 error.
    floors = [o["float32_floor"] for c in bad.to_dict()["cases"] for o in c["outputs"]]
    assert max(floors) < 1e-6
    assert "FAIL" in bad.table() and "NO" in bad.table()


def test_run_parity_rec_reports_argmax_and_decoded_agreement():
    model = TinyRec().eval()
    report = parity.run_parity(model, REC_CONFIG, shifted(model, 0.0, flip_first_step=True),
                               characters=list("abcd"), atol=1e-5).to_dict()
    shapes = [c["outputs"][0]["shape"] for c in report["cases"]]
    assert shapes[:4] == [[1, 20, 5], [1, 40, 5], [3, 20, 5], [3, 40, 5]]  # widths 160/320, batch 1/3
    for case in report["cases"]:
        steps = case["outputs"][0]["shape"][1]
        assert case["argmax_agreement"] == pytest.approx(1 - 1 / steps)  # step 0 changed in every item
        assert case["decoded_agreement"] == 0.0  # a changed first class always changes the collapsed path
        assert case["decoded_reference"] != case["decoded_converted"]
        assert set(case["decoded_reference"]) <= set("abcd")
    assert not report["passed"]


def test_report_round_trips_through_parity_json(tmp_path):
    model = TinyCls().eval()
    report = parity.run_parity(model, CLS_CONFIG, shifted(model, 0.0))
    report.write(tmp_path / "parity.json")
    import json

    data = json.loads((tmp_path / "parity.json").read_text())
    assert data["passed"] and data["tolerance"]["atol"] == parity.DEFAULT_ATOL
    assert data["reference"] == "test program" and data["task"] == "cls"
    assert not list(tmp_path.glob(".*tmp"))


def test_compare_state_dicts_reports_per_tensor_distance():
    a = {"w": torch.ones(3, 3), "b": torch.zeros(3), "extra": torch.zeros(1)}
    b = {"w": torch.ones(3, 3), "b": torch.tensor([0.0, 0.25, 0.0])}
    result = parity.compare_state_dicts(a, b)
    assert not result["identical"] and result["differing_tensors"] == 1
    assert result["max_abs_diff"] == pytest.approx(0.25)
    assert result["tensors"][0]["key"] == "b" and result["only_trained"] == ["extra"]
    assert "1/2 tensors equal" in result["summary"] and "1 only in the trained conversion" in result["summary"]
    same = parity.compare_state_dicts({"w": torch.ones(2), "thresh": torch.ones(1)}, {"w": torch.ones(2) + 1e-7})
    assert same["identical"] and same["only_trained"] == ["thresh"]
    missing = parity.compare_state_dicts({"w": torch.ones(2)}, {"w": torch.ones(2), "other": torch.ones(1)})
    assert not missing["identical"] and missing["only_inference"] == ["other"]


def test_missing_paddle_is_a_parity_error_with_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "paddle", None)
    assert not parity.paddle_available()
    with pytest.raises(ParityError, match=r"pip install 'ocrconv\[parity\]'"):
        parity.import_paddle()
    with pytest.raises(ParityError, match="not installed"):
        parity.PaddleProgram("/nonexistent")


def test_find_inference_prefix_skips_appledouble_junk(tmp_path):
    inner = tmp_path / "m_infer"
    inner.mkdir()
    for name in ("inference.pdmodel", "inference.pdiparams", "._inference.pdmodel"):
        (inner / name).write_bytes(b"x")
    assert parity.find_inference_prefix(tmp_path) == inner / "inference"
    assert parity.find_inference_prefix(inner / "inference.pdmodel") == inner / "inference"
    with pytest.raises(ParityError, match="no Paddle inference program"):
        parity.find_inference_prefix(tmp_path / "nothing")


@pytest.mark.paddle
def test_paddle_program_equals_jit_load_and_the_fixture_outputs(tmp_path):
    """The un-optimised predictor is bit-identical to paddle.jit.load; both match the shipped outputs up to
    the CPU kernels of the machine that made them (3e-7 here)."""
    from converter.unpack import safe_extract

    paddle = parity.import_paddle()
    row = "ch_ppocr_mobile_v2.0_cls"
    unpacked = safe_extract(fixture_data.infer_tar(row), tmp_path / "infer")
    program = parity.PaddleProgram(unpacked)
    layer = paddle.jit.load(str(program.prefix))
    layer.eval()
    expected = fixture_data.expected(row)
    for x, y in (("x0", "y0"), ("x1", "y1")):
        (out,) = program(expected[x])
        assert np.array_equal(out, layer(paddle.to_tensor(expected[x])).numpy())
        assert out.shape == expected[y].shape
        assert np.abs(out - expected[y]).max() <= 1e-6
