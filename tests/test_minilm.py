"""all-MiniLM-L6-v2 exported by tools/export_minilm_onnx.py, compiled with symbolic batch and sequence."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_tool

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("safetensors")

SENTENCES = [
    "A man is playing a guitar on stage.",
    "Someone performs music with a guitar in front of an audience.",
    "The stock market fell sharply this morning.",
]


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory):
    """(export module, ONNX path, loaded edgert model) compiled once for the module."""
    import edgert

    tool = load_tool("export_minilm_onnx")
    tool.model_dir()  # tools/setup.sh installs the model package: its absence is a failure, not a skip
    folder = tmp_path_factory.mktemp("minilm")
    onnx_path = tool.export(folder / "minilm.onnx")
    edgert.compile(str(onnx_path), output=folder / "minilm.edgert")
    return tool, onnx_path, edgert.load(folder / "minilm.edgert")


@pytest.mark.slow
def test_minilm_matches_onnxruntime_with_dynamic_batch_and_sequence(minilm):
    tool, onnx_path, model = minilm
    assert model.inputs[0]["shape"] == ["batch", "sequence"]
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for texts in (SENTENCES[:1], SENTENCES):  # one unpadded row; three rows of different lengths, padded
        feeds = tool.tokenize(texts)
        got = model(feeds)
        want = dict(zip(["last_hidden_state", "sentence_embedding"], sess.run(None, feeds), strict=True))
        mask = feeds["attention_mask"][..., None].astype(bool)
        np.testing.assert_allclose(
            np.where(mask, got["last_hidden_state"], 0), np.where(mask, want["last_hidden_state"], 0), atol=1e-4
        )
        np.testing.assert_allclose(got["sentence_embedding"], want["sentence_embedding"], atol=1e-5)


@pytest.mark.slow
def test_minilm_embeddings_rank_paraphrases_first(minilm):
    tool, _, model = minilm
    emb = model(tool.tokenize(SENTENCES))["sentence_embedding"]
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sim = emb @ emb.T
    assert sim[0, 1] > 0.5 > sim[0, 2]
