"""The OpenAI-compatible HTTP API on Starlette: completions, chat, models, embeddings, transcriptions,
/health and Prometheus /metrics. Errors have OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from edgert.errors import ContextLengthError, EdgertError
from edgert.runtime.sampling import SamplingParams
from edgert.serve.engine import LLMEngine, QueueFullError
from edgert.serve.metrics import render_metrics
from edgert.serve.models import Served, encode_vector

RETRY_AFTER_SECONDS = 1
_MARK = "\x00text\x00"  # stands for a chunk's text in its JSON template


class APIError(Exception):
    """An error answered in OpenAI's shape with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class Guard:
    """ASGI middleware: the API key check (401 in OpenAI's shape) and the request counts of /metrics."""

    def __init__(self, app: ASGIApp, api_key: str | None, counts: Counter):
        self.app, self.api_key, self.counts = app, api_key, counts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        status = {"code": 500}

        async def counted_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self.api_key is not None:
                headers = dict(scope["headers"])
                given = headers.get(b"authorization", b"").decode("latin-1")
                if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                    what = "no API key was given" if not given else "the API key is wrong"
                    err = APIError(
                        401, f"{what}: send 'Authorization: Bearer <key>'", "authentication_error", "invalid_api_key"
                    )
                    await err.response()(scope, receive, counted_send)
                    return
            await self.app(scope, receive, counted_send)
        finally:
            known = path if path in KNOWN_PATHS else "other"
            self.counts[(known, str(status["code"]))] += 1


KNOWN_PATHS = {
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/audio/transcriptions",
}


def create_app(models: dict[str, Served], api_key: str | None = None) -> Starlette:
    """The Starlette app serving ``models`` (see `edgert.serve.models.load_models`)."""
    counts: Counter = Counter()
    started = int(time.time())

    def model_of(body: dict[str, Any], kind: str) -> Served:
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise APIError(400, "the 'model' field is missing", param="model", code="missing_field")
        served = models.get(name)
        if served is None:
            raise APIError(
                404,
                f"the model '{name}' does not exist (served: {', '.join(models)})",
                param="model",
                code="model_not_found",
            )
        if served.kind != kind:
            raise APIError(
                400,
                f"the model '{name}' is a {served.kind} model, not a {kind} one",
                param="model",
                code="wrong_model_kind",
            )
        return served

    async def json_body(request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        return body

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "models": list(models)})

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(render_metrics(models, counts), media_type="text/plain; version=0.0.4")

    async def list_models(request: Request) -> Response:
        data = [
            {"id": m.name, "object": "model", "created": started, "owned_by": "edgert", "kind": m.kind}
            for m in models.values()
        ]
        return JSONResponse({"object": "list", "data": data})

    async def chat_completions(request: Request) -> Response:
        return await generate(request, chat=True)

    async def completions(request: Request) -> Response:
        return await generate(request, chat=False)

    async def generate(request: Request, chat: bool) -> Response:
        body = await json_body(request)
        served = model_of(body, "completion")
        engine: LLMEngine = served.runtime
        max_tokens, sampling, stop = generation_options(body)
        try:
            if chat:
                messages = body.get("messages")
                if (
                    not isinstance(messages, list)
                    or not messages
                    or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)
                ):
                    raise APIError(
                        400,
                        "'messages' must be a non-empty list of {role, content}",
                        param="messages",
                        code="missing_field",
                    )
                ids = engine.encode(messages=[{"role": m["role"], "content": content_text(m)} for m in messages])
            else:
                prompt = body.get("prompt")
                if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
                    prompt = prompt[0]
                if not (
                    isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt))
                ):
                    raise APIError(
                        400, "'prompt' must be a string or a list of token ids", param="prompt", code="missing_field"
                    )
                ids = engine.encode(prompt=prompt)
        except EdgertError as exc:
            raise APIError(400, str(exc)) from None
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        try:
            # The engine calls put_nowait on this loop, all of a step's events in one callback.
            req = engine.submit(
                ids,
                events.put_nowait,
                max_tokens=max_tokens,
                sampling=sampling,
                stop=stop,
                dispatch=loop.call_soon_threadsafe,
            )
        except QueueFullError as exc:
            raise APIError(
                429, str(exc), "rate_limit_error", "queue_full", headers={"Retry-After": str(RETRY_AFTER_SECONDS)}
            ) from None
        except ContextLengthError as exc:
            raise APIError(
                400, str(exc), param="messages" if chat else "prompt", code="context_length_exceeded"
            ) from None
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def usage() -> dict[str, Any]:
            n = req.stats.generated_tokens
            return {
                "prompt_tokens": len(ids),
                "completion_tokens": n,
                "total_tokens": len(ids) + n,
                "prompt_tokens_details": {"cached_tokens": req.stats.cached_tokens},
            }

        def choice(text: str | None, finish: str | None, stream: bool) -> dict[str, Any]:
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            if stream:
                delta: dict[str, Any] = {} if text is None else {"content": text}
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }

        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

            def chunk(text: str | None, finish: str | None, **extra: Any) -> str:
                obj = {
                    "id": rid,
                    "object": kind + (".chunk" if chat else ""),
                    "created": created,
                    "model": served.name,
                    "choices": [choice(text, finish, True)],
                    **extra,
                }
                return f"data: {json.dumps(obj)}\n\n"

            # A text chunk is the same JSON but for its text: the rest is encoded once.
            head, tail = chunk(_MARK, None).split(json.dumps(_MARK))

            def text_chunk(text: str) -> str:
                return head + json.dumps(text) + tail

            async def stream() -> AsyncIterator[str]:
                try:
                    if chat:
                        first = {
                            "id": rid,
                            "object": "chat.completion.chunk",
                            "created": created,
                            "model": served.name,
                            "choices": [
                                {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                            ],
                        }
                        yield f"data: {json.dumps(first)}\n\n"
                    pending: deque[tuple[str, Any]] = deque()
                    while True:
                        if not pending:
                            pending.append(await events.get())
                            while not events.empty():
                                pending.append(events.get_nowait())
                        # Text that piled up while this response waited goes out as one chunk.
                        texts = []
                        while pending and pending[0][0] == "text":
                            texts.append(pending.popleft()[1])
                        if texts:
                            yield text_chunk("".join(texts))
                            continue
                        event, value = pending.popleft()
                        if event == "done":
                            yield chunk(None if chat else "", value)
                            if include_usage:
                                obj = {
                                    "id": rid,
                                    "object": kind + (".chunk" if chat else ""),
                                    "created": created,
                                    "model": served.name,
                                    "choices": [],
                                    "usage": usage(),
                                }
                                yield f"data: {json.dumps(obj)}\n\n"
                            break
                        else:
                            err = {"error": {"message": value, "type": "server_error", "param": None, "code": None}}
                            yield f"data: {json.dumps(err)}\n\n"
                            break
                    yield "data: [DONE]\n\n"
                finally:
                    engine.cancel(req)  # a no-op after the end; at once when the client went away

            return StreamingResponse(
                stream(),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )

        pieces: list[str] = []
        try:
            while True:
                event, value = await events.get()
                if event == "text":
                    pieces.append(value)
                elif event == "done":
                    finish = value
                    break
                else:
                    raise APIError(500, value, "server_error")
        finally:
            engine.cancel(req)
        return JSONResponse(
            {
                "id": rid,
                "object": kind,
                "created": created,
                "model": served.name,
                "choices": [choice("".join(pieces), finish, False)],
                "usage": usage(),
            }
        )

    async def embeddings(request: Request) -> Response:
        body = await json_body(request)
        served = model_of(body, "embedding")
        texts = body.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
            raise APIError(
                400, "'input' must be a non-empty string or list of strings", param="input", code="missing_field"
            )
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise APIError(400, f"encoding_format '{fmt}' is not one of float, base64", param="encoding_format")
        vectors, tokens = await served.runtime.call(served.runtime.embed, texts)
        data = [{"object": "embedding", "index": i, "embedding": encode_vector(v, fmt)} for i, v in enumerate(vectors)]
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "model": served.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    async def transcriptions(request: Request) -> Response:
        try:
            form = await request.form()
        except Exception as exc:  # not multipart, or a garbled body
            raise APIError(400, f"send the audio as multipart/form-data: {exc}", code="invalid_form") from None
        served = model_of({"model": form.get("model")}, "transcription")
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise APIError(400, "the 'file' part (the audio) is missing", param="file", code="missing_field")
        data = await upload.read()
        fmt = form.get("response_format") or "json"
        if fmt not in ("json", "text", "verbose_json"):
            raise APIError(
                400, f"response_format '{fmt}' is not one of json, text, verbose_json", param="response_format"
            )
        try:
            result = await served.runtime.call(served.runtime.transcribe, data)
        except EdgertError as exc:
            raise APIError(400, f"the audio cannot be read: {exc}", param="file", code="invalid_audio") from None
        if fmt == "text":
            return PlainTextResponse(result["text"])
        if fmt == "verbose_json":
            return JSONResponse({"task": "transcribe", "language": "en", **result})
        return JSONResponse({"text": result["text"]})

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return exc.response()

    async def on_http_error(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        return APIError(status, str(getattr(exc, "detail", exc)), "invalid_request_error").response()

    from starlette.exceptions import HTTPException

    routes = [
        Route("/health", health),
        Route("/metrics", metrics),
        Route("/v1/models", list_models),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/audio/transcriptions", transcriptions, methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={APIError: on_api_error, HTTPException: on_http_error})
    app.add_middleware(Guard, api_key=api_key, counts=counts)
    return app


def content_text(message: dict[str, Any]) -> str:
    """A chat message's content as text (OpenAI's list of parts: the text parts joined)."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    raise APIError(400, "a message's 'content' must be a string or a list of parts", param="messages")


def generation_options(body: dict[str, Any]) -> tuple[int, SamplingParams, list[str]]:
    """max_tokens, sampling and stop strings from a request, bad values answered 400."""
    if body.get("n", 1) != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = 256 if max_tokens is None else max_tokens
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise APIError(400, f"max_tokens must be a positive integer, got {max_tokens!r}", param="max_tokens")
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise APIError(400, "'stop' must be a string or a list of strings", param="stop")
    try:
        temperature = float(body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0)
        top_p = float(body.get("top_p") if body.get("top_p") is not None else 1.0)
        top_k = int(body.get("top_k") or 0)
        penalty = float(body.get("repetition_penalty") or 1.0)
        seed = body.get("seed")
        sampling = SamplingParams(temperature, top_k, top_p, penalty, None if seed is None else int(seed))
    except (TypeError, ValueError) as exc:
        raise APIError(400, f"bad sampling parameter: {exc}") from None
    return max_tokens, sampling, stop
