"""`ohlora-rag serve`: the tutor over HTTP — an OpenAI-compatible chat API, retrieval, health, and the web chat page.

Endpoints (see README "Serving"):
- `POST /v1/chat/completions` — OpenAI's chat shape (`stream: true` gives SSE chunks and `data: [DONE]`); the RAG
  facts ride in extension fields clients ignore: `sources`, `threshold`, `cutoff`, `declined`, `guarded`,
  `follow_up`. The earlier user messages are the conversation: a follow-up retrieves for its topic.
- `GET /v1/models`, `POST /v1/search` (the `search --json` shape), `GET /health`, and `/` (the chat page).

Every answer goes through `QueryEngine.stream`, the path `ask` and `chat` take; concurrent answers are generated
in batches (`batching.Batcher`). Errors are JSON bodies in OpenAI's shape: `{"error": {"message", "type", ...}}`.
"""

from __future__ import annotations

import json
import secrets
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any, Literal

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .config import ServeConfig
from .engine import AnswerStream, QueryEngine
from .errors import OhloraError

#: The model name clients send (`GET /v1/models` lists it).
MODEL_ID = "ohlora-tutor"


class ApiError(Exception):
    """An error answered as OpenAI-style JSON with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text (a list of content parts: its text parts joined)."""
        if isinstance(self.content, list):
            return " ".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send more (n, top_p, user ...): accepted, unused

    model: str
    messages: list[ChatMessage]
    stream: bool = False
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = Field(default=None, allow_inf_nan=False)
    seed: int | None = None


class SearchRequest(BaseModel):
    query: str
    top_k: int | None = None


class _BodyLimit:
    """Pure ASGI middleware: refuse request bodies over `limit` bytes (413), declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = ApiError(413, f"request body over {self.limit} bytes", code="body_too_large").response()
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await too_big(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise ApiError(413, f"request body over {self.limit} bytes", code="body_too_large")
            return message

        await self.app(scope, limited, send)


class _State:
    """The engine, loaded in a background thread so that /health answers while the models load."""

    def __init__(self) -> None:
        self.engine: QueryEngine | None = None
        self.error: str | None = None
        self.started = time.time()

    def require(self) -> QueryEngine:
        if self.engine is None:
            if self.error:
                raise ApiError(503, f"the tutor failed to load: {self.error}", "server_error", code="load_failed")
            raise ApiError(
                503, "the tutor is still loading its models — retry in a few seconds", "server_error", code="loading"
            )
        return self.engine


def create_app(load: Callable[[], QueryEngine], config: ServeConfig | None = None) -> FastAPI:
    """The ASGI app. `load` builds the engine (called once, in a thread, at start-up)."""
    from contextlib import asynccontextmanager

    config = config or ServeConfig()
    state = _State()

    def load_engine() -> None:
        try:
            engine = load()
            retriever = getattr(engine, "retriever", None)
            if retriever is not None:
                retriever.load_pair_models()  # before "ready": no request waits for them or shares the CPU with loading
            state.engine = engine
        except OhloraError as exc:
            state.error = str(exc)
        except Exception as exc:  # noqa: BLE001 — reported by /health and every request, not lost in a thread
            state.error = f"{type(exc).__name__}: {exc}"

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=load_engine, name="ohlora-load", daemon=True).start()
        yield

    app = FastAPI(title="ohlora-rag", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.tutor = state
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(_BodyLimit, limit=config.max_body_bytes)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            return ApiError(400, "the request body is not valid JSON", code="invalid_json").response()
        message = f"{where}: {first.get('msg', 'invalid value')}" if where else str(first.get("msg", "invalid request"))
        return ApiError(400, message, param=where or None).response()

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> Response:
        import logging

        logging.getLogger("ohlora_rag.server").exception("request failed")
        kind = "invalid_request_error" if isinstance(exc, OhloraError) else "server_error"
        return ApiError(400 if isinstance(exc, OhloraError) else 500, str(exc) or type(exc).__name__, kind).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        return ApiError(
            exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None
        ).response()

    @app.middleware("http")
    async def authorise(request: Request, call_next: Callable[[Request], Any]) -> Response:
        if config.api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
                return ApiError(
                    401, "missing or wrong API key: send 'Authorization: Bearer KEY'", code="invalid_api_key"
                ).response()
        return await call_next(request)  # type: ignore[no-any-return]

    @app.get("/health")
    async def health() -> dict[str, Any]:
        engine = state.engine
        if engine is None:
            return {"status": "failed" if state.error else "loading", "error": state.error}
        retriever = engine.retriever
        choice = engine.generator.choice
        manifest = retriever.stored.manifest if retriever else None
        return {
            "status": "ready",
            "model": MODEL_ID,
            "index": str(retriever.stored.folder) if retriever else None,
            "entries": manifest.count if manifest else None,
            "encoder": manifest.encoder if manifest else None,
            "decision": "model" if retriever and retriever.decision else "threshold",
            "llm": choice.base.reference,
            "adapter": str(choice.adapter) if choice.adapter else None,
            "load_seconds": round(engine.load_seconds, 3),
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(state.started)]}

    @app.get("/v1/models/{name}")
    async def model(name: str) -> dict[str, Any]:
        if name != MODEL_ID:
            raise _unknown_model(name)
        return _model_card(state.started)

    @app.post("/v1/search")
    async def search(body: SearchRequest) -> dict[str, Any]:
        engine = state.require()
        assert engine.retriever is not None
        question = _question(body.query, "query", config)
        top_k = body.top_k if body.top_k is not None else engine.config.top_k
        if not 1 <= top_k <= 50:
            raise ApiError(400, f"top_k {top_k}: must be between 1 and 50", param="top_k")
        result = await anyio.to_thread.run_sync(engine.retriever.search, question, top_k)
        return result.to_dict()

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatRequest) -> Response | dict[str, Any]:
        engine = state.require()
        if body.model != MODEL_ID:
            raise _unknown_model(body.model)
        question, history = _conversation(body.messages, config)
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if limit is not None and limit < 1:
            raise ApiError(400, f"max_tokens {limit}: must be at least 1", param="max_tokens")
        if body.temperature is not None and not 0 <= body.temperature <= 2:
            raise ApiError(400, f"temperature {body.temperature}: must be between 0 and 2", param="temperature")

        def start() -> AnswerStream:
            conversation = engine.conversation(history)
            return engine.stream(question, conversation, limit, body.temperature, body.seed)

        answering = await anyio.to_thread.run_sync(start)
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if not body.stream:
            try:
                answer = await anyio.to_thread.run_sync(answering.answer, abandon_on_cancel=True)
            finally:
                answering.cancel()  # a no-op once it has ended; stops the generation if the client left
            return {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": MODEL_ID,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": answer.answer},
                        "finish_reason": _finish_reason(answering),
                    }
                ],
                "usage": _usage(answering),
                **_facts(answering),
            }
        from sse_starlette import EventSourceResponse

        return EventSourceResponse(
            _chunks(answering, completion_id, created),
            ping=15,
            shutdown_event=anyio.Event(),  # watched by nobody: answers in flight finish within the grace period
            shutdown_grace_period=config.shutdown_grace_seconds,
        )

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(_web_file("index.html"), headers={"Cache-Control": "no-cache"})

    @app.get("/static/{name}")
    async def static(name: str) -> Response:
        types = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
        kind = next((t for ext, t in types.items() if name.endswith(ext)), None)
        if kind is None or "/" in name or name.startswith("."):
            raise ApiError(404, f"no such file: {name}", code="not_found")
        try:
            return Response(_web_file(name), media_type=kind, headers={"Cache-Control": "no-cache"})
        except FileNotFoundError:
            raise ApiError(404, f"no such file: {name}", code="not_found") from None

    return app


async def _chunks(answering: AnswerStream, completion_id: str, created: int) -> AsyncIterator[str]:
    """SSE data lines: a role chunk, content chunks, a last chunk with the finish reason and the RAG facts."""

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        body = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": MODEL_ID,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            **extra,
        }
        return json.dumps(body, ensure_ascii=False)

    pieces = iter(answering)
    try:
        yield chunk({"role": "assistant", "content": ""}, sources=_sources(answering))
        while True:
            piece = await anyio.to_thread.run_sync(next, pieces, None, abandon_on_cancel=True)
            if piece is None:
                break
            yield chunk({"content": piece})
        answer = answering.answer()
        yield chunk({}, _finish_reason(answering), usage=_usage(answering), answer=answer.answer, **_facts(answering))
        yield "[DONE]"
    finally:
        answering.cancel()  # the client went away mid-answer: stop generating for it


def _facts(answering: AnswerStream) -> dict[str, Any]:
    answer = answering.answer()
    return {
        "sources": _sources(answering),
        "threshold": answer.threshold,
        "cutoff": answer.cutoff,
        "declined": answer.declined,
        "guarded": answer.guarded,
        "follow_up": answer.follow_up,
    }


def _sources(answering: AnswerStream) -> list[dict[str, Any]]:
    result = answering.result
    hits = result.hits if result else []
    return [
        {
            **{k: v for k, v in hit.to_dict().items() if k != "metadata"},  # the one serialisation of a hit
            "title": hit.metadata.get("title") or hit.text.partition(" : ")[0][:80],
            "used": answering.used is not None and hit.id == answering.used.id,
        }
        for hit in hits
    ]


def _usage(answering: AnswerStream) -> dict[str, int]:
    answer = answering.answer()
    used = answer.prompt_tokens + answer.new_tokens
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.new_tokens, "total_tokens": used}


def _finish_reason(answering: AnswerStream) -> Literal["stop", "length"]:
    answer = answering.answer()
    limit = answering.max_new_tokens
    return "length" if limit is not None and answer.new_tokens >= limit and not answer.guarded else "stop"


def _model_card(created: float) -> dict[str, Any]:
    return {"id": MODEL_ID, "object": "model", "created": int(created), "owned_by": "ohlora-rag"}


def _unknown_model(name: str) -> ApiError:
    return ApiError(
        404, f"model {name!r} does not exist — use {MODEL_ID!r} (GET /v1/models)", param="model", code="model_not_found"
    )


def _question(text: str, param: str, config: ServeConfig) -> str:
    text = text.strip()
    if not text:
        raise ApiError(400, f"{param}: empty — ask something", param=param)
    if len(text) > config.max_question_chars:
        raise ApiError(
            400,
            f"{param}: {len(text)} characters — the limit is {config.max_question_chars}",
            param=param,
            code="question_too_long",
        )
    return text


def _conversation(messages: list[ChatMessage], config: ServeConfig) -> tuple[str, list[str]]:
    """The question (the last message, which must be the user's) and the earlier user messages."""
    if not messages:
        raise ApiError(400, "messages: empty — send at least one user message", param="messages")
    for i, message in enumerate(messages):
        if message.role not in ("system", "developer", "user", "assistant", "tool"):
            raise ApiError(400, f"messages[{i}].role {message.role!r}: use system, user or assistant", param="messages")
    if messages[-1].role != "user":
        raise ApiError(400, "messages: the last message must be the user's question", param="messages")
    question = _question(messages[-1].text(), f"messages[{len(messages) - 1}].content", config)
    earlier = [m.text().strip() for m in messages[:-1][-config.max_history_messages :] if m.role == "user"]
    return question, [q[: config.max_question_chars] for q in earlier if q]


def _web_file(name: str) -> str:
    return resources.files("ohlora_rag").joinpath("web", name).read_text(encoding="utf-8")


def serve(config: ServeConfig, load: Callable[[], QueryEngine], log: Callable[[str], None]) -> None:
    """Run the server until SIGTERM / Ctrl-C (answers in flight finish first)."""
    import sys

    import uvicorn

    # uvicorn finishes the requests in flight on SIGTERM, then re-raises the signal: end with status 0 instead, as
    # after Ctrl-C — a stop that was asked for is not a failure.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    app = create_app(load, config)
    where = f"http://{'[' + config.host + ']' if ':' in config.host else config.host}:{config.port}"
    log(f"serving the tutor at {where}/ (OpenAI API at {where}/v1, model {MODEL_ID!r}); loading models ...")
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        log_level="warning",
        timeout_graceful_shutdown=int(config.shutdown_grace_seconds) + 5,
    )
