"""Prompt-lookup drafts for speculative decoding (the engine's `prompt_lookup`, on by default).

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
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


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
