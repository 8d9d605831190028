"""Read PaddleOCR weight files into ``{name: numpy array}`` without PaddlePaddle.

Formats:

* trained checkpoints (``*.pdparams``; also ``*.pdopt`` and ``*.states``): pickles written by ``paddle.save``,
  read with the restricted unpickler of :mod:`converter._pickle_safe`;
* inference models (``inference.pdmodel`` + ``inference.pdiparams`` [+ ``.pdiparams.info``]): the program is
  decoded by :mod:`converter._protobuf`; the ``.pdiparams`` stream holds one serialized DenseTensor per
  persistable program variable, in sorted variable-name order;
* either of them inside a ``.tar`` (read from the members, nothing extracted) or an unpacked directory.

:func:`load` is the entry point. Arrays are read straight into preallocated numpy arrays (inference) or keep
the pickle's bytes as their buffer (trained), so the peak memory stays at or below the file size. In plain files
and plain tar members, data of ``MAPPED_BYTES`` (1 MiB) or more is not read at all, in both formats: such arrays
are writable copy-on-write views of a private mapping of the file (possibly unaligned; numpy and torch accept
that). As with any mapping, truncating the file in place while they live would fault; the cache never does that.
"""
from __future__ import annotations

import hashlib
import io
import logging
import math
import mmap
import os
import posixpath
import tarfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Mapping

import numpy as np

from converter import _protobuf as pb
from converter._pickle_safe import MAPPED_BYTES, load_pickle, private_mapping
from converter.errors import CorruptWeightsError, UnsupportedFormatError
from converter.unpack import is_junk

log = logging.getLogger(__name__)

NAME_TABLE_KEY = "StructuredToParameterName@@"
BIG_PARAM_KEY = "UnpackBigParamInfor@@"
PICKLE_SUFFIXES = (".pdparams", ".pdopt", ".states")
TRAINED_PREFERENCE = ("best_accuracy.pdparams", "student.pdparams")
# not parameters: Paddle's is_persistable() leaves out the first three, and save_vars() skips RAW variables
_SKIPPED_VAR_TYPES = {pb.FEED_MINIBATCH, pb.FETCH_LIST, pb.READER, pb.RAW}
_MAX_LOD_LEVELS = 16
_FLATTEN_SLACK = 1 << 20  # characters of names and values a state may flatten to beyond its file size


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of a program variable (-1 marks a dynamic dimension)."""

    name: str
    shape: tuple[int, ...]
    dtype: str


def _dtype_name(data_type: int) -> str:
    dtype = pb.PADDLE_DTYPES.get(data_type)
    return np.dtype(dtype).name if dtype else pb.VAR_TYPE_NAMES.get(data_type, f"type{data_type}").lower()


def _spec(var: pb.VarDesc | None, name: str) -> TensorSpec:
    if var is None or var.tensor is None:
        return TensorSpec(name, (), "unknown")
    return TensorSpec(name, tuple(var.tensor.dims), _dtype_name(var.tensor.data_type))


class ProgramInfo:
    """What ocrconv needs from an inference program: feeds/fetches (in ``col`` order), parameters, ops.

    ``params``: persistable variables sorted by name (the .pdiparams order); ``vars``: every variable by name;
    ``ops``: every operator (decoded on first access); ``version``: Paddle's program version integer.
    """

    def __init__(self, program: pb.ProgramDesc, source: str):
        self._program = program
        self._source = source
        self._ops: list[pb.OpDesc] | None = None
        self.version = program.version
        self.vars: dict[str, pb.VarDesc] = {}
        for block in program.blocks:
            for var in block.vars:
                self.vars.setdefault(var.name, var)
        feeds, fetches = [], []
        for span in program.op_spans():
            kind = self._decode(program.op_type, span)
            if kind in ("feed", "fetch"):
                op = self._decode(program.decode_op, span)
                names = op.outputs.get("Out", []) if kind == "feed" else op.inputs.get("X", [])
                (feeds if kind == "feed" else fetches).extend((op.attrs.get("col") or 0, n) for n in names)
        self.feeds = [_spec(self.vars.get(n), n) for _, n in sorted(feeds)]
        self.fetches = [_spec(self.vars.get(n), n) for _, n in sorted(fetches)]
        self.params = [_spec(var, name) for name, var in sorted(self.vars.items())
                       if var.persistable and var.type not in _SKIPPED_VAR_TYPES]

    def _decode(self, decoder, span):
        try:
            return decoder(span)
        except pb.ProtobufError as exc:
            raise CorruptWeightsError(f"{self._source}: malformed operator at byte {span[0]}: {exc}") from exc

    @property
    def ops(self) -> list[pb.OpDesc]:
        """Every operator of every block, in program order."""
        if self._ops is None:
            self._ops = [self._decode(self._program.decode_op, span) for span in self._program.op_spans()]
        return self._ops

    @property
    def paddle_version(self) -> str | None:
        """Paddle version that wrote the program, e.g. ``"2.6.2"`` (None when it recorded 0 / nothing)."""
        if not self.version:
            return None
        major, rest = divmod(self.version, 1_000_000)
        minor, patch = divmod(rest, 1_000)
        return f"{major}.{minor}.{patch}"

    def op_types(self) -> dict[str, int]:
        """Operator type -> count."""
        counts: dict[str, int] = {}
        for span in self._program.op_spans():
            kind = self._decode(self._program.op_type, span)
            counts[kind] = counts.get(kind, 0) + 1
        return counts

    def __repr__(self) -> str:
        return (f"ProgramInfo(feeds={self.feeds}, fetches={self.fetches}, params={len(self.params)}, "
                f"ops={len(self._program.op_spans())})")


class PaddleWeights(dict):
    """``{structured name: np.ndarray}`` read from Paddle files, with where it came from.

    Attributes: ``kind`` ("trained" | "inference"), ``source`` (file, inference prefix or tar read),
    ``sha256`` (of the main weight file; hashed on first access, so reading is not slowed down by it),
    ``weight_file`` (that file's path on disk; None when it is a tar member),
    ``program`` (ProgramInfo or None), ``info_only`` (inference: .info entries not in the program, structured
    name -> var name), ``param_names`` (structured name -> Paddle var name), ``meta`` (format facts: file,
    candidates, pickle protocol, Paddle version hints, ...).
    """

    def __init__(self, arrays: dict[str, np.ndarray], *, kind: str, source: Path, sha256: str | Callable[[], str],
                 program: ProgramInfo | None = None, info_only: dict[str, str] | None = None,
                 param_names: dict[str, str] | None = None, meta: dict | None = None,
                 weight_file: Path | None = None):
        super().__init__(arrays)
        self.kind = kind
        self.source = Path(source)
        self.weight_file = weight_file
        self._sha256 = sha256
        self.program = program
        self.info_only = dict(info_only or {})
        self.param_names = dict(param_names or {})
        self.meta = dict(meta or {})

    @property
    def sha256(self) -> str:
        """sha256 of the main weight file (.pdparams or .pdiparams), hashed on first access."""
        if callable(self._sha256):
            self._sha256 = self._sha256()
        return self._sha256

    @property
    def nbytes(self) -> int:
        """Total bytes of all arrays."""
        return sum(a.nbytes for a in self.values())

    def __repr__(self) -> str:
        return (f"PaddleWeights(kind={self.kind!r}, source={str(self.source)!r}, tensors={len(self)}, "
                f"bytes={self.nbytes})")


# ----------------------------------------------------------------------------- file access


class _Files:
    """Uniform access to the files of a directory or the members of a tar (relative POSIX names)."""

    def __init__(self, names: dict[str, Any], opener: Callable[[Any], IO[bytes]], sizer: Callable[[Any], int],
                 root: Path, container: str | None):
        self.names = names
        self._opener = opener
        self._sizer = sizer
        self.root = root
        self.container = container

    def disk_path(self, name: str) -> Path | None:
        """The file ``name`` on disk; None for a tar member."""
        return None if self.container else Path(self.names[name])

    def hasher(self, name: str) -> Callable[[], str]:
        """A function that re-opens ``name`` (also after the tar is closed) and returns its sha256."""
        handle, root, container = self.names[name], self.root, self.container

        def sha256() -> str:
            try:
                with ExitStack() as stack:
                    if container:
                        tar = stack.enter_context(tarfile.open(root, "r:*"))
                        fileobj = _open_member(tar, root, tar.getmember(handle.name))
                    else:
                        fileobj = open(handle, "rb")
                    with fileobj:
                        return hashlib.file_digest(fileobj, "sha256").hexdigest()  # a 256 KiB buffer, reused
            except (OSError, KeyError, tarfile.TarError) as exc:
                raise UnsupportedFormatError(f"{self.describe(name)}: cannot hash it any more: {exc}") from exc

        return sha256

    def open(self, name: str) -> tuple[IO[bytes], int]:
        """Open one file: ``(binary file object, size)``."""
        handle = self.names[name]
        return self._opener(handle), self._sizer(handle)

    def read_bytes(self, name: str) -> bytes:
        """The whole (small) file."""
        fileobj, size = self.open(name)
        with fileobj:
            data = fileobj.read(size)
        if len(data) != size:
            raise CorruptWeightsError(f"{self.describe(name)}: truncated ({len(data)} of {size} bytes)")
        return data

    def describe(self, name: str) -> str:
        """Human-readable location of ``name``."""
        if not name:
            return str(self.root)
        return f"{self.root}!{name}" if self.container else str(self.root / name)

    def path(self, name: str) -> Path:
        """Path attributed to ``name`` (the tar itself for a tar member)."""
        return self.root if self.container else self.root / name


def _ignored(name: str) -> bool:
    """AppleDouble files, ``__MACOSX`` and anything in a hidden folder (``.ipynb_checkpoints``...), in a directory
    or a tar alike."""
    return is_junk(name) or any(p.startswith(".") for p in name.split("/")[:-1])


def _dir_files(root: Path, max_depth: int = 4) -> _Files:
    names: dict[str, Path] = {}
    root_depth = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root):
        depth = len(Path(dirpath).parts) - root_depth
        dirnames[:] = sorted(d for d in dirnames if not _ignored(f"{d}/") and depth < max_depth)
        for filename in sorted(filenames):
            full = Path(dirpath) / filename
            rel = full.relative_to(root).as_posix()
            if not _ignored(rel) and full.is_file():
                names[rel] = full
    return _Files(names, lambda p: open(p, "rb"), lambda p: p.stat().st_size, root, None)


class _TarMember(io.RawIOBase):
    """One member of an uncompressed tar, read straight from the archive file (``tarfile``'s own member reader
    copies every block twice through Python)."""

    def __init__(self, path: Path, offset: int, size: int):
        super().__init__()
        self._file = open(path, "rb", buffering=0)
        self._offset = offset
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self._size - self._pos)
        if count <= 0:
            return 0
        self._file.seek(self._offset + self._pos)
        got = self._file.readinto(memoryview(buffer).cast("B")[:count])
        self._pos += got
        return got

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def fileno(self) -> int:
        return self._file.fileno()

    @property
    def offset(self) -> int:
        """Where the member's data starts in the archive file."""
        return self._offset

    def close(self) -> None:
        self._file.close()
        super().close()


def _map_source(fileobj: IO[bytes]) -> tuple[int, int] | None:
    """(file descriptor, offset of the data in that file) for a plain file or a plain tar member; else None."""
    raw = getattr(fileobj, "raw", None)
    if isinstance(raw, _TarMember):
        return raw.fileno(), raw.offset
    if isinstance(raw, io.FileIO):
        return raw.fileno(), 0
    return None


def _open_member(tar: tarfile.TarFile, path: Path, member: tarfile.TarInfo) -> IO[bytes]:
    """A binary file object on ``member`` of ``tar`` (the archive at ``path``)."""
    if type(tar.fileobj) is io.BufferedReader and not member.sparse:  # compressed tars come in a decompressor
        return io.BufferedReader(_TarMember(path, member.offset_data, member.size))
    fileobj = tar.extractfile(member)
    if fileobj is None:  # pragma: no cover - isreg() members always have data
        raise UnsupportedFormatError(f"{path}!{member.name}: not a regular file")
    return fileobj


def _tar_files(path: Path, stack: ExitStack) -> _Files:
    try:
        tar = stack.enter_context(tarfile.open(path, "r:*"))
        members = tar.getmembers()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise UnsupportedFormatError(f"{path}: not a readable tar archive: {exc}") from exc
    names: dict[str, tarfile.TarInfo] = {}
    for member in members:
        name = posixpath.normpath(member.name.lstrip("/"))
        if member.isreg() and not _ignored(name) and not name.startswith(".."):
            names[name] = member

    return _Files(names, lambda member: _open_member(tar, path, member), lambda m: m.size, path, "tar")


def _single_file(path: Path) -> _Files:
    return _Files({path.name: path}, lambda p: open(p, "rb"), lambda p: p.stat().st_size, path.parent, None)


# ----------------------------------------------------------------------------- choosing what to read


def _looks_like_pickle(files: _Files, name: str) -> bool:
    fileobj, size = files.open(name)
    with fileobj:
        head = fileobj.read(2)
    return size > 2 and len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


@dataclass
class _Choice:
    kind: str  # "trained" | "inference"
    name: str  # pickle file name, or inference prefix (name without .pdmodel)
    candidates: list[str]
    others: list[str]


def _inference_prefixes(names: Iterable[str]) -> list[str]:
    names = set(names)
    return sorted(n[: -len(".pdmodel")] for n in names
                  if n.endswith(".pdmodel") and n[: -len(".pdmodel")] + ".pdiparams" in names)


def _matches(candidate: str, prefer: str) -> bool:
    """``prefer`` names ``candidate`` by relative path or file name (an inference model also by its prefix)."""
    if prefer in (candidate, posixpath.basename(candidate)):
        return True
    if candidate.endswith(".pdmodel"):
        prefix, wanted = candidate[: -len(".pdmodel")], prefer.removesuffix(".pdmodel")
        return wanted in (prefix, posixpath.basename(prefix))
    return False


def _choose(files: _Files, prefer: str | None, kind: str | None) -> _Choice:
    names = sorted(files.names)
    prefixes = _inference_prefixes(names)
    pickles = [n for n in names if n.endswith(".pdparams")]
    others = [n for n in names if n.endswith((".pdopt", ".states"))]
    if not pickles and not prefixes:
        pickles = [n for n in names if not posixpath.basename(n).count(".") and _looks_like_pickle(files, n)]
    inference = [f"{p}.pdmodel" for p in prefixes]
    candidates = (inference if kind != "trained" else []) + (pickles if kind != "inference" else [])
    where = files.describe("")
    if prefer is not None:
        every = inference + pickles + others
        wanted = [c for c in every if _matches(c, prefer)]
        if len(wanted) != 1:
            raise UnsupportedFormatError(
                f"{where}: prefer={prefer!r} matches {len(wanted)} of the weight files {every}")
        chosen = wanted[0]
        chosen_kind = "inference" if chosen.endswith(".pdmodel") else "trained"
        if kind is not None and kind != chosen_kind:
            raise UnsupportedFormatError(
                f"{where}: prefer={prefer!r} names the {chosen_kind} file {chosen}, but kind={kind!r} was asked for")
        name = chosen[: -len(".pdmodel")] if chosen_kind == "inference" else chosen
        return _Choice(chosen_kind, name, candidates, others)
    if kind != "trained" and prefixes:
        if pickles and kind is None:
            raise UnsupportedFormatError(
                f"{where}: holds both an inference model ({inference}) and trained checkpoints ({pickles}); "
                "pass kind='inference' or kind='trained' (or prefer=<file>)")
        if len(prefixes) > 1:
            raise UnsupportedFormatError(f"{where}: several inference models {inference}; pass prefer=<name>")
        return _Choice("inference", prefixes[0], candidates, others)
    if kind != "inference" and pickles:
        for preferred in TRAINED_PREFERENCE:
            matches = [p for p in pickles if posixpath.basename(p) == preferred]
            if len(matches) == 1:
                return _Choice("trained", matches[0], candidates, others)
            if len(matches) > 1:
                break
        if len(pickles) == 1:
            return _Choice("trained", pickles[0], candidates, others)
        raise UnsupportedFormatError(f"{where}: several checkpoints {pickles}; pass prefer=<file name>")
    pir = [n for n in names if n.endswith(".json") and n[: -len(".json")] + ".pdiparams" in files.names]
    if pir:
        raise UnsupportedFormatError(
            f"{where}: {pir[0]} is a PaddlePaddle 3 PIR program, which ocrconv cannot read; "
            "use a model exported with the classic program format (.pdmodel)")
    wanted_kind = f"{kind} " if kind else ""
    raise UnsupportedFormatError(
        f"{where}: no {wanted_kind}Paddle weights found (looked for *.pdparams and *.pdmodel + *.pdiparams; "
        f"files: {names[:20]})")


# ----------------------------------------------------------------------------- trained checkpoints


def _repack_big_params(state: dict, table: Any, source: str) -> list[str]:
    """Undo ``_unpack_saved_dict``: join the ``key@@.N`` slices of big arrays (protocol 2/3 files)."""
    if not isinstance(table, dict):
        raise CorruptWeightsError(f"{source}: {BIG_PARAM_KEY} is not a dict")
    joined = []
    for key, info in table.items():
        if not isinstance(key, str):
            raise CorruptWeightsError(f"{source}: {BIG_PARAM_KEY} has a {type(key).__name__} key, not a name")
        try:
            shape = tuple(int(d) for d in info["OriginShape"])
            slices = list(info["slices"])
        except (TypeError, KeyError, ValueError) as exc:
            raise CorruptWeightsError(f"{source}: malformed {BIG_PARAM_KEY} entry for {key!r}") from exc
        for part in slices:
            if not isinstance(part, str):
                raise CorruptWeightsError(
                    f"{source}: {BIG_PARAM_KEY} entry for {key!r} lists a {type(part).__name__} among its slices; "
                    "slices are named by strings")
        parts: list[np.ndarray | None] = []
        for part in slices:
            array = state.get(part)
            if not isinstance(array, np.ndarray) or array.ndim != 1:
                raise CorruptWeightsError(f"{source}: slice {part!r} of big parameter {key!r} is missing or not 1-D")
            parts.append(array)
        dtypes = {p.dtype for p in parts}
        total = sum(p.size for p in parts)
        if (len(dtypes) != 1 or len(set(slices)) != len(slices) or any(d < 0 for d in shape)
                or total != math.prod(shape)):
            raise CorruptWeightsError(
                f"{source}: the {len(slices)} slices of big parameter {key!r} ({len(set(slices))} distinct) hold "
                f"{total} elements of {dtypes}, its OriginShape {shape} needs {math.prod(shape)}")
        out = np.empty(total, dtype=dtypes.pop())
        at = 0
        for index, part_name in enumerate(slices):  # drop each slice once copied: peak = one array + one slice
            part, parts[index] = parts[index], None
            out[at: at + part.size] = part
            at += part.size
            del state[part_name], part
        state[key] = out.reshape(shape)
        joined.append(str(key))
    return joined


class _Flattener:
    """Collects the arrays of an unpickled state dict under dotted names, in every form ``paddle.save`` writes
    (ndarray, ``(name, ndarray)``, nested dicts, lists and tuples), and its other values as plain data.

    Like ``paddle.load``, it follows an object the pickle shares once per reference; ``_prescan`` bounds how many
    objects that can make, and ``budget`` bounds the characters of the keys, Paddle names and text/bytes values
    written, so a small pickle cannot expand into huge names or values.
    """

    def __init__(self, source: str, budget: int):
        self.source = source
        self.budget = budget
        self.arrays: dict[str, np.ndarray] = {}
        self.names: dict[str, str] = {}
        self.values: dict[str, Any] = {}
        self.forms: set[str] = set()
        self._state_within: dict[int, bool] = {}  # id of a list/tuple -> whether arrays or dicts lie in it

    def add(self, obj: Any, prefix: str) -> None:
        """File ``obj`` (and what it holds) under ``prefix``."""
        self._charge(1 + len(prefix), prefix)
        if isinstance(obj, np.ndarray):
            self.forms.add("ndarray")
            self._store(self.arrays, prefix, obj)
        elif (isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], str)
              and isinstance(obj[1], np.ndarray)):
            self.forms.add("tuple(name, ndarray)")
            self._store(self.arrays, prefix, obj[1])
            self._charge(len(obj[0]), prefix)
            self.names[prefix] = obj[0]
        elif isinstance(obj, dict):
            if prefix:
                self.forms.add("nested dict")
            for key, value in obj.items():
                name = key if type(key) is str else self._key_name(key, prefix)
                self.add(value, f"{prefix}.{name}" if prefix else name)
        elif isinstance(obj, (list, tuple)) and self._holds_state(obj):
            for index, value in enumerate(obj):
                self.add(value, f"{prefix}.{index}" if prefix else str(index))
        else:
            self._store(self.values, prefix, self._plain(obj, prefix))

    def add_names(self, table: dict) -> None:
        """Take the Paddle variable names of the arrays read from a ``StructuredToParameterName@@`` table."""
        for key, name in table.items():
            if isinstance(key, str) and isinstance(name, str) and key in self.arrays:
                self._charge(len(name), key)
                self.names[key] = name

    def _key_name(self, key: Any, prefix: str) -> str:
        if isinstance(key, str):
            return key
        if isinstance(key, int) and key.bit_length() <= 64:
            return str(key)
        raise CorruptWeightsError(
            f"{self.source}: a key under {prefix or 'the top level'!r} is a {type(key).__name__}; "
            "a state dict is keyed by names (or integers)")

    def _holds_state(self, sequence: list | tuple) -> bool:
        """Whether an array or a dict lies in ``sequence``, at any depth of lists and tuples."""
        known = self._state_within.get(id(sequence))
        if known is None:
            known = any(isinstance(v, (np.ndarray, dict)) or (isinstance(v, (list, tuple)) and self._holds_state(v))
                        for v in sequence)
            self._state_within[id(sequence)] = known
        return known

    def _store(self, table: dict, key: str, value: Any) -> None:
        if key in self.arrays or key in self.values:
            raise CorruptWeightsError(
                f"{self.source}: two entries of the state are both named {key!r} once nested names are joined "
                "with '.'; refusing to keep only one of them")
        table[key] = value

    def _plain(self, value: Any, prefix: str) -> Any:
        """A value as plain Python data: numpy scalars as numbers, lists/tuples as lists, bytes as latin1 text."""
        self._charge(1, prefix)
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, (list, tuple)):
            return [self._plain(v, prefix) for v in value]
        if isinstance(value, (str, bytes)):
            self._charge(len(value), prefix)
            return value.decode("latin1") if isinstance(value, bytes) else value
        if isinstance(value, (set, frozenset)):
            for member in value:
                self._plain(member, prefix)
        return value

    def _charge(self, count: int, prefix: str) -> None:
        self.budget -= count
        if self.budget < 0:
            raise self._exhausted(prefix)

    def _exhausted(self, prefix: str) -> CorruptWeightsError:
        return CorruptWeightsError(
            f"{self.source}: at {prefix or 'the top level'!r}, the names and values of the state grow past the "
            "file's size (an object referenced many times over: a decompression bomb or a corrupt pickle)")


def _read_trained(files: _Files, name: str) -> tuple[dict, dict, dict]:
    """Read one pickle file: ``(arrays, param_names, meta)``."""
    source = files.describe(name)
    fileobj, size = files.open(name)
    with fileobj:
        obj, facts = load_pickle(fileobj, size, source=source, map_from=_map_source(fileobj))
    if not isinstance(obj, dict):
        raise UnsupportedFormatError(f"{source}: the pickle holds a {type(obj).__name__}, not a state dict")
    state = dict(obj)
    table = state.pop(NAME_TABLE_KEY, None)
    joined = _repack_big_params(state, state.pop(BIG_PARAM_KEY), source) if BIG_PARAM_KEY in state else []
    flat = _Flattener(source, size + _FLATTEN_SLACK)
    flat.add(state, "")
    if isinstance(table, dict):
        flat.add_names(table)
    arrays, names = flat.arrays, flat.names
    numpy_modules = sorted({g.rsplit(".", 1)[0] for g in facts["globals"] if g.endswith("._reconstruct")})
    meta = {
        "format": "pickle",
        "file": name,
        "size": size,
        "pickle_protocol": facts["protocol"],
        "pickle_globals": facts["globals"],
        "numpy_module": numpy_modules,
        "forms": sorted(flat.forms),
        "name_table": table is not None,
        "big_params_joined": joined,
        "values": flat.values,
    }
    return arrays, names, meta


# ----------------------------------------------------------------------------- inference models


class BoundedReader:
    """Reads exactly what is asked from a file of known size; a request past the end is a CorruptWeightsError."""

    def __init__(self, file: IO[bytes], size: int, source: str):
        self.file = file
        self.size = size
        self.pos = 0
        self.source = source

    def _check(self, n: int) -> None:
        if n < 0 or n > self.size - self.pos:
            raise CorruptWeightsError(
                f"{self.source}: asks for {n} bytes at byte {self.pos}, but the file has only "
                f"{self.size - self.pos} left (truncated or corrupt)")

    def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes."""
        self._check(n)
        data = self.file.read(n)
        if len(data) != n:
            raise CorruptWeightsError(f"{self.source}: file ended at byte {self.pos + len(data)}")
        self.pos += n
        return data

    def readinto(self, array: np.ndarray) -> None:
        """Fill ``array``'s buffer completely, straight from the file."""
        view = memoryview(array).cast("B")
        self._check(len(view))
        done = 0
        while done < len(view):
            got = self.file.readinto(view[done:])
            if not got:
                raise CorruptWeightsError(f"{self.source}: file ended at byte {self.pos + done}")
            done += got
        self.pos += done

    def skip(self, n: int) -> None:
        """Move ``n`` bytes forward without reading them."""
        self._check(n)
        self.file.seek(n, io.SEEK_CUR)
        self.pos += n


class _ParamsMapping:
    """A private (copy-on-write) mapping of a ``.pdiparams`` file, made on first use, that large tensors view
    instead of being read: like the large payloads of checkpoints (``MAPPED_BYTES``)."""

    def __init__(self, map_from: tuple[int, int], size: int):
        self._map_from = map_from
        self._size = size
        self._mapping: tuple[mmap.mmap, int] | None = None

    def array(self, offset: int, dtype: np.dtype, shape: list[int]) -> np.ndarray:
        """A writable view of the data at ``offset`` (from the start of the params file)."""
        if self._mapping is None:
            self._mapping = private_mapping(self._map_from, self._size)
        buffer, origin = self._mapping
        return np.frombuffer(buffer, dtype, count=math.prod(shape), offset=origin + offset).reshape(shape)


def _u32(reader: BoundedReader) -> int:
    return int.from_bytes(reader.read(4), "little")


def _tensor_header(reader: BoundedReader, var: pb.VarDesc, source: str) -> tuple[np.dtype, list[int]]:
    """Read the header of one serialized DenseTensor (Paddle's SerializeToStream) for ``var``, checked against
    the program: (dtype, dims). The reader is left at the tensor's data, whose size is checked to fit."""
    offset = reader.pos

    def corrupt(why: str) -> CorruptWeightsError:
        return CorruptWeightsError(f"{source}: variable {var.name!r} (tensor at byte {offset}): {why}")

    try:
        version = _u32(reader)
        if version != 0:
            raise corrupt(f"unsupported DenseTensor version {version} (only 0 exists)")
        lod_levels = int.from_bytes(reader.read(8), "little")
        if lod_levels > _MAX_LOD_LEVELS:
            raise corrupt(f"claims {lod_levels} LoD levels")
        for _ in range(lod_levels):
            level_bytes = int.from_bytes(reader.read(8), "little")
            reader.read(level_bytes)  # bounded by the file size; parameters carry no LoD
        tensor_version = _u32(reader)
        if tensor_version != 0:
            raise corrupt(f"unsupported tensor version {tensor_version}")
        desc_size = int.from_bytes(reader.read(4), "little", signed=True)
        if desc_size < 0 or desc_size > reader.size - reader.pos:
            raise corrupt(f"TensorDesc size {desc_size} does not fit in the {reader.size - reader.pos} bytes left")
        desc_offset = reader.pos
        try:
            desc = pb.parse_tensor_desc(memoryview(reader.read(desc_size)))
        except pb.ProtobufError as exc:
            raise corrupt(f"bad TensorDesc at byte {desc_offset + exc.offset}: {exc}") from exc
    except CorruptWeightsError as exc:
        if var.name in str(exc):
            raise
        raise corrupt(str(exc).split(": ", 1)[-1]) from exc
    dtype = pb.PADDLE_DTYPES.get(desc.data_type)
    if dtype is None and desc.data_type not in pb.NON_NUMPY_DTYPES:
        raise corrupt(f"unknown data type {pb.VAR_TYPE_NAMES.get(desc.data_type, desc.data_type)}")
    if any(d < 0 for d in desc.dims):
        raise corrupt(f"negative dimension in {desc.dims}")
    expected = var.tensor
    if expected is not None:
        if list(expected.dims) != list(desc.dims):
            raise corrupt(f"stored shape {desc.dims} differs from the program's {expected.dims}")
        if expected.data_type != desc.data_type:
            raise corrupt(f"stored dtype {_dtype_name(desc.data_type)} differs from the program's "
                          f"{_dtype_name(expected.data_type)}")
    if dtype is None:
        raise UnsupportedFormatError(
            f"{source}: variable {var.name!r} is stored as {pb.VAR_TYPE_NAMES[desc.data_type]}, which numpy (and so "
            "ocrconv) cannot represent; export the model in float32 or float16")
    nbytes = math.prod(desc.dims) * np.dtype(dtype).itemsize
    if nbytes > reader.size - reader.pos:
        raise corrupt(f"data of shape {desc.dims} {np.dtype(dtype).name} needs {nbytes} bytes at byte {reader.pos}, "
                      f"the file has {reader.size - reader.pos} left")
    return np.dtype(dtype), list(desc.dims)


def _read_tensor(reader: BoundedReader, var: pb.VarDesc, source: str,
                 mapping: _ParamsMapping | None = None) -> np.ndarray:
    """Read one serialized DenseTensor for ``var`` and check it against the program. With a ``mapping``, data of
    ``MAPPED_BYTES`` or more is not read: the array views the mapping."""
    dtype, dims = _tensor_header(reader, var, source)
    nbytes = math.prod(dims) * dtype.itemsize
    if mapping is not None and nbytes >= MAPPED_BYTES:
        array = mapping.array(reader.pos, dtype, dims)
        reader.skip(nbytes)
        return array
    array = np.empty(dims, dtype=dtype)
    if nbytes:
        reader.readinto(array)
    return array


def rewrite_params(params: str | os.PathLike, program: ProgramInfo, values: Mapping[str, np.ndarray],
                   target: str | os.PathLike) -> None:
    """Write to ``target`` a copy of the inference parameters file ``params`` (of ``program``) in which the data
    of the variables named in ``values`` (Paddle var name -> array of the stored shape and dtype) is replaced.

    Headers are copied byte for byte, so Paddle reads the copy as it reads the original. Raises ValueError for
    a value whose shape or dtype differs from the stored tensor, or a name that is not a program parameter.
    """
    unknown = sorted(set(values) - {spec.name for spec in program.params})
    if unknown:
        raise ValueError(f"not parameters of the program: {', '.join(unknown[:10])}")
    params, size = Path(params), os.path.getsize(params)
    with open(params, "rb") as source, open(target, "xb") as out:
        reader = BoundedReader(source, size, str(params))
        for spec in program.params:
            start = reader.pos
            dtype, dims = _tensor_header(reader, program.vars[spec.name], str(params))
            header_end = reader.pos
            source.seek(start)
            out.write(source.read(header_end - start))
            nbytes = math.prod(dims) * dtype.itemsize
            if spec.name in values:
                value = np.asarray(values[spec.name])
                if list(value.shape) != dims or value.dtype != dtype:
                    raise ValueError(f"{spec.name}: the replacement is {list(value.shape)} {value.dtype.name}, the "
                                     f"stored tensor {dims} {dtype.name}")
                out.write(np.ascontiguousarray(value).data)
                reader.skip(nbytes)
            else:
                out.write(reader.read(nbytes))
        if reader.pos != size:
            raise CorruptWeightsError(f"{params}: {size - reader.pos} unread bytes after the {len(program.params)} "
                                      "program parameters; the file does not belong to this program")


def _read_info(files: _Files, name: str) -> dict[str, str]:
    """``.pdiparams.info``: Paddle var name -> structured name."""
    fileobj, size = files.open(name)
    with fileobj:
        obj, _ = load_pickle(fileobj, size, source=files.describe(name))
    if not isinstance(obj, dict):
        raise CorruptWeightsError(f"{files.describe(name)}: expected a dict, found {type(obj).__name__}")
    mapping = {}
    for var_name, entry in obj.items():
        structured = entry.get("structured_name") if isinstance(entry, dict) else None
        if isinstance(var_name, str) and isinstance(structured, str):
            mapping[var_name] = structured
    return mapping


def _read_inference(files: _Files, prefix: str) -> tuple[dict, ProgramInfo, dict, dict, dict]:
    model_name, params_name, info_name = f"{prefix}.pdmodel", f"{prefix}.pdiparams", f"{prefix}.pdiparams.info"
    try:
        program = pb.parse_program(files.read_bytes(model_name))
        info = ProgramInfo(program, files.describe(model_name))  # decodes the variable types it needs
    except pb.ProtobufError as exc:
        raise CorruptWeightsError(f"{files.describe(model_name)}: not a Paddle ProgramDesc: {exc}") from exc
    for spec in info.params:
        var = info.vars[spec.name]
        if var.type != pb.DENSE_TENSOR:
            raise UnsupportedFormatError(
                f"{files.describe(model_name)}: persistable variable {spec.name!r} has type "
                f"{pb.VAR_TYPE_NAMES.get(var.type, var.type)}; only dense tensors can be read")
    structured = _read_info(files, info_name) if info_name in files.names else {}
    source = files.describe(params_name)
    by_var: dict[str, np.ndarray] = {}
    fileobj, size = files.open(params_name)
    with fileobj:
        reader = BoundedReader(fileobj, size, source)
        map_from = _map_source(fileobj)
        mapping = _ParamsMapping(map_from, size) if map_from is not None else None
        for spec in info.params:
            by_var[spec.name] = _read_tensor(reader, info.vars[spec.name], source, mapping)
        if reader.pos != size:
            raise CorruptWeightsError(
                f"{source}: {size - reader.pos} unread bytes after the {len(info.params)} program parameters "
                f"(byte {reader.pos}); the file does not belong to this program")
    arrays: dict[str, np.ndarray] = {}
    param_names: dict[str, str] = {}
    for var_name, array in by_var.items():
        key = structured.get(var_name, var_name)
        if key in arrays:
            raise CorruptWeightsError(
                f"{files.describe(info_name)}: variables {param_names[key]!r} and {var_name!r} share the "
                f"structured name {key!r}")
        arrays[key] = array
        param_names[key] = var_name
    info_only = {s: v for v, s in structured.items() if v not in by_var}
    meta = {
        "format": "inference",
        "file": params_name,
        "size": size,
        "files": {"model": model_name, "params": params_name,
                  "info": info_name if info_name in files.names else None},
        "program_version": program.version,
        "paddle_version": info.paddle_version,
        "info_entries": len(structured),
        "unnamed_params": sorted(v for v in by_var if v not in structured),
    }
    return arrays, info, info_only, param_names, meta


# ----------------------------------------------------------------------------- entry point


def _files_for(path: Path, stack: ExitStack) -> tuple[_Files, str | None, str | None]:
    """(files, forced kind, forced name) for any accepted ``path``."""
    if path.is_dir():
        return _dir_files(path), None, None
    name = path.name
    for suffix in (".pdmodel", ".pdiparams", ".pdiparams.info"):
        if name.endswith(suffix):
            prefix = name[: -len(suffix)]
            return _dir_files_for_prefix(path.parent, prefix), "inference", prefix
    if not path.exists():
        if path.with_name(name + ".pdmodel").is_file():
            return _dir_files_for_prefix(path.parent, name), "inference", name
        raise UnsupportedFormatError(f"{path}: no such file, directory or inference prefix")
    if name.endswith(PICKLE_SUFFIXES):
        return _single_file(path), "trained", name
    if name.endswith((".tar", ".tar.gz", ".tgz")) or tarfile.is_tarfile(path):
        return _tar_files(path, stack), None, None
    files = _single_file(path)
    if _looks_like_pickle(files, name):
        return files, "trained", name
    raise UnsupportedFormatError(
        f"{path}: not a Paddle weight file (expected .tar, .pdparams, .pdopt, .states, .pdmodel/.pdiparams, "
        "an inference prefix or a directory)")


def _dir_files_for_prefix(folder: Path, prefix: str) -> _Files:
    names = {}
    for suffix in (".pdmodel", ".pdiparams", ".pdiparams.info"):
        candidate = folder / f"{prefix}{suffix}"
        if candidate.is_file():
            names[candidate.name] = candidate
    if f"{prefix}.pdmodel" not in names or f"{prefix}.pdiparams" not in names:
        missing = [s for s in (".pdmodel", ".pdiparams") if f"{prefix}{s}" not in names]
        raise UnsupportedFormatError(f"{folder / prefix}: inference model incomplete, missing {missing}")
    return _Files(names, lambda p: open(p, "rb"), lambda p: p.stat().st_size, folder, None)


def load(path: str | os.PathLike, *, prefer: str | None = None, kind: str | None = None) -> PaddleWeights:
    """Read Paddle weights from ``path`` without PaddlePaddle.

    ``path``: a ``.tar``, an unpacked directory, a ``.pdparams``/``.pdopt``/``.states`` file, an inference prefix
    (``.../inference``) or a ``.pdmodel``/``.pdiparams`` file. In a directory or tar, ``kind`` ("trained" or
    "inference") picks one kind when both are present and ``prefer`` names the file to read (default:
    best_accuracy.pdparams, else student.pdparams, else the only checkpoint); a ``prefer`` of the other ``kind``,
    or one that names another file than a single-file ``path``, is an error. Hidden folders are skipped.

    Arrays keep the dtype they were saved with. bfloat16 tensors of trained checkpoints come back as the uint16
    bit patterns ``paddle.save`` stores (as ``paddle.load(..., return_numpy=True)`` gives them); inference models
    record the data type, and BF16/FP8 tensors there raise UnsupportedFormatError.
    Raises UnsupportedFormatError, UnsafeCheckpointError or CorruptWeightsError.
    """
    if kind not in (None, "trained", "inference"):
        raise ValueError(f"kind must be 'trained' or 'inference', not {kind!r}")
    path = Path(path)
    with ExitStack() as stack:
        files, forced_kind, forced_name = _files_for(path, stack)
        if forced_kind is not None:
            if kind is not None and kind != forced_kind:
                article = "an" if forced_kind == "inference" else "a"
                raise UnsupportedFormatError(f"{path}: is {article} {forced_kind} file, not {kind}")
            named = f"{forced_name}.pdmodel" if forced_kind == "inference" else forced_name
            if prefer is not None and not _matches(named, prefer):
                raise UnsupportedFormatError(
                    f"{path}: prefer={prefer!r} names another file than the one this path reads ({named})")
            choice = _Choice(forced_kind, forced_name, [forced_name], [])
        else:
            choice = _choose(files, prefer, kind)
        common = {"candidates": choice.candidates, "other_files": choice.others, "container": files.container}
        if files.container:
            common["archive"] = str(files.root)
        if choice.kind == "inference":
            arrays, info, info_only, param_names, meta = _read_inference(files, choice.name)
            main = f"{choice.name}.pdiparams"
            source = files.root if files.container else files.root / choice.name
            weights = PaddleWeights(arrays, kind="inference", source=source, sha256=files.hasher(main),
                                    program=info, info_only=info_only, param_names=param_names,
                                    meta={**meta, **common}, weight_file=files.disk_path(main))
        else:
            arrays, param_names, meta = _read_trained(files, choice.name)
            weights = PaddleWeights(arrays, kind="trained", source=files.path(choice.name),
                                    sha256=files.hasher(choice.name), param_names=param_names,
                                    meta={**meta, **common}, weight_file=files.disk_path(choice.name))
    log.debug("read %r", weights)
    return weights
