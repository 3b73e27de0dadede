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

A greedy batch speculates row by row (`decode_rows`): there the forward pass is mostly compute-bound (every
verified token costs a row of each matmul, accepted or not), so the gain comes from the per-pass costs -- op
dispatch, reading the weights and each row's KV cache once per pass -- and needs drafts that mostly hit; drafts
stay short (BATCH_DRAFT). On the benchmarks' randomly initialised models, which fall into loops, acceptance is
high (75-90%); real text accepts less, so the batched gain there is smaller (a pass with no drafts costs about
what a plain step does).
"""

from __future__ import annotations

import numpy as np

# Longest draft per row in a batch. A batch's projections are compute-bound (tokens cost alike, drafted or not) and
# its attention pads every row's run to the longest one, so short drafts pay best: measured on the benchmark's
# llama-6m / gpt2-124m at 32 rows (greedy), 2-3 beat 4 and 8.
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


def decode_rows(engine, b, prompts, rows):
    """Greedy decoding of the batch b of prompts[rows] with prompt-lookup speculation (no penalties; the FastDecode
    path). The prefill runs the prompts without padding (FastDecode.verify_rows). Then each pass, every unfinished
    row drafts up to its own k <= BATCH_DRAFT tokens by `ngram_draft` (k adapts per row as in the one-row case),
    one forward pass verifies every row's [last token, draft...] (verify_rows again: projections over the tokens
    themselves, attention over runs padded to the longest), and each row keeps its accepted draft tokens plus one
    pick. Rows advance on their own: a row's g-th token goes to cache slot L + g - 1 at position prompt length +
    g - 1 -- the slots and positions of plain decoding -- and the slots past its accepted tokens are masked out,
    then overwritten by its next pass. A pass where no row drafts is a plain decode step. Greedy batches only:
    sampled rows rarely accept drafts from near-flat distributions, and the verify pass's differently shaped
    matmuls round differently, which can change a sampled token (the same distribution, not the same text).
    -> Results in the order of rows."""
    import torch  # the engine's dependency (this module's drafting needs numpy only)

    from llmctl.engine import argmax

    dev, st, K = engine.device, engine.stats, min(engine.prompt_lookup, BATCH_DRAFT)
    B, L = len(b.rows), b.L
    extra = b.cache.max_len - b.mask.size(1)
    b.mask = torch.cat([b.mask, torch.ones(B, extra, dtype=torch.bool, device=dev)], 1)  # room for drafts
    rows = list(rows)
    lens = [len(prompts[i]) for i in rows]
    x = torch.tensor([t for i in rows for t in prompts[i]], device=dev)  # the prefill: prompts without padding
    rr = torch.tensor([r for r, n in enumerate(lens) for _ in range(n)], device=dev)
    j = torch.tensor([i for n in lens for i in range(n)], device=dev)
    last = torch.tensor(np.cumsum(lens) - 1, device=dev)
    logits = b.fast.verify_rows(x, b.cache, rr, j, L - b.lens, torch.zeros_like(b.lens), b.mask, L, last)
    results = {}
    gen = [[] for _ in range(B)]  # per batch position
    done = [n == 0 for n in b.limit]
    for r in range(B):
        if done[r]:
            results[b.rows[r]] = engine._result(prompts[b.rows[r]], [], "length", ())
    seqs = [np.array(list(prompts[i]) + [0] * b.limit[r], dtype=np.int64) for r, i in enumerate(b.rows)]
    ks = [min(4, K)] * B  # each row's draft length: +2 after a fully accepted draft, -1 after a miss
    # a row whose 1-token drafts miss stops drafting for a while (4 passes, doubling while it keeps missing): in a
    # compute-bound batch a rejected draft token costs as much as a plain step's
    idle, backoff = [0] * B, [4] * B
    picks = [[int(v)] for v in b.select(logits, 0).tolist()]  # the first token of every row
    drafts = [[] for _ in range(B)]  # what each row drafted for the pass just run
    while True:
        for r in range(B):  # the host takes each row's new tokens
            if done[r]:
                continue
            d, out = drafts[r], []
            for j, v in enumerate(picks[r][: len(d) + 1]):
                out.append(v)
                if j == len(d) or v != d[j]:
                    break
            if d:
                st["drafted"] += len(d)
                st["accepted"] += len(out) - 1
                if len(out) > len(d):
                    ks[r], backoff[r] = min(ks[r] + 2, K), 4
                elif ks[r] > 1 or len(out) > 1:
                    ks[r] = max(1, ks[r] - 1)
                else:
                    idle[r], backoff[r] = backoff[r], min(2 * backoff[r], 64)
            g, reason = gen[r], None
            for v in out:
                g.append(v)
                seqs[r][lens[r] + len(g) - 1] = v
                if v in b.eos[r]:
                    reason = "eos"
                elif b.stops[r] and engine._hit_stop(g, b.stops[r], b.stop_tail[r]):
                    reason = "stop"
                elif len(g) >= b.limit[r]:
                    reason = "length"
                if reason is not None:
                    done[r] = True
                    results[b.rows[r]] = engine._result(prompts[b.rows[r]], g, reason, b.stops[r])
                    break
        alive = [r for r in range(B) if not done[r]]
        if not alive:
            return [results[i] for i in rows]
        if len(alive) <= B // 2:  # compact the batch: drop the finished rows
            b.keep(alive)
            gen, seqs, lens, ks, idle, backoff = ([x[r] for r in alive] for x in (gen, seqs, lens, ks, idle, backoff))
            done, B = [False] * len(alive), len(alive)
        runs, rr, js, drafts = [], [], [], [[] for _ in range(B)]  # each unfinished row's [last token, draft...]
        for r in range(B):
            if not done[r]:
                g = len(gen[r])
                if idle[r]:
                    idle[r] -= 1
                else:
                    drafts[r] = ngram_draft(seqs[r][: lens[r] + g], min(ks[r], b.limit[r] - g - 1))
                run = [gen[r][-1], *drafts[r]]
                runs += run
                rr += [r] * len(run)
                js += range(len(run))
        T = 1 + max(map(len, drafts))
        if T > 1:
            st["lookup_steps"] += 1
        x, rr, j = (torch.tensor(a, device=dev) for a in (runs, rr, js))
        G = torch.tensor([max(len(g), 1) for g in gen], device=dev)  # tokens so far; the last one goes in now
        logits = b.fast.verify_rows(x, b.cache, rr, j, L - 1 + G, b.lens - 1 + G, b.mask, T)  # [M, V]
        p, picks, o = argmax(logits).tolist(), [[] for _ in range(B)], 0
        for r in range(B):
            if not done[r]:
                picks[r] = p[o : o + 1 + len(drafts[r])]
                o += len(picks[r])
