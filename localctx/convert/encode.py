"""Encoding a planned GGUF: the new header, the tensor-info table and the pieces of the data
section (byte ranges of the source, or new bytes), in file order."""
from __future__ import annotations

import struct
from typing import Any, Union

from gguf import GGMLQuantizationType, GGUFValueType

from ..errors import ConversionError
from ..gguf_meta import _SCALAR_FORMATS, GGUFHeader, TensorInfo
from .. import rope_freqs
from .plan import Plan



def _encode_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def encode_kv(key: str, vtype: GGUFValueType, value: Any) -> bytes:
    """One GGUF key-value entry (scalars, strings, float32 arrays) as it is laid out in a file."""
    head = _encode_string(key) + struct.pack("<I", int(vtype))
    if vtype == GGUFValueType.STRING:
        return head + _encode_string(value)
    if vtype == GGUFValueType.ARRAY:
        return head + struct.pack("<IQ", int(GGUFValueType.FLOAT32), len(value)) + rope_freqs.to_bytes(tuple(value))
    return head + struct.pack(_SCALAR_FORMATS[vtype], value)


def build_header(plan: Plan, raw: bytes) -> bytes:
    """Everything before the data section of the new file: magic, version, counts, key-values
    (untouched ones as their raw bytes, in their original order), tensor infos, alignment padding.
    `raw` is the input's bytes from 0 to the end of its tensor-info block."""
    h = plan.header
    entries: list[bytes] = []
    for key, kv in h.kvs.items():
        if key in plan.updates:
            update = plan.updates[key]
            if update is not None:
                entries.append(encode_kv(key, *update))
        else:
            start, end = kv.span
            entries.append(raw[start:end])
    entries += [encode_kv(key, *u) for key, u in plan.updates.items() if key not in h.kvs and u is not None]
    infos, n_tensors = tensor_infos(plan, raw)
    out = bytearray(raw[:8])  # magic and version, as they were
    out += struct.pack("<QQ", n_tensors, len(entries))
    for entry in entries:
        out += entry
    out += infos
    out += b"\0" * (-len(out) % h.alignment)
    return bytes(out)


# The output's data section, in order: (offset in IN's data section, length) to copy, or bytes.
Piece = Union[tuple[int, int], bytes]


def tensor_infos(plan: Plan, raw: bytes) -> tuple[bytes, int]:
    """The output's tensor-info block and tensor count: IN's entries as their raw bytes, with the
    rope_freqs.weight entry appended or dropped (replaced in place, it keeps its entry)."""
    h, edit = plan.header, plan.tensor
    start, end = h.tensor_info_span
    block = raw[start:end]
    if edit is None or (edit.old is not None and edit.new is not None):
        return block, len(h.tensors)
    if edit.new is not None:
        return block + _encode_tensor_info(edit.name, len(edit.new), _appended_offset(plan)), len(h.tensors) + 1
    assert edit.info is not None
    first, last = _info_span(h, edit.info, raw)
    return block[: first - start] + block[last - start:], len(h.tensors) - 1


def _encode_tensor_info(name: str, n: int, offset: int) -> bytes:
    # name, one dimension of n, F32, offset in the data section (the GGUF tensor-info layout)
    return _encode_string(name) + struct.pack("<IQIQ", 1, n, int(GGMLQuantizationType.F32), offset)


def _info_span(h: GGUFHeader, info: TensorInfo, raw: bytes) -> tuple[int, int]:
    """Where `info`'s entry lies in the tensor-info block: entries are laid out in order, each its
    name, dimension count, dimensions, type and offset."""
    pos = h.tensor_info_span[0]
    for t in h.tensors:
        (name_len,) = struct.unpack_from("<Q", raw, pos)
        size = 8 + name_len + 4 + 8 * len(t.shape) + 4 + 8
        if t is info:
            return pos, pos + size
        pos += size
    raise ConversionError(f"{info.name} is not among the tensors of {h.path}.")  # unreachable: info is one of them


def _appended_offset(plan: Plan) -> int:
    return -(-plan.data_bytes // plan.header.alignment) * plan.header.alignment


def data_pieces(plan: Plan) -> list[Piece]:
    """The output's data section: IN's data streamed unchanged around the one tensor edit. An
    added tensor goes after everything, aligned and padded as gguf writers pad each tensor; a
    removed one that ends the data is cut off (one followed by others stays, unreferenced)."""
    n, edit = plan.data_bytes, plan.tensor
    if edit is None:
        return [(0, n)]
    align = plan.header.alignment
    if edit.new is None:
        assert edit.info is not None
        last = all(t.offset <= edit.info.offset for t in plan.header.tensors)
        return [(0, edit.info.offset if last else n)]
    data = rope_freqs.to_bytes(edit.new)
    if edit.info is None:
        start = _appended_offset(plan)
        return [(0, n), b"\0" * (start - n) + data + b"\0" * (-len(data) % align)]
    at, size = edit.info.offset, edit.info.nbytes
    return [(0, at), data, (at + size, n - at - size)]


def pieces_bytes(pieces: list[Piece]) -> int:
    return sum(p[1] if isinstance(p, tuple) else len(p) for p in pieces)
