"""Text generation: the one engine behind `llmctl generate`, evaluation and RL rollouts.

    engine = Engine(model, tokenizer)
    results = engine.generate([ids_a, ids_b], SamplingParams(max_new_tokens=64, top_p=0.9, seed=0))
    for delta in (s := engine.stream(ids, params)): print(delta, end="")     # s.result once exhausted

Prompts are lists of token ids (the caller adds BOS / applies a chat template). A batch is left-padded and
prefilled in one forward pass (padding mask + position ids), then decoded one token per step into a preallocated KV
cache by FastDecode (llmctl/fastdecode.py: the same logits with fewer, larger ops; the model's own forward for
wrapped layers such as LoRA; fp32 on CPU, its native C++ step, llmctl/native.py, built on first use: one call a
token for a single row, the matmuls through PyTorch's BLAS for a batch); every row stops on its own (EOS or stop
token, stop string, max_new_tokens) and the rows that finished early are dropped from the batch once they are half
of it. The host reads the new tokens every step on CPU (free there), every `sync_every` steps on a GPU unless a row
needs them (stop strings, streaming). `compile=True` runs a static-shape variant of the step through torch.compile
(CUDA graphs on a GPU; where the native step runs, fp32 on CPU, that one instead: the compiled step measured 0.75-0.9x
of the PyTorch step for a sampled batch of 32, attending over the whole cache, and ~1.2x at batch 1, where the native
step is ~1.8x on a 6M llama). Prompt-lookup speculation (`prompt_lookup`,
llmctl/speculative.py) replaces the one-token steps for a one-prompt batch and for a greedy batch (rows then
advance on their own, and the greedy batch prefills without padding): the same tokens, fewer forward passes.

Sampling is vectorised over the batch with per-row settings: repetition penalty (on prompt and completion
tokens, as in transformers), frequency / presence penalties (completion tokens, as in OpenAI / vLLM), then
temperature (0 = greedy), top-k, top-p, min-p, in transformers' order. A sampled row draws its uniforms from
its own torch.Generator seeded with `SamplingParams.seed`, so the same prompt and seed give the same tokens
whatever else is in the batch, as long as the batch computes the same logits: batch size and padding
change float rounding in the matmuls, which can flip a near-tie (fp32 on CPU: practically never).

Beam search (num_beams > 1) runs one prompt at a time, with transformers' algorithm and defaults
(early_stopping=False, length_penalty on the completion length); temperature, top-k/p and min-p are ignored,
stop strings only cut the final text.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from llmctl.fastdecode import FastDecode
from llmctl.model import KVCache
from llmctl.speculative import decode_rows, ngram_draft

FINISH_REASONS = ("stop", "length", "eos")


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and the completion
    frequency_penalty: float = 0.0  # subtracted from a logit once per occurrence in the completion
    presence_penalty: float = 0.0  # subtracted once if the token occurs in the completion
    num_beams: int = 1
    length_penalty: float = 1.0  # beam search: score = logprob / completion_length ** length_penalty
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one
    stop_token_ids: tuple[int, ...] = ()  # extra end-of-sequence tokens (e.g. <|im_end|> for chat)
    seed: int | None = None  # None: drawn from torch's global generator
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)

    def __post_init__(self):
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        checks = [
            ("max_new_tokens", isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 0, "an integer >= 0"),
            ("temperature", self.temperature >= 0, ">= 0"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("min_p", 0 <= self.min_p <= 1, "in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
            ("num_beams", isinstance(self.num_beams, int) and self.num_beams >= 1, "an integer >= 1"),
            ("stop", all(isinstance(s, str) and s for s in stop), "non-empty strings"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise ValueError(f"{name} must be {what}, got {getattr(self, name)!r}")

    def replace(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)


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


def sample(logits, u, temperature, top_k=None, top_p=None, min_p=None):
    """Draw one token per row from softmax(logits / temperature) truncated by top-k, then top-p, then min-p
    (each renormalised; the most likely token always survives), by inverting the CDF at the uniforms u [B].
    logits [B, V] fp32; temperature [B] > 0; top_k [B] long (0 = off); top_p [B] (1 = off); min_p [B] (0 = off);
    None = off for every row. The truncations become one probability threshold per row, found on the sorted
    probabilities (values only: no argsort), and the CDF is taken in vocabulary order, so a row's token depends
    only on its own logits and uniform. Ties at a threshold are all kept (as transformers' top-k does)."""
    B, V = logits.shape
    p = torch.softmax(logits / temperature[:, None], dim=-1)
    thr = None
    if top_k is not None or top_p is not None:
        ps = _sort_desc(p)  # [B, V]
        k = torch.full_like(u, V, dtype=torch.long) if top_k is None else torch.where(top_k > 0, top_k.clamp(max=V), V)
        thr = ps.gather(1, (k - 1)[:, None])[:, 0] if top_k is not None else torch.zeros_like(u)
        if top_p is not None:  # keep sorted position j while the mass before it is < top_p (of the top-k mass):
            cs = ps.cumsum(dim=-1)  # the mass before j is cs[j - 1], nondecreasing: a binary search per row
            mass = cs.gather(1, (k - 1)[:, None])
            keep = torch.searchsorted(cs, top_p[:, None] * mass)[:, 0].clamp_(max=V - 1) + 1
            keep = torch.minimum(keep, k)
            thr = torch.where(top_p < 1, torch.maximum(thr, ps.gather(1, (keep - 1)[:, None])[:, 0]), thr)
        if min_p is not None:
            thr = torch.maximum(thr, min_p * ps[:, 0])
    elif min_p is not None:
        thr = min_p * p.amax(dim=-1)
    if thr is not None:
        p = p * (p >= thr[:, None])  # (3x faster than masked_fill on CPU)
    cdf = p.cumsum(dim=-1)
    tok = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    return tok.clamp_(max=V - 1)


def _sort_desc(x: torch.Tensor) -> torch.Tensor:
    """Values of x [B, V] sorted descending along the last dim (numpy's SIMD sort on CPU: ~20x torch's)."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        return torch.from_numpy(np.sort(-x.numpy(), axis=-1)).neg_()
    return x.sort(dim=-1, descending=True).values


def argmax(x: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim of x [B, V] (numpy's on CPU: ~20x faster than torch's there)."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        return torch.from_numpy(np.argmax(x.numpy(), axis=-1))
    return x.argmax(dim=-1)


def _eos_ids(model, tokenizer) -> set[int]:
    ids = {getattr(tokenizer, "eos_id", None), model.config.eos_token_id}
    return {int(i) for i in ids if i is not None}


def _base(model):
    """The llmctl Transformer inside peft / torch.compile / DDP wrappers (LoRA layers stay active)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    while hasattr(model, "_orig_mod") or hasattr(model, "module"):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


class _Batch:
    """Per-row decoding state of a sampled batch; `keep(rows)` drops finished rows (cache included)."""

    def __init__(self, engine: "Engine", prompts, params, rows):
        m, dev = engine.model, engine.device
        self.rows = list(rows)  # indices into the caller's list
        self.params = [params[i] for i in rows]
        lens = [len(prompts[i]) for i in rows]
        B, L = len(rows), max(lens)
        self.limit = [min(p.max_new_tokens, engine.block_size - n) for p, n in zip(self.params, lens)]
        self.N = max(self.limit)
        self.padded = min(lens) != L
        pad = engine.pad_id
        idx = torch.full((B, L), pad, dtype=torch.long)
        self.mask = torch.ones(B, L + self.N, dtype=torch.bool)  # key mask: False on left padding
        for r, i in enumerate(rows):
            idx[r, L - lens[r] :] = torch.tensor(prompts[i], dtype=torch.long)
            self.mask[r, : L - lens[r]] = False
        self.idx, self.mask = idx.to(dev), self.mask.to(dev)
        self.lens = torch.tensor(lens, device=dev)  # position of each row's next token
        self.L = L
        fast = engine._fast()  # fp32 on CPU the native step (llmctl/native.py) beats the compiled one: it runs instead
        self.static = engine.compiled is not None and fast is not None and fast.native is None
        self.fast = fast  # the step's FastDecode (None: the model's forward)
        if self.static:  # few distinct shapes for torch.compile: the cache length in steps of 64
            self.cache = m.new_cache(B, min(engine.block_size, -(-(L + self.N) // 64) * 64))
            self.smask = torch.zeros(B, self.cache.max_len, dtype=torch.bool, device=dev)
            self.smask[:, :L] = self.mask[:, :L]  # prompt (minus padding); slots open as tokens are written
            self.slot = torch.zeros(1, dtype=torch.long, device=dev)
            if dev.type == "cuda":  # CUDA graphs may write the cache in place
                for buf in self.cache.k + self.cache.v:
                    torch._dynamo.mark_static_address(buf)
        else:  # slots, not positions: left padding can take a batch past block_size; + room for batched drafts
            n, c, w = L + self.N + (engine.prompt_lookup if B > 1 else 0), m.config, m.lm_head.weight
            self.cache = KVCache(c.n_layer, B, c.n_kv_head, n, c.head_dim, device=w.device, dtype=w.dtype)
        ps = self.params

        def col(name, used, dtype=torch.float32):  # a per-row setting [B], or None when no row uses it
            return torch.tensor([getattr(p, name) for p in ps], dtype=dtype, device=dev) if used else None

        self.greedy = torch.tensor([p.temperature == 0 for p in ps], device=dev)
        self.all_greedy, self.any_greedy = bool(self.greedy.all()), bool(self.greedy.any())
        self.temp = torch.where(self.greedy, 1.0, col("temperature", True))
        self.top_k = col("top_k", any(p.top_k for p in ps), torch.long)
        self.top_p = col("top_p", any(p.top_p < 1 for p in ps))
        self.min_p = col("min_p", any(p.min_p > 0 for p in ps))
        self.rep = col("repetition_penalty", any(p.repetition_penalty != 1 for p in ps))
        self.freq = col("frequency_penalty", any(p.frequency_penalty or p.presence_penalty for p in ps))
        self.pres = col("presence_penalty", self.freq is not None)
        V = m.config.vocab_size
        self.seen = self.counts = None
        if self.rep is not None:  # tokens of the prompt and the completion
            self.seen = torch.zeros(B, V, dtype=torch.bool, device=dev)
            for r, i in enumerate(rows):
                self.seen[r, torch.tensor(prompts[i], dtype=torch.long, device=dev)] = True
        if self.freq is not None:  # occurrences in the completion
            self.counts = torch.zeros(B, V, dtype=torch.float32, device=dev)
        self.u = None
        if not self.all_greedy:  # every uniform a row will use, drawn from its own generator
            self.u = torch.zeros(B, self.N, device=dev)
            for r, p in enumerate(self.params):
                if p.temperature > 0:
                    g = torch.Generator(device=dev).manual_seed(engine.seed_of(p))
                    u = torch.rand(p.max_new_tokens, generator=g, device=dev)[: self.N]
                    self.u[r, : u.numel()] = u
        eos = [sorted(engine.eos_ids | set(p.stop_token_ids)) if not p.ignore_eos else list(p.stop_token_ids)
               for p in self.params]  # fmt: skip
        self.eos = [set(e) for e in eos]
        self.stops = [p.stop for p in self.params]
        self.stop_tail = [max(map(len, s)) + 8 if s else 0 for s in self.stops]

    def keep(self, keep: list[int]) -> None:
        """Keep only the batch positions `keep` (ascending)."""
        ix = torch.tensor(keep, device=self.lens.device)
        c = self.cache
        for lst in (c.k, c.v):
            for i, buf in enumerate(lst):
                lst[i] = buf.index_select(0, ix)
        for name in ("mask", "lens", "greedy", "temp", "top_k", "top_p", "min_p", "rep", "freq", "pres", "seen",
                     "counts", "u"):  # fmt: skip
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, ix))
        for name in ("rows", "params", "limit", "eos", "stops", "stop_tail"):
            lst = getattr(self, name)
            setattr(self, name, [lst[i] for i in keep])

    def select(self, logits: torch.Tensor, t: int) -> torch.Tensor:
        """Next token per row [B] from the last logits [B, V] (fp32) at decode step t."""
        if self.rep is not None:
            r = self.rep[:, None]
            logits = torch.where(self.seen, torch.where(logits < 0, logits * r, logits / r), logits)
        if self.freq is not None:
            logits = logits - self.freq[:, None] * self.counts - self.pres[:, None] * (self.counts > 0)
        if self.all_greedy:
            return argmax(logits)
        tok = sample(logits, self.u[:, t], self.temp, self.top_k, self.top_p, self.min_p)
        return torch.where(self.greedy, argmax(logits), tok) if self.any_greedy else tok

    def select_draft(self, logits: torch.Tensor, t: int, draft: list[int]) -> list[int]:
        """One-row batch: the tokens at decode steps t, t+1, ... from the verify pass's logits [1 + d, V] (position j
        was computed after draft[:j]): what `select` picks at each position, as long as the previous pick equalled
        the draft token there; so the accepted draft tokens plus one more (llmctl/speculative.py). Observes them."""
        n = logits.size(0)
        if self.rep is None and self.freq is None:  # no state between positions: all picks at once
            if self.all_greedy:
                picks = argmax(logits).tolist()
            else:
                e = lambda x: None if x is None else x.expand(n)  # noqa: E731
                picks = sample(logits, self.u[0, t : t + n], e(self.temp), e(self.top_k), e(self.top_p),
                               e(self.min_p)).tolist()  # fmt: skip
            out = []
            for j, v in enumerate(picks):
                out.append(v)
                if j == n - 1 or v != draft[j]:
                    break
            return out
        out = []
        for j in range(n):
            tok = self.select(logits[j : j + 1], t + j)
            self.observe(tok)
            out.append(int(tok))
            if j == n - 1 or out[-1] != draft[j]:
                break
        return out

    def observe(self, tok: torch.Tensor) -> None:
        """Record the new tokens [B] for the penalties."""
        if self.seen is not None:
            self.seen.scatter_(1, tok[:, None], True)
        if self.counts is not None:
            self.counts.scatter_add_(1, tok[:, None], torch.ones_like(self.counts[:, :1]))


class Stream:
    """Iterator of text deltas for one prompt; `result` holds the Result once it is exhausted."""

    def __init__(self, gen):
        self._gen, self.result = gen, None

    def __iter__(self) -> Iterator[str]:
        self.result = (yield from self._gen)[0]


class Engine:
    """Batched generation with a KV cache for an llmctl Transformer (eval mode, any device / dtype)."""

    def __init__(self, model, tokenizer=None, *, eos_ids: Sequence[int] | None = None, fast: bool = True,
                 share_weights: bool = False, compile: bool | str = False, sync_every: int | None = None,
                 prompt_lookup: int = 8):  # fmt: skip
        """fast: decode with FastDecode (copies of the weights; share_weights: re-point the model's weights at
        them instead, for an inference-only model). compile: run its static-shape step through torch.compile
        (True: inductor, with CUDA graphs on a GPU; a string: that backend); sampled batches only, rows are then
        not dropped from a batch. eos_ids: default the tokenizer's and the config's EOS.
        prompt_lookup: speculative decoding of one-prompt batches (a single PROMPT, `stream`, batch_size 1) with
        drafts of up to this many tokens found by n-gram lookup in the prompt and the text so far, checked in one
        forward pass (llmctl/speculative.py): the same tokens as without it, faster when the text repeats
        itself (code, quoting, extraction, a looping model). Greedy batches (no penalties, FastDecode) speculate
        row by row with drafts of up to min(this, 3) tokens (speculative.decode_rows). 0 = off. Counts in
        `stats`."""
        if not (isinstance(prompt_lookup, int) and prompt_lookup >= 0):
            raise ValueError(f"prompt_lookup must be an integer >= 0, got {prompt_lookup!r}")
        self.prompt_lookup = prompt_lookup
        self.stats = {"lookup_steps": 0, "drafted": 0, "accepted": 0}  # speculative decoding, since creation
        self.model = _base(model)
        self.fast = FastDecode(self.model, share_weights) if fast and FastDecode.supported(self.model) else None
        self.compiled = None
        if compile and self.fast is not None:
            backend = compile if isinstance(compile, str) else "inductor"
            cuda = self.model.lm_head.weight.is_cuda
            mode = "reduce-overhead" if backend == "inductor" and cuda else None
            # CPU: a C++ wrapper around the kernels instead of a Python one (+~10% tokens/s at batch 1)
            opts = {"cpp_wrapper": True} if backend == "inductor" and not cuda else None
            self.compiled = torch.compile(self.fast.static_step, backend=backend, mode=mode, fullgraph=True,
                                          dynamic=False, options=opts)  # fmt: skip
        self.tokenizer = tokenizer
        cfg = self.model.config
        self.block_size = cfg.block_size
        self.device = self.model.lm_head.weight.device
        self.eos_ids = set(eos_ids) if eos_ids is not None else _eos_ids(self.model, tokenizer)
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
            out[i] = self._beam_search(list(prompts[i]), params[i])
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
                    r = self._beam_search(list(prompt), params)
                    yield r.text
                    return [r]
                return (yield from self._decode([prompt], [params], [0], stream=True))

        return Stream(run())

    # ------------------------------------------------------------------------------------------ internals

    def _params(self, prompts, params) -> list[SamplingParams]:
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        for ids in prompts:
            if len(ids) == 0:
                raise ValueError("a prompt needs at least one token (e.g. BOS)")
            if len(ids) >= self.block_size:
                raise ValueError(f"a prompt of {len(ids)} tokens leaves no room in the context of "
                                 f"{self.block_size} tokens (see Engine.fit_prompt)")  # fmt: skip
        return list(params)

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

    def _fast(self):
        """The FastDecode to use now (None: the model's forward), its weights up to date."""
        if self.fast is None or self.model.training:
            return None
        self.fast.refresh()
        return self.fast

    def _forward(self, b: _Batch, x: torch.Tensor, t: int) -> torch.Tensor:
        """Decode step t: the tokens x [B] at positions lens + t -> logits [B, V] (fp32)."""
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

    def _decode(self, prompts, params, rows, stream: bool = False):
        """Generator: decode prompts[rows] as one batch; yields text deltas of row 0 when `stream`, returns Results."""
        b = _Batch(self, prompts, params, rows)
        gen: list[list[int]] = [[] for _ in rows]  # per batch position
        reason: list[str | None] = ["length" if n == 0 else None for n in b.limit]
        results = {b.rows[r]: self._result(prompts[b.rows[r]], [], "length", ())
                   for r, n in enumerate(b.limit) if n == 0}  # fmt: skip
        if b.N == 0:
            return [results[i] for i in rows]
        m = self.model
        lookup_rows = (len(rows) > 1 and self.prompt_lookup and b.all_greedy and not b.static and b.fast is not None
                       and b.rep is None and b.freq is None)  # fmt: skip
        if lookup_rows:  # greedy batch: prefill without padding, then speculate row by row (llmctl/speculative.py)
            return decode_rows(self, b, prompts, rows)
        pos = None  # left padding: positions count from each row's first real token
        if b.padded:
            pos = (torch.arange(b.L, device=self.device)[None, :] - (b.L - b.lens)[:, None]).clamp_(min=0)
        h = m(b.idx, position_ids=pos, cache=b.cache, attn_mask=b.mask[:, : b.L] if b.padded else None,
              return_hidden=True)[:, -1]  # fmt: skip
        logits = m.lm_head(h).float()  # [B, V]: the prompt's last position only
        if len(b.rows) == 1 and self.prompt_lookup and not b.static:
            return (yield from self._decode_lookup(b, prompts[b.rows[0]], logits, stream))
        pending: list[torch.Tensor] = []
        need_host = stream or any(b.stops)
        streamed = ""
        for t in range(b.N):
            tok = b.select(logits, t)
            pending.append(tok)
            b.observe(tok)
            if need_host or len(pending) >= self.sync_every or t == b.N - 1:  # the host looks at the new tokens
                new = torch.stack(pending, 1).tolist() if len(pending) > 1 else [[v] for v in tok.tolist()]
                pending = []
                for r, toks in enumerate(new):
                    g = gen[r]
                    for v in toks:
                        if reason[r] is not None:
                            break
                        g.append(v)
                        if v in b.eos[r]:
                            reason[r] = "eos"
                        elif b.stops[r] and self._hit_stop(g, b.stops[r], b.stop_tail[r]):
                            reason[r] = "stop"
                        elif len(g) >= b.limit[r]:
                            reason[r] = "length"
                        if reason[r] is not None:
                            results[b.rows[r]] = self._result(prompts[b.rows[r]], g, reason[r], b.stops[r])
                if stream:
                    if reason[0] is None:
                        text = self._stream_text(prompts[b.rows[0]], gen[0], b.stops[0])
                    else:
                        text = results[b.rows[0]].text
                    if len(text) > len(streamed) and text.startswith(streamed):
                        yield text[len(streamed) :]
                        streamed = text
                alive = [r for r in range(len(reason)) if reason[r] is None]
                if not alive:
                    break
                if len(alive) <= len(reason) // 2 and not b.static:  # compact the batch: drop the finished rows
                    tok = tok.index_select(0, torch.tensor(alive, device=tok.device))
                    b.keep(alive)
                    gen, reason = [gen[r] for r in alive], [None] * len(alive)
            if t == b.N - 1:
                break
            logits = self._forward(b, tok, t)
        return [results[i] for i in rows]

    def _decode_lookup(self, b: _Batch, prompt, logits: torch.Tensor, stream: bool):
        """_decode of a one-row batch with prompt-lookup speculation (llmctl/speculative.py): each step either
        verifies [last token, draft...] in one forward pass and keeps the accepted draft tokens plus one, or, when
        the lookup finds nothing, runs the plain one-token step. The draft length adapts: +2 after a fully
        accepted draft, -1 otherwise."""
        m, cache, st = self.model, b.cache, self.stats
        limit, eos, stops, tail = b.limit[0], b.eos[0], b.stops[0], b.stop_tail[0]
        seq = np.empty(len(prompt) + limit, dtype=np.int64)  # prompt and completion, for the lookup
        seq[: len(prompt)] = prompt
        n = len(prompt)
        gen: list[int] = []
        reason, streamed, k = None, "", min(4, self.prompt_lookup)
        tok = b.select(logits, 0)
        b.observe(tok)
        toks = tok.tolist()
        while True:
            for v in toks:
                gen.append(v)
                seq[n] = v
                n += 1
                if v in eos:
                    reason = "eos"
                elif stops and self._hit_stop(gen, stops, tail):
                    reason = "stop"
                elif len(gen) >= limit:
                    reason = "length"
                if reason is not None:
                    break
            if stream:
                text = self._stream_text(prompt, gen, stops) if reason is None else self._result(prompt, gen, reason,
                                                                                                 stops).text  # fmt: skip
                if len(text) > len(streamed) and text.startswith(streamed):
                    yield text[len(streamed) :]
                    streamed = text
            if reason is not None:
                return [self._result(prompt, gen, reason, stops)]
            g = len(gen)  # gen[-1] goes to position n - 1 of the cache; the next pick is decode step g
            draft = ngram_draft(seq[:n], min(k, limit - g - 1))
            if not draft:
                tok = b.select(self._forward(b, torch.tensor([gen[-1]], device=self.device), g - 1), g)
                b.observe(tok)
                toks = tok.tolist()
                continue
            P = cache.pos
            idx = torch.tensor([gen[-1], *draft], device=self.device)
            if b.fast is not None:  # logits [1 + d, V]; writes the cache at P .. P + d
                logits = b.fast.verify(idx, cache)
            else:
                logits = m.lm_head(m(idx[None], cache=cache, return_hidden=True)[0]).float()
            toks = b.select_draft(logits, g, draft)
            cache.pos = P + len(toks)  # the last token and the accepted draft; the slots after are stale
            st["lookup_steps"] += 1
            st["drafted"] += len(draft)
            st["accepted"] += len(toks) - 1
            k = min(k + 2, self.prompt_lookup) if len(toks) > len(draft) else max(1, k - 1)

    def _hit_stop(self, gen, stops, tail) -> bool:
        text = self.tokenizer.decode(gen[-tail:], skip_special_tokens=True)
        return any(s in text for s in stops)

    def _result(self, prompt, gen, reason, stops) -> Result:
        text = self._text(prompt, gen)
        if reason == "eos":
            text = self._text(prompt, gen[:-1])
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

    # ------------------------------------------------------------------------------------------ beam search

    def _beam_search(self, prompt: list[int], p: SamplingParams) -> Result:
        """transformers' beam search for one prompt (early_stopping=False): 2n candidates per step, the best n
        unfinished continue, finished ones (EOS or max length) are scored logprob / length ** length_penalty."""
        n, m, L = p.num_beams, self.model, len(prompt)
        N = min(p.max_new_tokens, self.block_size - L)
        eos = (set() if p.ignore_eos else self.eos_ids) | set(p.stop_token_ids)
        cache, fast = m.new_cache(n, L + N), self._fast()
        x = torch.tensor([prompt], device=self.device).expand(n, L)
        logits = m.lm_head(m(x, cache=cache, return_hidden=True)[:, -1]).float()  # [n, V]
        V = logits.size(-1)
        seqs: list[list[int]] = [[] for _ in range(n)]
        scores = torch.full((n,), -1e9, device=self.device)
        scores[0] = 0.0  # identical beams at the start: only the first one counts
        seen = None
        if p.repetition_penalty != 1:
            seen = torch.zeros(n, V, dtype=torch.bool, device=self.device)
            seen[:, torch.tensor(prompt, device=self.device)] = True
        finished: list[tuple[float, list[int]]] = []  # (normalised score, tokens), best first, at most n
        for t in range(N):
            logp = F.log_softmax(logits, dim=-1)
            if seen is not None:
                rp = p.repetition_penalty
                logp = torch.where(seen, torch.where(logp < 0, logp * rp, logp / rp), logp)
            cand = (logp + scores[:, None]).view(-1)
            top_v, top_i = cand.topk(2 * n)
            top_v, top_i = top_v.tolist(), top_i.tolist()
            last = t + 1 >= N
            run_beams, run_toks, run_scores = [], [], []
            new_fin = []
            for j, (v, ci) in enumerate(zip(top_v, top_i)):
                beam, tok = divmod(ci, V)
                hits = last or tok in eos
                if hits:
                    if j < n:
                        new_fin.append((v / (t + 1) ** p.length_penalty, seqs[beam] + [tok]))
                elif len(run_beams) < n:
                    run_beams.append(beam)
                    run_toks.append(tok)
                    run_scores.append(v)
            finished = sorted(finished + new_fin, key=lambda f: -f[0])[:n]
            if last or not run_beams:
                break
            while len(run_beams) < n:  # fewer than n unfinished candidates: pad with dead beams
                run_beams.append(run_beams[0])
                run_toks.append(run_toks[0])
                run_scores.append(-1e9)
            seqs = [seqs[bm] + [tk] for bm, tk in zip(run_beams, run_toks)]
            scores = torch.tensor(run_scores, device=self.device)
            idx = torch.tensor(run_beams, device=self.device)
            cache.reorder(idx)
            tok_t = torch.tensor(run_toks, device=self.device)
            if seen is not None:
                seen = seen.index_select(0, idx)
                seen.scatter_(1, tok_t[:, None], True)
            # transformers' heuristic (early_stopping=False): stop once the best running beam, normalised at
            # the current length, cannot beat the worst finished hypothesis
            if len(finished) == n and run_scores[0] / (t + 1) ** p.length_penalty <= finished[-1][0]:
                break
            logits = fast(tok_t, cache) if fast is not None else m(tok_t[:, None], cache=cache)[:, -1]
        score, best = finished[0] if finished else (0.0, [])  # max_new_tokens 0
        reason = "eos" if best and best[-1] in eos else "length"
        r = self._result(prompt, best, reason, p.stop)
        r.score = score
        return r


def _drain(gen):
    """Run a generator to the end and return its return value."""
    while True:
        try:
            next(gen)
        except StopIteration as e:
            return e.value
