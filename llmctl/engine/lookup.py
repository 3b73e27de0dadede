"""Prompt lookup: the engine's draft policy for speculative decoding (`Engine(prompt_lookup=k)`, on by default).

Decoding one sequence on a CPU (or any memory-bound device) costs about the same for 1 or 8 tokens per forward
pass: the time goes into reading the weights. So the engine guesses the next few tokens by n-gram lookup -- the
continuation of the most recent earlier occurrence of the sequence's last 3 (else 2, else 1) tokens, in the prompt
or in the text generated so far (transformers' `prompt_lookup_num_tokens`, vLLM's "ngram" speculator) -- and
checks the guesses in one forward pass over [last token, draft...]:

- each position's token is picked exactly as plain decoding would pick it: the same (penalised) logits, the same
  sampler, the same per-row uniform (decode step t uses uniform t of the row's seeded generator);
- draft tokens are kept while they equal those picks; the first pick that differs (or the pick after the last
  draft token) is kept as well, and the cache slots past it are overwritten later.

So the tokens are those of plain decoding (greedy: the argmax tokens; same seed -> same text, with or without
speculation), up to float rounding of a multi-row matmul against a one-row one. For sampling this is the standard
speculative-sampling rule for a point-mass draft q = delta(d): accepting d with probability min(1, p(d) / q(d)) =
p(d) and otherwise drawing from norm(max(p - q, 0)) = p without d is the same law as drawing x ~ p and keeping d
iff x == d -- the distribution of the text is exactly p's.

A greedy batch speculates row by row, its rows advancing on their own: there the forward pass is mostly
compute-bound (every verified token costs a row of each matmul, accepted or not), so the gain comes from the
per-pass costs -- op dispatch, reading the weights and each row's KV cache once per pass -- and needs drafts that
mostly hit: drafts stay short (BATCH_DRAFT), and a row whose one-token drafts keep missing stops drafting for a while.
"""

from __future__ import annotations

import numpy as np

# Longest draft per row in a batch. A batch's projections are compute-bound (tokens cost alike, drafted or not) and
# its attention pads every row's run to the longest one, so short drafts pay best (benchmarks/generate_vs_hf.py).
BATCH_DRAFT = 3


def ngram_draft(seq: np.ndarray, k: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Up to k draft tokens continuing seq (1-D int array): find the most recent earlier occurrence of seq's last
    n tokens (n = max_ngram down to min_ngram) and copy what followed it. The copy may run into the draft itself
    (a repeating cycle continues), so a hit always gives k tokens. [] when nothing matches."""
    n = seq.shape[0]
    if k <= 0 or n < 2:
        return []
    hits = np.flatnonzero(seq[: n - 1] == seq[n - 1])  # earlier occurrences of the last token
    if hits.size == 0:
        return []
    best, ok = hits[-1:] if min_ngram <= 1 else hits[:0], hits
    for j in range(1, min(max_ngram, n - 1)):  # occurrences that also match the j tokens before
        ok = ok[ok >= j]
        ok = ok[seq[ok - j] == seq[n - 1 - j]]
        if ok.size == 0:
            break
        if j + 1 >= min_ngram:
            best = ok[-1:]
    if best.size == 0:
        return []
    start = int(best[0]) + 1  # the continuation of the most recent longest match (< n)
    src = seq[start:n]
    return src[:k].tolist() if src.size >= k else np.resize(src, k).tolist()  # a cycle: seq[start + j], extended


class Lookup:
    """The draft policy: each pass, every live row of a batch `b` (the engine's per-row state) drafts up to its own
    k tokens by `ngram_draft` over its prompt and tokens so far; k starts at min(4, K), grows by 2 after a fully
    accepted draft and shrinks by 1 otherwise. With `backoff` (batches), a row whose one-token draft misses stops
    drafting for 4 passes, doubling (to 64) while it keeps missing: in a compute-bound batch a rejected draft token
    costs as much as a plain step's. Counts into `stats` (lookup_steps, drafted, accepted). Rows are known by their
    index in the caller's list (b.rows), so dropping finished rows from the batch needs nothing here."""

    def __init__(self, b, K: int, backoff: bool, stats: dict):
        self.K, self.backoff, self.stats = K, backoff, stats
        self.k = {i: min(4, K) for i in b.rows}
        self.idle = {i: 0 for i in b.rows}
        self.wait = {i: 4 for i in b.rows}  # the next idle spell
        self.seq = {i: np.array(list(p) + [0] * n, dtype=np.int64) for i, p, n in zip(b.rows, b.prompts, b.limit)}
        self.have = {i: 0 for i in b.rows}  # the row's tokens in seq so far

    def propose(self, b) -> list[list[int] | None]:
        """Each row's draft for the next pass ([]: none, None: the row has finished)."""
        drafts: list[list[int] | None] = []
        for i, prompt, toks, limit, done in zip(b.rows, b.prompts, b.tokens, b.limit, b.reason):
            if done is not None:
                drafts.append(None)
                continue
            n, g, have, seq = len(prompt), len(toks), self.have[i], self.seq[i]
            seq[n + have : n + g] = toks[have:]
            self.have[i] = g
            if self.idle[i]:
                self.idle[i] -= 1
                drafts.append([])
            else:
                drafts.append(ngram_draft(seq[: n + g], min(self.k[i], limit - g - 1)))
        if any(drafts):
            self.stats["lookup_steps"] += 1
        return drafts

    def update(self, i: int, draft: list[int], out: list[int]) -> None:
        """Row i's draft gave `out` (its accepted tokens plus one): adapt its k."""
        if not draft:
            return
        self.stats["drafted"] += len(draft)
        self.stats["accepted"] += len(out) - 1
        if len(out) > len(draft):
            self.k[i], self.wait[i] = min(self.k[i] + 2, self.K), 4
        elif self.k[i] > 1 or len(out) > 1 or not self.backoff:
            self.k[i] = max(1, self.k[i] - 1)
        else:
            self.idle[i], self.wait[i] = self.wait[i], min(2 * self.wait[i], 64)
