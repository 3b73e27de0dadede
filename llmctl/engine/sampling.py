"""Picking tokens: SamplingParams, the vectorised sampler, penalties, and a batch's sampling state.

Sampling is vectorised over the batch with per-row settings: repetition penalty (on prompt and completion tokens, as
in transformers), frequency / presence penalties (completion tokens, as in OpenAI / vLLM), then temperature (0 =
greedy), top-k, top-p, min-p, in transformers' order. A sampled row draws its uniforms from its own
torch.Generator seeded with `SamplingParams.seed` (decode step t uses uniform t), so the same prompt and seed give
the same tokens whatever else is in the batch, as long as the batch computes the same logits: batch size and padding
change float rounding in the matmuls, which can flip a near-tie (fp32 on CPU: practically never).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch


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
        p = p * (p >= thr[:, None])  # (faster than masked_fill on CPU)
    cdf = p.cumsum(dim=-1)
    tok = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    return tok.clamp_(max=V - 1)


def _sort_desc(x: torch.Tensor) -> torch.Tensor:
    """Values of x [B, V] sorted descending along the last dim (numpy's SIMD sort on CPU, faster than torch's)."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        return torch.from_numpy(np.sort(-x.numpy(), axis=-1)).neg_()
    return x.sort(dim=-1, descending=True).values


def argmax(x: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim of x [B, V] (numpy's on CPU, faster than torch's there)."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        return torch.from_numpy(np.argmax(x.numpy(), axis=-1))
    return x.argmax(dim=-1)


def repetition_penalty(logits, seen, rep):
    """transformers' repetition penalty: logits of the tokens `seen` [B, V] divided by rep [B, 1] (multiplied where
    negative)."""
    return torch.where(seen, torch.where(logits < 0, logits * rep, logits / rep), logits)


class Sampler:
    """The sampling half of a batch's per-row state: each row's settings as [B] tensors (None: no row uses the
    setting), the uniforms its seeded generator gives decode steps 0..N-1, and what the penalties count (tokens
    seen in the prompt and the completion, occurrences in the completion). `keep(ix)` keeps rows ix."""

    def __init__(self, params: list[SamplingParams], prompts: list, N: int, V: int, device, seed_of):
        ps, dev, B = params, device, len(params)

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
        self.penalised = self.rep is not None or self.freq is not None
        self.seen = self.counts = None
        if self.rep is not None:  # tokens of the prompt and the completion
            self.seen = torch.zeros(B, V, dtype=torch.bool, device=dev)
            for r, prompt in enumerate(prompts):
                self.seen[r, torch.tensor(prompt, dtype=torch.long, device=dev)] = True
        if self.freq is not None:  # occurrences in the completion
            self.counts = torch.zeros(B, V, dtype=torch.float32, device=dev)
        self.u = None
        if not self.all_greedy:  # every uniform a row will use, drawn from its own generator
            self.u = torch.zeros(B, N, device=dev)
            for r, p in enumerate(ps):
                if p.temperature > 0:
                    g = torch.Generator(device=dev).manual_seed(seed_of(p))
                    u = torch.rand(p.max_new_tokens, generator=g, device=dev)[:N]
                    self.u[r, : u.numel()] = u

    def keep(self, ix: torch.Tensor) -> None:
        for name in _COLUMNS:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, ix))

    @classmethod
    def stack(cls, rows: list[tuple["Sampler", int, int]]) -> "Sampler":
        """The sampling state of rows taken from other batches' samplers: (sampler, row, its next decode step). In
        the new sampler each row's next decode step is 1 (continuous batching: rows that joined at different times
        decode in lockstep); a setting some rows lack gets its "off" value there."""
        new = cls.__new__(cls)
        for name in _COLUMNS:
            parts = [getattr(s, name) for s, _, _ in rows]
            if all(t is None for t in parts):
                setattr(new, name, None)
                continue
            like = next(t for t in parts if t is not None)
            if name == "u":  # uniforms from each row's next step on, at steps 1, 2, ...
                width = 1 + max(t.size(1) - g if t is not None else 0 for t, (_, _, g) in zip(parts, rows))
                col = like.new_zeros(len(rows), max(width, 1))
                for i, (t, (_, r, g)) in enumerate(zip(parts, rows)):
                    if t is not None and t.size(1) > g:
                        col[i, 1 : 1 + t.size(1) - g] = t[r, g:]
            else:
                off = _OFF.get(name, 0)
                col = torch.stack([t[r] if t is not None else torch.full_like(like[0], off)
                                   for t, (_, r, _) in zip(parts, rows)])  # fmt: skip
            setattr(new, name, col)
        new.all_greedy, new.any_greedy = bool(new.greedy.all()), bool(new.greedy.any())
        new.penalised = new.rep is not None or new.freq is not None
        return new

    def select(self, logits: torch.Tensor, t: int) -> torch.Tensor:
        """Next token per row [B] from the last logits [B, V] (fp32) at decode step t."""
        if self.rep is not None:
            logits = repetition_penalty(logits, self.seen, self.rep[:, None])
        if self.freq is not None:
            logits = logits - self.freq[:, None] * self.counts - self.pres[:, None] * (self.counts > 0)
        if self.all_greedy:
            return argmax(logits)
        tok = sample(logits, self.u[:, t], self.temp, self.top_k, self.top_p, self.min_p)
        return torch.where(self.greedy, argmax(logits), tok) if self.any_greedy else tok

    def select_run(self, logits: torch.Tensor, t: int, draft: list[int]) -> list[int]:
        """One-row batch: the tokens at decode steps t, t+1, ... from a verify pass's logits [1 + d, V] (position j
        was computed after draft[:j]): what `select` picks at each position, as long as the previous pick equalled
        the draft token there; so the accepted draft tokens plus one more. Observes them."""
        n = logits.size(0)
        if not self.penalised:  # no state between positions: all picks at once
            if self.all_greedy:
                return accepted(argmax(logits).tolist(), draft)
            e = lambda x: None if x is None else x.expand(n)  # noqa: E731
            return accepted(sample(logits, self.u[0, t : t + n], e(self.temp), e(self.top_k), e(self.top_p),
                                   e(self.min_p)).tolist(), draft)  # fmt: skip
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


_COLUMNS = ("greedy", "temp", "top_k", "top_p", "min_p", "rep", "freq", "pres", "seen", "counts", "u")
_OFF = {"top_p": 1.0, "rep": 1.0, "temp": 1.0}  # a setting's "off" value where it is not 0 / False


def accepted(picks: list[int], draft: list[int]) -> list[int]:
    """The picks at a run's positions [last token, *draft] -> the draft tokens the picks confirm, plus the pick after
    them (the first pick that differs from the draft, or the pick after its last token)."""
    for j, v in enumerate(picks):
        if j == len(draft) or v != draft[j]:
            return picks[: j + 1]
    return picks
