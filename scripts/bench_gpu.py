#!/usr/bin/env python
"""GPU throughput of the converted PyTorch models in float32 and float16, and whether float16 keeps rec decoding.

``--models DIR`` holds converted output directories (``ocrconv convert`` outputs: config.json + model.safetensors
[+ dict.txt]), loaded with ``architectures.load_pretrained``. A directory with config.json but no weights (used
for the ~100 MB server models that do not travel to the GPU machine) is built from its config with PyTorch's
default initialisation and timed only: its row says ``weights: random-init``.

Throughput: images/s at each batch size (det 3x640x640, rec 3xHx320 with H from config.json, cls 3x48x192),
``torch.inference_mode()``, cudnn.benchmark on, warm-up excluded, CUDA synchronised around ``--iters`` calls.
float16 = the model and its input in half precision (``load_pretrained(dtype=torch.float16)``).

float16 decode identity (rec models with a dictionary): a few text lines are rendered with Pillow's built-in
font, preprocessed like PaddleOCR's rec (resize to height H keeping the aspect ratio, width <= 320,
(x / 255 - 0.5) / 0.5, zero-pad right), decoded greedily (argmax, collapse repeats, drop blank 0) in float32 and
float16; reported: identical strings or not, the strings, max |prob diff|, per-frame argmax agreement.
det / cls: max |output diff| and (cls) argmax agreement between float16 and float32, as information.

    PYTHONPATH=. python scripts/bench_gpu.py --models gpu_models --json out.json [--device cuda] [--iters 50]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import architectures  # noqa: E402
from architectures.postprocess import ctc_greedy_decode  # noqa: E402
from converter.parity import rec_input  # noqa: E402
from architectures.pretrained import (CONFIG_FILE, WEIGHTS_FILE, architecture_config, load_pretrained,  # noqa: E402
                                     read_config)

TEXT_LINES = ["Hello World 2024", "PaddleOCR to PyTorch", "The quick brown fox", "invoice No. 83125-B",
              "Total: $1,299.00", "ocrconv fp16 check"]
REC_WIDTH = 320
DET_SIZE = 640
CLS_SHAPE = (48, 192)


def load_model(folder: Path, device: str, dtype: torch.dtype) -> tuple[torch.nn.Module, str]:
    """(model in eval mode on device/dtype, "converted" | "random-init")."""
    if (folder / WEIGHTS_FILE).is_file():
        return load_pretrained(folder, device=device, dtype=dtype), "converted"
    config = read_config(folder)
    torch.manual_seed(0)
    model = architectures.build(architecture_config(config)).to(device=device, dtype=dtype).eval()
    model.ocrconv_config = config
    model.characters = None
    return model, "random-init"


def input_hw(config: dict) -> tuple[int, int]:
    """(height, width) of the benchmark input for the model's task."""
    task = config["task"]
    if task == "det":
        return DET_SIZE, DET_SIZE
    if task == "cls":
        return CLS_SHAPE
    return int(config["preprocess"]["image_shape"][1]), REC_WIDTH


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def throughput(model: torch.nn.Module, shape: tuple[int, ...], dtype: torch.dtype, device: str, warmup: int,
               iters: int) -> dict:
    """images/s of ``model`` on random input of ``shape``; milliseconds per batch."""
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        _sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            model(x)
        _sync(device)
        elapsed = time.perf_counter() - start
    return {"batch": shape[0], "images_per_s": shape[0] * iters / elapsed, "ms_per_batch": elapsed / iters * 1e3,
            "iters": iters}


def render_line(text: str, height: int) -> np.ndarray:
    """A black-on-white text line (H x W x 3 uint8, BGR order like cv2) rendered with Pillow's default font."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=28)
    except TypeError:  # Pillow < 10.1: only the small bitmap font
        font = ImageFont.load_default()
    left, top, right, bottom = font.getbbox(text)
    image = Image.new("RGB", (right - left + 16, bottom - top + 12), "white")
    ImageDraw.Draw(image).text((8 - left, 6 - top), text, fill="black", font=font)
    return np.asarray(image)[:, :, ::-1].copy()


def _first(output):
    return output[-1] if isinstance(output, (list, tuple)) else output


def fp16_agreement(model32: torch.nn.Module, model16: torch.nn.Module, config: dict, device: str) -> dict:
    """How float16 compares with float32: decoded strings for rec, output differences for all."""
    task = config["task"]
    height, width = input_hw(config)
    if task == "rec":
        batch = np.concatenate([rec_input(render_line(t, height), height, width) for t in TEXT_LINES])
    else:
        batch = np.random.RandomState(0).uniform(0, 1, (2, 3, height, width)).astype(np.float32)
    x = torch.from_numpy(batch).to(device)
    with torch.inference_mode():
        y32 = _first(model32(x)).float().cpu().numpy()
        y16 = _first(model16(x.half())).float().cpu().numpy()
    result = {"max_abs_diff": float(np.abs(y32 - y16).max()), "finite_fp16": bool(np.isfinite(y16).all())}
    if task == "rec":
        characters = model32.characters
        if characters is not None:
            s32, a32 = [r.text for r in ctc_greedy_decode(y32, characters)], y32.argmax(-1)
            s16, a16 = [r.text for r in ctc_greedy_decode(y16, characters)], y16.argmax(-1)
            result.update({"strings_identical": s32 == s16, "fp32": s32, "fp16": s16,
                           "frame_argmax_agreement": float((a32 == a16).mean()), "lines": TEXT_LINES,
                           "fp32_reads_lines": sum(a.strip() == b for a, b in zip(s32, TEXT_LINES))})
        else:
            result["frame_argmax_agreement"] = float((y32.argmax(-1) == y16.argmax(-1)).mean())
    elif task == "cls":
        result["argmax_agreement"] = float((y32.argmax(-1) == y16.argmax(-1)).mean())
    return result


def bench_model(folder: Path, device: str, batches: dict[str, list[int]], warmup: int, iters: int) -> dict:
    """Throughput in float32 and float16 at each batch size, plus the float16 comparison."""
    model32, weights = load_model(folder, device, torch.float32)
    model16, _ = load_model(folder, device, torch.float16)
    config = model32.ocrconv_config
    height, width = input_hw(config)
    entry = {"model": folder.name, "family": config.get("family"), "task": config["task"], "weights": weights,
             "input": f"3x{height}x{width}", "throughput": []}
    for batch in batches[config["task"]]:
        for name, model, dtype in (("fp32", model32, torch.float32), ("fp16", model16, torch.float16)):
            r = throughput(model, (batch, 3, height, width), dtype, device, warmup, iters)
            entry["throughput"].append({"dtype": name, **r})
            print(f"{folder.name:32s} {config['task']:3s} {name} batch {batch:2d}: {r['images_per_s']:9.1f} img/s "
                  f"({r['ms_per_batch']:.2f} ms)", flush=True)
    try:
        entry["fp16_vs_fp32"] = fp16_agreement(model32, model16, config, device)
    except Exception as exc:  # keep the throughput figures of a lent machine
        entry["fp16_vs_fp32"] = {"error": f"{type(exc).__name__}: {exc}"}
    cmp = entry["fp16_vs_fp32"]
    if "strings_identical" in cmp:
        print(f"{folder.name:32s} fp16 decoding identical: {cmp['strings_identical']} "
              f"(max |prob diff| {cmp['max_abs_diff']:.2e}, frame agreement {cmp['frame_argmax_agreement']:.4f})",
              flush=True)
    del model32, model16
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return entry


def machine(device: str) -> dict:
    """What ran the benchmark."""
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": device}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        info.update({"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                     "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()})
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, required=True, help="folder of converted model directories")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (to test the script)")
    parser.add_argument("--iters", type=int, default=50, help="timed calls per measurement (default 50)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls first (default 10)")
    parser.add_argument("--det-batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rec-batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--cls-batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--only", nargs="*", help="model directory names to run (default: all)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("CUDA is not available; use --device cpu to test the script")
    torch.backends.cudnn.benchmark = True
    batches = {"det": args.det_batches, "rec": args.rec_batches, "cls": args.cls_batches}
    folders = sorted(p for p in args.models.iterdir() if (p / CONFIG_FILE).is_file())
    if args.only:
        folders = [p for p in folders if p.name in args.only]
    result = {"machine": machine(args.device), "iters": args.iters, "warmup": args.warmup, "batches": batches,
              "models": [], "errors": []}
    for folder in folders:
        try:
            result["models"].append(bench_model(folder, args.device, batches, args.warmup, args.iters))
        except Exception as exc:  # one broken model must not lose the other measurements of a lent machine
            result["errors"].append({"model": folder.name, "error": f"{type(exc).__name__}: {exc}"})
            print(f"{folder.name}: FAILED {type(exc).__name__}: {exc}", flush=True)
        if args.json:
            _write_json(args.json, result)
    if args.json:
        _write_json(args.json, result)
    return 1 if result["errors"] else 0


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
