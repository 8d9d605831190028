"""Small, dependency-free post-processing for the converted models (numpy only).

* CTC greedy decoding as PaddleOCR's ``CTCLabelDecode`` does it: argmax per time step, collapse repeats,
  drop the blank (class 0); class ``i`` is ``characters[i - 1]``, where ``characters`` is the dictionary's lines
  plus a space at the end (``use_space_char``). Another blank index keeps the other classes in order.
* DB probability-map thresholding into connected text regions (the first step of ``DBPostProcess``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np


def load_character_list(dict_path: str | Path, use_space_char: bool = True) -> list[str]:
    """The characters of a PaddleOCR dictionary file (one per line), plus ``" "`` when ``use_space_char``."""
    with open(dict_path, "rb") as handle:
        characters = [line.decode("utf-8").rstrip("\r\n") for line in handle]
    if use_space_char:
        characters.append(" ")
    return characters


@dataclass(frozen=True)
class CTCResult:
    """One decoded line: ``text``, ``score`` (mean max-probability of the kept steps, 0 when empty) and the
    class ``indices`` that were kept."""

    text: str
    score: float
    indices: tuple[int, ...]


def _as_array(values) -> np.ndarray:
    """A numpy array of a numpy array, nested sequence or torch tensor (bfloat16, which numpy lacks, as float32)."""
    if not hasattr(values, "detach"):
        return np.asarray(values)
    tensor = values.detach().cpu()
    try:
        return tensor.numpy()
    except TypeError:
        return tensor.float().numpy()


def ctc_greedy_decode(probs, characters: Sequence[str], blank: int = 0) -> list[CTCResult]:
    """Greedy CTC decoding of ``probs`` (N, T, C) (softmax or logits; numpy array or torch tensor of any float
    dtype).

    ``characters`` lists the C - 1 non-blank classes in order: with ``blank=0`` (PaddleOCR) class ``i`` is
    ``characters[i - 1]``; with another ``blank`` the classes below it are ``characters[i]``, those above
    ``characters[i - 1]``. A list of another length raises ValueError (a dictionary that does not fit the model).
    """
    array = _as_array(probs)
    if array.ndim != 3:
        raise ValueError(f"expected CTC probabilities of shape (N, T, C), got {array.shape}")
    classes = array.shape[2]
    if characters is None:
        raise ValueError("characters is None: pass the model's character list (load_pretrained reads it from dict.txt; "
                         "this model directory has none)")
    if not 0 <= blank < classes:
        raise ValueError(f"blank index {blank} is outside the model's {classes} classes")
    if classes != len(characters) + 1:
        raise ValueError(f"the model has {classes} classes but the character list has {len(characters)} characters "
                         f"(+1 blank): the dictionary does not fit the model")
    indices = array.argmax(axis=2)
    best = array.max(axis=2)
    results = []
    for seq, conf in zip(indices, best):
        keep = np.ones(len(seq), dtype=bool)
        keep[1:] = seq[1:] != seq[:-1]
        keep &= seq != blank
        kept = seq[keep]
        text = "".join(characters[int(i) - 1 if i > blank else int(i)] for i in kept)
        score = float(conf[keep].mean()) if kept.size else 0.0
        results.append(CTCResult(text=text, score=score, indices=tuple(int(i) for i in kept)))
    return results


@dataclass(frozen=True)
class Region:
    """A connected region of the thresholded det map: bounding box (x0, y0, x1, y1, inclusive) and pixel count."""

    box: tuple[int, int, int, int]
    area: int


def _find(parent: np.ndarray, i: int) -> int:
    root = i
    while parent[root] != root:
        root = parent[root]
    while parent[i] != root:
        parent[i], i = root, parent[i]
    return root


def connected_regions(mask: np.ndarray, min_area: int = 1) -> list[Region]:
    """4-connected components of a 2-D boolean mask, sorted top-to-bottom then left-to-right.

    Union-find over horizontal runs, so the cost grows with the number of runs, not pixels.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    runs: list[tuple[int, int, int]] = []  # (row, start, end exclusive)
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    row_starts: list[int] = []
    for row in range(mask.shape[0]):
        row_starts.append(len(runs))
        starts = np.flatnonzero(edges[row] == 1)
        ends = np.flatnonzero(edges[row] == -1)
        runs.extend((row, int(s), int(e)) for s, e in zip(starts, ends))
    row_starts.append(len(runs))
    parent = np.arange(len(runs))
    for row in range(1, mask.shape[0]):
        above = range(row_starts[row - 1], row_starts[row])
        current = range(row_starts[row], row_starts[row + 1])
        j = above.start
        for i in current:
            _, start, end = runs[i]
            while j < above.stop and runs[j][2] <= start:
                j += 1
            k = j
            while k < above.stop and runs[k][1] < end:
                a, b = _find(parent, i), _find(parent, k)
                if a != b:
                    parent[max(a, b)] = min(a, b)
                k += 1
    regions: dict[int, list[int]] = {}
    for i, (row, start, end) in enumerate(runs):
        root = _find(parent, i)
        box = regions.setdefault(root, [start, row, end - 1, row, 0])
        box[0] = min(box[0], start)
        box[2] = max(box[2], end - 1)
        box[3] = row
        box[4] += end - start
    out = [Region(box=(b[0], b[1], b[2], b[3]), area=b[4]) for b in regions.values() if b[4] >= min_area]
    return sorted(out, key=lambda r: (r.box[1], r.box[0]))


def db_regions(prob_map, thresh: float = 0.3, min_area: int = 10) -> list[list[Region]]:
    """Text regions of DB probability maps (N, 1, H, W) or (H, W): ``prob > thresh``, connected components.

    ``prob_map`` may also be a det model's output tuple: PP-OCRv4 server det returns ``(cbn_maps, maps)``, and the
    first map is the one PaddleOCR post-processes (its ``outputs[0]``). Torch tensors of any float dtype work."""
    if isinstance(prob_map, tuple) and prob_map:
        prob_map = prob_map[0]
    array = _as_array(prob_map)
    if array.ndim == 2:
        array = array[None, None]
    if array.ndim != 4 or array.shape[1] != 1:
        raise ValueError(f"expected a probability map of shape (N, 1, H, W) or (H, W), got {array.shape}")
    return [connected_regions(item[0] > thresh, min_area) for item in array]
