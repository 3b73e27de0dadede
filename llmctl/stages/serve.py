"""`llmctl serve`: a MODEL behind an OpenAI-compatible HTTP server (llmctl/serve/), continuously batched.

Documented behaviours (README, `llmctl serve --help`):
- binds 127.0.0.1 unless --host says otherwise; --port 0 picks a free port; `serving on http://HOST:PORT` goes to
  stderr once the server accepts connections; one line per request follows;
- the model is named --served-model-name (default: MODEL as given); a request for another model is a 404;
- with --api-key K (or LLMCTL_API_KEY), /v1 routes want `Authorization: Bearer K` (401 otherwise); /health is open;
- up to --max-rows requests decode together; more wait in the batcher's queue;
- SIGTERM (or Ctrl-C): no new connections; the requests in flight finish and are answered; then exit 0.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys

from llmctl.errors import UserError
from llmctl.generation import load_engine


def _listen(host: str, port: int) -> socket.socket:
    """A bound socket (port 0: a free one), so a taken port fails before the model loads."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"--host {host}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


def run(model: str, adapter=None, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
        max_rows: int = 16, served_model_name: str | None = None, device: str | None = None,
        dtype: str | None = None) -> None:  # fmt: skip
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError("llmctl serve needs fastapi and uvicorn: pip install 'llmctl[serve]'") from None
    from llmctl.engine.batcher import Batcher
    from llmctl.serve.app import build_app

    if not 0 <= port <= 65535:
        raise UserError(f"--port must be in [0, 65535], got {port}")
    if max_rows < 1:
        raise UserError(f"--max-rows must be at least 1, got {max_rows}")
    api_key = api_key or os.environ.get("LLMCTL_API_KEY") or None
    sock = _listen(host, port)
    engine = load_engine(model, device, adapter=adapter, dtype=dtype)
    batcher = Batcher(engine, max_rows=max_rows)
    name = served_model_name or str(model)
    app = build_app(engine, batcher, name, api_key)

    closed = []

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        import asyncio

        await asyncio.to_thread(batcher.close, drain=True)  # every request is answered by now
        closed.append(True)

    app.router.lifespan_context = lifespan
    bound = sock.getsockname()
    url = f"http://{host if ':' not in host else f'[{host}]'}:{bound[1]}"

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if not self.should_exit:
                print(f"serving on {url} (model {name!r}, up to {max_rows} requests decoding together)",
                      file=sys.stderr, flush=True)  # fmt: skip

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                self._captured_signals.clear()  # a graceful shutdown by SIGTERM / Ctrl-C exits 0

    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=None,
                            timeout_keep_alive=5)  # fmt: skip
    try:
        Server(config).run(sockets=[sock])
    finally:
        if not closed:
            batcher.close(drain=False)
        sock.close()
    print("server stopped", file=sys.stderr, flush=True)
