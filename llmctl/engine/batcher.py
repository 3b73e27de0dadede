"""Continuous batching for `llmctl serve`: requests join the running batch at a step boundary and leave when done.

    batcher = Batcher(engine, max_rows=16)
    req = batcher.submit(prompt_ids, SamplingParams(max_new_tokens=64, seed=0), logprobs=2)
    for ev in req.events(): print(ev.text, end="")         # or `async for ev in req.aevents()`; req.result at the end
    batcher.close()

One engine thread runs the engine's decode loop (`Engine._loop`) with this batcher as its `feed`. A new request is
prefilled on its own (its prompt's forward, and its first token: the time to first token does not wait for the
batch) and then packed into the running batch: every row keeps its cached keys / values, its position, its sampler
row (settings, its seeded uniforms from its own next step on, the penalties' counts) and its stop conditions; rows
that finished or were cancelled leave at the same boundary (`pack`). So a row decodes exactly as it would alone,
with the same sampler and seed as `llmctl generate`, whatever else is in flight; only the float rounding of the
batched matmuls differs (fp32 on CPU: practically never a different token). `max_rows` rows decode at once and
`max_tokens` bounds their prompt + completion tokens; the rest wait in order.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from dataclasses import dataclass

import torch

from llmctl.attention import KVCache
from llmctl.engine.engine import Batch, Engine, Result
from llmctl.engine.sampling import Sampler, SamplingParams


@dataclass
class TokenLogprob:
    token: int
    logprob: float  # log-softmax of the model's logits (before temperature and penalties)
    top: list[tuple[int, float]]  # the k most likely (token, logprob)


@dataclass
class Event:
    text: str  # new completion text (held back while it could be the start of a stop string or a UTF-8 character)
    tokens: list[int]  # the new token ids (a final EOS / stop token included)
    logprobs: list[TokenLogprob] | None = None  # one per token, when asked for
    result: Result | None = None  # on the last event only


class Request:
    """One submitted prompt: its events as they come (`events()` / `aevents()`), `result` once done."""

    def __init__(self, batcher: "Batcher", prompt: list[int], params: SamplingParams, logprobs: int | None):
        self.prompt, self.params, self.logprobs = prompt, params, logprobs
        self.result: Result | None = None
        self.cancelled = False
        self.sent_text, self.sent_tokens = "", 0
        self._batcher, self._lock, self._buf = batcher, threading.Lock(), collections.deque()
        self._ready = threading.Event()
        self._aq: asyncio.Queue | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def cancel(self) -> None:
        """Free the request's row at the next step boundary; its events end with finish_reason "cancelled"."""
        if self.result is None:
            self.cancelled = True
            self._batcher._wake()

    def events(self):
        """The events, blocking until each comes; leaving the loop early cancels the request."""
        try:
            while True:
                self._ready.wait()
                with self._lock:
                    ev = self._buf.popleft()
                    if not self._buf:
                        self._ready.clear()
                yield ev
                if ev.result is not None:
                    return
        finally:
            self.cancel()

    async def aevents(self):
        """The events for asyncio; leaving early (or a cancelled task) cancels the request."""
        with self._lock:
            self._loop, self._aq = asyncio.get_running_loop(), asyncio.Queue()
            for ev in self._buf:
                self._aq.put_nowait(ev)
            self._buf.clear()
        try:
            while True:
                ev = await self._aq.get()
                yield ev
                if ev.result is not None:
                    return
        finally:
            self.cancel()

    def _push(self, ev: Event) -> None:  # engine thread
        if ev.result is not None:
            self.result = ev.result
        with self._lock:
            if self._aq is not None:
                self._loop.call_soon_threadsafe(self._aq.put_nowait, ev)
            else:
                self._buf.append(ev)
                self._ready.set()


class Batcher:
    """Serves requests from one engine thread by continuous batching (see the module doc)."""

    def __init__(self, engine: Engine, max_rows: int = 16, max_tokens: int | None = None):
        if not (isinstance(max_rows, int) and max_rows >= 1):
            raise ValueError(f"max_rows must be an integer >= 1, got {max_rows!r}")
        self.engine, self.max_rows = engine, max_rows
        self.max_tokens = max_tokens or max_rows * engine.block_size
        self._counts = {"finished": 0, "steps": 0}
        self._waiting: collections.deque[Request] = collections.deque()
        self._cv = threading.Condition()
        self._closing, self._drain = False, True
        self._results: dict = {}  # rows finished by the loop, not yet delivered
        self._live: set[Request] = set()  # admitted, not finished
        self._thread = threading.Thread(target=self._run, name="llmctl-batcher", daemon=True)
        self._thread.start()

    def submit(self, prompt, params: SamplingParams | None = None, logprobs: int | None = None) -> Request:
        """Queue a prompt (token ids); returns at once. ValueError for a request that can't run."""
        params = params or SamplingParams()
        prompt, block = [int(t) for t in prompt], self.engine.block_size
        if not prompt:
            raise ValueError("a prompt needs at least one token")
        if len(prompt) >= block:
            raise ValueError(f"the prompt has {len(prompt)} tokens: it leaves no room for a completion in the "
                             f"model's context of {block} tokens")  # fmt: skip
        if params.num_beams != 1:
            raise ValueError("beam search is not served (num_beams must be 1)")
        if logprobs is not None and not (isinstance(logprobs, int) and 0 <= logprobs <= 20):
            raise ValueError(f"logprobs must be an integer in [0, 20], got {logprobs!r}")
        req = Request(self, prompt, params, logprobs)
        with self._cv:
            if self._closing:
                raise RuntimeError("the server is shutting down")
            self._waiting.append(req)
            self._cv.notify()
        return req

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Take no more requests; finish the ones in flight and queued (drain) or cancel them; wait for the thread."""
        with self._cv:
            self._closing, self._drain = True, drain
            if not drain:
                for req in self._waiting:
                    req.cancelled = True
            self._cv.notify()
        self._thread.join(timeout)

    @property
    def stats(self) -> dict:
        """Rows decoding (admitted, not finished), requests waiting, requests finished, decode steps so far."""
        return {"live": len(self._live), "waiting": len(self._waiting), **self._counts}

    def _dropped(self, req: Request) -> bool:
        """The request is to end now: cancelled, or the batcher is closing without draining."""
        return req.cancelled or (self._closing and not self._drain)

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    # ------------------------------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._closing:
                    self._cv.wait()
                if not self._waiting:
                    return
            try:
                with torch.inference_mode():
                    joiners = self._admit(0, 0)
                    if joiners:
                        for _ in self.engine._loop(pack(self.engine, joiners), None, self._results, feed=self):
                            pass
            except Exception as e:  # a fault in the engine: every request in flight ends with it
                self._fail(e)

    def step(self, b: Batch, new: list[list[int]], logits: torch.Tensor) -> Batch | None:
        """The loop's hook after the host took a step's tokens: deliver them, let finished and cancelled rows go,
        admit waiting requests; the batch to decode next (None: nothing left)."""
        self._counts["steps"] += 1
        lps = self._logprobs(b, new, logits)
        keep = []
        for r, req in enumerate(b.rows):
            if b.reason[r] is None and self._dropped(req):
                b.reason[r] = "cancelled"
                self._results[req] = self.engine._result(req.prompt, b.tokens[r], "cancelled", b.stops[r])
            self._deliver(req, b, r, lps.get(r))
            if b.reason[r] is None:
                keep.append(r)
        used = sum(len(b.prompts[r]) + b.limit[r] for r in keep)
        joiners = self._admit(len(keep), used)
        if not keep and not joiners:
            return None
        if not joiners and len(keep) == len(b.rows):
            return b
        return pack(self.engine, [(b, r) for r in keep] + joiners)

    def _admit(self, rows: int, used: int) -> list[tuple[Batch, int]]:
        """Prefill the waiting requests that the rows and the token budget allow, together: [(their batch, row)]."""
        group = []
        with self._cv:
            while self._waiting and rows + len(group) < self.max_rows:
                req = self._waiting[0]
                need = len(req.prompt) + min(req.params.max_new_tokens, self.engine.block_size - len(req.prompt))
                if (rows or group) and used + need > self.max_tokens and not req.cancelled:
                    break
                self._waiting.popleft()
                if self._dropped(req) or req.params.max_new_tokens == 0:
                    why = "length" if req.params.max_new_tokens == 0 and not req.cancelled else "cancelled"
                    self._finish(req, self.engine._result(req.prompt, [], why, req.params.stop))
                    continue
                group.append(req)
                used += need
        if not group:
            return []
        self._live.update(group)
        b = self._prefill(group)
        return [(b, r) for r, why in enumerate(b.reason) if why is None]

    def _prefill(self, group: list[Request]) -> Batch:
        """The requests' prompts in one forward (several: FastDecode's ragged prefill, no padding computed) and their
        first tokens, in a batch of their own that `pack` then takes rows from."""
        eng = self.engine
        b = Batch(eng, [r.prompt for r in group], [r.params for r in group], range(len(group)))
        b.rows = list(group)
        b.ragged = b.fast is not None and len(group) > 1
        logits = eng._prefill(b)  # (the prompts end at slot L = cache.pos)
        new = eng._pick(b, logits, None, lazy=False)
        lps = self._logprobs(b, new, logits)
        for r, req in enumerate(group):
            if eng._take(b, r, new[r]):
                self._results[req] = eng._result(req.prompt, b.tokens[r], b.reason[r], b.stops[r])
            self._deliver(req, b, r, lps.get(r))
        return b

    def _logprobs(self, b: Batch, new, logits) -> dict[int, list[TokenLogprob]]:
        """Each asking row's log-probabilities of its new token (one per step: lockstep rows)."""
        rows = [r for r, req in enumerate(b.rows) if req.logprobs is not None and new[r]]
        if not rows:
            return {}
        lp = logits[rows].float().log_softmax(-1)
        k = max(b.rows[r].logprobs for r in rows)
        top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
        out = {}
        for i, r in enumerate(rows):
            tok, kr = new[r][0], b.rows[r].logprobs
            top = list(zip(top_i[i, :kr].tolist(), top_v[i, :kr].tolist()))
            out[r] = [TokenLogprob(tok, float(lp[i, tok]), top)]
        return out

    def _deliver(self, req: Request, b: Batch, r: int, lps) -> None:
        """Send row r's new tokens and text (and its result once it is done)."""
        eng, toks = self.engine, b.tokens[r]
        done = b.reason[r] is not None
        res = self._results.pop(req, None) if done else None
        text = res.text if res is not None else eng._stream_text(req.prompt, toks, b.stops[r])
        delta = text[len(req.sent_text) :] if text.startswith(req.sent_text) else ""
        new = toks[req.sent_tokens :]
        if not delta and not new and res is None:
            return
        req.sent_text, req.sent_tokens = req.sent_text + delta, len(toks)
        if res is not None:
            self._counts["finished"] += 1
            self._live.discard(req)
        req._push(Event(delta, list(new), lps, res))

    def _finish(self, req: Request, res: Result) -> None:
        self._counts["finished"] += 1
        self._live.discard(req)
        req._push(Event("", [], None, res))

    def _fail(self, e: Exception) -> None:
        """End every request in flight or waiting with finish_reason "error" (the engine thread goes on)."""
        with self._cv:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for req in [*self._live, *waiting]:
            if req.result is None:
                self._finish(req, Result(text=f"{type(e).__name__}: {e}", tokens=[], finish_reason="error",
                                         prompt_tokens=len(req.prompt)))  # fmt: skip
        self._results.clear()
        self._live.clear()


def pack(eng: Engine, parts: list[tuple[Batch, int]]) -> Batch:
    """One lockstep batch of rows taken from other batches, (batch, row): each row's cached keys / values right-
    aligned at the new batch's write column (left padding masked), its position, sampler row, limits, stop
    conditions and tokens so far carried over; every row has picked its next token (b.last) and the batch's decode
    step is 1. Rows must be lockstep rows (not ragged, not static)."""
    ref = parts[0][0].cache
    B, n_layer = len(parts), len(ref.k)
    cached = [len(b.prompts[r]) + len(b.tokens[r]) - 1 for b, r in parts]  # tokens in the cache = next position
    c = max(cached)
    width = c + max(b.limit[r] - len(b.tokens[r]) for b, r in parts)
    _, nkv, _, hd = ref.k[0].shape
    dev = ref.k[0].device
    nb = Batch.__new__(Batch)
    nb.cache = KVCache(n_layer, B, nkv, width, hd, device=dev, dtype=ref.k[0].dtype)
    nb.mask = torch.ones(B, width, dtype=torch.bool, device=dev)
    for i, ((b, r), n) in enumerate(zip(parts, cached)):
        p = b.cache.pos
        for dst, src in zip(nb.cache.k + nb.cache.v, b.cache.k + b.cache.v):
            dst[i, :, c - n : c] = src[r, :, p - n : p]
        nb.mask[i, : c - n] = False
    nb.cache.pos = c
    nb.lens = torch.tensor(cached, device=dev)  # position of each row's next token at decode step 1
    nb.L, nb.t, nb.N, nb.padded = c, 1, width - c, min(cached) != c  # (no padding: one row, its fastest step)
    nb.last = torch.tensor([b.tokens[r][-1] for b, r in parts], device=dev)
    nb.sampler = Sampler.stack([(b.sampler, r, b.t) for b, r in parts])
    for name in ("rows", "params", "prompts", "limit", "eos", "stops", "stop_tail", "tokens", "reason"):
        setattr(nb, name, [getattr(b, name)[r] for b, r in parts])
    nb.static, nb.ragged, nb.fast, nb.idx, nb.pending, nb.pos = False, False, eng._fast(), None, [], None
    return nb
