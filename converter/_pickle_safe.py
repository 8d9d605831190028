"""A restricted unpickler for Paddle checkpoints (``.pdparams``, ``.pdopt``, ``.states``, ``.pdiparams.info``).

``pickle.load`` on a downloaded file can run any code. Here only the globals that ``paddle.save`` output can
contain are resolved, and each one is replaced by a guard that checks its arguments before it builds anything:

* ``numpy.core.multiarray._reconstruct`` / ``numpy._core.multiarray._reconstruct``: only
  ``_reconstruct(ndarray, (0,), b'b')``, the empty shell numpy's ``ndarray.__reduce__`` emits;
* ``numpy.ndarray``: an opaque token that only ``_reconstruct`` accepts (it cannot be called);
* ``numpy.dtype``: plain numeric/bool dtypes only (no object, string or structured dtypes); its two flags
  may be bools or, as numpy < 1.19 wrote them, the ints 0 and 1;
* ``numpy.core.multiarray.scalar`` (and ``numpy._core``): a numeric dtype plus exactly itemsize bytes;
* ``_codecs.encode``: only ``(str, 'latin1')``, the way protocol 2 stores ``bytes``;
* ``builtins.tuple`` (Paddle 2.1 saves tensors as ``tuple((name, ndarray))``), ``builtins.bytes`` (empty only),
  ``builtins.set``/``frozenset`` and ``collections.OrderedDict`` (from lists/tuples/dicts only);
* ``builtins.eval``: only Paddle's ``reduce_DenseTensor`` form ``eval('data', {'data': ndarray})``, answered
  by returning the array; ``eval`` itself is never called.

Anything else raises :class:`UnsafeCheckpointError` naming the global, before it is imported. The guards hand out
*shells* (our own objects), never numpy objects: ``BUILD`` reaches only a shell's ``__setstate__``, which validates
the state (shape, dtype, byte count; a dtype state may only set the byte order) and builds the real array; every
other ``BUILD`` target is refused. The shells are swapped for their arrays once the whole pickle was read.

Reading is two passes. :func:`_prescan` walks the opcodes without building anything: every byte count and frame
size is checked against the file size, memo indices may only grow one by one, and opcodes a Paddle checkpoint never
uses (``NEWOBJ``/``NEWOBJ_EX``, ``EXT*``, protocol 5 buffers) are refused. It also follows the unpickler's stack,
counting how many objects each one stands for when shared (memoized, then referenced again) objects are followed as
a tree: a "billion laughs" pickle, a few hundred bytes of ``GET``s that would make hashing its keys or walking its
result take exponential time, is refused before it is built. Only then is the file unpickled, with the
same guards, by the C unpickler (its allocations are now bounded by the checked counts; this is what makes reading
fast), or, when the file holds array data as large latin1 texts (protocol 0-2), by the pure-Python one, which drops
each text from the memo as soon as its bytes exist, so those files also peak at about 1x their size. Data the guards
materialize is charged against a budget of twice the file size, so a small pickle cannot expand into a memory bomb;
shared objects are converted once (their results stay shared).
Arrays keep the pickle's bytes as their buffer (no second copy); payloads of 1 MiB or more are not read at all when
the caller can map the file (``load_pickle(map_from=...)``): their arrays are copy-on-write views of the mapping.
"""
from __future__ import annotations

import bisect
import collections
import io
import math
import mmap
import pickle
import reprlib
import struct
from typing import IO, Any, Callable

import numpy as np

from converter.errors import CorruptWeightsError, UnsafeCheckpointError

_NUMERIC_KINDS = frozenset("biufc")
_BYTEORDERS = frozenset("<>|=")


class _ShortRepr(reprlib.Repr):
    """``repr`` that builds only what it shows: a few items of each container, the start of each text or bytes."""

    def __init__(self):
        super().__init__()
        self.maxstring = self.maxother = 40

    def repr_bytes(self, value: bytes, level: int) -> str:
        return repr(value[:self.maxstring]) + ("..." if len(value) > self.maxstring else "")


_SHORT_REPR = _ShortRepr()


def _describe(value: Any) -> str:
    """A short repr for messages (a plain repr of a shared or large object could take gigabytes)."""
    text = _SHORT_REPR.repr(value)
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
    if (dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None
            or dtype.hasobject or dtype.flags != np.dtype(dtype.str).flags):
        raise UnsafeCheckpointError(f"{where}: dtype {dtype!r} is not a plain numeric dtype")
    return dtype


class _Context:
    """What one read shares between its guards and shells: the source, the size budget, the globals seen."""

    def __init__(self, size: int, source: str):
        self.size = size
        self.source = source
        # protocol 2 stores bytes as latin1 text: the text and the bytes made from it both count
        self.budget = 2 * size + (1 << 20)
        self.globals_seen: set[str] = set()
        self.release: Callable[[str], None] = lambda text: None  # set by the pure-Python driver
        self.guards = _guards_for(self)

    def charge(self, nbytes: int, what: str) -> None:
        """Count ``nbytes`` of materialized data; refuse once the budget (twice the file size) is spent."""
        self.budget -= nbytes
        if self.budget < 0:
            raise CorruptWeightsError(
                f"{self.source}: {what} would materialize more data than the file holds (a decompression bomb "
                "or a corrupt pickle)")

    def find_class(self, module: str, name: str) -> "_Guard":
        guard = self.guards.get((module, name))
        if guard is None:
            raise UnsafeCheckpointError(
                f"{self.source}: refused to load: the pickle asks for the global '{module}.{name}', "
                "which a Paddle checkpoint never needs; nothing from the file was executed")
        self.globals_seen.add(f"{module}.{name}")
        return guard

    def persistent_load(self, pid: Any):
        raise UnsafeCheckpointError(
            f"{self.source}: refused to load: the pickle uses a persistent id ({_describe(pid)}), "
            "which a Paddle checkpoint never contains")

    def refuse_build(self, target: Any) -> UnsafeCheckpointError:
        return UnsafeCheckpointError(
            f"{self.source}: refused BUILD on {type(target).__name__}: only numpy array shells and dtypes made "
            "by the allowed reconstructors can receive a state")


# ----------------------------------------------------------------------------- shells


class _Shell:
    """An object a guard hands to the pickle in place of a numpy object; see :meth:`value`."""

    __slots__ = ("ctx",)

    def __init__(self, ctx: _Context):
        self.ctx = ctx

    def __setstate__(self, state: Any) -> None:
        raise self.ctx.refuse_build(self)

    def __reduce__(self):
        raise TypeError(f"a {type(self).__name__} cannot be pickled")

    def value(self) -> Any:
        """The object this shell stands for, once the pickle is read."""
        raise NotImplementedError


class _DtypeShell(_Shell):
    """A numeric dtype; a BUILD may set its byte order, once, before any array or scalar uses it."""

    __slots__ = ("dtype", "settled")

    def __init__(self, ctx: _Context, dtype: np.dtype):
        super().__init__(ctx)
        self.dtype = dtype
        self.settled = False

    def __setstate__(self, state: Any) -> None:
        if self.settled:
            raise UnsafeCheckpointError(
                f"{self.ctx.source}: refused BUILD on a numpy dtype that already has its state or is in use")
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata]) of a plain dtype
        if (type(state) is not tuple or len(state) not in (8, 9) or state[0] not in (3, 4)
                or state[1] not in _BYTEORDERS or any(part is not None for part in state[2:5])
                or state[5:8] != (-1, -1, self.dtype.flags) or (len(state) == 9 and state[8] is not None)):
            raise UnsafeCheckpointError(f"{self.ctx.source}: refused dtype state {_describe(state)}")
        if state[1] in "<>" and self.dtype.itemsize > 1:
            self.dtype = self.dtype.newbyteorder(state[1])
        self.settled = True

    def value(self) -> np.dtype:
        """The dtype (numeric, checked by the guard; a state only changes its byte order)."""
        self.settled = True  # a dtype in use can no longer receive a state
        return self.dtype


class _ArrayShell(_Shell):
    """What ``_reconstruct`` returns; its BUILD state (shape, dtype, order, bytes) is checked, then the array made."""

    __slots__ = ("array",)

    def __init__(self, ctx: _Context):
        super().__init__(ctx)
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        ctx = self.ctx
        if self.array is not None:
            raise UnsafeCheckpointError(f"{ctx.source}: refused a second BUILD on an array")
        if type(state) is tuple and len(state) == 5:
            state = state[1:]
        if type(state) is not tuple or len(state) != 4:
            raise UnsafeCheckpointError(f"{ctx.source}: refused array state {_describe(state)}")
        shape, dtype, is_fortran, raw = state
        if (type(shape) is not tuple or not all(type(d) is int and d >= 0 for d in shape)
                or type(dtype) is not _DtypeShell or type(is_fortran) is not bool
                or not isinstance(raw, (bytes, str, _MappedBytes))):
            raise UnsafeCheckpointError(f"{ctx.source}: refused array state {_describe(state)}")
        dtype = dtype.value()
        nbytes = math.prod(shape) * dtype.itemsize
        if len(raw) != nbytes:
            raise CorruptWeightsError(
                f"{ctx.source}: array of shape {shape} {dtype} needs {nbytes} bytes, the pickle holds {len(raw)}")
        ctx.charge(nbytes, f"an array of shape {shape}")
        if isinstance(raw, _MappedBytes):
            self.array = raw.as_array(dtype, shape, is_fortran)
            return
        if isinstance(raw, str):  # Python 2 pickles, decoded with latin1
            text, raw = raw, raw.encode("latin1")
            ctx.release(text)
        array = np.ndarray.__new__(np.ndarray, (0,), np.int8)
        array.__setstate__((shape, dtype, is_fortran, raw))
        self.array = array

    def value(self) -> np.ndarray:
        if self.array is None:
            raise CorruptWeightsError(f"{self.ctx.source}: an array was reconstructed but never given its data")
        return self.array


class _ScalarShell(_Shell):
    """A numpy scalar (e.g. a learning rate in a ``.pdopt``); it accepts no state."""

    __slots__ = ("scalar",)

    def __init__(self, ctx: _Context, scalar: np.generic):
        super().__init__(ctx)
        self.scalar = scalar

    def value(self) -> np.generic:
        return self.scalar


class _MappedBytes(_Shell):
    """A large BINBYTES payload left in the file: arrays are made as views of a private mapping of it."""

    __slots__ = ("buffer", "offset", "count")

    def __init__(self, ctx: _Context, buffer: mmap.mmap, offset: int, count: int):
        super().__init__(ctx)
        self.buffer = buffer
        self.offset = offset
        self.count = count

    def __len__(self) -> int:
        return self.count

    def as_array(self, dtype: np.dtype, shape: tuple[int, ...], is_fortran: bool) -> np.ndarray:
        """The payload as an array (a writable copy-on-write view; byte-swapped to native order if need be)."""
        flat = np.frombuffer(self.buffer, np.uint8, count=self.count, offset=self.offset).view(dtype)
        if not dtype.isnative:
            flat = flat.astype(dtype.newbyteorder("="))
        return flat.reshape(shape, order="F" if is_fortran else "C")

    def value(self) -> bytes:
        """The payload as bytes (when it is not array data), charged against the budget. ``_finish`` calls it
        once per shell and shares the result wherever the pickle references the payload again."""
        self.ctx.charge(self.count, f"a bytes value of {self.count} bytes")
        return self.buffer[self.offset:self.offset + self.count]


class _OrderedDict(collections.OrderedDict):
    """The OrderedDict the guard makes: filled by SETITEMS like any dict, but it accepts no BUILD state."""

    def __setstate__(self, state: Any) -> None:
        raise UnsafeCheckpointError("refused BUILD on OrderedDict: it never receives a state in a checkpoint")


# ----------------------------------------------------------------------------- guards


class _Guard:
    """A callable standing in for one allowed global; slotted, and refuses any BUILD, so pickle cannot patch it."""

    __slots__ = ("qualname", "ctx")

    def __init__(self, qualname: str, ctx: _Context):
        self.qualname = qualname
        self.ctx = ctx

    @property
    def where(self) -> str:
        return f"{self.ctx.source}: {self.qualname}"

    def refuse(self, why: str) -> UnsafeCheckpointError:
        return UnsafeCheckpointError(f"{self.ctx.source}: refused call to {self.qualname}: {why}")

    def __setstate__(self, state: Any) -> None:
        raise self.ctx.refuse_build(self)

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
        return _ArrayShell(self.ctx)


class _Dtype(_Guard):
    """``numpy.dtype(spec, align, copy)``; numpy before 1.19 pickled the two flags as the ints 0 and 1."""

    __slots__ = ()

    def __call__(self, *args):
        if not 1 <= len(args) <= 3 or not all(type(flag) in (bool, int) and flag in (0, 1) for flag in args[1:]):
            raise self.refuse(f"expected (str, bool, bool), got {_describe(args)}")
        return _DtypeShell(self.ctx, _numeric_dtype(args[0], self.where))


class _Scalar(_Guard):
    __slots__ = ()

    def __call__(self, *args):
        if len(args) != 2 or type(args[0]) is not _DtypeShell or not isinstance(args[1], (bytes, str)):
            raise self.refuse(f"expected (dtype, bytes), got {_describe(args)}")
        dtype = args[0].value()
        raw = args[1].encode("latin1") if isinstance(args[1], str) else args[1]
        if len(raw) != dtype.itemsize:
            raise self.refuse(f"{len(raw)} bytes for a {dtype} scalar")
        return _ScalarShell(self.ctx, np.frombuffer(raw, dtype=dtype)[0])


class _CodecsEncode(_Guard):
    __slots__ = ()

    def __call__(self, *args):
        if len(args) != 2 or not isinstance(args[0], str) or args[1] not in ("latin1", "latin-1"):
            raise self.refuse(f"expected (str, 'latin1'), got {_describe(args)}")
        self.ctx.charge(len(args[0]), self.qualname)
        data = args[0].encode("latin1")
        self.ctx.release(args[0])
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

    def __init__(self, qualname: str, ctx: _Context, factory: Callable):
        super().__init__(qualname, ctx)
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
                and list(args[1]) == ["data"] and isinstance(args[1]["data"], _ArrayShell)):
            return args[1]["data"]
        raise self.refuse(f"only Paddle's eval('data', {{'data': array}}) form is accepted, got {_describe(args)}")


def _guards_for(ctx: _Context) -> dict[tuple[str, str], _Guard]:
    guards: dict[tuple[str, str], _Guard] = {("numpy", "ndarray"): _NdarrayToken("numpy.ndarray", ctx),
                                             ("numpy", "dtype"): _Dtype("numpy.dtype", ctx)}
    for core in ("numpy.core.multiarray", "numpy._core.multiarray"):
        guards[(core, "_reconstruct")] = _Reconstruct(f"{core}._reconstruct", ctx)
        guards[(core, "scalar")] = _Scalar(f"{core}.scalar", ctx)
    guards[("_codecs", "encode")] = _CodecsEncode("_codecs.encode", ctx)
    for module in ("builtins", "__builtin__"):
        guards[(module, "tuple")] = _Tuple(f"{module}.tuple", ctx)
        guards[(module, "bytes")] = _Bytes(f"{module}.bytes", ctx)
        guards[(module, "set")] = _Container(f"{module}.set", ctx, set)
        guards[(module, "frozenset")] = _Container(f"{module}.frozenset", ctx, frozenset)
        guards[(module, "eval")] = _PaddleEval(f"{module}.eval", ctx)
    guards[("collections", "OrderedDict")] = _Container("collections.OrderedDict", ctx, _OrderedDict)
    return guards


# ----------------------------------------------------------------------------- pass 1: opcode scan

_FIXED_ARG = {op[0]: size for op, size in (
    (pickle.MARK, 0), (pickle.POP, 0), (pickle.POP_MARK, 0), (pickle.DUP, 0), (pickle.NONE, 0),
    (pickle.REDUCE, 0), (pickle.APPEND, 0), (pickle.BUILD, 0), (pickle.DICT, 0), (pickle.EMPTY_DICT, 0),
    (pickle.APPENDS, 0), (pickle.LIST, 0), (pickle.EMPTY_LIST, 0), (pickle.SETITEM, 0), (pickle.TUPLE, 0),
    (pickle.EMPTY_TUPLE, 0), (pickle.SETITEMS, 0), (pickle.TUPLE1, 0), (pickle.TUPLE2, 0), (pickle.TUPLE3, 0),
    (pickle.NEWTRUE, 0), (pickle.NEWFALSE, 0), (pickle.EMPTY_SET, 0), (pickle.ADDITEMS, 0), (pickle.FROZENSET, 0),
    (pickle.STACK_GLOBAL, 0), (pickle.OBJ, 0), (pickle.MEMOIZE, 0), (pickle.BINGET, 1),
    (pickle.BININT1, 1), (pickle.BININT2, 2), (pickle.BININT, 4), (pickle.LONG_BINGET, 4), (pickle.BINFLOAT, 8))}
# opcode -> width of its fixed-size argument, -1 for the opcodes _prescan looks at more closely
_FIXED_WIDTH = [_FIXED_ARG.get(code, -1) for code in range(256)]
# opcode -> the struct of its byte count; the count is followed by that many bytes
_COUNTED = {op[0]: struct.Struct(fmt) for op, fmt in (
    (pickle.SHORT_BINSTRING, "<B"), (pickle.SHORT_BINBYTES, "<B"), (pickle.SHORT_BINUNICODE, "<B"),
    (pickle.LONG1, "<B"), (pickle.BINSTRING, "<i"), (pickle.BINBYTES, "<I"), (pickle.BINUNICODE, "<I"),
    (pickle.LONG4, "<i"), (pickle.BINUNICODE8, "<Q"), (pickle.BINBYTES8, "<Q"))}
_LINES = {op[0]: lines for op, lines in (
    (pickle.INT, 1), (pickle.LONG, 1), (pickle.FLOAT, 1), (pickle.STRING, 1), (pickle.UNICODE, 1),
    (pickle.GLOBAL, 2), (pickle.INST, 2))}
_PUTS = {pickle.BINPUT[0]: "<B", pickle.LONG_BINPUT[0]: "<I", pickle.PUT[0]: None}
_REFUSED = {getattr(pickle, name)[0]: name for name in (
    "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4", "BYTEARRAY8", "NEXT_BUFFER", "READONLY_BUFFER")}
_BYTES = frozenset(code[0] for code in (pickle.BINBYTES, pickle.BINBYTES8))
_PERSISTENT_IDS = frozenset(code[0] for code in (pickle.PERSID, pickle.BINPERSID))
MAPPED_BYTES = 1 << 20  # payloads this large are not read: arrays view a private mapping of the file instead
_TEXTS = frozenset(code[0] for code in (pickle.BINSTRING, pickle.BINUNICODE, pickle.BINUNICODE8))
_LARGE_TEXT = 1 << 16  # texts this long (array data in protocol 0-2 pickles) are dropped from the memo once used
_OPNAMES = {code[0]: name for name, code in vars(pickle).items()
            if name.isupper() and isinstance(code, bytes) and len(code) == 1}
_SCAN_CHUNK = 1 << 13

# How each opcode with no or a fixed-size argument changes the unpickler's stack, for the tree-size bound of
# _prescan (the others are followed where their argument is read); the arity is the number of objects popped
(_MEMOIZE, _LEAF, _EMPTY, _BINGET, _LONG_BINGET, _MARK, _POP, _POP_MARK, _DUP, _BUILD, _MARKED_NEW, _MARKED_INTO,
 _POPPED_NEW, _POPPED_INTO) = range(14)
_EFFECTS = {
    _LEAF: [pickle.NONE, pickle.NEWTRUE, pickle.NEWFALSE, pickle.BININT, pickle.BININT1, pickle.BININT2,
            pickle.BINFLOAT],
    _EMPTY: [pickle.EMPTY_LIST, pickle.EMPTY_DICT, pickle.EMPTY_TUPLE, pickle.EMPTY_SET],
    _BINGET: [pickle.BINGET], _LONG_BINGET: [pickle.LONG_BINGET], _MEMOIZE: [pickle.MEMOIZE],
    _MARK: [pickle.MARK], _POP: [pickle.POP], _POP_MARK: [pickle.POP_MARK], _DUP: [pickle.DUP], _BUILD: [pickle.BUILD],
    # build one object from everything above the mark / add everything above the mark to the object below it
    _MARKED_NEW: [pickle.TUPLE, pickle.LIST, pickle.DICT, pickle.FROZENSET, pickle.OBJ],
    _MARKED_INTO: [pickle.APPENDS, pickle.SETITEMS, pickle.ADDITEMS],
}
_EFFECT = [-1] * 256
_ARITY = [0] * 256
for _effect, _codes in _EFFECTS.items():
    for _code in _codes:
        _EFFECT[_code[0]] = _effect
for _code, _effect, _arity in (
        (pickle.TUPLE1, _POPPED_NEW, 1), (pickle.TUPLE2, _POPPED_NEW, 2), (pickle.TUPLE3, _POPPED_NEW, 3),
        (pickle.REDUCE, _POPPED_NEW, 2), (pickle.STACK_GLOBAL, _POPPED_NEW, 2),
        (pickle.APPEND, _POPPED_INTO, 1), (pickle.SETITEM, _POPPED_INTO, 2)):
    _EFFECT[_code[0]], _ARITY[_code[0]] = _effect, _arity
del _effect, _codes, _code, _arity
# What _prescan lets the objects of a pickle add up to, followed as trees (a shared object counted once per
# reference): sharing lets a few hundred bytes stand for a tree of 2**40 nodes. Checkpoints stay below 1 per byte.
_TREE_SLACK = 1 << 16
_TREE_PER_BYTE = 8


class _Scan:
    """A window on the file for :func:`_prescan`: ``buf`` holds the bytes from file offset ``base`` on."""

    def __init__(self, file: IO[bytes], size: int, source: str):
        self.file = file
        self.size = size
        self.source = source
        self.base = 0
        self.buf = file.read(_SCAN_CHUNK)

    def unreadable(self, why: str) -> CorruptWeightsError:
        return CorruptWeightsError(f"{self.source}: not a readable Paddle pickle: {why}")

    def move(self, pos: int) -> int:
        """Refill the window so it starts at ``pos`` (an index into the current window); return the new index 0."""
        self.base += pos
        self.file.seek(self.base)
        self.buf = self.file.read(_SCAN_CHUNK)
        return 0

    def line_end(self, pos: int) -> tuple[int, int]:
        """``(start, end)`` of the text line starting at ``pos``, ``buf[end]`` being its newline (window may move)."""
        end = self.buf.find(b"\n", pos)
        while end < 0:
            if self.base + len(self.buf) >= self.size:
                raise self.unreadable(f"it ended at byte {self.size} inside a text argument (truncated)")
            self.file.seek(self.base + len(self.buf))
            self.buf = self.buf[pos:] + self.file.read(max(_SCAN_CHUNK, len(self.buf)))
            self.base += pos
            pos = 0
            end = self.buf.find(b"\n")
        return pos, end

    def check_count(self, count: int, opcode: int, at: int, after: int) -> None:
        left = self.size - after
        if count < 0 or count > left:
            raise CorruptWeightsError(
                f"{self.source}: {_OPNAMES.get(opcode, hex(opcode))} at byte {at} asks for {count} bytes, but the "
                f"file has only {left} left of {self.size} (truncated or corrupt)")


def _prescan(file: IO[bytes], size: int, source: str) -> tuple[int, bool, list[tuple[int, int, int]]]:
    """Walk the opcodes of ``file`` without building anything; return the pickle protocol (0 without PROTO),
    whether it holds a text of at least ``_LARGE_TEXT`` characters (array data of a protocol 0-2 pickle), and the
    ``(position, header size, byte count)`` of every BINBYTES payload of at least ``MAPPED_BYTES`` outside a frame.

    Byte counts and frame sizes must fit in the file, memo indices may grow only one at a time, and opcodes a
    checkpoint never uses are refused. Payloads are skipped, so the scan reads little more than the opcodes.

    The scan also follows the unpickler's stack, with the tree size of each object: the number of objects it holds
    when every shared (memoized, then referenced again) object is counted once per reference, as hashing a key,
    checking a guard's arguments or walking the result count them. No object, and not the objects it drops (POP,
    BUILD states, what STOP leaves below the result) together, may reach ``_TREE_PER_BYTE`` per byte of the
    pickle (plus ``_TREE_SLACK``): such a pickle is refused as a "billion laughs" bomb before anything is built.
    """
    scan = _Scan(file, size, source)
    buf, pos, n = scan.buf, 0, len(scan.buf)
    safe = n - 9  # up to here an opcode and any fixed argument lie in the window
    protocol = frame_end = 0
    large_text = False
    payloads: list[tuple[int, int, int]] = []
    # The unpickler's stack, each object as a cell [tree size, referenced again]. A memoized object keeps its cell,
    # so a GET sees the size it grew to, and a container may not grow once it is referenced a second time (which
    # would also make it hold itself). Scalars, strings and globals share one cell: they never grow.
    leaf: list = [1, False]
    stack: list[list] = []
    marks: list[int] = []  # stack height at each open MARK
    memo: list[list] = []  # the cell of each memo entry
    dropped = 0  # the tree sizes of the objects dropped, summed
    limit = _TREE_SLACK  # raised to what the bytes scanned so far allow when a tree size outgrows it
    width_of, counted, lines, puts, refused = _FIXED_WIDTH, _COUNTED, _LINES, _PUTS, _REFUSED
    effect_of, arity_of = _EFFECT, _ARITY
    try:
        while True:
            if pos > safe:
                if scan.base + n < size:  # keep the opcode and any fixed argument in the window
                    pos = scan.move(pos)
                    buf, n = scan.buf, len(scan.buf)
                    safe = n - 9
                if pos >= n:
                    raise scan.unreadable(f"it ended at byte {scan.base + pos} without its STOP opcode (truncated)")
            op = buf[pos]
            effect = effect_of[op]
            if effect == _MEMOIZE:
                memo.append(stack[-1])
                pos += 1
            elif effect == _BINGET:
                cell = memo[buf[pos + 1]]
                cell[1] = True
                stack.append(cell)
                pos += 2
            elif effect == _LEAF:
                stack.append(leaf)
                pos += 1 + width_of[op]
            elif effect == _POPPED_NEW:  # TUPLE1-3, REDUCE, STACK_GLOBAL: a new object from the top 1-3
                arity = arity_of[op]
                if arity == 1:
                    nodes = stack[-1][0] + 1
                elif arity == 2:
                    nodes = stack.pop()[0] + stack[-1][0] + 1
                else:
                    nodes = stack.pop()[0] + stack.pop()[0] + stack[-1][0] + 1
                stack[-1] = [nodes, False]
                if nodes > limit:
                    limit = _tree_limit(source, scan.base + pos, nodes)
                pos += 1
            elif effect < 0:  # an opcode with a counted or text argument, or none of a checkpoint's
                at = scan.base + pos
                if op in counted:
                    count_struct = counted[op]
                    width = count_struct.size
                    if pos + 1 + width > n:
                        raise scan.unreadable(f"it ended at byte {size} inside an opcode argument (truncated)")
                    (count,) = count_struct.unpack_from(buf, pos + 1)
                    pos += 1 + width
                    if not 0 <= count <= size - scan.base - pos:
                        scan.check_count(count, op, at, scan.base + pos)  # raises
                    stack.append(leaf)
                    if count >= _LARGE_TEXT:  # array data: a protocol 0-2 text, or (>= MAPPED_BYTES) a payload to map
                        large_text = large_text or op in _TEXTS
                        if count >= MAPPED_BYTES and op in _BYTES and at >= frame_end:
                            payloads.append((at, 1 + width, count))
                    pos += count
                    if pos > n:
                        pos = scan.move(pos)
                        buf, n = scan.buf, len(scan.buf)
                        safe = n - 9
                elif op == 0x2E:  # STOP: the result is walked, what lies below it was built for nothing
                    _tree_limit(source, at, dropped + sum(cell[0] for cell in stack))
                    return protocol, large_text, payloads
                elif op == 0x80:  # PROTO
                    if pos + 1 >= n:
                        raise scan.unreadable(f"it ended at byte {size} inside an opcode argument (truncated)")
                    protocol = buf[pos + 1]
                    pos += 2
                elif op == 0x95:  # FRAME: the next count bytes are opcodes, scanned as usual
                    if pos + 9 > n:
                        raise scan.unreadable(f"it ended at byte {size} inside an opcode argument (truncated)")
                    (count,) = struct.unpack_from("<Q", buf, pos + 1)
                    pos += 9
                    scan.check_count(count, op, at, scan.base + pos)
                    frame_end = scan.base + pos + count
                elif op in puts:
                    fmt = puts[op]
                    if fmt is None:
                        index, pos = _line_index(scan, pos + 1, "PUT", at)
                        buf, n = scan.buf, len(scan.buf)
                        safe = n - 9
                    else:
                        (index,) = struct.unpack_from(fmt, buf, pos + 1)
                        pos += 1 + struct.calcsize(fmt)
                    if index > len(memo):
                        raise scan.unreadable(
                            f"memo index {index} at byte {at} skips ahead of the {len(memo)} entries stored")
                    if index == len(memo):
                        memo.append(stack[-1])
                    else:
                        memo[index] = stack[-1]
                elif op == 0x67:  # GET, its index as a text line
                    index, pos = _line_index(scan, pos + 1, "GET", at)
                    buf, n = scan.buf, len(scan.buf)
                    safe = n - 9
                    cell = memo[index]
                    cell[1] = True
                    stack.append(cell)
                elif op in lines:  # INT, LONG, FLOAT, STRING, UNICODE, GLOBAL: a leaf; INST: an object from the mark
                    pos += 1
                    for _ in range(lines[op]):
                        start, end = scan.line_end(pos)
                        large_text = large_text or end - start >= _LARGE_TEXT
                        pos = end + 1
                    buf, n = scan.buf, len(scan.buf)
                    safe = n - 9
                    if op == 0x69:  # INST
                        start = marks.pop()
                        nodes = 1 + sum(cell[0] for cell in stack[start:])
                        del stack[start:]
                        stack.append([nodes, False])
                        if nodes > limit:
                            limit = _tree_limit(source, at, nodes)
                    else:
                        stack.append(leaf)
                elif op in refused:
                    raise UnsafeCheckpointError(
                        f"{source}: refused opcode {refused[op]} at byte {at}: a Paddle checkpoint never uses it")
                elif op in _PERSISTENT_IDS:
                    raise UnsafeCheckpointError(
                        f"{source}: refused to load: the pickle uses a persistent id (at byte {at}), which a Paddle "
                        "checkpoint never contains")
                else:
                    raise scan.unreadable(f"unknown opcode 0x{op:02x} at byte {at}")
            elif effect == _MARK:
                marks.append(len(stack))
                pos += 1
            elif effect == _MARKED_NEW:  # TUPLE, LIST, DICT, FROZENSET, OBJ: a new object from the mark on
                start = marks.pop()
                nodes = 1
                for cell in stack[start:]:
                    nodes += cell[0]
                del stack[start:]
                stack.append([nodes, False])
                if nodes > limit:
                    limit = _tree_limit(source, scan.base + pos, nodes)
                pos += 1
            elif effect == _BUILD:  # the state goes to a shell's checks; the shell stands for an array or dtype
                dropped += stack.pop()[0]
                if dropped > limit:
                    limit = _tree_limit(source, scan.base + pos, dropped)
                pos += 1
            elif effect == _LONG_BINGET:
                cell = memo[struct.unpack_from("<I", buf, pos + 1)[0]]
                cell[1] = True
                stack.append(cell)
                pos += 5
            elif effect == _POPPED_INTO or effect == _MARKED_INTO:  # APPEND(S), SETITEM(S), ADDITEMS
                start = len(stack) - arity_of[op] if effect == _POPPED_INTO else marks.pop()
                if start < 1:
                    raise _stack_underflow(scan, pos)
                target = stack[start - 1]
                if target[1] or target is leaf:
                    raise scan.unreadable(
                        f"byte {scan.base + pos} adds items to an object that is not a container, or to a container "
                        "already referenced elsewhere (a self-referencing structure, which a checkpoint never holds)")
                for cell in stack[start:]:
                    target[0] += cell[0]
                del stack[start:]
                if target[0] > limit:
                    limit = _tree_limit(source, scan.base + pos, target[0])
                pos += 1
            elif effect == _EMPTY:
                stack.append([1, False])
                pos += 1
            elif effect == _POP or effect == _POP_MARK:
                if effect == _POP_MARK or (marks and len(stack) == marks[-1]):
                    start = marks.pop()
                else:
                    start = len(stack) - 1
                for cell in stack[start:]:
                    dropped += cell[0]
                del stack[start:]
                if dropped > limit:
                    limit = _tree_limit(source, scan.base + pos, dropped)
                pos += 1
            else:  # _DUP
                cell = stack[-1]
                cell[1] = True
                stack.append(cell)
                pos += 1
    except IndexError as exc:  # the stack, a MARK or a memo entry an opcode needs is not there
        raise _stack_underflow(scan, pos) from exc


def _tree_limit(source: str, at: int, nodes: int) -> int:
    """What the first ``at`` bytes of a pickle allow its trees to add up to; refuses ``nodes`` beyond that."""
    limit = _TREE_SLACK + _TREE_PER_BYTE * at
    if nodes > limit:
        raise CorruptWeightsError(
            f"{source}: refused to load: by byte {at} its shared objects expand to {nodes} objects when followed as "
            f"trees, more than the {limit} allowed (a 'billion laughs' bomb or a corrupt pickle)")
    return limit


def _stack_underflow(scan: _Scan, pos: int) -> CorruptWeightsError:
    return scan.unreadable(
        f"the opcode near byte {scan.base + pos} uses a stack item, mark or memo entry that does not exist")


def _line_index(scan: _Scan, pos: int, what: str, at: int) -> tuple[int, int]:
    """The memo index on the text line at ``pos`` (protocol 0 PUT/GET) and the position after it."""
    start, end = scan.line_end(pos)
    text = scan.buf[start:end]
    if not text.isdigit():
        raise scan.unreadable(f"{what} at byte {at} has a bad index {text[:20]!r}")
    return int(text), end + 1


# ----------------------------------------------------------------------------- pass 2: unpickling


class _FastUnpickler(pickle.Unpickler):
    """The C unpickler, for files that passed :func:`_prescan`; globals resolve to the guards. ``payloads``: what
    the persistent ids of a :class:`_Spliced` stream stand for."""

    def __init__(self, file: IO[bytes], ctx: _Context, payloads: list[_MappedBytes] | None = None):
        super().__init__(file, encoding="latin1")
        self.ctx = ctx
        self.payloads = payloads or []

    def find_class(self, module: str, name: str):
        return self.ctx.find_class(module, name)

    def persistent_load(self, pid):
        if type(pid) is int and 0 <= pid < len(self.payloads):
            return self.payloads[pid]
        return self.ctx.persistent_load(pid)


class _Spliced(io.RawIOBase):
    """The pickle with each large BINBYTES opcode and its payload replaced by ``BININT k; BINPERSID``: the
    unpickler then asks for payload ``k`` instead of reading it (the file itself had no persistent ids: the scan
    refuses them)."""

    def __init__(self, file: IO[bytes], size: int, payloads: list[tuple[int, int, int]]):
        super().__init__()
        self._file = file
        self._segments: list[tuple[int, int, int | bytes]] = []  # (start, length, file offset or bytes)
        start = offset = 0
        for index, (at, header, count) in enumerate(payloads):
            token = b"J" + struct.pack("<i", index) + b"Q"
            for length, what in ((at - offset, offset), (len(token), token)):
                if length:
                    self._segments.append((start, length, what))
                    start += length
            offset = at + header + count
        if size > offset:
            self._segments.append((start, size - offset, offset))
        self._starts = [segment[0] for segment in self._segments]
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        index = bisect.bisect_right(self._starts, self._pos) - 1
        if index < 0 or index >= len(self._segments):
            return 0
        start, length, what = self._segments[index]
        skip = self._pos - start
        if skip >= length:
            return 0
        view = memoryview(buffer).cast("B")[:length - skip]
        if isinstance(what, bytes):
            chunk = what[skip:skip + len(view)]
            got = len(chunk)
            view[:got] = chunk
        else:
            self._file.seek(what + skip)
            got = self._file.readinto(view)
        self._pos += got
        return got


def private_mapping(map_from: tuple[int, int], size: int) -> tuple[mmap.mmap, int]:
    """A private (copy-on-write) mapping of the ``size`` bytes at ``map_from`` (file descriptor, offset in that
    file), and where the first of them lies in it (a mapping starts at a multiple of the allocation granularity)."""
    fileno, base = map_from
    start = base - base % mmap.ALLOCATIONGRANULARITY
    return mmap.mmap(fileno, base + size - start, access=mmap.ACCESS_COPY, offset=start), base - start


def _mapped_payloads(ctx: _Context, map_from: tuple[int, int], size: int,
                     payloads: list[tuple[int, int, int]]) -> list[_MappedBytes]:
    """One copy-on-write mapping of the pickle's bytes (``map_from``: file descriptor and offset of byte 0)."""
    buffer, origin = private_mapping(map_from, size)
    return [_MappedBytes(ctx, buffer, origin + at + header, count) for at, header, count in payloads]


class _Released:
    """Replaces a memoized array text once it was turned into bytes, so the text does not stay in memory."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<released array text>"


_RELEASED = _Released()


def _text_loader(load_text: Callable[[pickle._Unpickler], None]):
    """Wrap a text opcode loader so that a large text is noted (see ``_PythonUnpickler.release``)."""

    def load(self: "_PythonUnpickler") -> None:
        load_text(self)
        text = self.stack[-1]
        if len(text) >= _LARGE_TEXT:
            self.large_texts[id(text)] = [text, []]

    return load


def _put_loader(read_index: Callable[[pickle._Unpickler], int]):
    """Memo-put opcode loader that also notes where a large text was memoized."""

    def load(self: "_PythonUnpickler") -> None:
        index = read_index(self)
        top = self.stack[-1]
        self.memo[index] = top
        if self.large_texts:  # the text itself, or the memoized (text, 'latin1') argument tuple
            text = top[0] if type(top) is tuple and top else top
            entry = self.large_texts.get(id(text))
            if entry is not None and entry[0] is text:
                entry[1].append(index)

    return load


def _load_build(self: "_PythonUnpickler") -> None:
    state = self.stack.pop()
    target = self.stack[-1]
    if not isinstance(target, (_Shell, _Guard, _OrderedDict)):
        raise self.ctx.refuse_build(target)
    target.__setstate__(state)


class _PythonUnpickler(pickle._Unpickler):
    """The pure-Python unpickler, for files holding large latin1 texts (array data of protocol 0-2 pickles): each
    text is dropped from the memo as soon as its bytes exist, so these files also peak at about 1x their size."""

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = _load_build
    for _code in (pickle.BINSTRING, pickle.BINUNICODE, pickle.BINUNICODE8, pickle.STRING, pickle.UNICODE):
        dispatch[_code[0]] = _text_loader(pickle._Unpickler.dispatch[_code[0]])
    dispatch[pickle.PUT[0]] = _put_loader(lambda self: int(self.readline()[:-1]))
    dispatch[pickle.BINPUT[0]] = _put_loader(lambda self: self.read(1)[0])
    dispatch[pickle.LONG_BINPUT[0]] = _put_loader(lambda self: struct.unpack("<I", self.read(4))[0])
    dispatch[pickle.MEMOIZE[0]] = _put_loader(lambda self: len(self.memo))
    del _code

    def __init__(self, file: IO[bytes], ctx: _Context):
        super().__init__(file, encoding="latin1")
        self.ctx = ctx
        self.large_texts: dict[int, list] = {}  # id -> [text, memo indices holding it]
        ctx.release = self.release

    def find_class(self, module: str, name: str):
        return self.ctx.find_class(module, name)

    def persistent_load(self, pid):
        return self.ctx.persistent_load(pid)

    def release(self, text: str) -> None:
        """Drop a large text from the memo once its bytes exist."""
        entry = self.large_texts.pop(id(text), None)
        if entry is None or entry[0] is not text:
            return
        for index in entry[1]:
            held = self.memo.get(index)
            if held is text or (type(held) is tuple and held and held[0] is text):
                self.memo[index] = _RELEASED


def _finish(obj: Any, source: str, done: dict[int, Any], depth: int = 0) -> Any:
    """``obj`` with every shell replaced by its value; guards or released texts in the result are refused.

    ``done`` maps the id of each container or shell already converted to its result, so an object the pickle
    shares (memoized, referenced again) is converted once and stays shared.
    """
    kind = type(obj)
    if kind in (str, int, float, bool, bytes) or obj is None:
        return obj
    if id(obj) in done:
        return done[id(obj)]
    if depth > 100:
        raise CorruptWeightsError(f"{source}: the pickle nests deeper than 100 levels")
    if isinstance(obj, _Shell):
        result = obj.value()
    elif isinstance(obj, _Guard):
        raise UnsafeCheckpointError(f"{source}: the pickle returns the global {obj.qualname} itself")
    elif obj is _RELEASED:
        raise CorruptWeightsError(f"{source}: the pickle uses the data text of an array twice")
    elif isinstance(obj, dict):
        items = [(k if type(k) is str else _finish(k, source, done, depth + 1), _finish(v, source, done, depth + 1))
                 for k, v in obj.items()]
        try:
            result = collections.OrderedDict(items) if isinstance(obj, collections.OrderedDict) else dict(items)
        except TypeError as exc:
            raise CorruptWeightsError(
                f"{source}: a dict key is unhashable once its arrays are built ({exc}); a checkpoint keys its "
                "entries by names") from exc
    elif kind in (list, tuple):
        result = kind(_finish(v, source, done, depth + 1) for v in obj)
    elif kind in (set, frozenset):
        try:
            result = kind(_finish(v, source, done, depth + 1) for v in obj)
        except TypeError as exc:
            raise CorruptWeightsError(f"{source}: the pickle puts an array in a set ({exc})") from exc
    else:
        raise UnsafeCheckpointError(f"{source}: unexpected {kind.__name__} in the result")
    done[id(obj)] = result
    return result


def load_pickle(file: IO[bytes], size: int, *, source: str,
                map_from: tuple[int, int] | None = None) -> tuple[Any, dict]:
    """Unpickle ``file`` (``size`` bytes, seekable) safely; return ``(object, facts)``.

    ``map_from`` (file descriptor, offset of the pickle's first byte in that file): when given, arrays of large
    payloads are writable copy-on-write views of a mapping of the file instead of copies read into memory (like
    safetensors' ``safe_open``; such arrays need not be aligned). ``facts``: ``protocol`` (PROTO opcode value,
    None for protocol 0/1) and ``globals`` (sorted names used). Raises UnsafeCheckpointError for anything outside
    the allow-list and CorruptWeightsError for a malformed file.
    """
    ctx = _Context(size, source)
    try:
        protocol, large_text, payloads = _prescan(file, size, source)
        file.seek(0)
        if large_text:
            unpickler = _PythonUnpickler(file, ctx)
        elif payloads and map_from is not None:
            mapped = _mapped_payloads(ctx, map_from, size, payloads)
            unpickler = _FastUnpickler(io.BufferedReader(_Spliced(file, size, payloads)), ctx, mapped)
        else:
            unpickler = _FastUnpickler(file, ctx)
        obj = _finish(unpickler.load(), source, {})
    except (UnsafeCheckpointError, CorruptWeightsError):
        raise
    except RecursionError as exc:
        raise CorruptWeightsError(f"{source}: the pickle nests too deeply") from exc
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            MemoryError, OverflowError, UnicodeDecodeError, struct.error, io.UnsupportedOperation) as exc:
        where = file.tell() if file.seekable() else "?"
        raise CorruptWeightsError(
            f"{source}: not a readable Paddle pickle (near byte {where}): {type(exc).__name__}: {exc}") from exc
    return obj, {"protocol": protocol if protocol >= 2 else None, "globals": sorted(ctx.globals_seen)}
