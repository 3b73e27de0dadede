"""Text generation: the one engine behind `llmctl generate`, evaluation and RL rollouts.

    engine = Engine(model, tokenizer)
    results = engine.generate([ids_a, ids_b], SamplingParams(max_new_tokens=64, top_p=0.9, seed=0))
    for delta in (s := engine.stream(ids, params)): print(delta, end="")     # s.result once exhausted

Prompts are lists of token ids (the caller adds BOS / applies a chat template). The rows of a batch decode in one
loop (`Engine._decode`) over one per-row state (`Batch`): prefill (one forward over the prompts), then repeat:
pick each live row's tokens from the logits (sampling.py) -> the host takes them (an EOS or stop token, a stop
string or max_new_tokens ends a row) -> drop the finished rows once they are half of the batch -> the draft policy
proposes up to k tokens per row (lookup.py; none: plain decoding) -> one forward (step.py) over every live row's
[last token, draft...]. Each position's pick is plain decoding's (the same logits, sampler and per-row uniform),
and a row keeps the draft tokens its picks confirm plus one more pick: drafts change the number of forward passes,
not the tokens. The rows sit in the KV cache one of three ways:
- lockstep, no drafts: left-padded prompts prefilled together (padding mask + position ids), every row writing the
  same slot each step. The host reads the picks every step on CPU (free there), every `sync_every` steps on a GPU
  unless a row needs them at once (stop strings, streaming). `compile=True` runs a static-shape step through
  torch.compile (CUDA graphs on a GPU), except where the native step runs.
- one row with prompt lookup (a single prompt, `stream`, batch_size 1), any sampling settings: a pass verifies
  [last token, draft...] (FastDecode.verify), then the cache position moves back past the rejected draft tokens.
- ragged, with prompt lookup (a greedy batch, no penalties, FastDecode): prefilled without padding, each row
  advancing on its own (FastDecode.verify_rows: a row's g-th token goes to plain decoding's slot and position;
  the slots past its accepted tokens are overwritten by its next pass).
The forward is FastDecode's (step.py: fused weights; fp32 on CPU its native step, llmctl/native/), or the model's
own for wrapped layers such as LoRA. Beam search (num_beams > 1) has its own loop (beam.py). For a server the same
loop runs lockstep rows with a `feed` (batcher.py) that adds and drops rows between steps: continuous batching.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from llmctl.engine.beam import beam_search
from llmctl.engine.lookup import BATCH_DRAFT, Lookup
from llmctl.engine.sampling import Sampler, SamplingParams, accepted
from llmctl.engine.step import FastDecode
from llmctl.model import KVCache, unwrap


@dataclass
class Result:
    text: str  # the completion (special tokens skipped), cut before a stop string
    tokens: list[int]  # every generated id, the final EOS / stop token included
    finish_reason: str  # "eos" | "stop" | "length"
    prompt_tokens: int
    score: float | None = None  # beam search: the length-normalised log-probability

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


class Stream:
    """Iterator of text deltas for one prompt; `result` holds the Result once it is exhausted."""

    def __init__(self, gen):
        self._gen, self.result = gen, None

    def __iter__(self) -> Iterator[str]:
        self.result = (yield from self._gen)[0]


class Batch:
    """The per-row state of the rows decoding together, every list and tensor indexed by batch position: the rows'
    indices in the caller's list, prompts, limits and stop conditions, tokens so far and finish reasons (None: still
    decoding); their layout in the KV cache (left padding: mask, prompt lengths); the sampler's per-row settings.
    `keep(rows)` keeps only those rows (cache included)."""

    def __init__(self, engine: "Engine", prompts, params, rows):
        m, dev = engine.model, engine.device
        self.rows = list(rows)  # indices into the caller's list
        self.params = [params[i] for i in rows]
        self.prompts = [prompts[i] for i in rows]
        lens = [len(p) for p in self.prompts]
        B, L = len(rows), max(lens)
        self.limit = [min(p.max_new_tokens, engine.block_size - n) for p, n in zip(self.params, lens)]
        self.N, self.L = max(self.limit), L
        self.padded = min(lens) != L
        idx = torch.full((B, L), engine.pad_id, dtype=torch.long)
        mask = torch.ones(B, L + self.N, dtype=torch.bool)  # key mask: False on left padding
        for r, p in enumerate(self.prompts):
            idx[r, L - lens[r] :] = torch.tensor(p, dtype=torch.long)
            mask[r, : L - lens[r]] = False
        self.idx, self.mask = idx.to(dev), mask.to(dev)
        self.lens = torch.tensor(lens, device=dev)  # position of each row's first new token
        fast = engine._fast()  # fp32 on CPU the native step (llmctl/native/) beats the compiled one: it runs instead
        self.static = engine.compiled is not None and fast is not None and fast.native is None
        self.fast = fast  # the step's FastDecode (None: the model's forward)
        if self.static:  # few distinct shapes for torch.compile: the cache length in steps of 64
            self.cache = m.new_cache(B, min(engine.block_size, -(-(L + self.N) // 64) * 64), dtype=fast.dtype)
            self.smask = torch.zeros(B, self.cache.max_len, dtype=torch.bool, device=dev)
            self.smask[:, :L] = self.mask[:, :L]  # prompt (minus padding); slots open as tokens are written
            self.slot = torch.zeros(1, dtype=torch.long, device=dev)
            if dev.type == "cuda":  # CUDA graphs may write the cache in place
                for buf in self.cache.k + self.cache.v:
                    torch._dynamo.mark_static_address(buf)
        else:  # slots, not positions: left padding can take a batch past block_size; + room for ragged drafts
            n, c, w = L + self.N + (engine.prompt_lookup if B > 1 else 0), m.config, m.lm_head.weight
            dtype = w.dtype if fast is None else fast.dtype  # (16-bit weights on CPU: an fp32 cache)
            self.cache = KVCache(c.n_layer, B, c.n_kv_head, n, c.head_dim, device=w.device, dtype=dtype)
            self.mask = torch.cat([self.mask, self.mask.new_ones(B, n - self.mask.size(1))], 1)
        self.sampler = Sampler(self.params, self.prompts, self.N, m.config.vocab_size, dev, engine.seed_of)
        self.eos = [(set(p.stop_token_ids) | engine.eos_ids) if not p.ignore_eos else set(p.stop_token_ids)
                    for p in self.params]  # fmt: skip
        self.stops = [p.stop for p in self.params]
        self.stop_tail = [max(map(len, s)) + 8 if s else 0 for s in self.stops]
        self.tokens: list[list[int]] = [[] for _ in rows]
        self.reason: list[str | None] = ["length" if n == 0 else None for n in self.limit]
        self.ragged = False  # rows advancing on their own (set by the engine before the prefill)
        self.t, self.last, self.pending = 0, None, []  # lockstep: decode step; the last picks [B]; picks not read
        self.pos = None  # one row: where its last pass began writing the cache

    def keep(self, keep: list[int]) -> None:
        """Keep only the batch positions `keep` (ascending)."""
        ix = torch.tensor(keep, device=self.lens.device)
        c = self.cache
        for lst in (c.k, c.v):
            for i, buf in enumerate(lst):
                lst[i] = buf.index_select(0, ix)
        self.mask, self.lens = self.mask.index_select(0, ix), self.lens.index_select(0, ix)
        if self.last is not None:
            self.last = self.last.index_select(0, ix)
        self.sampler.keep(ix)
        for name in ("rows", "params", "prompts", "limit", "eos", "stops", "stop_tail", "tokens", "reason"):
            lst = getattr(self, name)
            setattr(self, name, [lst[i] for i in keep])


class Engine:
    """Batched generation with a KV cache for an llmctl Transformer (eval mode, any device / dtype)."""

    def __init__(self, model, tokenizer=None, *, eos_ids: Sequence[int] | None = None, fast: bool = True,
                 share_weights: bool = False, compile: bool | str = False, sync_every: int | None = None,
                 prompt_lookup: int = 8):  # fmt: skip
        """fast: decode with FastDecode (copies of the weights; share_weights: re-point the model's weights at
        them instead, for an inference-only model). compile: run its static-shape step through torch.compile
        (True: inductor, with CUDA graphs on a GPU; a string: that backend); sampled batches only, rows are then
        not dropped from a batch. eos_ids: default the tokenizer's `eos_ids` (its EOS and the eos_token_id list
        of its model folder) and the config's EOS. prompt_lookup: drafts of up to this many tokens by prompt
        lookup (lookup.py; 0 = off): the same tokens, fewer forward passes when the text repeats itself (code,
        quoting, extraction, a looping model); one-prompt batches with any settings, greedy batches without
        penalties row by row, drafts of up to min(this, 3). Counts in `stats`."""
        if not (isinstance(prompt_lookup, int) and prompt_lookup >= 0):
            raise ValueError(f"prompt_lookup must be an integer >= 0, got {prompt_lookup!r}")
        self.prompt_lookup = prompt_lookup
        self.stats = {"lookup_steps": 0, "drafted": 0, "accepted": 0}  # speculative decoding, since creation
        self.model = unwrap(model)  # inside compile / DDP / peft wrappers; LoRA layers stay active
        self.fast = FastDecode(self.model, share_weights) if fast and FastDecode.supported(self.model) else None
        self.compiled = None
        if compile and self.fast is not None:
            backend = compile if isinstance(compile, str) else "inductor"
            cuda = self.model.lm_head.weight.is_cuda
            mode = "reduce-overhead" if backend == "inductor" and cuda else None
            # CPU: a C++ wrapper around the kernels instead of a Python one (faster at batch 1)
            opts = {"cpp_wrapper": True} if backend == "inductor" and not cuda else None
            self.compiled = torch.compile(self.fast.static_step, backend=backend, mode=mode, fullgraph=True,
                                          dynamic=False, options=opts)  # fmt: skip
        self.tokenizer = tokenizer
        cfg = self.model.config
        self.block_size = cfg.block_size
        self.device = self.model.lm_head.weight.device
        eos = ((*getattr(tokenizer, "eos_ids", ()), getattr(tokenizer, "eos_id", None), cfg.eos_token_id,
                *(cfg.eos_token_ids or ()))
               if eos_ids is None else eos_ids)  # fmt: skip
        self.eos_ids = {int(i) for i in eos if i is not None}
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else getattr(tokenizer, "pad_id", None)
        self.pad_id = int(pad) if pad is not None and 0 <= pad < cfg.vocab_size else 0
        # how often the host looks at the new tokens when no row needs them at once (stop strings, streaming)
        self.sync_every = sync_every or (1 if self.device.type == "cpu" else 8)

    # ------------------------------------------------------------------------------------------ public API

    def fit_prompt(self, ids: list[int], max_new_tokens: int, keep_first: int = 0) -> tuple[list[int], bool]:
        """(ids, truncated): a prompt longer than block_size - max_new_tokens keeps its first `keep_first` ids
        (e.g. BOS) and its last ones. Raises ValueError when max_new_tokens leaves no room."""
        room = self.block_size - max_new_tokens
        if room < 1 + keep_first:
            raise ValueError(f"max_new_tokens must be below the model's context of {self.block_size} tokens, "
                             f"got {max_new_tokens}")  # fmt: skip
        if len(ids) <= room:
            return list(ids), False
        return list(ids[:keep_first]) + list(ids[len(ids) - (room - keep_first) :]), True

    def seed_of(self, p: SamplingParams) -> int:
        return p.seed if p.seed is not None else int(torch.randint(0, 2**62, ()).item())

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 batch_size: int | None = None) -> list[Result]:  # fmt: skip
        """One Result per prompt, in order. Sampled prompts run `batch_size` at a time (default: all), longest
        first; beam-search prompts one at a time."""
        params = self._params(prompts, params)
        out: list[Result | None] = [None] * len(prompts)
        sampled = [i for i, p in enumerate(params) if p.num_beams == 1]
        for i in (i for i, p in enumerate(params) if p.num_beams > 1):
            out[i] = beam_search(self, list(prompts[i]), params[i])
        sampled.sort(key=lambda i: -len(prompts[i]))
        bs = batch_size or max(1, len(sampled))
        for s in range(0, len(sampled), bs):
            for i, r in zip(sampled[s : s + bs], _drain(self._decode(prompts, params, sampled[s : s + bs]))):
                out[i] = r
        return out  # type: ignore[return-value]

    def stream(self, prompt: Sequence[int], params: SamplingParams | None = None) -> Stream:
        """Text deltas of one prompt as tokens arrive (held back while they could be the start of a stop string
        or an incomplete UTF-8 character); the Result is `stream.result` once the iterator is exhausted."""
        params = params or SamplingParams()

        def run():
            with torch.inference_mode():
                if params.num_beams > 1:
                    r = beam_search(self, list(prompt), params)
                    yield r.text
                    return [r]
                return (yield from self._decode([prompt], [params], [0], stream=True))

        return Stream(run())

    # ------------------------------------------------------------------------------------------ the decode loop

    def _decode(self, prompts, params, rows, stream: bool = False):
        """Generator: decode prompts[rows] as one batch; yields text deltas of row 0 when `stream`; returns the
        Results in the order of rows."""
        b = Batch(self, prompts, params, rows)
        results = {i: self._result(p, [], "length", ()) for i, p, n in zip(b.rows, b.prompts, b.limit) if n == 0}
        if b.N == 0:
            return [results[i] for i in rows]
        drafter = self._drafter(b)
        b.ragged = drafter is not None and len(b.rows) > 1
        yield from self._loop(b, self._prefill(b), results, drafter, stream)
        return [results[i] for i in rows]

    def _loop(self, b: Batch, logits, results: dict, drafter=None, stream: bool = False, feed=None):
        """The one decode loop (see the module doc), from a batch's logits (None: a batch whose rows have picked
        their last tokens already). `feed` (batcher.py, continuous batching) takes each step's tokens and manages
        the rows instead: it may drop and add rows between steps; the loop ends when it returns no batch."""
        drafts = None if drafter is None else [[] for _ in b.rows]  # each row's draft in the pass just run
        lazy = drafter is None and not stream and not any(b.stops) and feed is None  # the host may read late
        streamed = ""
        while True:
            new = None if logits is None else self._pick(b, logits, drafts, lazy)
            if new is not None:
                for r, toks in enumerate(new):  # the host takes them: each row stops on its own
                    if drafter is not None:
                        drafter.update(b.rows[r], drafts[r] or [], toks)
                    if b.reason[r] is None and toks and self._take(b, r, toks):
                        results[b.rows[r]] = self._result(b.prompts[r], b.tokens[r], b.reason[r], b.stops[r])
                if feed is not None and (b := feed.step(b, new, logits)) is None:
                    return
                if stream:
                    i = b.rows[0]
                    text = results[i].text if i in results else self._stream_text(b.prompts[0], b.tokens[0],
                                                                                  b.stops[0])  # fmt: skip
                    if len(text) > len(streamed) and text.startswith(streamed):
                        yield text[len(streamed) :]
                        streamed = text
                alive = [r for r, why in enumerate(b.reason) if why is None]
                if not alive:
                    return
                if len(alive) <= len(b.rows) // 2 and not b.static:  # drop the finished rows from the batch
                    b.keep(alive)
                if drafter is not None:
                    drafts = drafter.propose(b)
            logits = self._step(b, drafts)

    def _drafter(self, b: Batch) -> Lookup | None:
        """The batch's draft policy: prompt lookup for a one-row batch, and for a greedy batch without penalties on
        FastDecode; None (plain decoding) otherwise, and for the compiled static step."""
        if not self.prompt_lookup or b.static:
            return None
        if len(b.rows) == 1:
            return Lookup(b, self.prompt_lookup, backoff=False, stats=self.stats)
        if b.fast is not None and b.sampler.all_greedy and not b.sampler.penalised:
            return Lookup(b, min(self.prompt_lookup, BATCH_DRAFT), backoff=True, stats=self.stats)
        return None

    def _prefill(self, b: Batch) -> torch.Tensor:
        """One forward over the prompts -> the logits [B, V] of each row's last prompt token (fp32)."""
        if b.ragged or b.fast is not None and b.fast.wide:  # FastDecode's rows (16-bit weights: fp32 activations)
            # without padding: the prompts' tokens only, at the slots of their left-padded layout
            dev, lens = self.device, [len(p) for p in b.prompts]
            x = torch.tensor([t for p in b.prompts for t in p], device=dev)
            rr, j = (torch.tensor(a, device=dev) for a in zip(*[(r, i) for r, n in enumerate(lens) for i in range(n)]))
            last = torch.tensor(lens, device=dev).cumsum(0) - 1
            b.cache.pos = b.L  # the prompts end at slot L (lockstep steps write at cache.pos; ragged ones ignore it)
            return b.fast.verify_rows(x, b.cache, rr, j, b.L - b.lens, torch.zeros_like(b.lens), b.mask, b.L, last)
        m, pos = self.model, None
        if b.padded:  # left padding: positions count from each row's first real token
            pos = (torch.arange(b.L, device=self.device)[None, :] - (b.L - b.lens)[:, None]).clamp_(min=0)
        h = m(b.idx, position_ids=pos, cache=b.cache, attn_mask=b.mask[:, : b.L] if b.padded else None,
              return_hidden=True)[:, -1]  # fmt: skip
        return m.lm_head(h).float()

    def _forward(self, b: Batch, x: torch.Tensor, t: int) -> torch.Tensor:
        """A lockstep step: each row's token t, x [B], at positions lens + t -> logits [B, V] (fp32)."""
        if b.static:
            slot = b.L + t
            b.smask[:, slot] = True
            b.slot.fill_(slot)
            b.cache.pos = slot + 1
            return self.compiled(x, b.cache.k, b.cache.v, b.slot, b.lens + t, b.smask)
        if b.fast is not None:
            if b.padded:  # (rows done already may pass the context's end: clamped, their tokens go unused)
                return b.fast(x, b.cache, (b.lens + t).clamp_(max=self.block_size - 1), b.mask[:, : b.L + t + 1])
            return b.fast(x, b.cache)
        if b.padded:
            pos = (b.lens + t).clamp_(max=self.block_size - 1)[:, None]
            return self.model(x[:, None], position_ids=pos, cache=b.cache, attn_mask=b.mask[:, : b.L + t + 1])[:, -1]
        return self.model(x[:, None], cache=b.cache)[:, -1]

    def _step(self, b: Batch, drafts: list[list[int] | None] | None) -> torch.Tensor:
        """One forward over every live row's run [last token, *draft] -> the logits of the runs' tokens [M, V]
        (drafts None: lockstep, each row's last pick, b.last, at decode step b.t - 1)."""
        dev = self.device
        if drafts is None:
            return self._forward(b, b.last, b.t - 1)
        if not b.ragged:  # one row, at the cache's position
            last, d, m = b.tokens[0][-1], drafts[0], self.model
            b.pos = b.cache.pos
            if not d:
                return self._forward(b, torch.tensor([last], device=dev), len(b.tokens[0]) - 1)
            idx = torch.tensor([last, *d], device=dev)
            if b.fast is not None:  # writes the cache at pos .. pos + d
                return b.fast.verify(idx, b.cache)
            return m.lm_head(m(idx[None], cache=b.cache, return_hidden=True)[0]).float()
        x, rr, js = [], [], []
        for r, d in enumerate(drafts):
            if d is not None:
                run = [b.tokens[r][-1], *d]
                x += run
                rr += [r] * len(run)
                js += range(len(run))
        T = 1 + max(len(d) for d in drafts if d is not None)
        x, rr, j = (torch.tensor(a, device=dev) for a in (x, rr, js))
        G = torch.tensor([max(len(g), 1) for g in b.tokens], device=dev)  # tokens so far; the last one goes in now
        return b.fast.verify_rows(x, b.cache, rr, j, b.L - 1 + G, b.lens - 1 + G, b.mask, T)  # [M, V]

    def _pick(self, b: Batch, logits: torch.Tensor, drafts, lazy: bool) -> list[list[int]] | None:
        """Each row's picks at its run's positions, cut after the first one that differs from its draft (drafts
        None: one token per row, kept on the device in b.pending until the host reads them: None until then)."""
        if drafts is None:  # lockstep: every row's token at decode step b.t
            tok = b.last = b.sampler.select(logits, b.t)
            b.sampler.observe(tok)
            b.pending.append(tok)
            b.t += 1
            if lazy and len(b.pending) < self.sync_every and b.t < b.N:
                return None
            new = torch.stack(b.pending, 1).tolist() if len(b.pending) > 1 else [[v] for v in tok.tolist()]
            b.pending = []
            return new
        if not b.ragged:  # one row, any sampling settings, decode step = its tokens so far
            new = b.sampler.select_run(logits, len(b.tokens[0]), drafts[0])
            if b.pos is not None:  # the cache keeps the last token and the accepted draft; the slots after: stale
                b.cache.pos = b.pos + len(new)
            return [new]
        picks, o, new = b.sampler.select(logits, 0).tolist(), 0, []  # (greedy, no penalties: argmax)
        for d in drafts:
            if d is None:
                new.append([])
                continue
            new.append(accepted(picks[o : o + 1 + len(d)], d))
            o += 1 + len(d)
        return new

    def _take(self, b: Batch, r: int, toks: list[int]) -> bool:
        """Row r's new tokens, up to the first that ends it; True when it did (b.reason[r] says why)."""
        g, eos, stops = b.tokens[r], b.eos[r], b.stops[r]
        for v in toks:
            g.append(v)
            if v in eos:
                b.reason[r] = "eos"
            elif stops and self._hit_stop(g, stops, b.stop_tail[r]):
                b.reason[r] = "stop"
            elif len(g) >= b.limit[r]:
                b.reason[r] = "length"
            if b.reason[r] is not None:
                return True
        return False

    # ------------------------------------------------------------------------------------------ internals

    def _params(self, prompts, params) -> list[SamplingParams]:
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        for ids in prompts:
            if len(ids) == 0:
                raise ValueError("a prompt needs at least one token (e.g. BOS)")
            if len(ids) >= self.block_size:
                raise ValueError(f"a prompt of {len(ids)} tokens leaves no room in the context of "
                                 f"{self.block_size} tokens (see Engine.fit_prompt)")  # fmt: skip
        return list(params)

    def _fast(self):
        """The FastDecode to use now (None: the model's forward), its weights up to date."""
        if self.fast is None or self.model.training:
            return None
        self.fast.refresh()
        return self.fast

    def _text(self, prompt, tokens) -> str:
        """Decode a completion in the context of the prompt's last tokens (tokenizers that strip a leading space
        would otherwise drop it)."""
        if self.tokenizer is None:
            return ""
        dec = self.tokenizer.decode
        anchor = list(prompt[-3:])
        head = dec(anchor, skip_special_tokens=True)
        full = dec(anchor + list(tokens), skip_special_tokens=True)
        if full.startswith(head) and "\ufffd" not in head[-1:]:
            return full[len(head) :]
        return dec(tokens, skip_special_tokens=True)

    def _hit_stop(self, gen, stops, tail) -> bool:
        text = self.tokenizer.decode(gen[-tail:], skip_special_tokens=True)
        return any(s in text for s in stops)

    def _result(self, prompt, gen, reason, stops) -> Result:
        text = self._text(prompt, gen[:-1] if reason == "eos" else gen)
        if stops:
            cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                text, reason = text[:cut], "stop"
        return Result(text=text, tokens=list(gen), finish_reason=reason or "length", prompt_tokens=len(prompt))

    def _stream_text(self, prompt, gen, stops) -> str:
        """The completion so far minus what may still change: an incomplete UTF-8 character at the end, or a
        suffix that could grow into a stop string."""
        text = self._text(prompt, gen).rstrip("\ufffd")
        for s in stops:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    text = text[:-k]
                    break
        return text


def _drain(gen):
    """Run a generator to the end and return its return value."""
    try:
        while True:
            next(gen)
    except StopIteration as e:
        return e.value
