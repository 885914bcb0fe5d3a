"""Bad model files: one clear edgert error naming the problem, and nothing written.

Each case is compiled through the API (an `EdgertError` subclass with a one-line message that
names the file and the problem) and through the CLI (exit code 2, the message on stderr, no
traceback). A failed compile must not create the output, nor touch a file already there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import load_tool, run_cli

import edgert
from edgert.errors import EdgertError, ModelFileError, UnsupportedModelError

tiny = load_tool("make_tiny_gguf")


def _write_without_hyperparameters(path: Path) -> Path:
    """A llama GGUF with only llama.block_count, no other hyper-parameters and no vocabulary."""
    import gguf

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_tensor("output_norm.weight", np.ones(64, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# name: (error class, phrases its message must contain besides the file's path)
EXPECTED: dict[str, tuple[type[EdgertError], list[str]]] = {
    "missing": (ModelFileError, ["not found"]),
    "truncated_in_tensors": (ModelFileError, ["truncated"]),
    "truncated_in_metadata": (ModelFileError, ["truncated"]),
    "empty": (ModelFileError, ["not a GGUF file"]),
    "bad_magic": (ModelFileError, ["not a GGUF file", "GGML"]),
    "random_after_magic": (ModelFileError, ["truncated or garbled"]),
    "random_after_header": (ModelFileError, ["truncated or garbled"]),
    "no_hyperparameters": (ModelFileError, ["missing", "llama.embedding_length", "tokenizer.ggml.tokens"]),
    "unsupported_tensor_type": (UnsupportedModelError, ["token_embd.weight", "Q2_K", "does not support"]),
    "unsupported_architecture": (UnsupportedModelError, ["architecture 'mamba'", "not supported"]),
}
# Cases that fail only after TVM compiled the model (tensor types are checked as weights
# are converted): they exercise the clean-up of the staging folder next to the output.
LATE = {"unsupported_tensor_type"}


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad-gguf")
    fields = tiny.read_tokenizer_fields()
    good = tiny.write_tiny_llama(d / "good.gguf", "Q4_0", tokenizer_fields=fields)
    data = good.read_bytes()
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, 100_000, dtype=np.uint8).tobytes()
    files = {
        "truncated_in_tensors": data[: len(data) // 2],  # the metadata ends at about 49 %
        "truncated_in_metadata": data[:100_000],  # inside the token list
        "empty": b"",
        "bad_magic": b"GGML" + data[4:],
        "random_after_magic": b"GGUF" + noise,
        "random_after_header": data[:8] + noise,  # magic and version 3, then noise
    }
    paths = {"missing": d / "does-not-exist.gguf"}
    for name, content in files.items():
        paths[name] = d / f"{name}.gguf"
        paths[name].write_bytes(content)
    paths["no_hyperparameters"] = _write_without_hyperparameters(d / "no_hyperparameters.gguf")
    paths["unsupported_tensor_type"] = tiny.write_tiny_llama(  # Q2_K needs rows of 256 values
        d / "q2_k.gguf", "Q2_K", n_layers=1, hidden=256, ffn=256, tokenizer_fields=fields
    )
    paths["unsupported_architecture"] = tiny.write_tiny_llama(
        d / "mamba.gguf", "Q4_0", architecture="mamba", tokenizer_fields=fields
    )
    assert set(paths) == set(EXPECTED)
    return paths


def _marks(name: str) -> list[pytest.MarkDecorator]:
    return [pytest.mark.slow] if name in LATE else []


CASES = [pytest.param(name, marks=_marks(name), id=name) for name in EXPECTED]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_good_tiny_model_is_accepted(bad_models: dict[str, Path]) -> None:
    """Control: the file the bad ones are cut from reads fine (no compile needed)."""
    from edgert.families.llama.model import LlamaConfig
    from edgert.frontend import read_gguf

    model = read_gguf(bad_models["missing"].with_name("good.gguf"))
    cfg = LlamaConfig.from_gguf(model)
    assert (cfg.num_layers, cfg.hidden_size, cfg.vocab_size) == (2, 64, 49152)
    assert model.tensor("token_embd.weight").shape == (49152, 64)


@pytest.mark.parametrize("name", CASES)
def test_api_error(bad_models: dict[str, Path], tmp_path: Path, name: str) -> None:
    error, phrases = EXPECTED[name]
    path = bad_models[name]
    out = tmp_path / "model.edgert"
    with pytest.raises(EdgertError) as info:
        edgert.compile(str(path), target="host", output=out, weight_dtype="f32")
    message = str(info.value)
    assert type(info.value) is error, f"{type(info.value).__name__}: {message}"
    assert str(path) in message and "\n" not in message
    for phrase in phrases:
        assert phrase in message
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [], "the failed compile left files next to the output"


@pytest.mark.parametrize("name", CASES)
def test_cli_error(bad_models: dict[str, Path], tmp_path: Path, name: str) -> None:
    _, phrases = EXPECTED[name]
    path = bad_models[name]
    out = tmp_path / "model.edgert"
    out.write_bytes(b"an older artifact that must survive")
    before = _snapshot(tmp_path)
    result = run_cli("compile", str(path), "--output", str(out), "--weight-dtype", "f32", env={"COLUMNS": "1000"})
    stderr = " ".join(result.stderr.split())
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert "error:" in stderr and str(path) in stderr
    for phrase in phrases:
        assert phrase in stderr
    assert _snapshot(tmp_path) == before, "the failed compile changed the output folder"


@pytest.mark.slow
def test_late_failure_keeps_existing_artifact_via_api(bad_models: dict[str, Path], tmp_path: Path) -> None:
    """A failure after the TVM build (staging already under way) leaves the old output as it was."""
    out = tmp_path / "model.edgert"
    out.write_bytes(b"sentinel")
    with pytest.raises(UnsupportedModelError, match="Q2_K"):
        edgert.compile(str(bad_models["unsupported_tensor_type"]), target="host", output=out, weight_dtype="f32")
    assert _snapshot(tmp_path) == {"model.edgert": b"sentinel"}


def test_missing_file_without_gguf_suffix(tmp_path: Path) -> None:
    """A name that is neither a recipe nor an existing file says so, listing the recipes."""
    with pytest.raises(ModelFileError, match="neither a model recipe") as info:
        edgert.compile(str(tmp_path / "nothing-here"), target="host", output=tmp_path / "x.edgert")
    assert "smollm2-135m" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_cli_error_message_keeps_square_brackets(tmp_path: Path) -> None:
    """The message is printed as text, not as rich markup ('[red]' must not vanish as a style)."""
    folder = tmp_path / "[red]"
    folder.mkdir()
    result = run_cli(
        "compile", str(folder / "model.gguf"), "--output", str(tmp_path / "x.edgert"), env={"COLUMNS": "1000"}
    )
    assert result.returncode == 2
    assert str(folder / "model.gguf") in " ".join(result.stderr.split())
