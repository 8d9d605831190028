"""Parity checker: Paddle's own inference program versus the converted PyTorch model, on the same inputs.

The reference is the exported inference program run by Paddle Inference with IR optimisation switched off
(``switch_ir_optim(False)``), which reproduces ``paddle.jit.load`` exactly; the optimised predictor fuses
kernels and moves outputs by up to 2.3e-4. This is the only library module that imports PaddlePaddle, and
only inside :func:`import_paddle`.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from converter.errors import ParityError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'ocrconv[parity]'"
DEFAULT_ATOL = 1e-5
# For class probabilities (rec, cls), relative differences, taken against max(|reference|, REL_FLOOR), must also
# stay within DEFAULT_RTOL, or within FLOOR_FACTOR x the relative float32 floor where that is larger: an absolute
# limit alone lets a wrong class of a 6625-class head pass (its probability may be 1e-4 while the limit is 1e-5 or
# more). Det maps are held to the absolute limit only: a sigmoid's relative error in its tail equals the logit's
# absolute error, which float32 accumulation order moves by far more than a 1-ulp input nudge does (random-weight
# PP-OCRv4 server det fixture, rendered page: relative 4.5 between Paddle and us, 32 x its relative floor 2.0,
# while the absolute 0.30 is within 32 x its floor 0.39).
REL_FLOOR = 1e-6
DEFAULT_RTOL = 1e-3
RELATIVE_TASKS = ("rec", "cls")
# The float32 floor of the converted model on an input is how far its float32 output moves when the input is
# nudged by about one float32 ulp (relative ULP_NUDGE, NUDGES seeded draws): it holds the rounding noise and the
# conditioning of the network at that input. A difference up to FLOOR_FACTOR x that floor is float32 physics, not a
# conversion error. Measured: Paddle's float32 program, compared with a float64 run of the converted model, is off
# by up to 12x our own float32 rounding (ch_ppocr_mobile_v2.0_rec fixture, rendered text: 1.0e-3 vs 8.5e-5), 5.4x
# on the real ch_PP-OCRv4_det; on the random-weight ch_PP-OCRv4_server_det fixture's rendered page activations reach
# 3e4 and a 1-ulp nudge alone moves Paddle's map by 0.034 and ours by 0.014, while the two differ by 0.31.
# A conversion error still shows on the well-conditioned random inputs, where the floor is ~1e-6.
ULP_NUDGE = 1e-7
NUDGES = 2
FLOOR_FACTOR = 32.0
RENDERED_TEXT = "Hello PaddleOCR 2026"
# Same-weight tolerance when comparing converted weights with those of the released inference model.
WEIGHTS_RTOL = 1e-5


def import_paddle():
    """Import PaddlePaddle with the classic program format enabled, or raise ParityError with the install hint."""
    os.environ.setdefault("FLAGS_enable_pir_api", "0")
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        with warnings.catch_warnings():  # Paddle warns about ccache and friends on import
            warnings.simplefilter("ignore")
            return importlib.import_module("paddle")
    except ImportError as exc:
        raise ParityError(
            f"the parity check needs PaddlePaddle, which is not installed ({exc}); install it with: {INSTALL_HINT}"
        ) from exc
    finally:  # importing Paddle installs an INFO handler on the root logger; keep the application's logging
        root.handlers[:] = handlers
        root.setLevel(level)


def paddle_available() -> bool:
    """True when PaddlePaddle is importable (without importing it)."""
    if "paddle" in sys.modules:
        return sys.modules["paddle"] is not None
    try:
        return importlib.util.find_spec("paddle") is not None
    except (ImportError, ValueError):
        return False


def find_inference_prefix(path: str | os.PathLike) -> Path:
    """The ``.../inference`` prefix of the exported program in ``path`` (a directory, prefix or .pdmodel file)."""
    path = Path(path)
    if path.suffix in (".pdmodel", ".pdiparams"):
        return path.with_suffix("")
    if path.with_suffix(".pdmodel").is_file():
        return path
    if path.is_dir():
        models = sorted(p for p in path.rglob("*.pdmodel") if not p.name.startswith("._"))
        if len(models) == 1:
            return models[0].with_suffix("")
        if models:
            raise ParityError(f"{path} holds several inference programs: {', '.join(map(str, models))}")
    raise ParityError(f"no Paddle inference program (.pdmodel + .pdiparams) found at {path}")


class PaddleProgram:
    """An exported inference program, run by Paddle Inference without IR optimisation on the CPU
    (``threads`` defaults to torch's thread count); ``params`` replaces its ``.pdiparams`` file (e.g. one written
    by :func:`converter.paddle_io.rewrite_params`)."""

    def __init__(self, prefix: str | os.PathLike, threads: int | None = None, params: str | os.PathLike | None = None):
        paddle = import_paddle()
        from paddle import inference

        self.prefix = find_inference_prefix(prefix)
        self.params = Path(params) if params is not None else self.prefix.with_suffix(".pdiparams")
        self.paddle_version = paddle.__version__
        config = inference.Config(str(self.prefix.with_suffix(".pdmodel")), str(self.params))
        config.switch_ir_optim(False)
        config.disable_gpu()
        config.disable_glog_info()
        config.set_cpu_math_library_num_threads(threads or torch.get_num_threads())
        self._predictor = inference.create_predictor(config)
        names = self._predictor.get_input_names()
        if len(names) != 1:
            raise ParityError(f"{self.prefix}: expected one input, the program has {names}")
        self._input = self._predictor.get_input_handle(names[0])

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        """Outputs in the program's fetch order."""
        self._input.reshape(list(x.shape))
        self._input.copy_from_cpu(np.ascontiguousarray(x, dtype=np.float32))
        self._predictor.run()
        return [self._predictor.get_output_handle(n).copy_to_cpu() for n in self._predictor.get_output_names()]


def torch_outputs(model: torch.nn.Module, x: np.ndarray) -> list[np.ndarray]:
    """Run the PyTorch model in its parameters' dtype; outputs as a list in Paddle's fetch order."""
    param = next(model.parameters())
    with torch.inference_mode():
        out = model(torch.from_numpy(np.ascontiguousarray(x)).to(param.dtype))
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    return [o.numpy() for o in outs]


# ----------------------------------------------------------------------------------------------- inputs

def _font(size: int):
    from PIL import ImageFont

    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def render_text(text: str, height: int, font_size: int | None = None) -> np.ndarray:
    """Black text on white, ``height x (text width + margins) x 3`` uint8, drawn with Pillow (DejaVu Sans if present)."""
    from PIL import Image, ImageDraw

    font = _font(font_size or max(8, int(height * 0.6)))
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)
    margin = height // 4
    image = Image.new("RGB", (right - left + 2 * margin, height), "white")
    ImageDraw.Draw(image).text((margin - left, (height - (bottom - top)) // 2 - top), text, fill="black", font=font)
    return np.asarray(image)


def rec_input(image: np.ndarray, height: int, max_width: int, mean: Sequence[float] = (0.5, 0.5, 0.5),
              std: Sequence[float] = (0.5, 0.5, 0.5)) -> np.ndarray:
    """PaddleOCR's rec/cls preprocessing of an ``HxWx3`` uint8 image: resize to ``height`` keeping the aspect
    ratio (width at most ``max_width``), scale to [0, 1], normalise, zero-pad on the right -> ``1x3xHxmax_width``."""
    from PIL import Image

    width = min(max_width, int(np.ceil(height * image.shape[1] / image.shape[0])))
    resized = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
    x = (resized.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    padded = np.zeros((height, max_width, 3), np.float32)
    padded[:, :width] = x
    return padded.transpose(2, 0, 1)[None]


def text_line_input(text: str, height: int, max_width: int, mean: Sequence[float] = (0.5, 0.5, 0.5),
                    std: Sequence[float] = (0.5, 0.5, 0.5)) -> np.ndarray:
    """A rendered text line as a rec/cls input ``1x3xHxmax_width`` (see :func:`rec_input`)."""
    return rec_input(render_text(text, height), height, max_width, mean, std)


def text_page_input(height: int, width: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A rendered page with three text lines as a det input ``1x3xHxW``."""
    page = np.full((height, width, 3), 255, np.uint8)
    for i, text in enumerate((RENDERED_TEXT, "ocrconv parity", "0123456789")):
        line = render_text(text, height // 6)[:, :width - width // 10]
        top, left = height // 10 + i * (height // 4), width // 20
        page[top:top + line.shape[0], left:left + line.shape[1]] = line
    x = (page.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return x.transpose(2, 0, 1)[None]


def parity_inputs(config: Mapping, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """Fixed inputs for a task: seeded U(0,1) tensors at several shapes and batch sizes, plus a rendered text image."""
    task = config["task"]
    pre = config.get("preprocess") or {}
    mean, std = pre.get("mean", (0.5, 0.5, 0.5)), pre.get("std", (0.5, 0.5, 0.5))
    if task == "det":
        shapes = [(1, 3, 320, 320), (2, 3, 320, 480)]
    elif task == "rec":
        height = int(pre.get("image_shape", (3, 48, 320))[1])
        shapes = [(batch, 3, height, width) for batch in (1, 3) for width in (160, 320)]
    elif task == "cls":
        shapes = [(1, 3, 48, 192), (3, 3, 48, 192)]
    else:
        raise ParityError(f"unknown task {task!r} in the model config")
    cases = []
    for i, shape in enumerate(shapes):
        rng = np.random.RandomState(seed + i)
        cases.append((f"random U(0,1) seed={seed + i} {'x'.join(map(str, shape))}", rng.uniform(0, 1, shape).astype(np.float32)))
    if task == "det":
        cases.append((f"rendered text page 1x3x320x640", text_page_input(320, 640, mean, std)))
    else:
        c, h, w = (3, 48, 192) if task == "cls" else (3, shapes[0][2], 320)
        cases.append((f"rendered text line {RENDERED_TEXT!r} 1x{c}x{h}x{w}", text_line_input(RENDERED_TEXT, h, w, mean, std)))
    return cases


# ------------------------------------------------------------------------------------------- comparison

def decode_texts(probs: np.ndarray, characters: Sequence[str] | None, reverse: bool = False) -> list[str]:
    """Greedy CTC texts of ``probs`` (N, T, C); without a dictionary class ``i`` is written ``<i>``."""
    from architectures.postprocess import ctc_greedy_decode

    chars = list(characters) if characters is not None else [f"<{i}>" for i in range(1, probs.shape[-1])]
    texts = [r.text for r in ctc_greedy_decode(probs, chars)]
    return [t[::-1] for t in texts] if reverse else texts


def _max_differences(reference: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """Largest absolute and relative (denominator ``max(|reference|, REL_FLOOR)``) difference, in float64."""
    if not reference.size:
        return 0.0, 0.0
    reference = reference.astype(np.float64)
    diff = np.abs(reference - other.astype(np.float64))
    return float(diff.max()), float((diff / np.maximum(np.abs(reference), REL_FLOOR)).max())


def compare_arrays(reference: np.ndarray, converted: np.ndarray, atol: float, float32_floor: float | None = None,
                   floor_factor: float = FLOOR_FACTOR, rtol: float | None = DEFAULT_RTOL,
                   float32_rel_floor: float | None = None) -> dict:
    """Max abs diff, max rel diff (elementwise, denominator ``max(|ref|, REL_FLOOR)``) and pass/fail.

    The absolute limit is ``atol`` and, unless ``rtol`` is None, the relative one ``rtol``; each is raised to
    ``floor_factor`` times the model's float32 floor on this input (absolute / relative, see FLOOR_FACTOR) where
    that is larger, and both must hold.
    """
    if reference.shape != converted.shape:
        return {"shape": list(reference.shape), "converted_shape": list(converted.shape), "max_abs_diff": None,
                "max_rel_diff": None, "float32_floor": float32_floor, "limit": atol, "passed": False}
    max_abs, max_rel = _max_differences(reference, converted)
    limit = max(atol, floor_factor * float32_floor) if float32_floor is not None else atol
    rel_limit = None
    if rtol is not None:
        rel_limit = max(rtol, floor_factor * float32_rel_floor) if float32_rel_floor is not None else rtol
    return {"shape": list(reference.shape), "max_abs_diff": max_abs, "max_rel_diff": max_rel,
            "float32_floor": float32_floor, "float32_rel_floor": float32_rel_floor, "limit": limit,
            "rel_limit": rel_limit,
            "passed": (bool(np.isfinite(converted).all()) and max_abs <= limit
                       and (rel_limit is None or max_rel <= rel_limit))}


@dataclass
class ParityReport:
    """Result of one parity run; :meth:`to_dict` is what parity.json holds."""

    data: dict

    @property
    def passed(self) -> bool:
        """True when every output of every case is within tolerance."""
        return bool(self.data["passed"])

    @property
    def max_abs_diff(self) -> float | None:
        """Largest absolute difference over every case and output."""
        return self.data["max_abs_diff"]

    def to_dict(self) -> dict:
        """JSON-ready dictionary."""
        return self.data

    def write(self, path: str | os.PathLike) -> None:
        """Write parity.json (temp file, then rename)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    def table(self) -> str:
        """Human-readable table: one row per case and output."""
        header = ["input", "output", "shape", "max abs diff", "max rel diff", "f32 floor", "argmax agree",
                  "text agree", "ok"]
        rows = []
        for case in self.data["cases"]:
            for out in case["outputs"]:
                rows.append([
                    case["input"], str(out["index"]), "x".join(map(str, out["shape"])),
                    _fmt(out["max_abs_diff"]), _fmt(out["max_rel_diff"]), _fmt(out.get("float32_floor")),
                    _fmt_ratio(case.get("argmax_agreement")), _fmt_ratio(case.get("decoded_agreement")),
                    ("yes" if out["passed"] and out["max_abs_diff"] <= self.data["tolerance"]["atol"]
                     and out["max_rel_diff"] <= (self.data["tolerance"].get("rtol") or float("inf"))
                     else "yes (floor)" if out["passed"] else "NO"),
                ])
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        verdict = "PASS" if self.passed else "FAIL"
        tol = self.data["tolerance"]
        floor_rule = (f", or {tol['float32_floor_factor']:g} x the float32 floor where that is larger"
                      if tol.get("float32_floor_factor") else "")
        rtol = f" and {tol['rtol']:g} relative" if tol.get("rtol") else ""
        lines.append(f"{verdict}: max abs diff {_fmt(self.max_abs_diff)} (tolerance {tol['atol']:g} abs{rtol} on "
                     f"{tol['on']}{floor_rule}); reference: {self.data['reference']}")
        for case in self.data["cases"]:
            if "decoded_converted" in case and case["input"].startswith("rendered"):
                lines.append(f"decoded text ({case['input']}): paddle {case['decoded_reference']!r} / "
                             f"pytorch {case['decoded_converted']!r}")
        half = self.data.get("float16_weights")
        if half:
            lines.append(f"float16 weights move the outputs by up to {_fmt(half['max_abs_diff'])} "
                         f"(parity above is of the float32 conversion)")
        substitution = reference_weights_line(self.data)
        if substitution:
            lines.append(substitution)
        if self.data.get("verdict"):
            lines.append(f"verdict: {self.data['verdict']}")
        weights = self.data.get("weights_vs_inference")
        if weights:
            lines.append(f"trained vs released inference weights: {weights['summary']}")
        return "\n".join(lines)


def reference_weights_line(data: Mapping) -> str | None:
    """One line on which weights Paddle's program ran with, for a report compared with a trained checkpoint."""
    substitution = data.get("reference_weights") or {}
    if "checkpoint" not in substitution:
        return None
    detail = ""
    if substitution["substituted"]:
        detail = f" ({substitution['found']})"
    elif substitution.get("unresolved"):
        detail = (f" ({substitution['unresolved_count']} program parameter(s) not in it, e.g. "
                  + "; ".join(substitution["unresolved"][:3]) + ")")
    return f"reference weights: {substitution['weights']}{detail}"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _fmt_ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def run_parity(model: torch.nn.Module, config: Mapping, reference: str | os.PathLike | Callable, *,
               characters: Sequence[str] | None = None, atol: float = DEFAULT_ATOL, seed: int = 0,
               floor_factor: float | None = FLOOR_FACTOR, progress: Callable[[str], None] | None = None,
               params: str | os.PathLike | None = None) -> ParityReport:
    """Compare ``model`` with Paddle's inference program (a prefix/directory, or a callable for tests); ``params``
    runs the program with another parameters file (see :class:`PaddleProgram`).

    ``characters`` (the resolved dictionary, class ``i + 1`` = ``characters[i]``) turns rec comparisons into
    decoded strings. With ``floor_factor`` the float32 floor of ``model`` is measured per input (see FLOOR_FACTOR);
    ``None`` holds every output to ``atol`` alone. Returns a
    :class:`ParityReport`; it does not raise on a mismatch.
    """
    start = time.perf_counter()
    program = (reference if callable(reference) and not isinstance(reference, (str, os.PathLike))
               else PaddleProgram(reference, params=params))
    post = config.get("postprocess") or {}
    reverse = bool(post.get("reverse", False))
    rtol = DEFAULT_RTOL if config["task"] in RELATIVE_TASKS else None
    model.eval()
    cases, overall, passed = [], 0.0, True
    for label, x in parity_inputs(config, seed):
        if progress:
            progress(label)
        ref_outs, got_outs = program(x), torch_outputs(model, x)
        if len(ref_outs) != len(got_outs):
            raise ParityError(f"Paddle's program returns {len(ref_outs)} outputs, the PyTorch model {len(got_outs)} "
                              f"(input {label})")
        floors = rel_floors = [None] * len(got_outs)
        if floor_factor:
            floors, rel_floors = [0.0] * len(got_outs), [0.0] * len(got_outs)
            for k in range(NUDGES):
                noise = np.random.RandomState(seed + 1000 + k).standard_normal(x.shape)
                nudged = torch_outputs(model, (x * (1 + ULP_NUDGE * noise)).astype(np.float32))
                moved = [_max_differences(a, b) for a, b in zip(got_outs, nudged)]
                floors = [max(f, m[0]) for f, m in zip(floors, moved)]
                rel_floors = [max(f, m[1]) for f, m in zip(rel_floors, moved)]
        outputs = []
        for i, (ref, got) in enumerate(zip(ref_outs, got_outs)):
            result = compare_arrays(ref, got, atol, floors[i], floor_factor or 0.0, rtol=rtol,
                                    float32_rel_floor=rel_floors[i])
            result["index"] = i
            outputs.append(result)
            passed &= result["passed"]
            if result["max_abs_diff"] is not None:
                overall = max(overall, result["max_abs_diff"])
        case = {"input": label, "outputs": outputs}
        if config["task"] in ("rec", "cls") and ref_outs[0].shape == got_outs[0].shape:
            case["argmax_agreement"] = float((ref_outs[0].argmax(-1) == got_outs[0].argmax(-1)).mean())
        if config["task"] == "rec" and ref_outs[0].shape == got_outs[0].shape:
            ref_text = decode_texts(ref_outs[0], characters, reverse)
            got_text = decode_texts(got_outs[0], characters, reverse)
            case["decoded_agreement"] = float(np.mean([a == b for a, b in zip(ref_text, got_text)]))
            case["decoded_reference"], case["decoded_converted"] = ref_text[0], got_text[0]
        cases.append(case)
    paddle_version = getattr(program, "paddle_version", None)
    data = {
        "reference": ("Paddle Inference, switch_ir_optim(False), CPU" if isinstance(program, PaddleProgram)
                      else getattr(program, "label", "custom reference")),
        "reference_program": str(getattr(program, "prefix", "")) or None,
        "paddle_version": paddle_version,
        "torch_version": torch.__version__,
        "task": config["task"],
        "family": config.get("family"),
        "tolerance": {"atol": atol, "rtol": rtol,
                      "on": "probabilities" if config["task"] != "det" else "probability maps",
                      "float32_floor_factor": floor_factor, "rel_floor": REL_FLOOR,
                      "ulp_nudge": ULP_NUDGE, "nudges": NUDGES,
                      "rule": "pass when max abs diff <= max(atol, float32_floor_factor * float32_floor) and (rtol "
                              "set: rec, cls) max rel diff <= max(rtol, float32_floor_factor * float32_rel_floor); "
                              "rel diff = |diff| / "
                              "max(|reference|, rel_floor); float32_floor (float32_rel_floor) = max over the nudges of "
                              "the abs (rel) difference between model(x) and model(x * (1 + ulp_nudge * N(0,1))) for "
                              "the converted model in float32"},
        "passed": passed,
        "max_abs_diff": overall,
        "cases": cases,
        "seconds": round(time.perf_counter() - start, 3),
    }
    return ParityReport(data)


def compare_state_dicts(converted: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
                        rtol: float = WEIGHTS_RTOL) -> dict:
    """Per-tensor distance between two converted state dicts (trained checkpoint vs released inference model).

    Information, not a verdict: releases are sometimes exported from another epoch than the trained checkpoint.
    ``identical`` ignores tensors only the trained side has (training-only branches such as DB's threshold map).
    """
    common = [k for k in converted if k in reference]
    tensors, differing, largest = [], 0, 0.0
    for key in common:
        a, b = converted[key].double(), reference[key].double()
        if a.shape != b.shape:
            tensors.append({"key": key, "shape": list(a.shape), "reference_shape": list(b.shape), "max_abs_diff": None})
            differing += 1
            continue
        diff = float((a - b).abs().max()) if a.numel() else 0.0
        scale = float(b.abs().max()) if b.numel() else 0.0
        same = diff <= rtol * max(scale, 1.0)
        differing += not same
        largest = max(largest, diff)
        tensors.append({"key": key, "shape": list(a.shape), "max_abs_diff": diff, "same": same})
    only_converted = sorted(set(converted) - set(reference))
    only_reference = sorted(set(reference) - set(converted))
    identical = differing == 0 and not only_reference  # extra trained tensors are training-only branches
    summary = (f"{len(common) - differing}/{len(common)} tensors equal (rtol {rtol:g}), largest |diff| {largest:.3g}"
               + (f", {len(only_converted)} only in the trained conversion" if only_converted else "")
               + (f", {len(only_reference)} only in the inference conversion" if only_reference else ""))
    return {"identical": identical, "summary": summary, "max_abs_diff": largest, "differing_tensors": differing,
            "only_trained": only_converted, "only_inference": only_reference,
            "tensors": sorted(tensors, key=lambda t: -(t["max_abs_diff"] or 0.0))}
