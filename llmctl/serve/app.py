"""The FastAPI app of `llmctl serve`: OpenAI's routes over the engine's continuous batcher.

Every choice of a request is one batcher request; a streamed response merges the choices' events as they come
(server-sent events, `data: [DONE]` last). A client that goes away cancels its requests, which frees their rows
at the next decode step: a streamed response sees it when Starlette cancels the stream, a plain one by polling
the connection while it waits. Errors are OpenAI error objects ({"error": {message, type, param, code}}), FastAPI's
own errors included. One line per request on stderr: method, path, status, prompt / completion tokens, seconds.
"""

# (no `from __future__ import annotations`: FastAPI reads the handlers' annotations, Request among them)
import asyncio
import contextlib
import json
import sys
import time

from llmctl.serve.protocol import ApiError, Reply, parse


class RequestLog:
    """ASGI middleware: one stderr line per HTTP request, once its response is sent (or its client gone); the
    handlers put the token counts into the request's state."""

    def __init__(self, app, stream=None):
        self.app, self.stream = app, stream

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [None]

        async def send_and_see(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_see)
        finally:
            st = scope.get("state") or {}
            counts = f" prompt={st['prompt_tokens']} completion={st.get('completion_tokens', 0)}" \
                if "prompt_tokens" in st else ""  # fmt: skip
            gone = " (client gone)" if st.get("gone") else ""
            print(f"{scope['method']} {scope['path']} {status[0] or '-'}{counts} {time.perf_counter() - t0:.2f}s"
                  f"{gone}", file=self.stream or sys.stderr, flush=True)  # fmt: skip


async def _merged(reqs):
    """Lists of (choice, event): every request's events as they come, what has piled up since the last list at
    once; cancels the unfinished requests when left early."""
    if len(reqs) == 1:  # one choice: its events as they are, without a task and a queue in between
        try:
            async for ev in reqs[0].aevents():
                yield [(0, ev)]
        finally:
            if reqs[0].result is None:
                reqs[0].cancel()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, r):
        try:
            async for ev in r.aevents():
                await queue.put((i, ev))
        except Exception as e:  # noqa: BLE001  (handed to the consumer)
            await queue.put((i, e))
        await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(reqs)]
    try:
        left = len(reqs)
        while left:
            got = [await queue.get()]
            while not queue.empty():
                got.append(queue.get_nowait())
            out = []
            for i, ev in got:
                if ev is None:
                    left -= 1
                elif isinstance(ev, Exception):
                    raise ev
                else:
                    out.append((i, ev))
            if out:
                yield out
    finally:
        for r in reqs:
            if r.result is None:
                r.cancel()
        for t in tasks:
            t.cancel()


def build_app(engine, batcher, model_name: str, api_key: str | None = None, log_stream=None):
    """The app serving `engine` through `batcher` as the model `model_name` (the key, when given, is required as
    `Authorization: Bearer KEY` on /v1 routes)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="llmctl serve", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    def error(status: int, message: str, type: str = "invalid_request_error", code=None):
        return JSONResponse(ApiError(message, status=status, type=type, code=code).body(), status_code=status)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e):
        return error(400, "; ".join(str(x.get("msg")) for x in e.errors()) or "invalid request")

    @app.exception_handler(HTTPException)
    async def _http(request, e):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error(e.status_code, str(e.detail), code=code)

    @app.exception_handler(Exception)
    async def _bug(request, e):
        return error(500, f"internal error: {type(e).__name__}: {e}", type="server_error")

    def check_key(request) -> None:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise ApiError("Incorrect or missing API key (send Authorization: Bearer KEY)", status=401,
                           code="invalid_api_key")  # fmt: skip

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "llmctl",
                "max_model_len": engine.block_size}  # fmt: skip

    @app.get("/health")
    async def health():
        return {"status": "ok", **batcher.stats}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(request: Request, model: str):
        check_key(request)
        if model != model_name:
            raise ApiError(f"The model `{model}` does not exist", "model", status=404, code="model_not_found")
        return model_card()

    async def generate(request: Request, kind: str):
        check_key(request)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(f"the request body is not valid JSON: {e}") from None
        plan = parse(kind, body, engine, model_name)
        reqs = []
        try:
            for i, params in enumerate(plan.params):
                reqs.append(batcher.submit(plan.prompts[i // plan.n], params, logprobs=plan.logprobs))
        except (ValueError, RuntimeError) as e:
            for r in reqs:
                r.cancel()
            if isinstance(e, RuntimeError):
                raise ApiError("the server is shutting down", status=503, type="server_error") from None
            raise ApiError(str(e)) from None
        reply, state = Reply(plan, engine.tokenizer), request.state
        state.prompt_tokens = sum(len(ids) for ids in plan.prompts)
        if plan.stream:
            return StreamingResponse(sse(reply, reqs, state), media_type="text/event-stream")
        events = _merged(reqs)
        task = asyncio.ensure_future(_drain(events, reply))
        while not task.done():  # a client that leaves frees its rows
            await asyncio.wait({task}, timeout=0.25)
            if not task.done() and await request.is_disconnected():
                state.gone = True
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                break
        state.completion_tokens = reply.completion_tokens
        if getattr(state, "gone", False):
            return JSONResponse({}, status_code=499)
        task.result()
        if reply.error is not None:  # the engine failed these rows (the batcher goes on)
            raise ApiError(f"generation failed: {reply.error}", status=500, type="server_error")
        return reply.body()

    async def sse(reply: Reply, reqs, state):
        done = False
        try:
            async for got in _merged(reqs):  # a server behind the engine sends what piled up as one chunk
                chunks = [reply.add(i, ev) for i, ev in _coalesced(got)]
                text = "".join(f"data: {json.dumps(c, ensure_ascii=False)}\n\n" for c in chunks if c is not None)
                if text:
                    yield text
            if reply.plan.include_usage:
                yield f"data: {json.dumps(reply.usage_chunk())}\n\n"
            yield "data: [DONE]\n\n"
            done = True
        finally:  # not done: the client left (the stream was cancelled, or closed between two chunks)
            state.completion_tokens = reply.completion_tokens
            if not done:
                state.gone = True
                for r in reqs:
                    if r.result is None:
                        r.cancel()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, "chat")

    app.add_middleware(RequestLog, stream=log_stream)
    return app


async def _drain(events, reply: Reply) -> None:
    async for got in events:
        for i, ev in got:
            reply.add(i, ev)


def _coalesced(got: list) -> list:
    """(choice, event) pairs with each choice's consecutive events joined into one (texts, tokens and logprobs
    concatenated, the result of the last)."""
    from types import SimpleNamespace

    out: dict = {}
    for i, ev in got:
        a = out.get(i)
        if a is None:
            out[i] = ev
        else:
            lps = None if a.logprobs is None and ev.logprobs is None else (a.logprobs or []) + (ev.logprobs or [])
            out[i] = SimpleNamespace(text=a.text + ev.text, tokens=a.tokens + ev.tokens, logprobs=lps,
                                     result=ev.result)  # fmt: skip
    return list(out.items())
