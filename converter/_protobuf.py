"""A small, dependency-free reader for the protobuf wire format and Paddle's ``ProgramDesc``.

Only the fields ocrconv needs are decoded; field numbers follow Paddle's
``paddle/fluid/framework/framework.proto`` (proto2). Every length is checked against the
buffer before it is used, so a malformed file raises :class:`ProtobufError` instead of
reading past the end or allocating from an untrusted size.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Iterator

# wire types
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_MAX_DEPTH = 64


class ProtobufError(ValueError):
    """Malformed protobuf data; ``offset`` is the byte position in the decoded buffer."""

    def __init__(self, message: str, offset: int):
        super().__init__(f"{message} at byte {offset}")
        self.offset = offset


def _read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    if pos < end:
        byte = buf[pos]
        if byte < 0x80:  # fast path: one-byte varint
            return byte, pos + 1
    result = 0
    shift = 0
    start = pos
    while True:
        if pos >= end:
            raise ProtobufError("truncated varint", start)
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise ProtobufError("varint longer than 10 bytes", start)


def _signed64(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _signed32(value: int) -> int:
    value &= (1 << 32) - 1
    return value - (1 << 32) if value >= 1 << 31 else value


def iter_fields(buf: bytes, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, object, int]]:
    """Yield ``(field_number, wire_type, value, offset)`` for each field of one message.

    ``value`` is an int for varint/fixed fields and a ``(start, end)`` slice for length-delimited ones.
    """
    end = len(buf) if end is None else end
    pos = start
    while pos < end:
        offset = pos
        key, pos = _read_varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ProtobufError("field number 0", offset)
        if wire == _VARINT:
            value, pos = _read_varint(buf, pos, end)
        elif wire == _LEN:
            length, pos = _read_varint(buf, pos, end)
            if length > end - pos:
                raise ProtobufError(f"field {number} claims {length} bytes, only {end - pos} left", offset)
            value = (pos, pos + length)
            pos += length
        elif wire == _I64:
            if pos + 8 > end:
                raise ProtobufError("truncated fixed64", offset)
            value = int.from_bytes(buf[pos:pos + 8], "little")
            pos += 8
        elif wire == _I32:
            if pos + 4 > end:
                raise ProtobufError("truncated fixed32", offset)
            value = int.from_bytes(buf[pos:pos + 4], "little")
            pos += 4
        else:
            raise ProtobufError(f"unsupported wire type {wire} for field {number}", offset)
        yield number, wire, value, offset


def _ints(buf: bytes, wire: int, value, out: list[int], signed32: bool) -> None:
    """Append a repeated integer field, packed or not."""
    conv = _signed32 if signed32 else _signed64
    if wire == _VARINT:
        out.append(conv(value))
    elif wire == _LEN:
        pos, end = value
        while pos < end:
            item, pos = _read_varint(buf, pos, end)
            out.append(conv(item))
    else:
        raise ProtobufError(f"integer field with wire type {wire}", value if isinstance(value, int) else 0)


def _floats(buf: bytes, wire: int, value, out: list[float], double: bool) -> None:
    fmt, size = ("<d", 8) if double else ("<f", 4)
    if wire in (_I64, _I32):
        out.append(struct.unpack(fmt, value.to_bytes(size, "little"))[0])
    elif wire == _LEN:
        pos, end = value
        if (end - pos) % size:
            raise ProtobufError("packed float field with a partial element", pos)
        out.extend(x[0] for x in struct.iter_unpack(fmt, buf[pos:end]))
    else:
        raise ProtobufError(f"float field with wire type {wire}", 0)


def _text(buf: bytes, value) -> str:
    pos, end = value
    try:
        return buf[pos:end].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtobufError("string field is not valid UTF-8", pos) from exc


# ----------------------------------------------------------------------------- Paddle types

#: VarType.Type values of data types -> numpy dtype strings (little endian).
PADDLE_DTYPES: dict[int, str] = {
    0: "|b1", 1: "<i2", 2: "<i4", 3: "<i8", 4: "<f2", 5: "<f4", 6: "<f8",
    20: "|u1", 21: "|i1", 23: "<c8", 24: "<c16", 36: "<u2", 37: "<u4", 38: "<u8",
}
#: Valid Paddle data types that numpy has no dtype for (BF16, FP8_E4M3FN, FP8_E5M2).
NON_NUMPY_DTYPES = frozenset({22, 32, 33})
#: Names of every VarType.Type value (data types and variable kinds).
VAR_TYPE_NAMES: dict[int, str] = {
    0: "BOOL", 1: "INT16", 2: "INT32", 3: "INT64", 4: "FP16", 5: "FP32", 6: "FP64", 19: "SIZE_T",
    20: "UINT8", 21: "INT8", 22: "BF16", 23: "COMPLEX64", 24: "COMPLEX128", 32: "FP8_E4M3FN",
    33: "FP8_E5M2", 36: "UINT16", 37: "UINT32", 38: "UINT64", 7: "DENSE_TENSOR", 8: "SELECTED_ROWS",
    9: "FEED_MINIBATCH", 10: "FETCH_LIST", 11: "STEP_SCOPES", 12: "LOD_RANK_TABLE",
    13: "DENSE_TENSOR_ARRAY", 14: "PLACE_LIST", 15: "READER", 17: "RAW", 18: "TUPLE", 25: "STRING",
    26: "STRINGS", 27: "VOCAB", 28: "FEED_LIST", 29: "PSTRING", 30: "SPARSE_COO", 31: "SPARSE_CSR",
}
DENSE_TENSOR = 7
FEED_MINIBATCH = 9
FETCH_LIST = 10
READER = 15
RAW = 17


@dataclass
class TensorDesc:
    """``VarType.TensorDesc``: element type (VarType.Type value) and dims (-1 = unknown)."""

    data_type: int = -1
    dims: list[int] = field(default_factory=list)


def parse_tensor_desc(buf: bytes, start: int = 0, end: int | None = None) -> TensorDesc:
    """Decode a ``VarType.TensorDesc`` message (field 1 data_type, field 2 dims)."""
    desc = TensorDesc()
    for number, wire, value, offset in iter_fields(buf, start, end):
        if number == 1 and wire == _VARINT:
            desc.data_type = _signed32(value)
        elif number == 2:
            _ints(buf, wire, value, desc.dims, signed32=False)
    return desc


class VarDesc:
    """One program variable: name, kind (VarType.Type value), tensor desc if dense, persistable flag.

    ``type`` and ``tensor`` are decoded on first access: a reader needs them only for the persistable variables
    and the feeds/fetches, a minority of a program's variables.
    """

    __slots__ = ("name", "persistable", "_buf", "_type_span", "_type", "_tensor")

    def __init__(self, name: str = "", persistable: bool = False, buf: bytes = b"",
                 type_span: tuple[int, int] | None = None):
        self.name = name
        self.persistable = persistable
        self._buf = buf
        self._type_span = type_span
        self._type = -1
        self._tensor: TensorDesc | None = None

    def _decode_type(self) -> None:
        if self._type_span is not None:
            span, self._type_span = self._type_span, None
            self._type, self._tensor = _parse_var_type(self._buf, *span)
            self._buf = b""

    @property
    def type(self) -> int:
        """``VarType.Type`` value (-1 when the variable records none)."""
        self._decode_type()
        return self._type

    @property
    def tensor(self) -> TensorDesc | None:
        """The tensor description of a dense tensor / selected rows / tensor array variable."""
        self._decode_type()
        return self._tensor

    def __repr__(self) -> str:
        return f"VarDesc(name={self.name!r}, type={self.type}, tensor={self.tensor}, persistable={self.persistable})"


def _parse_var_type(buf: bytes, start: int, end: int) -> tuple[int, TensorDesc | None]:
    var_type, tensor = -1, None
    for number, wire, value, _ in iter_fields(buf, start, end):
        if number == 1 and wire == _VARINT:
            var_type = _signed32(value)
        elif number in (2, 3, 4) and wire == _LEN:
            # 2: selected_rows (TensorDesc); 3: dense_tensor / 4: tensor_array (DenseTensorDesc: 1 tensor)
            if number == 2:
                tensor = parse_tensor_desc(buf, *value)
            else:
                for inner_number, inner_wire, inner_value, _ in iter_fields(buf, *value):
                    if inner_number == 1 and inner_wire == _LEN:
                        tensor = parse_tensor_desc(buf, *inner_value)
    return var_type, tensor


def _parse_var(buf: bytes, start: int, end: int) -> VarDesc:
    var = VarDesc(buf=buf)
    for number, wire, value, _ in iter_fields(buf, start, end):
        if number == 1 and wire == _LEN:
            var.name = _text(buf, value)
        elif number == 2 and wire == _LEN:
            var._type_span = value
        elif number == 3 and wire == _VARINT:
            var.persistable = bool(value)
    if var._type_span is None:
        var._buf = b""
    return var


@dataclass
class OpDesc:
    """One operator: type, inputs/outputs (parameter -> argument names) and attributes (name -> value)."""

    type: str = ""
    inputs: dict[str, list[str]] = field(default_factory=dict)
    outputs: dict[str, list[str]] = field(default_factory=dict)
    attrs: dict[str, object] = field(default_factory=dict)


def _parse_op_var(buf: bytes, start: int, end: int) -> tuple[str, list[str]]:
    parameter, arguments = "", []
    for number, wire, value, _ in iter_fields(buf, start, end):
        if number == 1 and wire == _LEN:
            parameter = _text(buf, value)
        elif number == 2 and wire == _LEN:
            arguments.append(_text(buf, value))
    return parameter, arguments


# OpDesc.Attr: field number -> (kind, repeated)
_ATTR_FIELDS = {
    3: ("i32", False), 4: ("f32", False), 5: ("str", False), 6: ("i32", True), 7: ("f32", True),
    8: ("str", True), 10: ("bool", False), 11: ("bool", True), 12: ("i32", False), 13: ("i64", False),
    14: ("i32", True), 15: ("i64", True), 16: ("f64", True), 17: ("str", False), 18: ("str", True),
    19: ("f64", False),
}
# AttrType -> the field holding the value
_ATTR_VALUE_FIELD = {0: 3, 1: 4, 2: 5, 3: 6, 4: 7, 5: 8, 6: 10, 7: 11, 8: 12, 9: 13, 10: 14, 11: 15, 12: 16,
                     13: 17, 14: 18, 15: 19}
_REPEATED_ATTR_TYPES = {3, 4, 5, 7, 10, 11, 12, 14}


def _parse_attr(buf: bytes, start: int, end: int) -> tuple[str, object]:
    name, attr_type = "", -1
    values: dict[int, list] = {}
    for number, wire, value, _ in iter_fields(buf, start, end):
        if number == 1 and wire == _LEN:
            name = _text(buf, value)
        elif number == 2 and wire == _VARINT:
            attr_type = _signed32(value)
        elif number in _ATTR_FIELDS:
            kind, _repeated = _ATTR_FIELDS[number]
            out = values.setdefault(number, [])
            if kind in ("i32", "i64"):
                _ints(buf, wire, value, out, signed32=kind == "i32")
            elif kind == "bool":
                _ints(buf, wire, value, out, signed32=True)
                out[:] = [bool(v) for v in out]
            elif kind in ("f32", "f64"):
                _floats(buf, wire, value, out, double=kind == "f64")
            else:
                out.append(_text(buf, value))
    value_field = _ATTR_VALUE_FIELD.get(attr_type)
    if value_field is None:  # SCALAR(S) and unknown kinds are kept as absent
        return name, None
    found = values.get(value_field, [])
    if attr_type in _REPEATED_ATTR_TYPES:
        return name, found
    return name, found[-1] if found else None


def _parse_op(buf: bytes, start: int, end: int) -> OpDesc:
    op = OpDesc()
    for number, wire, value, _ in iter_fields(buf, start, end):
        if wire != _LEN:
            continue
        if number == 3:
            op.type = _text(buf, value)
        elif number == 1:
            parameter, arguments = _parse_op_var(buf, *value)
            op.inputs[parameter] = arguments
        elif number == 2:
            parameter, arguments = _parse_op_var(buf, *value)
            op.outputs[parameter] = arguments
        elif number == 4:
            attr_name, attr_value = _parse_attr(buf, *value)
            op.attrs[attr_name] = attr_value
    return op


def op_type(buf: bytes, start: int, end: int) -> str:
    """Only the ``type`` (field 3) of an OpDesc, skipping its inputs/outputs without decoding them."""
    for number, wire, value, _ in iter_fields(buf, start, end):
        if number == 3 and wire == _LEN:
            return _text(buf, value)
    return ""


@dataclass
class BlockDesc:
    """One program block: its variables (in file order) and the byte spans of its operators."""

    idx: int = 0
    parent_idx: int = -1
    vars: list[VarDesc] = field(default_factory=list)
    op_spans: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class ProgramDesc:
    """A decoded ``ProgramDesc``: blocks and the program version (Paddle's ``version.version``).

    Operators are decoded on demand (:meth:`decode_op`), since most readers need only the variables.
    """

    data: bytes = field(repr=False, default=b"")
    blocks: list[BlockDesc] = field(default_factory=list)
    version: int | None = None

    def op_spans(self) -> list[tuple[int, int]]:
        """Byte spans of every operator, block by block."""
        return [span for block in self.blocks for span in block.op_spans]

    def decode_op(self, span: tuple[int, int]) -> OpDesc:
        """Decode the operator stored at ``span``."""
        return _parse_op(self.data, *span)

    def op_type(self, span: tuple[int, int]) -> str:
        """The type of the operator stored at ``span``."""
        return op_type(self.data, *span)


def parse_program(data: bytes) -> ProgramDesc:
    """Decode a serialized ``ProgramDesc`` (the ``.pdmodel`` file); operators are only located."""
    buf = bytes(data)
    program = ProgramDesc(data=buf)
    for number, wire, value, _ in iter_fields(buf):
        if number == 1 and wire == _LEN:
            block = BlockDesc()
            for b_number, b_wire, b_value, _ in iter_fields(buf, *value):
                if b_number == 1 and b_wire == _VARINT:
                    block.idx = _signed32(b_value)
                elif b_number == 2 and b_wire == _VARINT:
                    block.parent_idx = _signed32(b_value)
                elif b_number == 3 and b_wire == _LEN:
                    block.vars.append(_parse_var(buf, *b_value))
                elif b_number == 4 and b_wire == _LEN:
                    block.op_spans.append(b_value)
            program.blocks.append(block)
        elif number == 4 and wire == _LEN:
            for v_number, v_wire, v_value, _ in iter_fields(buf, *value):
                if v_number == 1 and v_wire == _VARINT:
                    program.version = _signed64(v_value)
    return program
