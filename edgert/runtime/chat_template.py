"""Chat templates rendered in a bounded Jinja sandbox: output length, time and sizes capped.

A template comes from the model file, so it is untrusted input. Jinja's sandbox stops attribute
tricks but not resource use: ``{{ 'x' * 10000000000 }}`` takes gigabytes, nested ``range``
loops spin for minutes. Here every operation that can make a value large (``*``, ``+``, ``%``,
``**``, filters, method calls) is refused past `MAX_OUTPUT` characters or items, every call,
attribute read and loop step checks a deadline, and the rendered text is capped.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import Any

from edgert.errors import EdgertError

MAX_OUTPUT = 1 << 20  # characters of rendered text (and of any string or list made on the way)
MAX_SECONDS = 2.0
MAX_EXPONENT = 256
# No system message: some templates (Gemma's, Mistral's) refuse one.
SAMPLE_CONVERSATION = (
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi. How can I help?"},
    {"role": "user", "content": "Name a color."},
)


class TemplateError(EdgertError):
    """A chat template does not parse, does not render, or exceeds the sandbox's bounds."""


class _Budget:
    """The deadline of one compile or render."""

    def __init__(self, where: str):
        self.where = where
        self.deadline = time.monotonic() + MAX_SECONDS

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateError(f"{self.where}: chat template took longer than {MAX_SECONDS:.0f} s (a runaway loop?)")


def _size(value: Any) -> int:
    return len(value) if isinstance(value, str | bytes | list | tuple | dict) else 0


def _big_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_OUTPUT


class _Env:
    """Builds the bounded environment (jinja2 is imported only when a template is used)."""

    @staticmethod
    def make(where: str) -> Any:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class Bounded(ImmutableSandboxedEnvironment):
            intercepted_binops = frozenset({"*", "+", "%", "**", "//"})
            intercepted_unops = frozenset()

            def __init__(self) -> None:
                super().__init__(trim_blocks=True, lstrip_blocks=True)
                self.budget = _Budget(where)
                self.globals["range"] = self._range
                self.globals["raise_exception"] = self._raise
                self.filters = {name: self._wrap(f) for name, f in self.filters.items()}

            def _raise(self, message: str) -> None:
                raise TemplateError(f"{where}: chat template raised: {message}")

            def _check(self, value: Any) -> Any:
                if _size(value) > MAX_OUTPUT:
                    raise TemplateError(f"{where}: chat template made a value of over {MAX_OUTPUT} characters")
                return value

            def _args(self, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
                self.budget.tick()
                if any(_big_int(a) for a in (*args, *kwargs.values())):
                    raise TemplateError(f"{where}: chat template passes a number over {MAX_OUTPUT} to a call")

            def _wrap(self, f: Any) -> Any:
                @functools.wraps(f)
                def bounded(*args: Any, **kwargs: Any) -> Any:
                    self._args(args, kwargs)
                    return self._check(f(*args, **kwargs))

                return bounded

            def _range(self, *args: int) -> Any:
                self._args(args, {})
                for item in range(*args):
                    self.budget.tick()
                    yield item

            def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
                self.budget.tick()
                if operator == "*":
                    sizes = (_size(left) * right if isinstance(right, int) else 0) + (
                        _size(right) * left if isinstance(left, int) else 0
                    )
                    if sizes > MAX_OUTPUT:
                        raise TemplateError(f"{where}: chat template repeats a value past {MAX_OUTPUT} characters")
                elif operator == "**":
                    if isinstance(right, int | float) and abs(right) > MAX_EXPONENT:
                        raise TemplateError(f"{where}: chat template raises to a power over {MAX_EXPONENT}")
                elif operator == "+":
                    if _size(left) + _size(right) > MAX_OUTPUT:
                        raise TemplateError(f"{where}: chat template made a value of over {MAX_OUTPUT} characters")
                elif operator == "%" and isinstance(left, str):
                    values = right if isinstance(right, tuple) else (right,)
                    if any(_big_int(v) for v in values) or _has_big_width(left):
                        raise TemplateError(f"{where}: chat template formats with a width over {MAX_OUTPUT}")
                return self._check(super().call_binop(context, operator, left, right))

            def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
                __self._args(args, kwargs)
                if isinstance(getattr(__obj, "__self__", None), str) and any(_has_big_width(a) for a in args):
                    raise TemplateError(f"{where}: chat template formats with a width over {MAX_OUTPUT}")
                if getattr(__obj, "__name__", "") in ("format", "format_map") and _has_big_width(
                    getattr(__obj, "__self__", "")
                ):
                    raise TemplateError(f"{where}: chat template formats with a width over {MAX_OUTPUT}")
                return __self._check(super().call(__context, __obj, *args, **kwargs))

            def getattr(self, obj: Any, attribute: str) -> Any:
                self.budget.tick()
                return self._check(super().getattr(obj, attribute))

            def getitem(self, obj: Any, argument: Any) -> Any:
                self.budget.tick()
                return self._check(super().getitem(obj, argument))

        return Bounded()


def _has_big_width(text: Any) -> bool:
    """True if a format string asks for a field wider than `MAX_OUTPUT` (``%99999999s``, ``{:>99999999}``)."""
    if not isinstance(text, str):
        return False
    run = 0
    for c in text:
        run = run + 1 if c.isdigit() else 0
        if run > len(str(MAX_OUTPUT)):
            return True
    return False


class ChatTemplate:
    """A compiled chat template; `render` turns a conversation into the prompt text."""

    def __init__(self, source: str | bytes, where: str = "chat template"):
        if isinstance(source, bytes):
            try:
                source = source.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise TemplateError(
                    f"{where}: chat template is not valid UTF-8 ({exc.reason} at byte {exc.start})"
                ) from None
        if not isinstance(source, str):
            raise TemplateError(f"{where}: chat template is a {type(source).__name__}, not text")
        self.where = where
        self.env = _Env.make(where)
        self.template = self._guard(lambda: self.env.from_string(source))

    def _guard(self, work: Any) -> Any:
        from jinja2 import TemplateError as JinjaError
        from jinja2.exceptions import SecurityError

        try:
            return work()
        except TemplateError:
            raise
        except SecurityError as exc:
            raise TemplateError(f"{self.where}: chat template does something the sandbox refuses: {exc}") from None
        except JinjaError as exc:
            line = getattr(exc, "lineno", None)
            at = f" (line {line})" if line else ""
            raise TemplateError(f"{self.where}: chat template error{at}: {exc}") from None
        except RecursionError:
            raise TemplateError(f"{self.where}: chat template recurses too deeply") from None
        except MemoryError:
            raise TemplateError(f"{self.where}: chat template needs too much memory") from None
        except (TypeError, ValueError, AttributeError, KeyError, IndexError, ArithmeticError, OverflowError) as exc:
            raise TemplateError(f"{self.where}: chat template failed: {type(exc).__name__}: {exc}") from None

    def render(self, messages: Sequence[dict[str, str]], **variables: Any) -> str:
        """The template's text for ``messages``, within the output, time and size bounds."""
        self.env.budget = _Budget(self.where)

        def work() -> str:
            pieces, total = [], 0
            for piece in self.template.generate(messages=list(messages), **variables):
                total += len(piece)
                if total > MAX_OUTPUT:
                    raise TemplateError(f"{self.where}: chat template rendered over {MAX_OUTPUT} characters")
                self.env.budget.tick()
                pieces.append(piece)
            return "".join(pieces)

        return str(self._guard(work))


def check_template(source: str | bytes, where: str = "chat template", bos: str = "", eos: str = "") -> str:
    """Compile ``source`` and render it on a sample conversation; the text, or a TemplateError."""
    template = ChatTemplate(source, where)
    text = template.render(list(SAMPLE_CONVERSATION), add_generation_prompt=True, bos_token=bos, eos_token=eos)
    if "Name a color." not in text:
        raise TemplateError(f"{where}: chat template leaves the user's message out of the prompt")
    return text
