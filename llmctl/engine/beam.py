"""Beam search (num_beams > 1), one prompt at a time, with transformers' algorithm and defaults (early_stopping=False,
length_penalty on the completion length); temperature, top-k/p and min-p are ignored, stop strings only cut the
final text. Its own loop: beams are reordered every step, which the engine's per-row decode loop does not do."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmctl.engine.sampling import SamplingParams, repetition_penalty


def beam_search(engine, prompt: list[int], p: SamplingParams):
    """transformers' beam search for one prompt (early_stopping=False): 2n candidates per step, the best n
    unfinished continue, finished ones (EOS or max length) are scored logprob / length ** length_penalty.
    -> the engine's Result for the best finished hypothesis, its score set."""
    n, m, L, dev = p.num_beams, engine.model, len(prompt), engine.device
    N = min(p.max_new_tokens, engine.block_size - L)
    eos = (set() if p.ignore_eos else engine.eos_ids) | set(p.stop_token_ids)
    cache, fast = m.new_cache(n, L + N), engine._fast()
    x = torch.tensor([prompt], device=dev).expand(n, L)
    logits = m.lm_head(m(x, cache=cache, return_hidden=True)[:, -1]).float()  # [n, V]
    V = logits.size(-1)
    seqs: list[list[int]] = [[] for _ in range(n)]
    scores = torch.full((n,), -1e9, device=dev)
    scores[0] = 0.0  # identical beams at the start: only the first one counts
    seen = None
    if p.repetition_penalty != 1:
        seen = torch.zeros(n, V, dtype=torch.bool, device=dev)
        seen[:, torch.tensor(prompt, device=dev)] = True
    finished: list[tuple[float, list[int]]] = []  # (normalised score, tokens), best first, at most n
    for t in range(N):
        logp = F.log_softmax(logits, dim=-1)
        if seen is not None:
            logp = repetition_penalty(logp, seen, p.repetition_penalty)
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
        scores = torch.tensor(run_scores, device=dev)
        idx = torch.tensor(run_beams, device=dev)
        cache.reorder(idx)
        tok_t = torch.tensor(run_toks, device=dev)
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
    r = engine._result(prompt, best, reason, p.stop)
    r.score = score
    return r
