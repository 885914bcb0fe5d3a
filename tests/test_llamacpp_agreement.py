"""edgert against llama.cpp (llama-cpp-python) on SmolLM2-135M-Instruct, greedy, 8 prompts.

Two references, because llama.cpp does not do plain arithmetic on a Q4_1 file.

1. Exact arithmetic. llama.cpp on an F32 copy of the Q4_1 GGUF (tools/dequantize_gguf.py:
   the same weight values, dequantized) computes in plain f32, with an f32 KV cache. Against
   it edgert must agree at >= 98% of the positions of llama.cpp's 48-token greedy
   continuations, and the first 16 tokens of edgert's free greedy generation must be
   identical for every prompt. Measured: 384 of 384 positions, 8 of 8 prompts.

2. The Q4_1 file itself. Here llama.cpp multiplies Q4_1 blocks by activations it first rounds
   to 8 bits (Q8_1, blocks of 32), and its batched and one-token kernels round differently;
   where the top two candidates nearly tie, its argmax follows the rounding, not the model.
   It is not consistent with itself there: fed its own continuation in one batch, it
   reproduces 375 of its 384 tokens (370 with an f32 KV cache). So its batched evaluation
   marks the positions it decides consistently, and
     - on those, edgert must agree at >= 98% (measured 369 of 375, 98.4%);
     - on all positions, at >= 96% (measured 374 of 384, 97.4%; llama.cpp vs itself 97.7%);
     - at most 5% of positions may be undecided (measured 2.3%);
     - free generation must match its first 16 tokens on at least 4 of the 8 prompts
       (measured 4). A single flip sends two free generations down different paths, and the
       flips above fall within the first 16 tokens of the other 4 prompts: on "What is the
       capital of France?" llama.cpp (Q4_1) starts with "A" by a 0.35-logit margin, where
       edgert and llama.cpp's own exact arithmetic start with "The". The strict 16-token
       check is the exact-arithmetic one above.
A real bug (a wrong RoPE layout, a misread tensor, a cache slot off by one) drops agreement
far below any of these bounds.

The bounds above hold for f32 activations (the suite's `smollm` build). The default build takes
int8 activations on an AVX-512 VNNI CPU (rounded per group of 32, like llama.cpp's Q8_1): that is
no longer plain arithmetic, so against the exact reference it agrees less and against the Q4_1 file
more. Measured (2026-12-05, the same figures for main's `--activations int8` build before the
default changed): exact reference 370 of 384 positions (96.4%), first 16 free tokens on 4 of 8
prompts; Q4_1 file 366 of its 375 decided positions (97.6%), 372 of 384 (96.9%), free on 6 of 8.
Both builds are checked (``build``); int8 ones are held to ``BOUNDS["int8"]``.

Which of two near-tied tokens an int8 build picks is a coin toss of its rounding: each build of a
changed kernel draws again. So against the exact reference an int8 build is held to where the toss
does not reach: every teacher-forced miss and each prompt's first free-generation difference must lie
where llama.cpp's top two logits differ by less than ``TIE`` (0.4; int8 activations move the logits by
0.2 rms from the f32 build's). Measured 2026-12-06, the default build with an f16 KV cache (the
default since then with int8 activations): 366 of 384 positions, its 18 misses at margins 0.03-0.30
(61 positions lie under 0.3); first free differences on 5 prompts, at margins 0.05-0.28 (3 of 8 equal
outright). The same build with an f32 cache: 375 of 384, 9 misses at 0.05-0.30, 6 of 8 equal outright.
With f32 activations an f16 cache changes nothing here: 384 of 384 and 8 of 8, as with f32 (and
llama.cpp's continuations with an f16 cache equal its f32 ones). The suite's f32 build keeps an f32
cache (``--kv-dtype f32``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import load_tool

CONTINUATION = 48
FREE_PREFIX = 16
# (exact teacher-forced share, exact free-generation prompts, Q4_1 decided share) by activations.
# int8 ones: the free generations up to a tie (``TIE``), every miss of the teacher-forced run at one.
BOUNDS = {"f32": (0.98, 8, 0.98), "int8": (0.95, 8, 0.97)}
# int8 activations move SmolLM2's logits by 0.2 rms from f32 ones: where llama.cpp's top two logits
# lie closer than this, which of them wins is a coin toss of the rounding (measured below).
TIE = 0.4


def _bounds(smollm) -> tuple[float, int, float]:
    return BOUNDS[smollm.artifact.manifest["weights"]["activations"]]


def _int8(smollm) -> bool:
    return smollm.artifact.manifest["weights"]["activations"] == "int8"


pytestmark = [pytest.mark.slow, pytest.mark.reference]


def _prompts() -> list[str]:
    from edgert.recipes import load_recipe

    return list(load_recipe("smollm2-135m").run["reference_prompts"])


def _continuations(llama_cpp, gguf: Path, smollm, **kwargs) -> list[dict]:
    """Per prompt: ids, llama.cpp's greedy continuation, and which of its tokens llama.cpp's
    own batched evaluation reproduces."""
    generator = llama_cpp.Llama(str(gguf), n_ctx=512, n_threads=2, verbose=False, **kwargs)
    batched = llama_cpp.Llama(str(gguf), n_ctx=512, n_threads=2, verbose=False, logits_all=True, **kwargs)
    out = []
    for prompt in _prompts():
        ids = smollm.encode_prompt(prompt, chat=True)
        # llama.cpp's tokenizer must agree with ours, or the comparison is meaningless.
        text = smollm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        assert generator.tokenize(text.encode(), add_bos=False, special=True) == ids
        generator.reset()
        cont: list[int] = []
        for token in generator.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
            cont.append(int(token))
            if len(cont) == CONTINUATION:
                break
        batched.reset()
        batched.eval(ids + cont[:-1])
        scores = np.asarray(batched.scores[len(ids) - 1 : len(ids) - 1 + CONTINUATION])
        top2 = np.sort(scores, axis=-1)[:, -2:]
        out.append(
            {
                "ids": ids,
                "cont": cont,
                "decided": np.argmax(scores, axis=-1) == np.asarray(cont),
                "margin": top2[:, 1] - top2[:, 0],  # llama.cpp's top logit over its second, per position
            }
        )
    del generator, batched
    return out


@pytest.fixture(scope="module")
def llama_cpp():
    """The reference engine, a test-only dependency."""
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is a test dependency: tools/setup.sh --test")


@pytest.fixture(scope="module")
def exact_reference(llama_cpp, smollm_gguf: Path, smollm, tmp_path_factory) -> list[dict]:
    """llama.cpp in plain f32 on the dequantized copy of the GGUF."""
    f32 = load_tool("dequantize_gguf").dequantize_gguf(
        smollm_gguf, tmp_path_factory.mktemp("gguf") / "smollm2.F32.gguf"
    )
    try:
        return _continuations(llama_cpp, f32, smollm, type_k=0, type_v=0)  # 0 = GGML_TYPE_F32
    finally:
        f32.unlink()


@pytest.fixture(scope="module")
def q4_reference(llama_cpp, smollm_gguf: Path, smollm) -> list[dict]:
    """llama.cpp with its default settings on the Q4_1 GGUF itself."""
    return _continuations(llama_cpp, smollm_gguf, smollm)


@pytest.fixture(scope="module", params=["f32", "default"])
def build(request: pytest.FixtureRequest, smollm):
    """The suite's f32 SmolLM2 build, then the default one (int8 activations on VNNI)."""
    if request.param == "f32":
        return smollm
    import edgert

    return edgert.load(request.getfixturevalue("smollm_default_artifact"))


def _agreement(smollm, reference: list[dict]) -> tuple[int, int, int, int, list[float]]:
    """(agree, total, agree on decided, decided, llama.cpp's top-two margin at each miss) of edgert's
    teacher-forced argmax."""
    agree = agree_decided = decided = total = 0
    missed: list[float] = []
    for ref in reference:
        ids, cont = ref["ids"], np.asarray(ref["cont"])
        logits = smollm.score(ids + ref["cont"][:-1])
        ours = np.argmax(logits[len(ids) - 1 :], axis=-1) == cont
        assert ours.shape == (CONTINUATION,)
        agree += int(ours.sum())
        missed += [float(m) for m in ref["margin"][~ours]]
        agree_decided += int((ours & ref["decided"]).sum())
        decided += int(ref["decided"].sum())
        total += CONTINUATION
    assert total == 8 * CONTINUATION
    return agree, total, agree_decided, decided, missed


def _free_matches(smollm, reference: list[dict], tie: float = 0.0) -> list[bool]:
    """Per prompt: do edgert's first 16 greedy tokens equal llama.cpp's, up to a first difference
    where llama.cpp's top two logits lie within ``tie`` of each other?"""
    result = []
    for ref in reference:
        smollm.reset()
        ours = [t.id for t in smollm.generate(ref["ids"], max_tokens=FREE_PREFIX)]
        expected = ref["cont"][:FREE_PREFIX]
        # llama.cpp keeps going after the end-of-turn token; edgert stops there.
        stop = next((i for i, t in enumerate(expected) if t in smollm.tokenizer.stop_token_ids), None)
        expected = expected if stop is None else expected[:stop]
        pairs = enumerate(zip(ours, expected, strict=False))
        first = next((i for i, (a, b) in pairs if a != b), min(len(ours), len(expected)))
        result.append(ours == expected or (first < len(expected) and ref["margin"][first] < tie))
    return result


def test_exact_arithmetic_teacher_forced(build, exact_reference) -> None:
    agree, total, _, _, missed = _agreement(build, exact_reference)
    assert agree / total >= _bounds(build)[0], f"agreement {agree}/{total}"
    if _int8(build):  # every miss a coin toss: where llama.cpp's top two lie within int8's noise
        assert max(missed, default=0.0) < TIE, f"a miss where llama.cpp's top two differ by {max(missed):.2f}"


def test_exact_arithmetic_free_generation(build, exact_reference) -> None:
    matches = _free_matches(build, exact_reference, TIE if _int8(build) else 0.0)
    assert sum(matches) >= _bounds(build)[1], f"free generation matched on {sum(matches)}/8 prompts"


def test_q4_file_teacher_forced(build, q4_reference) -> None:
    agree, total, agree_decided, decided, _ = _agreement(build, q4_reference)
    assert decided >= 0.95 * total, f"llama.cpp undecided at {total - decided}/{total} positions"
    assert agree_decided / decided >= _bounds(build)[2], f"agreement on decided positions {agree_decided}/{decided}"
    assert agree / total >= 0.96, f"agreement on all positions {agree}/{total}"


def test_q4_file_free_generation(build, q4_reference) -> None:
    matches = _free_matches(build, q4_reference)
    assert sum(matches) >= 4, f"free generation matched on {sum(matches)}/8 prompts"
