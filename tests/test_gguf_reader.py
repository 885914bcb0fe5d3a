"""edgert's GGUF reader (`open_gguf_reader`) gives `gguf`'s own reader's fields, faster, and refuses
an array whose count the file cannot hold."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from edgert.frontend.gguf_reader import open_gguf_reader  # noqa: E402

ARRAYS = {
    "test.u8": ([1, 2, 255], gguf.GGUFValueType.UINT8),
    "test.i32": ([-5, 0, 7, 2**31 - 1], gguf.GGUFValueType.INT32),
    "test.f32": ([0.5, -1.25, 2.0**100], gguf.GGUFValueType.FLOAT32),  # exact in float32
    "test.f64": ([1e-300, 2.0], gguf.GGUFValueType.FLOAT64),
    "test.u64": ([2**63, 1], gguf.GGUFValueType.UINT64),
    "test.bool": ([True, False, True], gguf.GGUFValueType.BOOL),
    "test.strings": (["", "a", "zwölf", "x" * 300], gguf.GGUFValueType.STRING),
}


def _write(path: Path) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("test.name", "tiny")
    writer.add_uint32("test.count", 3)
    for key, (values, kind) in ARRAYS.items():
        writer.add_key_value(key, values, gguf.GGUFValueType.ARRAY, sub_type=kind)
    writer.add_key_value("test.nested", [[1, 2], [3]], gguf.GGUFValueType.ARRAY)
    writer.add_tensor("t", np.arange(6, dtype=np.float32).reshape(2, 3))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _assert_same_fields(path: Path) -> None:
    stock, ours = gguf.GGUFReader(path, "r"), open_gguf_reader(path)
    assert list(ours.fields) == list(stock.fields)
    for name, want in stock.fields.items():
        got = ours.fields[name]
        assert (got.offset, got.name, list(got.data), list(got.types)) == (
            want.offset,
            want.name,
            list(want.data),
            list(want.types),
        ), name
        assert len(got.parts) == len(want.parts), name
        for a, b in zip(got.parts, want.parts, strict=True):
            assert (a.dtype, a.shape, a.tobytes()) == (b.dtype, b.shape, b.tobytes()), name
        assert got.contents() == want.contents(), name
    assert [(t.name, t.data.tobytes()) for t in ours.tensors] == [(t.name, t.data.tobytes()) for t in stock.tensors]


def test_fields_are_the_stock_readers(tmp_path: Path) -> None:
    """Every kind of array (scalars of each width, strings, nested) reads into the same parts.
    (gguf's writer refuses an empty array, so none is written here.)"""
    path = _write(tmp_path / "m.gguf")
    _assert_same_fields(path)
    fields = open_gguf_reader(path).fields
    for key, (values, _kind) in ARRAYS.items():
        assert fields[key].contents() == values, key


def test_fields_of_a_real_vocabulary_are_the_stock_readers(tiny_gguf_file: Path) -> None:
    """SmolLM2's tokenizer arrays (49152 tokens, their types, the merges) read the same."""
    _assert_same_fields(tiny_gguf_file)


@pytest.mark.parametrize("key", ["test.i32", "test.strings"])
def test_an_array_count_past_the_end_is_refused(tmp_path: Path, key: str) -> None:
    """A count the file cannot hold is an error, not a loop over empty slices."""
    path = _write(tmp_path / "m.gguf")
    data = bytearray(path.read_bytes())
    name = key.encode()
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name) + 4 + 4  # past the key, type, item type
    assert struct.unpack_from("<Q", data, at)[0] == len(ARRAYS[key][0])
    struct.pack_into("<Q", data, at, 2**40)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="runs past the end"):
        open_gguf_reader(path)
