"""The FastAPI app: routes, API-key check, body-size limit, OpenAI-style errors, SSE responses that notice a client
leaving, and the engine thread's start and stop in the app's lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat import chat_completion
from .completions import completion
from .errors import APIError, bad_request, validation_message
from .protocol import ChatCompletionRequest, CompletionRequest
from .serving import Serving, wait_unless_disconnected

log = logging.getLogger("qwen3_jax.server")


class EventStream(StreamingResponse):
    """SSE whose generator is closed as soon as the client disconnects (so its `finally` aborts the requests),
    whatever ASGI spec version the server speaks."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send):
        try:
            async with anyio.create_task_group() as tg:
                async def stream():
                    with contextlib.suppress(OSError):
                        await self.stream_response(send)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            await self.body_iterator.aclose()


class _StatusCounter:
    """ASGI middleware counting answered requests by route and status for /metrics."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope.get("path", "")
            route = path if path in _ROUTES else "other"
            self.metrics.http.labels(route, str(status[0])).inc()


_ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"}


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def _read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object, at most `limit` bytes."""
    too_big = bad_request(f"the request body is larger than this server's limit of {limit} bytes "
                          "(--max-request-body-bytes)", code="request_too_large")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_big
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise too_big
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(data).__name__}")
    return data


def _validate(model_cls, data: dict):
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        message, param = validation_message(e.errors(include_url=False))
        raise bad_request(message, param=param) from None


def build_app(serving: Serving) -> FastAPI:
    """The app for one `Serving` (model + engine thread + limits); the engine thread runs during its lifespan."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        serving.engine_loop.start(asyncio.get_running_loop())
        log.info("engine thread started; serving %s", ", ".join(serving.config.served_model_names))
        try:
            yield
        finally:
            serving.draining = True
            serving.engine_loop.stop()
            log.info("engine thread stopped")

    app = FastAPI(title="qwen3-jax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serving = serving
    app.add_middleware(_StatusCounter, metrics=serving.metrics)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return _error(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return _error(APIError(e.status_code, str(e.detail)))

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        log.exception("unhandled error in %s", request.url.path)
        return _error(APIError(500, f"internal error: {type(e).__name__}: {e}"))

    def check_key(request: Request) -> None:
        key = serving.config.api_key
        if key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    @app.get("/health")
    async def health():
        if serving.draining or not serving.engine_loop.alive:
            return _error(APIError(503, "the server is shutting down" if serving.draining
                                   else "the engine thread is not running"))
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(serving.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": serving.created, "owned_by": "qwen3-jax",
             "max_model_len": serving.max_model_len} for name in serving.config.served_model_names]}

    async def run(request: Request, model_cls, handler):
        check_key(request)
        req = _validate(model_cls, await _read_json(request, serving.config.max_body_bytes))
        if req.stream:
            _, events = await handler(serving, req)
            return EventStream(events, headers={"Cache-Control": "no-cache"})
        result = await wait_unless_disconnected(handler(serving, req), request.receive)
        if result is None:  # the client left; its requests were aborted
            return Response(status_code=499)
        return JSONResponse(result[1])

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await run(request, ChatCompletionRequest, chat_completion)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(request, CompletionRequest, completion)

    return app
