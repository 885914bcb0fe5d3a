"""Text in and out: the artifact's `tokenizers` document, its chat template, streaming decode."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

from edgert.errors import ArtifactError, EdgertError


def _give_back_free_heap() -> None:
    """Return freed heap pages to the system (glibc's ``malloc_trim``; elsewhere nothing).

    Parsing a tokenizer document of a few MB leaves about 30 MB of freed but still resident
    heap in glibc's arenas (measured on SmolLM2's 49k-token vocabulary): a tenth of the
    process while it decodes, for nothing.
    """
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)  # the symbols already loaded in this process: libc's own
    except (OSError, AttributeError, TypeError):
        pass  # not glibc (musl, macOS): nothing to give back this way


class TextTokenizer:
    """Encodes prompts, renders chat conversations and decodes token ids."""

    def __init__(
        self,
        tokenizer_json: str | None,
        config: dict[str, Any],
        where: str = "tokenizer.json",
        tables: Mapping[str, np.ndarray] | None = None,
    ):
        """From a `tokenizers` document, or from `piece_bpe` ``tables`` (then the document is not read)."""
        if not isinstance(config, dict):
            raise ArtifactError(f"{where}: the tokenizer settings are a {type(config).__name__}, not an object")
        self._tok: Any
        if tables is not None:
            from edgert.runtime.piece_bpe import PieceBPE

            self._tok = PieceBPE(tables, where)
            self._encode_ids = self._tok.encode_ids
        else:
            from tokenizers import Tokenizer

            try:
                self._tok = Tokenizer.from_str(tokenizer_json)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # a bare Exception, or a Rust panic (a BaseException)
                raise ArtifactError(f"{where}: not a readable tokenizer document ({_first_line(exc)})") from None
            _give_back_free_heap()
            hf = self._tok
            self._encode_ids = lambda text: hf.encode(text, add_special_tokens=False).ids
        self.config = config
        self.where = where
        stops = config.get("stop_token_ids") or []
        bos = config.get("bos_token_id")
        if not isinstance(stops, list) or not all(_is_id(t) for t in stops) or not (bos is None or _is_id(bos)):
            raise ArtifactError(f"{where}: the token ids of the tokenizer settings are not integers")
        size = self.vocab_size
        bad = [t for t in [*stops, bos] if t is not None and not 0 <= t < size]
        if bad:
            raise ArtifactError(f"{where}: special token id {bad[0]} is outside the vocabulary (0..{size - 1})")
        self.stop_token_ids: set[int] = set(stops)
        self.bos_token_id: int | None = bos
        self._template: Any = None

    @property
    def vocab_size(self) -> int:
        """Number of tokens, special ones included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; special tokens written in the text are recognised.

        Bytes are decoded as UTF-8; invalid UTF-8 is refused, not guessed at.
        """
        text = prompt_text(text)
        ids = self._encode_ids(text)
        if add_bos is None:
            add_bos = bool(self.config.get("add_bos_token"))
        if add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of ``ids``."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    @property
    def has_chat_template(self) -> bool:
        """True when the model came with a chat template."""
        return bool(self.config.get("chat_template"))

    def apply_chat_template(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render a conversation with the model's own Jinja chat template (sandboxed)."""
        if not self.has_chat_template:
            raise EdgertError("this model has no chat template: use a plain prompt (--raw)")
        if self._template is None:
            from edgert.runtime.chat_template import ChatTemplate

            self._template = ChatTemplate(self.config["chat_template"], self.where)
        messages = [{**m, "content": prompt_text(m.get("content", ""))} for m in messages]
        return self._template.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.config.get("bos_token") or "",
            eos_token=self.config.get("eos_token") or "",
        )

    def stream(self) -> StreamDecoder:
        """A decoder that turns token ids into text pieces as they arrive."""
        return StreamDecoder(self)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def prompt_text(text: str | bytes) -> str:
    """A prompt as text: bytes must be UTF-8, and a str must hold no lone surrogates (which
    is what Python makes of invalid UTF-8 in command-line arguments)."""
    if isinstance(text, bytes | bytearray):
        try:
            return bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EdgertError(f"the prompt is not valid UTF-8 (byte {exc.start}: {exc.reason})") from None
    if not isinstance(text, str):
        raise EdgertError(f"the prompt is a {type(text).__name__}, not text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise EdgertError(f"the prompt is not valid UTF-8 (character {exc.start} is not text)") from None
    return text


def tokenizer_from_artifact(artifact: Any) -> TextTokenizer:
    """The tokenizer of a language-model artifact, its manifest section checked."""
    section = artifact.manifest.get("tokenizer")
    if not isinstance(section, dict) or not isinstance(section.get("file"), str):
        raise ArtifactError(f"{artifact.path}: the manifest's 'tokenizer' section lacks its 'file'")
    where = f"{artifact.path}: {section['file']}"
    tables = section.get("tables")
    if tables is not None:  # compact tables beside the document (`piece_bpe`): mapped, not parsed
        if not isinstance(tables, str):
            raise ArtifactError(f"{artifact.path}: the manifest's tokenizer 'tables' is not a member name")
        return TextTokenizer(None, section, f"{artifact.path}: {tables}", tables=artifact.tensors(tables))
    try:
        text = artifact.read_text(section["file"])
    except UnicodeDecodeError:
        raise ArtifactError(f"{where} is not valid UTF-8") from None
    return TextTokenizer(text, section, where)


class StreamDecoder:
    """Incremental detokenization that never emits half of a multi-byte character."""

    def __init__(self, tokenizer: TextTokenizer):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0
        # The `tokenizers` library's own incremental decoder where there is one (the same pieces): right
        # after a SmolLM2 decode step (caches cold) a token took 34.5 us against 44 for the two full
        # decodes below (0.8 against 7-15 warm), in plain decoding and every speculative decoder alike.
        self._stream: Any = None
        if not isinstance(tokenizer._tok, _piece_bpe_type()):
            try:
                from tokenizers.decoders import DecodeStream
            except ImportError:  # tokenizers before 0.21
                pass
            else:
                self._stream = DecodeStream(skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became complete (maybe empty)."""
        if self._stream is not None:
            return self._stream.step(self._tok._tok, token_id) or ""
        self._ids.append(token_id)
        before = self._tok.decode(self._ids[self._prefix : self._read])
        after = self._tok.decode(self._ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before) :]
        return ""


def _piece_bpe_type() -> type:
    """`PieceBPE` (imported late: most artifacts use the `tokenizers` document)."""
    from edgert.runtime.piece_bpe import PieceBPE

    return PieceBPE
