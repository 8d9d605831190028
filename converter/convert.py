"""The conversion pipeline: NAME|PATH -> Paddle weights -> rules -> output directory (+ parity), and batches.

An output directory holds ``model.safetensors`` (with provenance metadata), ``config.json`` (what
``architectures.build`` needs plus pre/post-processing facts), ``dict.txt`` for recognition models and
``parity.json`` when checked. It is written to a temporary directory next to the target and renamed into
place, so an output is never half-written; with ``force`` an existing output is swapped out only after the new
one is complete.
"""
from __future__ import annotations

import json
import logging
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

from architectures.pretrained import CONFIG_FILE, DICT_FILE, METADATA_KEY, WEIGHTS_FILE, load_pretrained
from converter import __version__, dictionaries, parity
from converter.errors import (DictionaryError, FamilyError, OcrconvError, OutputError, ParityError,
                              UnknownModelError)

log = logging.getLogger(__name__)

PARITY_FILE = "parity.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16}
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
# Parity tolerances (abs, on probabilities). float32 deploy form: the 1e-5. The training form of a
# re-parameterisable backbone (PPLCNetV3) runs unfused branches against Paddle's fused program: PaddleOCR
# itself measures up to 7.4e-5 there.
ATOL_DEPLOY = parity.DEFAULT_ATOL
ATOL_TRAIN_FORM = 2e-4

DET_FACTS = {
    "preprocess": {"channel_order": "BGR", "scale": 1 / 255, "mean": [0.485, 0.456, 0.406],
                   "std": [0.229, 0.224, 0.225], "size_multiple": 32, "limit_side_len": 960, "limit_type": "max"},
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


def resolve_source(target: str | os.PathLike, *, artifact: str | None = None, mirror: str | None = None,
                   cache_dir: str | os.PathLike | None = None, offline: bool = False) -> _Source:
    """Turn NAME|PATH into a local path: a manifest name is downloaded and unpacked through the cache."""
    path = Path(target)
    if path.exists():
        entry, kind = _entry_for_path(path.resolve())
        return _Source(name=entry.name if entry else _stem(path), path=path, entry=entry, artifact=kind,
                       url=None, notes=[])
    from converter import download

    entry = _manifest().get_model(str(target))
    available = [k for k in ARTIFACT_ORDER if k in entry.artifacts]
    notes = []
    if artifact is None:
        artifact = available[0] if available else None
        if artifact is None:
            raise OcrconvError(f"{entry.name}: the manifest lists no downloadable artifact")
        notes.append(f"artifact: {artifact} (available: {', '.join(available)})")
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
        resolved = dictionaries.resolve_for_head(source.entry.dict, num_classes, family)
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
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
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


def _commit(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished temp directory into place; with force, swap out the old output only now."""
    if out.exists():
        if not force:
            raise OutputError(f"{out} appeared while converting; not overwritten (use --force)")
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        try:
            os.replace(tmp, out)
        except OSError:
            os.replace(old / out.name, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


# ------------------------------------------------------------------------------------------------ convert

def convert(target: str | os.PathLike, *, out: str | os.PathLike | None = None, artifact: str | None = None,
            family: str | None = None, dictionary: str | None = None, reference: str | os.PathLike | None = None,
            mirror: str | None = None, cache_dir: str | os.PathLike | None = None, offline: bool = False,
            train_form: bool = False, check: bool | None = None, dtype: str = "float32", force: bool = False,
            atol: float | None = None, skip_up_to_date: bool = False,
            progress: Callable[[str], None] | None = None) -> ConvertResult:
    """Convert a manifest NAME or a local PATH into an output directory; see the module docstring.

    ``check=None`` runs the parity check when PaddlePaddle is installed; ``check=True`` without Paddle adds a
    notice and skips it. ``skip_up_to_date`` (batches) leaves an existing output alone when its source sha256
    and ocrconv version match. Raises an :class:`OcrconvError` subclass on bad input; nothing is written then.
    """
    from converter import paddle_io, rules

    start = time.perf_counter()
    say = progress or (lambda message: None)
    if dtype not in DTYPES:
        raise OcrconvError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if check is None:
        check = parity.paddle_available()
    refuse_existing = not force and not skip_up_to_date
    if out is not None and refuse_existing:  # before any download
        _refuse_existing(Path(out))

    source = resolve_source(target, artifact=artifact, mirror=mirror, cache_dir=cache_dir, offline=offline)
    out = Path(out) if out is not None else Path.cwd() / source.name
    if refuse_existing:
        _refuse_existing(out)
    say(f"reading {source.path}")
    weights = paddle_io.load(source.path)
    source_sha256 = _source_sha256(weights)
    artifact = source.artifact or weights.kind
    fam = _family_for(weights, source, family)

    if skip_up_to_date and out.exists() and not force:
        meta = read_output_metadata(out)
        if meta and meta.get("source_sha256") == source_sha256() and meta.get("ocrconv_version") == __version__:
            previous = _read_parity(out)
            return ConvertResult(name=source.name, out=out, status="up-to-date", artifact=meta.get("artifact"),
                                 family=meta.get("family"), form=meta.get("form"), source=meta.get("source"),
                                 source_sha256=source_sha256(), parity=previous,
                                 notes=["output is up to date (same source sha256 and ocrconv version)"],
                                 seconds=round(time.perf_counter() - start, 3))
        raise OutputError(f"output directory {out} exists but was made from another source or ocrconv version "
                          f"({(meta or {}).get('source_sha256', 'unreadable')[:12]}..., "
                          f"{(meta or {}).get('ocrconv_version')}); use --force to replace it")

    form = "train" if train_form else "deploy"
    say(f"converting {fam} ({form} form)")
    conversion = rules.convert(weights, fam, form=form, kind=weights.kind)
    config = usage_facts(conversion.config)
    notes = source.notes + list(conversion.notes)

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
        "form": "train" if train_form else "fused", "dtype": dtype, "task": config["task"],
    }
    provenance = {"dropped": [[k, list(s), r] for k, s, r in conversion.dropped],
                  "weight_file": str(getattr(weights, "source", ""))}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _set_default_mode(tmp, 0o777)
        say(f"writing {out}")
        try:
            _write_directory(tmp, conversion.state_dict, metadata, provenance, config, characters, dtype)
        except OSError as exc:
            raise OutputError(f"cannot write the converted model to {out}: {exc}") from exc
        result = ConvertResult(name=source.name, out=out, status="converted", artifact=artifact, family=fam,
                               task=config["task"], form=metadata["form"], source=src_label,
                               source_sha256=source_sha256(), notes=notes)
        if check:
            _check_into(result, tmp, source, weights, conversion, fam, form, characters, config, atol, dtype,
                        reference, mirror, cache_dir, offline, say)
        _commit(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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


def _refuse_existing(out: Path) -> None:
    if out.exists():
        raise OutputError(f"output directory {out} already exists; use --force to replace it")


def _read_parity(out: Path) -> dict | None:
    path = out / PARITY_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


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

    if reference is not None:
        ref_weights = paddle_io.load(reference)
        return program_prefix(reference, scratch), ref_weights
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
    from converter import rules

    prefix, ref_weights = _reference_program(source, weights, reference, mirror, cache_dir, offline, scratch)
    if prefix is None:
        result.parity_skipped = ref_weights
        result.notes.append(f"parity not checked: {ref_weights}")
        return
    if ref_weights is not None:
        # Compared in the deploy form: an inference model holds fused convolutions only.
        ref_conversion = rules.convert(ref_weights, fam, form="deploy", kind=ref_weights.kind)
        deploy = conversion if form == "deploy" else rules.convert(weights, fam, form="deploy", kind=weights.kind)
        result.weights_vs_inference = parity.compare_state_dicts(deploy.state_dict, ref_conversion.state_dict)
    if atol is None:
        atol = ATOL_TRAIN_FORM if form == "train" else ATOL_DEPLOY
    say(f"checking parity against {prefix}")
    written = load_pretrained(tmp, dtype=torch.float32)
    # float16 storage is a lossy choice of the user: the conversion is verified in float32 and the effect of
    # rounding the weights to float16 is measured separately, as information.
    model = conversion.model.float() if dtype == "float16" else written
    report = parity.run_parity(model, config, prefix, characters=characters, atol=atol)
    data = report.to_dict()
    data["dtype"] = dtype
    data["form"] = result.form
    if dtype == "float16":
        data["float16_weights"] = float16_effect(model, written, config)
    if result.weights_vs_inference is not None:
        data["weights_vs_inference"] = result.weights_vs_inference
        if not result.weights_vs_inference["identical"] and not report.passed:
            data["verdict"] = ("outputs differ because the trained checkpoint's weights differ from the released "
                               "inference model (information, not a conversion failure)")
    parity.ParityReport(data).write(tmp / PARITY_FILE)
    result.parity = data
    weights_differ = result.weights_vs_inference is not None and not result.weights_vs_inference["identical"]
    if not report.passed and not weights_differ:
        result.status = "parity-failed"


def float16_effect(model32: torch.nn.Module, model16: torch.nn.Module, config: dict) -> dict:
    """How far float16-rounded weights move the outputs (max |diff| per parity input), computed in float32."""
    cases = []
    for label, x in parity.parity_inputs(config):
        diffs = [float(np.abs(a - b).max()) for a, b in zip(parity.torch_outputs(model32, x),
                                                           parity.torch_outputs(model16, x))]
        cases.append({"input": label, "max_abs_diff": max(diffs)})
    return {"note": "parity above is of the float32 conversion; these are the output changes caused by storing "
                    "the weights as float16 (information, not a verdict)",
            "max_abs_diff": max(c["max_abs_diff"] for c in cases), "cases": cases}


def check(target: str | os.PathLike, *, reference: str | os.PathLike | None = None, atol: float | None = None,
          mirror: str | None = None, cache_dir: str | os.PathLike | None = None, offline: bool = False,
          write: bool = True) -> parity.ParityReport:
    """Parity of a converted directory (or of a manifest NAME converted in memory) against Paddle's program.

    For a directory the reference is ``reference``, else the inference model it was converted from (the local
    path, or the manifest row's inference artifact through the cache); parity.json is rewritten there when
    ``write``. Raises ParityError when PaddlePaddle is missing.
    """
    from converter import paddle_io, rules

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
        with tempfile.TemporaryDirectory(prefix="ocrconv-check-") as scratch:
            report = parity.run_parity(model, config, program_prefix(reference, Path(scratch)),
                                       characters=characters, atol=atol)
        if write:
            report.write(path / PARITY_FILE)
        return report
    source = resolve_source(target, artifact="inference" if reference is None else None, mirror=mirror,
                            cache_dir=cache_dir, offline=offline)
    weights = paddle_io.load(source.path)
    if weights.kind != "inference" and reference is None:
        raise ParityError(f"{source.path} is a trained checkpoint; pass --reference PATH to an inference model")
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
        return parity.run_parity(conversion.model, config, prefix, characters=characters,
                                 atol=ATOL_DEPLOY if atol is None else atol)


def _reference_for_output(info: dict, mirror, cache_dir, offline) -> Path:
    """The inference model a converted directory came from (its recorded local file, or its manifest row)."""
    weight_file = info.get("weight_file")
    if info.get("artifact") == "inference" and weight_file and Path(weight_file).exists():
        return Path(weight_file)
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

def _convert_row(name: str, out_root: str, options: dict) -> dict:
    """Convert one batch row; never raises (errors become a failed row)."""
    start = time.perf_counter()
    try:
        result = convert(name, out=Path(out_root) / name, skip_up_to_date=True, **options)
        row = result.to_dict()
        row["error"] = None
    except OcrconvError as exc:
        row = {"name": name, "status": "failed", "error": str(exc), "out": str(Path(out_root) / name)}
    except Exception as exc:  # a bug in one row must not lose the whole batch
        log.exception("unexpected error converting %s", name)
        row = {"name": name, "status": "failed", "error": f"{type(exc).__name__}: {exc}", "out": str(Path(out_root) / name)}
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row


def batch_names(*, all_rows: bool = False, names_from: str | os.PathLike | None = None,
                task: str | None = None) -> list[str]:
    """Row names for a batch: every manifest row, or the names in a file (one per line, ``#`` comments), by task."""
    manifest = _manifest()
    if names_from is not None:
        names = []
        for line in Path(names_from).read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                names.append(manifest.get_model(line).name)
    elif all_rows:
        names = [entry.name for entry in manifest.load_manifest()]
    else:
        raise OcrconvError("a batch needs --all or --names-from FILE")
    if task:
        names = [n for n in names if manifest.get_model(n).task == task]
    return list(dict.fromkeys(names))


def convert_batch(names: Sequence[str], out_root: str | os.PathLike, *, jobs: int = 1, keep_going: bool = False,
                  report: str | os.PathLike | None = None, options: dict | None = None,
                  show_progress: bool = True) -> dict:
    """Convert many rows into ``out_root/<name>``; resumable (up-to-date outputs are skipped).

    Without ``keep_going`` the batch stops at the first failure (rows already running finish). Writes
    ``report`` (JSON) and a Markdown table next to it when given. Returns the report dictionary.
    """
    from tqdm import tqdm

    options = dict(options or {})
    start = time.perf_counter()
    rows: dict[str, dict] = {}
    bar = tqdm(total=len(names), desc="convert", unit="model", disable=not show_progress)
    if jobs <= 1:
        for name in names:
            bar.set_postfix_str(name)
            rows[name] = _convert_row(name, str(out_root), options)
            bar.update()
            if rows[name]["status"] in ("failed", "parity-failed") and not keep_going:
                break
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_convert_row, name, str(out_root), options): name for name in names}
            for future in as_completed(futures):
                row = future.result()
                rows[row["name"]] = row
                bar.update()
                if row["status"] in ("failed", "parity-failed") and not keep_going:
                    for other in futures:
                        other.cancel()
    bar.close()
    ordered = [rows[n] for n in names if n in rows]
    counts = {}
    for row in ordered:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    data = {"ocrconv_version": __version__, "rows_requested": len(names), "rows_run": len(ordered),
            "counts": counts, "failed": [r["name"] for r in ordered if r["status"] in ("failed", "parity-failed")],
            "seconds": round(time.perf_counter() - start, 3), "rows": ordered}
    if report is not None:
        write_batch_report(data, Path(report))
    return data


def write_batch_report(data: dict, path: Path) -> Path:
    """Write the JSON report and ``<stem>.md`` (name, artifact, family, status, max diff, seconds) next to it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    md = path.with_suffix(".md")
    tmp = md.with_name(f".{md.name}.tmp")
    tmp.write_text(markdown_table(data), encoding="utf-8")
    os.replace(tmp, md)
    return md


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
    if result.weights_vs_inference is not None:
        yield f"trained vs released inference weights: {result.weights_vs_inference['summary']}"


__all__ = ["ConvertResult", "convert", "check", "convert_batch", "batch_names", "converted_dir", "usage_facts",
           "read_output_metadata", "write_batch_report", "markdown_table", "iter_notes"]
