"""Text in and out: the artifact's `tokenizers` document, its chat template, streaming decode."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from edgert.errors import EdgertError


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

    def __init__(self, tokenizer_json: str, config: dict[str, Any]):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_str(tokenizer_json)
        _give_back_free_heap()
        self.config = config
        self.stop_token_ids: set[int] = set(config.get("stop_token_ids") or [])
        self.bos_token_id: int | None = config.get("bos_token_id")
        self._template: Any = None

    @property
    def vocab_size(self) -> int:
        """Number of tokens, special ones included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; special tokens written in the text are recognised."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
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
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

            def raise_exception(message: str) -> None:
                raise EdgertError(f"chat template: {message}")

            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.config["chat_template"])
        return self._template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.config.get("bos_token") or "",
            eos_token=self.config.get("eos_token") or "",
        )

    def stream(self) -> StreamDecoder:
        """A decoder that turns token ids into text pieces as they arrive."""
        return StreamDecoder(self)


class StreamDecoder:
    """Incremental detokenization that never emits half of a multi-byte character."""

    def __init__(self, tokenizer: TextTokenizer):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became complete (maybe empty)."""
        self._ids.append(token_id)
        before = self._tok.decode(self._ids[self._prefix : self._read])
        after = self._tok.decode(self._ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before) :]
        return ""
