"""A restricted unpickler for Paddle checkpoints (``.pdparams``, ``.pdopt``, ``.states``, ``.pdiparams.info``).

``pickle.load`` on a downloaded file can run any code. :class:`RestrictedUnpickler` resolves only the globals
that ``paddle.save`` output can contain, and each one is replaced by a guard that checks its arguments before
it builds anything:

* ``numpy.core.multiarray._reconstruct`` / ``numpy._core.multiarray._reconstruct``: only
  ``_reconstruct(ndarray, (0,), b'b')``, the empty shell numpy's ``ndarray.__reduce__`` emits;
* ``numpy.ndarray``: an opaque token that only ``_reconstruct`` accepts (it cannot be called);
* ``numpy.dtype``: plain numeric/bool dtypes only (no object, string or structured dtypes);
* ``numpy.core.multiarray.scalar`` (and ``numpy._core``): a numeric dtype plus exactly itemsize bytes;
* ``_codecs.encode``: only ``(str, 'latin1')``, the way protocol 2 stores ``bytes``;
* ``builtins.tuple`` (Paddle 2.1 saves tensors as ``tuple((name, ndarray))``), ``builtins.bytes`` (empty only),
  ``builtins.set``/``frozenset`` and ``collections.OrderedDict`` (from lists/tuples/dicts only);
* ``builtins.eval``: only Paddle's ``reduce_DenseTensor`` form ``eval('data', {'data': ndarray})``, answered
  by returning the array; ``eval`` itself is never called.

Anything else raises :class:`UnsafeCheckpointError` naming the global, before it is imported. ``BUILD`` is only
allowed on array shells and dtypes that the guards made, with a validated state; ``NEWOBJ``/``NEWOBJ_EX``,
protocol 5 buffers and persistent ids are refused. Every byte count in the pickle is checked against the file size
before it is read, and the data the guards materialize is charged against a budget of twice the file size, so a
small pickle cannot expand into a memory bomb. Arrays keep the pickle's bytes as their buffer (no second copy);
in protocol 0-2 files the latin1 text holding an array's data is dropped from the memo once converted.
It is built on the pure-Python ``pickle._Unpickler`` so that those opcodes can be checked (the C unpickler
allocates a claimed byte count before reading it, and sizes its memo from an untrusted index).
"""
from __future__ import annotations

import collections
import io
import math
import pickle
import struct
from typing import IO, Any, Callable

import numpy as np

from converter.errors import CorruptWeightsError, UnsafeCheckpointError

_NUMERIC_KINDS = frozenset("biufc")
_BYTEORDERS = frozenset("<>|=")


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _numeric_dtype(spec: Any, where: str) -> np.dtype:
    """``spec`` as a plain numeric dtype, or UnsafeCheckpointError."""
    if isinstance(spec, np.dtype):
        dtype = spec
    elif isinstance(spec, str) and len(spec) <= 8:
        try:
            dtype = np.dtype(spec)
        except TypeError as exc:
            raise UnsafeCheckpointError(f"{where}: unknown dtype {spec!r}") from exc
    else:
        raise UnsafeCheckpointError(f"{where}: dtype must be a short string, got {_describe(spec)}")
    if dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise UnsafeCheckpointError(f"{where}: dtype {dtype!r} is not a plain numeric dtype")
    return dtype


class _Guard:
    """A callable standing in for one allowed global; slotted, so pickle cannot patch it."""

    __slots__ = ("qualname", "owner")

    def __init__(self, qualname: str, owner: "RestrictedUnpickler"):
        self.qualname = qualname
        self.owner = owner

    @property
    def where(self) -> str:
        return f"{self.owner.source}: {self.qualname}"

    def refuse(self, why: str) -> UnsafeCheckpointError:
        return UnsafeCheckpointError(f"{self.owner.source}: refused call to {self.qualname}: {why}")

    def __reduce__(self):
        raise TypeError(f"the {self.qualname} guard cannot be pickled")


class _NdarrayToken(_Guard):
    """Stands for ``numpy.ndarray``; only ``_reconstruct`` accepts it."""

    __slots__ = ()

    def __call__(self, *args):
        raise self.refuse("numpy.ndarray can only be passed to _reconstruct, not called")


class _Reconstruct(_Guard):
    __slots__ = ()

    def __call__(self, *args):
        if (len(args) != 3 or not isinstance(args[0], _NdarrayToken) or args[1] != (0,)
                or args[2] not in (b"b", "b")):
            raise self.refuse(f"expected (numpy.ndarray, (0,), b'b'), got {_describe(args)}")
        shell = np.ndarray.__new__(np.ndarray, (0,), np.int8)
        self.owner.pending[id(shell)] = shell
        return shell


class _Dtype(_Guard):
    __slots__ = ()

    def __call__(self, *args):
        if not 1 <= len(args) <= 3 or not all(isinstance(flag, bool) for flag in args[1:]):
            raise self.refuse(f"expected (str, bool, bool), got {_describe(args)}")
        dtype = _numeric_dtype(args[0], self.where)
        fresh = np.dtype(dtype, align=False, copy=True)  # BUILD then sets the byte order on this copy only
        self.owner.pending[id(fresh)] = fresh
        return fresh


class _Scalar(_Guard):
    __slots__ = ()

    def __call__(self, *args):
        if len(args) != 2 or not isinstance(args[0], np.dtype) or not isinstance(args[1], (bytes, str)):
            raise self.refuse(f"expected (dtype, bytes), got {_describe(args)}")
        dtype = _numeric_dtype(args[0], self.where)
        self.owner.pending.pop(id(dtype), None)  # a dtype in use can no longer receive a state
        raw = args[1].encode("latin1") if isinstance(args[1], str) else args[1]
        if len(raw) != dtype.itemsize:
            raise self.refuse(f"{len(raw)} bytes for a {dtype} scalar")
        return np.frombuffer(raw, dtype=dtype)[0]


class _CodecsEncode(_Guard):
    __slots__ = ()

    def __call__(self, *args):
        if len(args) != 2 or not isinstance(args[0], str) or args[1] not in ("latin1", "latin-1"):
            raise self.refuse(f"expected (str, 'latin1'), got {_describe(args)}")
        self.owner.charge(len(args[0]), self.qualname)
        data = args[0].encode("latin1")
        self.owner.release(args[0])
        return data


class _Tuple(_Guard):
    __slots__ = ()

    def __call__(self, *args):
        if len(args) > 1 or (args and not isinstance(args[0], (tuple, list))):
            raise self.refuse(f"expected a tuple or list, got {_describe(args)}")
        return tuple(args[0]) if args else ()


class _Bytes(_Guard):
    __slots__ = ()

    def __call__(self, *args):
        if args:
            raise self.refuse(f"only bytes() is allowed, got {_describe(args)}")
        return b""


class _Container(_Guard):
    """set / frozenset / OrderedDict built from an already unpickled list, tuple or dict."""

    __slots__ = ("factory",)

    def __init__(self, qualname: str, owner: "RestrictedUnpickler", factory: Callable):
        super().__init__(qualname, owner)
        self.factory = factory

    def __call__(self, *args):
        if len(args) > 1 or (args and not isinstance(args[0], (list, tuple, dict))):
            raise self.refuse(f"expected at most one list/tuple/dict, got {_describe(args)}")
        return self.factory(*args)


class _PaddleEval(_Guard):
    """Paddle's ``reduce_DenseTensor`` pickles a tensor as ``eval('data', {'data': array})``."""

    __slots__ = ()

    def __call__(self, *args):
        if (len(args) == 2 and args[0] == "data" and isinstance(args[1], dict)
                and list(args[1]) == ["data"] and isinstance(args[1]["data"], np.ndarray)):
            return args[1]["data"]
        raise self.refuse(f"only Paddle's eval('data', {{'data': array}}) form is accepted, got {_describe(args)}")


def _guards_for(owner: "RestrictedUnpickler") -> dict[tuple[str, str], _Guard]:
    guards: dict[tuple[str, str], _Guard] = {("numpy", "ndarray"): _NdarrayToken("numpy.ndarray", owner),
                                             ("numpy", "dtype"): _Dtype("numpy.dtype", owner)}
    for core in ("numpy.core.multiarray", "numpy._core.multiarray"):
        guards[(core, "_reconstruct")] = _Reconstruct(f"{core}._reconstruct", owner)
        guards[(core, "scalar")] = _Scalar(f"{core}.scalar", owner)
    guards[("_codecs", "encode")] = _CodecsEncode("_codecs.encode", owner)
    for module in ("builtins", "__builtin__"):
        guards[(module, "tuple")] = _Tuple(f"{module}.tuple", owner)
        guards[(module, "bytes")] = _Bytes(f"{module}.bytes", owner)
        guards[(module, "set")] = _Container(f"{module}.set", owner, set)
        guards[(module, "frozenset")] = _Container(f"{module}.frozenset", owner, frozenset)
        guards[(module, "eval")] = _PaddleEval(f"{module}.eval", owner)
    guards[("collections", "OrderedDict")] = _Container("collections.OrderedDict", owner, collections.OrderedDict)
    return guards


def _load_build(self: "RestrictedUnpickler") -> None:
    state = self.stack.pop()
    inst = self.stack[-1]
    if self.pending.pop(id(inst), None) is not inst:
        raise UnsafeCheckpointError(
            f"{self.source}: refused BUILD on {type(inst).__name__}: only numpy array shells and dtypes made "
            "by the allowed reconstructors can receive a state")
    if isinstance(inst, np.dtype):
        self.build_dtype(inst, state)
    else:
        self.build_array(inst, state)


def _refuse_opcode(name: str):
    def refuse(self: "RestrictedUnpickler") -> None:
        raise UnsafeCheckpointError(f"{self.source}: refused opcode {name}: a Paddle checkpoint never uses it")

    return refuse


def _counted(opcode: str, header: str, make: Callable[["RestrictedUnpickler", bytes], Any]):
    """Loader for an opcode whose argument is a byte count followed by that many bytes; the count is checked
    against the file size before anything is read or allocated."""
    header_size = struct.calcsize(header)

    def load(self: "RestrictedUnpickler") -> None:
        (count,) = struct.unpack(header, self.read(header_size))
        self.check_count(count, opcode)
        data = self.read(count)
        if len(data) != count:
            raise CorruptWeightsError(f"{self.source}: {opcode} of {count} bytes is cut short: the file is truncated")
        value = make(self, data)
        del data
        if isinstance(value, str) and count >= _LARGE_TEXT:
            self.large_texts[id(value)] = [value, []]
        self.append(value)

    return load


class _Released:
    """Replaces a memoized array text once it was turned into bytes, so the text does not stay in memory."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<released array text>"


_RELEASED = _Released()
_LARGE_TEXT = 1 << 16  # texts this long (array data in protocol 0-2 pickles) are dropped from the memo once used


def _put_loader(read_index: Callable[["RestrictedUnpickler"], int]):
    """Memo-put opcode loader that also notes where a large text was memoized (see ``release``)."""

    def load(self: "RestrictedUnpickler") -> None:
        index = read_index(self)
        if index < 0:
            raise CorruptWeightsError(f"{self.source}: negative memo index {index}")
        top = self.stack[-1]
        self.memo[index] = top
        if self.large_texts:  # the text itself, or the memoized (text, 'latin1') argument tuple
            text = top[0] if type(top) is tuple and top else top
            entry = self.large_texts.get(id(text))
            if entry is not None and entry[0] is text:
                entry[1].append(index)

    return load


def _utf8(data: bytes) -> str:
    return str(data, "utf-8", "surrogatepass")


def _load_frame(self: "RestrictedUnpickler") -> None:
    (count,) = struct.unpack("<Q", self.read(8))
    self.check_count(count, "FRAME")
    self._unframer.load_frame(count)


class RestrictedUnpickler(pickle._Unpickler):
    """Unpickler that allows only the guarded globals above; see the module docstring."""

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = _load_build
    for _name in ("NEWOBJ", "NEWOBJ_EX", "BYTEARRAY8", "NEXT_BUFFER", "READONLY_BUFFER"):
        dispatch[getattr(pickle, _name)[0]] = _refuse_opcode(_name)
    dispatch[pickle.FRAME[0]] = _load_frame
    dispatch[pickle.BINBYTES[0]] = _counted("BINBYTES", "<I", lambda self, data: data)
    dispatch[pickle.BINBYTES8[0]] = _counted("BINBYTES8", "<Q", lambda self, data: data)
    dispatch[pickle.BINSTRING[0]] = _counted("BINSTRING", "<i", lambda self, data: self._decode_string(data))
    dispatch[pickle.BINUNICODE[0]] = _counted("BINUNICODE", "<I", lambda self, data: _utf8(data))
    dispatch[pickle.BINUNICODE8[0]] = _counted("BINUNICODE8", "<Q", lambda self, data: _utf8(data))
    dispatch[pickle.LONG4[0]] = _counted("LONG4", "<i", lambda self, data: pickle.decode_long(data))
    dispatch[pickle.PUT[0]] = _put_loader(lambda self: int(self.readline()[:-1]))
    dispatch[pickle.BINPUT[0]] = _put_loader(lambda self: self.read(1)[0])
    dispatch[pickle.LONG_BINPUT[0]] = _put_loader(lambda self: struct.unpack("<I", self.read(4))[0])
    dispatch[pickle.MEMOIZE[0]] = _put_loader(lambda self: len(self.memo))
    del _name

    def __init__(self, file: IO[bytes], *, size: int, source: str):
        super().__init__(file, encoding="latin1")
        self.file = file
        self.size = size
        self.source = source
        # protocol 2 stores bytes as latin1 text: the text and the bytes made from it both count
        self.budget = 2 * size + (1 << 20)
        self.pending: dict[int, Any] = {}
        self.guards = _guards_for(self)
        self.globals_seen: set[str] = set()
        self.checked_dtypes: set[np.dtype] = set()
        self.large_texts: dict[int, list] = {}  # id -> [text, memo indices holding it]

    def check_count(self, count: int, opcode: str) -> None:
        """Refuse a byte count that is negative or larger than the whole file."""
        if count < 0 or count > self.size:
            raise CorruptWeightsError(
                f"{self.source}: {opcode} at byte {self.file.tell()} asks for {count} bytes, but the file has only "
                f"{self.size} (truncated or corrupt)")

    def release(self, text: str) -> None:
        """Drop a large text from the memo once its bytes exist: protocol 0-2 arrays then peak at ~1x, not 2x."""
        entry = self.large_texts.pop(id(text), None)
        if entry is None or entry[0] is not text:
            return
        for index in entry[1]:
            held = self.memo.get(index)
            if held is text or (type(held) is tuple and held and held[0] is text):
                self.memo[index] = _RELEASED

    def charge(self, nbytes: int, what: str) -> None:
        """Count ``nbytes`` of materialized data; refuse once the budget (twice the file size) is spent."""
        self.budget -= nbytes
        if self.budget < 0:
            raise CorruptWeightsError(
                f"{self.source}: {what} would materialize more data than the file holds (a decompression bomb "
                "or a corrupt pickle)")

    def find_class(self, module: str, name: str):
        guard = self.guards.get((module, name))
        if guard is None:
            raise UnsafeCheckpointError(
                f"{self.source}: refused to load: the pickle asks for the global '{module}.{name}', "
                "which a Paddle checkpoint never needs; nothing from the file was executed")
        self.globals_seen.add(f"{module}.{name}")
        return guard

    def persistent_load(self, pid):
        raise UnsafeCheckpointError(
            f"{self.source}: refused to load: the pickle uses a persistent id ({_describe(pid)}), "
            "which a Paddle checkpoint never contains")

    def build_dtype(self, dtype: np.dtype, state: Any) -> None:
        """Apply a dtype state (version, byteorder, subarray, names, fields, elsize, alignment[, flags])."""
        if (not isinstance(state, tuple) or len(state) not in (8, 9) or state[1] not in _BYTEORDERS
                or any(part is not None for part in state[2:5])
                or not all(isinstance(part, int) for part in state[5:])):
            raise UnsafeCheckpointError(f"{self.source}: refused dtype state {_describe(state)}")
        dtype.__setstate__(state)
        _numeric_dtype(dtype, self.source)

    def build_array(self, shell: np.ndarray, state: Any) -> None:
        """Apply an ndarray state ([version,] shape, dtype, is_fortran, rawdata) after checking its size."""
        if type(state) is tuple and len(state) == 5:
            state = state[1:]
        if type(state) is not tuple or len(state) != 4:
            raise UnsafeCheckpointError(f"{self.source}: refused array state {_describe(state)}")
        shape, dtype, is_fortran, raw = state
        if (type(shape) is not tuple or not all(type(d) is int and d >= 0 for d in shape)
                or not isinstance(dtype, np.dtype) or type(is_fortran) is not bool
                or not isinstance(raw, (bytes, str))):
            raise UnsafeCheckpointError(f"{self.source}: refused array state {_describe(state)}")
        self.pending.pop(id(dtype), None)  # a dtype in use can no longer receive a state
        if dtype not in self.checked_dtypes:
            self.checked_dtypes.add(_numeric_dtype(dtype, self.source))
        nbytes = math.prod(shape) * dtype.itemsize
        if len(raw) != nbytes:
            raise CorruptWeightsError(
                f"{self.source}: array of shape {shape} {dtype} needs {nbytes} bytes, the pickle holds {len(raw)}")
        self.charge(nbytes, f"an array of shape {shape}")
        if isinstance(raw, str):  # Python 2 pickles, decoded with latin1
            text, raw = raw, raw.encode("latin1")
            self.release(text)
        shell.__setstate__((shape, dtype, is_fortran, raw))


def _check_result(obj: Any, source: str, depth: int = 0) -> None:
    if depth > 100:
        raise CorruptWeightsError(f"{source}: the pickle nests deeper than 100 levels")
    if isinstance(obj, _Guard):
        raise UnsafeCheckpointError(f"{source}: the pickle returns the global {obj.qualname} itself")
    if obj is _RELEASED:
        raise CorruptWeightsError(f"{source}: the pickle uses the data text of an array twice")
    if isinstance(obj, np.ndarray):
        _numeric_dtype(obj.dtype, source)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _check_result(key, source, depth + 1)
            _check_result(value, source, depth + 1)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for value in obj:
            _check_result(value, source, depth + 1)


def load_pickle(file: IO[bytes], size: int, *, source: str) -> tuple[Any, dict]:
    """Unpickle ``file`` (``size`` bytes) safely; return ``(object, facts)``.

    ``facts``: ``protocol`` (PROTO opcode value, None for protocol 0/1) and ``globals`` (sorted names used).
    Raises UnsafeCheckpointError for anything outside the allow-list and CorruptWeightsError for a malformed file.
    """
    unpickler = RestrictedUnpickler(file, size=size, source=source)
    try:
        obj = unpickler.load()
    except (UnsafeCheckpointError, CorruptWeightsError):
        raise
    except RecursionError as exc:
        raise CorruptWeightsError(f"{source}: the pickle nests too deeply") from exc
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            MemoryError, OverflowError, UnicodeDecodeError, struct.error, io.UnsupportedOperation) as exc:
        where = file.tell() if file.seekable() else "?"
        raise CorruptWeightsError(
            f"{source}: not a readable Paddle pickle (near byte {where}): {type(exc).__name__}: {exc}") from exc
    _check_result(obj, source)
    protocol = unpickler.proto if getattr(unpickler, "proto", 0) >= 2 else None
    return obj, {"protocol": protocol, "globals": sorted(unpickler.globals_seen)}
