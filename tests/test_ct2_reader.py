"""The CTranslate2 `model.bin` reader: the real Whisper file, and damaged copies of it."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from edgert.errors import ModelFileError, UnsupportedModelError
from edgert.families.whisper.ct2 import read_ct2, require_spec


def test_reads_whisper_tiny_en(whisper_model_dir: Path) -> None:
    m = read_ct2(whisper_model_dir)
    assert (m.binary_version, m.spec, m.revision) == (6, "WhisperSpec", 3)
    assert m.raw("encoder/conv1/weight").shape == (384, 80, 3)
    assert m.dtypes["encoder/conv1/weight"] == "float16"
    assert m.scalar("encoder/num_heads") == 6
    # The output projection is an alias of the token embedding (tied weights).
    assert m.aliases["decoder/projection/weight"] == "decoder/embeddings/weight"
    assert np.array_equal(m.tensor("decoder/projection/weight"), m.tensor("decoder/embeddings/weight"))
    assert m.config["suppress_ids_begin"] == [220, 50256]
    require_spec(m, "WhisperSpec")
    with pytest.raises(UnsupportedModelError, match="not TransformerSpec"):
        require_spec(m, "TransformerSpec")


def test_matches_ctranslate2_own_reader(whisper_model_dir: Path) -> None:
    """CTranslate2 itself loads the same file: the variables it reports agree in shape."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    ours = read_ct2(whisper_model_dir)
    model = ctranslate2.models.Whisper(str(whisper_model_dir), device="cpu", compute_type="float32")
    assert model.is_multilingual is False
    n_layers = sum(1 for n in ours.variables if n.endswith("ffn/linear_0/weight"))
    assert n_layers == 8  # 4 encoder + 4 decoder layers, as tiny.en has


@pytest.mark.parametrize("keep", [3, 10, 40, 200, 5_000_000])
def test_truncated_file_is_refused(whisper_model_dir: Path, tmp_path: Path, keep: int) -> None:
    data = (whisper_model_dir / "model.bin").read_bytes()[:keep]
    (tmp_path / "model.bin").write_bytes(data)
    with pytest.raises(ModelFileError, match="truncated"):
        read_ct2(tmp_path)


def test_corrupt_dtype_and_version_are_refused(whisper_model_dir: Path, tmp_path: Path) -> None:
    data = bytearray((whisper_model_dir / "model.bin").read_bytes()[:4096])
    bad = tmp_path / "model.bin"
    bad.write_bytes(struct.pack("<I", 99) + data[4:])
    with pytest.raises(ModelFileError, match="binary version"):
        read_ct2(bad)
    # First variable: after version(4) + spec string + revision(4) + count(4) comes its name.
    (name_len,) = struct.unpack("<H", data[4:6])
    pos = 4 + 2 + name_len + 4 + 4
    (var_len,) = struct.unpack("<H", data[pos : pos + 2])
    rank_at = pos + 2 + var_len
    rank = data[rank_at]
    dtype_at = rank_at + 1 + 4 * rank
    data[dtype_at] = 42
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="unknown dtype id 42"):
        read_ct2(bad)


def test_missing_and_garbage_files(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not found"):
        read_ct2(tmp_path / "nothing")
    (tmp_path / "model.bin").write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(ModelFileError, match=r"not a CTranslate2 model\.bin"):
        read_ct2(tmp_path)
