"""Gemma 3: the family's pieces on the shipped Q4_K_M GGUF, and agreement with llama.cpp.

Fast tests check the config read from ``gemma3.*`` metadata, the tokenizer against llama.cpp's,
and that the Q5_0, Q8_0, Q4_K and Q6_K tensors kept as codes and scales hold exactly the file's
values (numpy, bit for bit against `gguf`'s dequantization). The slow ones compile the model and
compare it with llama.cpp
(llama-cpp-python), greedy, 10 prompts, 48-token continuations, with the method of
test_llamacpp_agreement.py: teacher-forced argmax agreement on the positions llama.cpp's own
batched evaluation reproduces, and the first 16 tokens of free generation, against llama.cpp on
the Q4_K_M file and in plain f32 on a dequantized copy (the issue's goals: >= 98% on the file's
decided positions, first 16 tokens equal on >= 8 of 10 prompts against the f32 copy).
Measured 2026-12-05: on the file 476/480 positions, 476/479 decided (99.4%); its free generation
matched the first 16 tokens on 7/10 prompts (near-ties that llama.cpp's 8-bit activation rounding
decides; not asserted); against the f32 copy 480/480 positions and 10/10 prompts.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import load_tool

FREE_PREFIX = 16
# What the suite can afford (llama.cpp's 262k-word head makes every reference token costly): the
# file's agreement on the first 5 prompts over 32 tokens, the f32 copy's on all 10 over the 16
# tokens the free-generation goal reads. `GEMMA_FULL=1` runs the measured 10 x 48 of the docstring.
FULL = bool(os.environ.get("GEMMA_FULL"))
FILE_PROMPTS, FILE_TOKENS = (10, 48) if FULL else (5, 32)
EXACT_TOKENS = 48 if FULL else FREE_PREFIX


@pytest.fixture(scope="module")
def gemma_model(gemma_gguf: Path):
    from edgert.frontend import read_gguf

    return read_gguf(gemma_gguf)


def test_config_from_metadata_and_published_defaults(gemma_model) -> None:
    from edgert.families.gemma3.model import GEMMA3_DEFAULTS, Gemma3Config

    cfg = Gemma3Config.from_gguf(gemma_model)
    assert (cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.sliding_window) == (256, 4, 1, 512)
    assert cfg.rope_theta == 1e6 and cfg.rope_local_theta == GEMMA3_DEFAULTS["rope_local_base"]
    assert cfg.vocab_size == 262144 and cfg.tie_word_embeddings and cfg.final_logit_softcapping is None
    assert [i for i in range(cfg.num_layers) if not cfg.is_local(i)] == [5, 11, 17]


def test_kquant_blocks_hold_the_files_values(gemma_model) -> None:
    """Every quantized type of the file is kept as codes and scales that reproduce gguf's values bit for bit."""
    from edgert.families.gemma3.loader import kquant_rows

    cases = {  # tensor: (its type in the file, the storage edgert keeps it in)
        "blk.0.attn_q.weight": ("Q5_0", "q8"),
        "blk.0.attn_v.weight": ("Q8_0", "q8"),
        "blk.0.attn_output.weight": ("Q4_K", "q4s32"),
        "blk.0.ffn_down.weight": ("Q6_K", "q8g16s32"),
    }
    for name, (kind, key) in cases.items():
        q = kquant_rows(gemma_model, name)
        assert gemma_model.tensor_types[name] == kind and q.fmt.key == key, name
        np.testing.assert_array_equal(q.dequantize().view(np.uint32), gemma_model.tensor(name).view(np.uint32), name)


@pytest.fixture(scope="module")
def tokenizer_document(gemma_model) -> str:
    from edgert.frontend.gguf_tokenizer import build_tokenizer_json

    return build_tokenizer_json(gemma_model.metadata)


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_document: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_document)


TOKENIZER_TEXTS = (
    "<start_of_turn>user\nWrite a haiku about the sea.<end_of_turn>\n<start_of_turn>model\n",
    "  two  spaces\n\n\ttab émoji 🙂 数字 12345 don't—stop",
)


def test_tokenizer_matches_llama_cpp(gemma_model, gemma_gguf: Path, hf_tokenizer) -> None:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is a test dependency")
    from edgert.families.gemma3.loader import tokenizer_metadata
    from edgert.frontend.gguf_tokenizer import tokenizer_config

    tok = hf_tokenizer
    ref = llama_cpp.Llama(str(gemma_gguf), vocab_only=True, verbose=False)
    for text in TOKENIZER_TEXTS:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert ids == ref.tokenize(text.encode(), add_bos=False, special=True)
        assert tok.decode(ids, skip_special_tokens=False) == text
    config = tokenizer_config(tokenizer_metadata(gemma_model.metadata))  # the file has no template
    assert "<start_of_turn>" in config["chat_template"]
    assert 106 in config["stop_token_ids"]  # <end_of_turn>


def test_compact_tokenizer_tables_tokenize_like_tokenizers(
    tokenizer_document: str, hf_tokenizer, tmp_path: Path
) -> None:
    """The artifact's mapped tables (`piece_bpe`) give `tokenizers`' ids and text on the same document."""
    import random

    from edgert.artifact.tensorfile import read_tensors, write_tensors
    from edgert.runtime.piece_bpe import compact_tables
    from edgert.runtime.tokenizer import TextTokenizer

    tables = compact_tables(tokenizer_document)
    assert tables is not None
    with (tmp_path / "t.safetensors").open("wb") as fh:
        write_tensors(fh, tables)
    ours = TextTokenizer(None, {}, tables=read_tensors(tmp_path / "t.safetensors"))
    ref = hf_tokenizer
    rnd = random.Random(7)
    alphabet = [*"abcdefgh ijk\n\t<>_▁é中🤖́", "<start_of_turn>", "<bos>", "  ", "\n\n", "<unused3>"]
    texts = [*TOKENIZER_TEXTS, *("".join(rnd.choices(alphabet, k=rnd.randint(1, 60))) for _ in range(150))]
    for text in texts:
        ids = ref.encode(text, add_special_tokens=False).ids
        assert ours.encode(text, add_bos=False) == ids, text
        for skip in (True, False):
            assert ours.decode(ids, skip_special=skip) == ref.decode(ids, skip_special_tokens=skip), text
    ids = [rnd.randrange(ours.vocab_size) for _ in range(2000)]  # byte pieces, specials, unused ones
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert ours.vocab_size == ref.get_vocab_size(with_added_tokens=True)


def test_free_window_is_refused_without_sliding_window_layers(tiny_host_artifact: Path) -> None:
    from edgert.errors import EdgertError
    from edgert.runtime import open_artifact
    from edgert.runtime.generator import Generator

    with pytest.raises(EdgertError, match="no window to free"):
        Generator(open_artifact(tiny_host_artifact), free_window=True)


# -- agreement with llama.cpp (compiles the real model) ---------------------------------------


def _prompts() -> list[str]:
    from edgert.recipes import load_recipe

    return list(load_recipe("gemma3-270m").run["reference_prompts"])


@pytest.fixture(scope="module")
def gemma(gemma_artifact: Path):
    import edgert

    return edgert.load(gemma_artifact)


def _continuations(llama_cpp, gguf: Path, model, prompts: int, length: int, **kwargs) -> list[dict]:
    generator = llama_cpp.Llama(str(gguf), n_ctx=512, n_threads=2, verbose=False, **kwargs)
    batched = llama_cpp.Llama(str(gguf), n_ctx=512, n_threads=2, verbose=False, logits_all=True, **kwargs)
    out = []
    for prompt in _prompts()[:prompts]:
        ids = model.encode_prompt(prompt, chat=True)
        text = model.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        assert generator.tokenize(text.encode(), add_bos=False, special=True) == ids
        generator.reset()
        cont: list[int] = []
        for token in generator.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
            cont.append(int(token))
            if len(cont) == length:
                break
        batched.reset()
        batched.eval(ids + cont[:-1])
        scores = np.asarray(batched.scores[len(ids) - 1 : len(ids) - 1 + length])
        out.append({"ids": ids, "cont": cont, "decided": np.argmax(scores, axis=-1) == np.asarray(cont)})
    del generator, batched
    return out


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is a test dependency: tools/setup.sh --test")


@pytest.fixture(scope="module")
def file_reference(llama_cpp, gemma_gguf: Path, gemma) -> list[dict]:
    """llama.cpp with its default settings on the Q4_K_M file itself."""
    return _continuations(llama_cpp, gemma_gguf, gemma, FILE_PROMPTS, FILE_TOKENS)


@pytest.fixture(scope="module")
def exact_reference(llama_cpp, gemma_gguf: Path, gemma, tmp_path_factory) -> list[dict]:
    """llama.cpp in plain f32 (f32 KV cache) on a dequantized copy of the file."""
    f32 = load_tool("dequantize_gguf").dequantize_gguf(gemma_gguf, tmp_path_factory.mktemp("gguf") / "gemma.F32.gguf")
    try:
        return _continuations(llama_cpp, f32, gemma, 10, EXACT_TOKENS, type_k=0, type_v=0)
    finally:
        f32.unlink()


def _agreement(model, reference: list[dict]) -> tuple[int, int, int, int]:
    agree = agree_decided = decided = total = 0
    for ref in reference:
        ids, cont = ref["ids"], np.asarray(ref["cont"])
        logits = model.score(ids + ref["cont"][:-1])
        ours = np.argmax(logits[len(ids) - 1 :], axis=-1) == cont
        assert ours.shape == cont.shape
        agree += int(ours.sum())
        agree_decided += int((ours & ref["decided"]).sum())
        decided += int(ref["decided"].sum())
        total += len(cont)
    return agree, total, agree_decided, decided


def _free_matches(model, reference: list[dict]) -> list[bool]:
    result = []
    for ref in reference:
        model.reset()
        ours = [t.id for t in model.generate(ref["ids"], max_tokens=FREE_PREFIX)]
        expected = ref["cont"][:FREE_PREFIX]
        stop = next((i for i, t in enumerate(expected) if t in model.tokenizer.stop_token_ids), None)
        result.append(ours == (expected if stop is None else expected[:stop]))
    return result


@pytest.mark.slow
@pytest.mark.reference
def test_file_teacher_forced_agreement(gemma, file_reference) -> None:
    agree, total, agree_decided, decided = _agreement(gemma, file_reference)
    print(f"gemma3 vs llama.cpp (Q4_K_M): {agree}/{total} all, {agree_decided}/{decided} decided")
    assert decided >= 0.95 * total, f"llama.cpp undecided at {total - decided}/{total} positions"
    assert agree_decided / decided >= 0.98, f"agreement on decided positions {agree_decided}/{decided}"


@pytest.mark.slow
@pytest.mark.reference
def test_exact_arithmetic_agreement(gemma, exact_reference) -> None:
    agree, total, agree_decided, decided = _agreement(gemma, exact_reference)
    matches = _free_matches(gemma, exact_reference)
    print(
        f"gemma3 vs llama.cpp (f32 copy): {agree}/{total} all, {agree_decided}/{decided} decided, "
        f"free {sum(matches)}/{len(matches)}"
    )
    assert agree_decided / decided >= 0.98, f"agreement on decided positions {agree_decided}/{decided}"
    assert sum(matches) >= 8, f"free generation matched on {sum(matches)}/{len(matches)} prompts"


WINDOW = 512  # Gemma 3 270M's sliding window (test_config_from_metadata_and_published_defaults)


def _logits_past_window(model, ids: list[int]) -> np.ndarray:
    """``model``'s logits at positions WINDOW.. of ``ids`` from an empty cache, [len(ids) - WINDOW, vocab].

    The positions before the window are prefilled for the cache alone (last logits only): the test
    reads no logits there, and their 262k-word head rows cost as much as the rest of the model."""
    model.reset()
    model.prefill(ids[:WINDOW])
    chunk = model.prefill_chunk
    return np.concatenate([model.step(ids[s : s + chunk], all_logits=True) for s in range(WINDOW, len(ids), chunk)])


@pytest.mark.slow
@pytest.mark.reference
def test_local_layers_attend_to_their_window_only(gemma, llama_cpp, gemma_gguf: Path) -> None:
    """Past 512 tokens the local layers must drop the oldest positions, as llama.cpp's SWA mask does
    (measured: 99.4% argmax agreement past the window; 57% when every layer sees the whole context).
    Both engines compute logits only past the window, the positions the assertions read."""
    text = " ".join(
        f"Item {i}: the {['red', 'blue', 'green', 'old', 'new'][i % 5]} {['cat', 'house', 'river', 'tree'][i % 4]} "
        f"number {i * 7 % 13}."
        for i in range(70)
    )
    ids = gemma.encode_prompt(text, chat=False)
    assert len(ids) > 800
    ref = llama_cpp.Llama(str(gemma_gguf), n_ctx=1024, n_threads=2, verbose=False, logits_all=True)
    # llama-cpp-python's eval asks llama.cpp for every row's logits while `_logits_all` holds (its
    # batch's per-token logits flags); off for the first WINDOW tokens, the 262k-word head runs on
    # the rows past the window only. (Were the flag ignored, every row would have its logits: slower,
    # the same result; were the rows past the window left out, the agreement below would fail.)
    ref._logits_all = False
    ref.eval(ids[:WINDOW])
    ref._logits_all = True
    ref.eval(ids[WINDOW:])
    assert ref.n_tokens == len(ids)
    expected = np.argmax(np.asarray(ref.scores[WINDOW : len(ids)]), axis=-1)
    scores = _logits_past_window(gemma, ids)
    agree = np.argmax(scores, axis=-1) == expected
    print(f"gemma3 past the window: {int(agree.sum())}/{len(agree)}")
    assert agree.mean() >= 0.97
    # With free_window the local layers' cache keeps only its window (pages outside it freed):
    # the same logits, and a local cache of at most the window's pages (of 16 positions). (Before
    # the window nothing is freed yet, so the positions compared are the ones freeing can change.)
    from edgert.runtime import open_artifact
    from edgert.runtime.generator import Generator

    freed = Generator(open_artifact(gemma.artifact.path), free_window=True)
    freed_scores = _logits_past_window(freed, ids)
    # assert_allclose's |a - b| <= atol test, without its ~20 s of bookkeeping on 334 x 262k logits.
    assert freed_scores.shape == scores.shape
    assert float(np.abs(freed_scores - scores).max()) <= 2e-3
    assert (np.argmax(freed_scores, axis=-1) == np.argmax(scores, axis=-1)).all()
    global_pages, local_pages = freed.cache.pages_in_use()
    assert global_pages == -(-len(ids) // 16) and local_pages <= 511 // 16 + 2 < gemma.cache.pages_in_use()[1]


@pytest.mark.slow
def test_chat_over_stdin_holds_two_turns(gemma, gemma_artifact: Path) -> None:
    """`edgert chat` with two piped turns: the second prefills only the new turn (the cache holds the
    first), and each reply is the greedy reply of a fresh run on the whole conversation so far.
    (llama.cpp is not the reference here: its 262k-word head costs ~20 s a turn, and the agreement
    tests above already compare the model with it.)"""
    import re

    from conftest import run_cli

    turns, length = ["Write a haiku about the sea.", "Now write one about the mountains."], 24
    res = run_cli("chat", str(gemma_artifact), "--max-tokens", str(length), input="\n".join([*turns, "/exit"]) + "\n")
    assert res.returncode == 0, res.stderr
    cached = [int(n) for n in re.findall(r"\((\d+) cached\)", res.stderr)]
    assert len(cached) == 2 and cached[0] == 0 and cached[1] > 0, res.stderr
    messages: list[dict[str, str]] = []
    replies = []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        ids = gemma.tokenizer.encode(gemma.tokenizer.apply_chat_template(messages))
        reply = "".join(t.text for t in gemma.generate(ids, max_tokens=length))
        messages.append({"role": "assistant", "content": reply})
        replies.append(reply)
    assert replies[0].strip() and replies[0] != replies[1]
    pos = 0
    for reply in replies:  # each in the transcript, in order
        pos = res.stdout.index(reply.strip(), pos) + 1
