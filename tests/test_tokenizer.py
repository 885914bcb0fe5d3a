"""The tokenizer edgert builds from SmolLM2's GGUF: same ids as llama.cpp, streaming, chat template."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from edgert.frontend import read_gguf
from edgert.frontend.gguf_tokenizer import build_tokenizer_json, tokenizer_config
from edgert.runtime.tokenizer import TextTokenizer

TEXTS = [
    "Hello world",
    "Hello, World! How are you?",
    "1234567890 and 3.14159, 1,000,000 and 2024-01-31",
    "I'm sure you're right: we'll see, they've said, she'd know, it's John's. I'M SURE IT'S",
    "a  b   c    d     e",
    "  leading and trailing spaces  ",
    "line1\nline2\n\nline4\r\nline5\n",
    "\n\n\n",
    "tabs\tand\t\ttabs \t mixed",
    "héllo café naïve Ångström façade São Paulo",
    "e\u0301 (decomposed accent) vs é",
    "日本語のテキスト、中文文本。한국어",
    "русский текст и ελληνικά",
    "مرحبا بالعالم",
    "emoji 😀🎉 skin tone 👍🏽 family 👨\u200d👩\u200d👧 flag 🇫🇷",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))\n",
    'if (a != b && c <= d) { console.log("ok"); } // done',
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "text<|im_end|>more text",
    "<|im_start|> spaced <|im_end|>",
    "<repo_name>edgert<file_sep>main.py",
    "$100.00!!! ... ??? --- ___",
    "Ünïcödé ß ẞ ﬁ ½ Ⅻ ٣",
    "x\u00a0y\u2003z\u3000w",
    "\u200bzero width\u200d joiner",
    "",
    " ",
    "'s 'S 'll 'LL 've",
    "1 22 333 4444 55555",
    "\ufffd replacement char",
]
# Pieces for a seeded fuzz over character classes the pre-tokenizer treats differently.
FUZZ_PIECES = [
    *"abcXYZ019 '\"\n\t\r.,!?-_()[]{}<>|/\\",
    "  ",
    "   ",
    "\n\n",
    " \n",
    "é",
    "ñ",
    "ß",
    "日本",
    "😀",
    "👍🏽",
    "\u0301",
    "\u00a0",
    "\u3000",
    "'s",
    "'LL",
    "'ve",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "123",
    "٣",
    "½",
    "\u200d",
    "🇫🇷",
    "ﬁ",
    "İ",
    "🧑\u200d💻",
    "\x00",
    "\x7f",
]


def fuzz_texts(n: int = 300) -> list[str]:
    rnd = random.Random(0)
    return ["".join(rnd.choice(FUZZ_PIECES) for _ in range(rnd.randint(1, 25))) for _ in range(n)]


@pytest.fixture(scope="module")
def metadata(smollm_gguf: Path) -> dict:
    return read_gguf(smollm_gguf).metadata


@pytest.fixture(scope="module")
def tok(metadata: dict) -> TextTokenizer:
    return TextTokenizer(build_tokenizer_json(metadata), tokenizer_config(metadata))


@pytest.fixture(scope="module")
def llama_vocab(smollm_gguf: Path):  # -> llama_cpp.Llama holding the vocabulary only
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(smollm_gguf), vocab_only=True, verbose=False)
    yield llm
    llm.close()


def test_vocabulary_and_special_tokens(tok: TextTokenizer, metadata: dict) -> None:
    assert tok.vocab_size == 49152 == len(metadata["tokenizer.ggml.tokens"])
    cfg = tok.config
    assert (cfg["bos_token_id"], cfg["bos_token"]) == (1, "<|im_start|>")
    assert (cfg["eos_token_id"], cfg["eos_token"]) == (2, "<|im_end|>")
    assert cfg["add_bos_token"] is False
    assert tok.stop_token_ids == {2}
    assert tok.encode("<|im_start|><|im_end|><|endoftext|>") == [1, 2, 0]
    assert tok.encode("Hi", add_bos=True)[0] == 1 and tok.encode("Hi")[0] != 1


def test_byte_level_vocabulary_keeps_tokenizers(metadata: dict) -> None:
    """Compact tables are for SentencePiece-style documents only: SmolLM2's byte-level BPE keeps `tokenizers`."""
    from edgert.runtime.piece_bpe import compact_tables

    assert compact_tables(build_tokenizer_json(metadata)) is None


@pytest.mark.slow
@pytest.mark.reference
@pytest.mark.parametrize("text", TEXTS)
def test_tokenizes_like_llama_cpp(tok: TextTokenizer, llama_vocab, text: str) -> None:
    ids = tok.encode(text, add_bos=False)
    assert ids == llama_vocab.tokenize(text.encode(), add_bos=False, special=True)
    # Decoding (specials kept) gives the text back, and the same bytes as llama.cpp's.
    assert tok.decode(ids, skip_special=False) == text
    assert llama_vocab.detokenize(ids, special=True) == text.encode()


@pytest.mark.slow
@pytest.mark.reference
def test_tokenizes_like_llama_cpp_fuzz(tok: TextTokenizer, llama_vocab) -> None:
    texts = fuzz_texts()
    mismatches = [
        t
        for t in texts
        if tok.encode(t, add_bos=False) != llama_vocab.tokenize(t.encode(), add_bos=False, special=True)
    ]
    assert not mismatches, f"{len(mismatches)} of {len(texts)} differ, e.g. {mismatches[:3]!r}"
    assert all(tok.decode(tok.encode(t), skip_special=False) == t for t in texts)


def test_digits_split_one_by_one(tok: TextTokenizer) -> None:
    """SmolLM2's pre-tokenizer ('smollm') makes every digit its own token."""
    ids = tok.encode("12345")
    assert len(ids) == 5 and tok.decode(ids) == "12345"


def test_decode_skips_special_tokens_by_default(tok: TextTokenizer) -> None:
    ids = tok.encode("<|im_start|>assistant\nHello<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == "assistant\nHello"
    assert tok.decode(ids, skip_special=False) == "<|im_start|>assistant\nHello<|im_end|>"


@pytest.mark.parametrize(
    "text",
    ["😀", "👨\u200d👩\u200d👧 family", "ok 🦩 done", "日本語のテキスト", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "naïve café", *TEXTS[:6]],
)
def test_stream_decoder_pieces_concatenate_to_decode(tok: TextTokenizer, text: str) -> None:
    ids = tok.encode(text)
    decoder = tok.stream()
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces), "a half character leaked out"


def test_stream_decoder_holds_back_split_characters(tok: TextTokenizer) -> None:
    """'😀' is three byte-level tokens: nothing is emitted until the last one completes it."""
    ids = tok.encode("😀")
    assert len(ids) == 3
    decoder = tok.stream()
    assert [decoder.push(i) for i in ids] == ["", "", "😀"]


def test_stream_decoder_fuzz_and_specials(tok: TextTokenizer) -> None:
    for text in [*fuzz_texts(100), "<|im_start|>user\nHi 😀<|im_end|>\n"]:
        ids = tok.encode(text)
        decoder = tok.stream()
        pieces = [decoder.push(i) for i in ids]
        assert "".join(pieces) == tok.decode(ids), repr(text)


SMOLLM_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def test_chat_template_default_system_prompt(tok: TextTokenizer) -> None:
    assert tok.has_chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == SMOLLM_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    no_prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert no_prompt == SMOLLM_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n"


def test_chat_template_conversation(tok: TextTokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    assert tok.apply_chat_template(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tok.encode(tok.apply_chat_template(messages))
    assert ids.count(1) == 5 and ids.count(2) == 4  # <|im_start|> and <|im_end|> are single tokens


@pytest.mark.slow
@pytest.mark.reference
def test_chat_template_matches_llama_cpp_python(tok: TextTokenizer, metadata: dict) -> None:
    """llama-cpp-python's own Jinja formatter renders the GGUF's template the same way."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(
        template=metadata["tokenizer.chat_template"],
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        add_generation_prompt=True,
    )
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    assert tok.apply_chat_template(messages) == formatter(messages=messages).prompt
