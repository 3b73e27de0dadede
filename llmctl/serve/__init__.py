"""`llmctl serve`: an OpenAI-compatible HTTP server over the engine's continuous batcher.

    protocol.py  OpenAI requests -> prompts + SamplingParams (validated: 400 with an OpenAI error body), and the
                 response, chunk and error objects
    app.py       the FastAPI app: routes, server-sent events, API key, one log line per request, disconnects

FastAPI and uvicorn are imported inside functions (the `serve` extra), so `llmctl --help` stays fast.
"""
