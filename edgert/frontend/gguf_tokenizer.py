"""Build a Hugging Face `tokenizers` tokenizer from a GGUF file's own vocabulary and merges."""

from __future__ import annotations

from typing import Any

from edgert.errors import ModelFileError, UnsupportedModelError, brief

# GPT-2's split rule; llama.cpp uses the same one for the pre-tokenizer names below.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# Pre-tokenizer names (tokenizer.ggml.pre) that split digits one by one before GPT-2's rule.
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "codeshell", "minerva"}
_PLAIN_GPT2_PRE = {"gpt2", "gpt-2", "default", "phi-2", "jina-es", "jina-de", "poro-chat"}
# llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
_SPECIAL_TYPES = {3, 4}


def _tokens(metadata: dict[str, Any], where: str) -> list[str]:
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise ModelFileError(f"{where}: tokenizer.ggml.tokens is missing or not a list of strings")
    return tokens


def build_tokenizer_json(metadata: dict[str, Any], where: str = "GGUF file") -> str:
    """Return a `tokenizers` JSON document equivalent to the GGUF tokenizer fields."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind = metadata.get("tokenizer.ggml.model")
    if kind == "llama":
        return _sentencepiece_json(metadata)
    if kind != "gpt2":
        raise UnsupportedModelError(
            f"tokenizer model '{kind}' is not supported yet (edgert reads byte-level BPE 'gpt2' and "
            "SentencePiece BPE 'llama')"
        )
    tokens = _tokens(metadata, where)
    raw_merges = metadata.get("tokenizer.ggml.merges") or []
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if not isinstance(raw_merges, list) or not all(isinstance(m, str) and " " in m for m in raw_merges):
        raise ModelFileError(f"{where}: tokenizer.ggml.merges is not a list of 'a b' pairs")
    if not isinstance(types, list) or not all(isinstance(t, int) for t in types):
        raise ModelFileError(f"{where}: tokenizer.ggml.token_type is not a list of integers")
    merges = [tuple(m.split(" ", 1)) for m in raw_merges]
    pre = str(metadata.get("tokenizer.ggml.pre", "default"))
    try:
        return _assemble(tokens, merges, types, pre, (AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers))
    except (UnsupportedModelError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # bare Exceptions and Rust panics from `tokenizers`
        raise ModelFileError(f"{where}: the tokenizer fields do not make a tokenizer ({brief(exc)})") from None


def _assemble(tokens: list[str], merges: list[tuple[str, ...]], types: list[int], pre: str, lib: tuple) -> str:
    AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers = lib

    vocab = {tok: i for i, tok in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    gpt2_split = pre_tokenizers.Split(Regex(_GPT2_SPLIT), behavior="isolated")
    if pre in _DIGIT_SPLIT_PRE:
        steps = [pre_tokenizers.Digits(individual_digits=True), gpt2_split, byte_level]
    elif pre in _PLAIN_GPT2_PRE:
        steps = [gpt2_split, byte_level]
    else:
        raise UnsupportedModelError(f"GGUF pre-tokenizer '{pre}' is not supported yet")
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tokenizer.decoder = decoders.ByteLevel()
    specials = [
        AddedToken(tok, special=True, normalized=False)
        for tok, kind_id in zip(tokens, types, strict=False)
        if int(kind_id) in _SPECIAL_TYPES
    ]
    tokenizer.add_special_tokens(specials)
    return tokenizer.to_str()


def _sentencepiece_json(metadata: dict[str, Any]) -> str:
    """A SentencePiece BPE vocabulary (GGUF ``llama`` tokenizer: pieces with ``▁`` and scores, byte
    fallback ``<0xNN>``) as a `tokenizers` BPE.

    llama.cpp's SPM tokenizer repeatedly merges the adjacent pair whose merged piece has the
    highest score; BPE with merges ranked by that score does the same, so the merges are derived
    from the vocabulary (as `transformers`' GGUF converters do): every split of a piece into two
    pieces of the vocabulary, ranked by the piece's score.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    scores = list(metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
    types = list(metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    ranked = []
    for piece, i in vocab.items():
        if int(types[i]) != 1 or len(piece) < 2:  # only normal pieces are built by merges
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-float(scores[i]), i, vocab[left], vocab[right], left, right))
    ranked.sort()
    merges = [(r[4], r[5]) for r in ranked]
    unk = metadata.get("tokenizer.ggml.unknown_token_id")
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            fuse_unk=True,
            byte_fallback=True,
            unk_token=tokens[int(unk)] if unk is not None else None,
        )
    )
    steps = [normalizers.Replace(" ", "\u2581")]
    if metadata.get("tokenizer.ggml.add_space_prefix", True):
        steps.insert(0, normalizers.Prepend("\u2581"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.pre_tokenizer = None
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if metadata.get("tokenizer.ggml.add_space_prefix", True) else [])
    )
    # Control pieces are special (skipped when decoding); user-defined ones (Gemma's runs of
    # newlines and spaces) are whole-text matches that stay in the decoded text.
    pieces = list(zip(tokens, types, strict=False))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in pieces if int(k) == 3])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in pieces if int(k) == 4])
    return tokenizer.to_str()


def tokenizer_config(metadata: dict[str, Any], where: str = "GGUF file") -> dict[str, Any]:
    """Special token ids, BOS policy and chat template, for the artifact's manifest.

    A special token id outside the vocabulary is refused (a model that could never stop, or
    that starts every prompt with a token it has no embedding for).
    """
    tokens = _tokens(metadata, where)

    def _id(key: str) -> int | None:
        value = metadata.get(f"tokenizer.ggml.{key}")
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < len(tokens):
            raise ModelFileError(
                f"{where}: tokenizer.ggml.{key} is {value!r}, outside the vocabulary of {len(tokens)} tokens"
            )
        return value

    eos = _id("eos_token_id")
    stop_ids = {eos} if eos is not None else set()
    eot = _id("eot_token_id")
    if eot is not None:
        stop_ids.add(eot)
    template = metadata.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise ModelFileError(f"{where}: tokenizer.chat_template is not text")
    # Chat models end a turn with an end-of-turn marker that the template emits.
    for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        if marker in tokens and template and marker in template:
            stop_ids.add(tokens.index(marker))
    bos = _id("bos_token_id")
    return {
        "bos_token_id": bos,
        "bos_token": tokens[bos] if bos is not None else None,
        "eos_token_id": eos,
        "eos_token": tokens[eos] if eos is not None else None,
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        "stop_token_ids": sorted(stop_ids),
        "chat_template": template,
    }
