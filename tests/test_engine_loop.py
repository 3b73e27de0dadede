"""The engine's decode loop on stand-in models whose logits are a fixed function of the context (no weights, no
training): plain and prompt-lookup decoding follow the function exactly, rows stop on their own (EOS, stop tokens,
stop strings, max_new_tokens, the context's end), drafts are accepted and rejected as the picks say, the cache is
rewound past rejected drafts, and beam search finds what exhaustive search finds. Milliseconds each; the parity
tests against transformers and the KV-cache tests on real tiny models are in test_engine.py."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llmctl.engine import Engine, SamplingParams
from llmctl.engine.lookup import Lookup, ngram_draft
from llmctl.engine.sampling import accepted
from llmctl.model import KVCache

V = 16


def rule(prev: int, tok: int, pos: int) -> int:
    """The next token after `tok` at position `pos`, `prev` the token before it (-1: none): a cycle through
    1..9 that the previous token's parity bends, and a jump every 11th position -- repetitive enough for prompt
    lookup to draft, irregular enough for drafts to miss."""
    if pos % 11 == 10:
        return (tok * 7 + 3) % V
    return tok % 9 + 1 + (prev >= 0 and prev % 2 == 1 and tok % 4 == 0)


class StandIn(torch.nn.Module):
    """The Transformer's interface (forward with a KV cache, position ids and a key mask; lm_head; new_cache),
    its logits a function of each token, the token before it and its position: 3.0 on rule(prev, tok, pos) (or
    on table[tok] when a table [V, V] of logits is given), 0 elsewhere. The tokens go into the cache, and `prev`
    is read back from it (unless masked out: left padding), so a cache position left past a rejected draft token
    changes the logits."""

    def __init__(self, block_size=64, table=None, eos=None):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=V, block_size=block_size, eos_token_id=eos, pad_token_id=0,
                                      n_layer=1, n_kv_head=1, head_dim=1)  # fmt: skip
        self.lm_head = torch.nn.Identity()
        self.lm_head.weight = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # device and dtype
        self.table = table
        self.calls = 0  # forward passes

    def new_cache(self, batch_size, max_len=None):
        return KVCache(1, batch_size, 1, max_len or self.config.block_size, 1)

    def forward(self, idx, position_ids=None, cache=None, attn_mask=None, return_hidden=False):
        self.calls += 1
        B, T = idx.shape
        P = cache.pos if cache is not None else 0
        pos = torch.arange(P, P + T)[None].expand(B, T) if position_ids is None else position_ids.expand(B, T)
        if cache is not None:
            buf = cache.k[0][:, 0, :, 0]  # [B, max_len]
            buf[:, P : P + T] = idx.float()
            seq = buf[:, : P + T].long()
            ok = torch.ones(B, P + T, dtype=torch.bool) if attn_mask is None else attn_mask.bool()
            cache.pos = P + T
        else:
            seq, ok = idx, torch.ones(B, T, dtype=torch.bool)
        logits = torch.zeros(B, T, V)
        for r in range(B):
            for t in range(T):
                s = P + t  # this token's slot
                prev = int(seq[r, s - 1]) if s > 0 and ok[r, s - 1] else -1
                tok = int(idx[r, t])
                if self.table is not None:
                    logits[r, t] = self.table[tok]
                else:
                    logits[r, t, rule(prev, tok, int(pos[r, t]))] = 3.0
        return logits


class Chars:
    """A tokenizer: token i is the letter chr(97 + i); EOS (15) decodes to nothing when specials are skipped."""

    eos_id, pad_id, bos_id = 15, 0, None

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(97 + i) for i in ids if not (skip_special_tokens and i == self.eos_id))


def reference(prompt, n, stop_at=()):
    """Greedy decoding by the rule: up to n tokens, the first one in stop_at included."""
    seq, out = list(prompt), []
    for _ in range(n):
        prev = seq[-2] if len(seq) > 1 else -1
        out.append(rule(prev, seq[-1], len(seq) - 1))
        seq.append(out[-1])
        if out[-1] in stop_at:
            break
    return out


PROMPTS = [[3, 4, 5, 6, 7, 3, 4, 5], [2], [9, 1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2], [5, 6, 1]]
GREEDY = SamplingParams(max_new_tokens=30, temperature=0)


@pytest.mark.parametrize("lookup", [0, 8])
@pytest.mark.parametrize("sync_every", [1, 4])
def test_greedy_decoding_follows_the_model(lookup, sync_every):
    """Every row of a left-padded batch, and each prompt alone (prompt lookup on and off; the host reading the
    tokens every step or every 4), gives the rule's tokens; rows with other limits stop on their own and
    finished rows leave the batch."""
    engine = Engine(StandIn(), Chars(), eos_ids=[], prompt_lookup=lookup, sync_every=sync_every)
    assert engine.fast is None  # not a Transformer: the model's own forward
    limits = [30, 3, 17, 0]
    got = engine.generate(PROMPTS, [GREEDY.replace(max_new_tokens=n) for n in limits])
    assert [r.tokens for r in got] == [reference(p, n) for p, n in zip(PROMPTS, limits)]
    assert [r.finish_reason for r in got] == ["length"] * 4 and got[3].text == ""
    for p in PROMPTS:
        assert engine.generate([p], GREEDY)[0].tokens == reference(p, 30)


def test_prompt_lookup_drafts_and_accepts_as_the_picks_say():
    """One row with prompt lookup: fewer forward passes than tokens, drafts both accepted and rejected, and the
    tokens of plain decoding -- which a cache not rewound past a rejected draft token would change (the stand-in
    reads the previous token back from the cache)."""
    p = PROMPTS[0]
    m = StandIn()
    on, off = Engine(m, eos_ids=[]), Engine(m, eos_ids=[], prompt_lookup=0)
    m.calls = 0
    a = on.generate([p], GREEDY.replace(max_new_tokens=40))[0]
    passes, m.calls = m.calls, 0
    b = off.generate([p], GREEDY.replace(max_new_tokens=40))[0]
    assert a.tokens == b.tokens == reference(p, 40)
    assert m.calls == 40  # the prefill's pick, then 39 one-token steps
    st = on.stats
    assert st["drafted"] > st["accepted"] > 0 and 0 < st["lookup_steps"] < passes
    assert passes == 40 - st["accepted"]  # each pass gives its accepted draft tokens plus one


@pytest.mark.parametrize("sp", [SamplingParams(max_new_tokens=40, temperature=0.7, seed=3),
                                SamplingParams(max_new_tokens=40, temperature=1.0, top_k=3, top_p=0.9, seed=1),
                                SamplingParams(max_new_tokens=40, temperature=0, repetition_penalty=1.5),
                                SamplingParams(max_new_tokens=40, temperature=0.5, frequency_penalty=0.5,
                                               presence_penalty=0.3, seed=2)])  # fmt: skip
def test_prompt_lookup_samples_the_tokens_of_plain_decoding(sp):
    """Sampled rows and penalties: the same tokens with and without drafts (each pick uses its decode step's
    uniform and the penalties of the tokens before it)."""
    m = StandIn()
    on, off = Engine(m, eos_ids=[]), Engine(m, eos_ids=[], prompt_lookup=0)
    a, b = on.generate([PROMPTS[2]], sp)[0], off.generate([PROMPTS[2]], sp)[0]
    assert a.tokens == b.tokens and len(a.tokens) == 40


@pytest.mark.parametrize("lookup", [0, 8])
def test_stopping(lookup):
    """EOS (the engine's and a row's stop_token_ids; ignore_eos), stop strings (the tokens generated, the text
    cut before the string), max_new_tokens and the context's end each end a row on its own."""
    free = reference(PROMPTS[0], 30)
    eos = 13
    engine = Engine(StandIn(block_size=24), Chars(), eos_ids=[eos], prompt_lookup=lookup)
    r = engine.generate([PROMPTS[0]], GREEDY)[0]
    n = free.index(eos) + 1
    assert (r.tokens, r.finish_reason, r.text) == (free[:n], "eos", Chars().decode(free[: n - 1]))
    r = engine.generate([PROMPTS[0]], GREEDY.replace(ignore_eos=True, stop_token_ids=(11,)))[0]
    assert (r.tokens, r.finish_reason) == (free[: free.index(11) + 1], "eos")
    r = engine.generate([PROMPTS[0]], GREEDY.replace(ignore_eos=True))[0]  # the context (24 = 8 + 16) ends it
    assert (r.tokens, r.finish_reason) == (free[:16], "length")
    text = Chars().decode(free)
    stop = text[5:7]
    r = engine.generate([PROMPTS[0]], GREEDY.replace(ignore_eos=True, stop=["zz", stop]))[0]
    assert r.finish_reason == "stop" and r.text == text[: text.index(stop)]
    assert r.tokens == free[: text.index(stop) + 2]  # the stop string's tokens are generated
    # a batch: each row stops for its own reason
    sps = [GREEDY.replace(max_new_tokens=5), GREEDY, GREEDY.replace(stop=[stop], ignore_eos=True), GREEDY]
    got = engine.generate([PROMPTS[0], PROMPTS[0], PROMPTS[0], PROMPTS[1]], sps)
    assert [r.finish_reason for r in got] == ["length", "eos", "stop", "eos"]
    assert [r.tokens for r in got] == [free[:5], free[:n], free[: text.index(stop) + 2],
                                       reference(PROMPTS[1], 23, stop_at=(eos,))]  # fmt: skip


def test_streaming_holds_back_what_may_still_change():
    """Text deltas: concatenated, the Result's text; a suffix that could begin a stop string is held back."""
    engine = Engine(StandIn(), Chars(), eos_ids=[])
    text = Chars().decode(reference(PROMPTS[0], 30))
    stop = text[9:12]
    for lookup in (0, 8):
        engine.prompt_lookup = lookup
        s = engine.stream(PROMPTS[0], GREEDY.replace(stop=[stop]))
        deltas = list(s)
        assert "".join(deltas) == s.result.text == text[: text.index(stop)] and len(deltas) > 3


def test_accepted_and_ngram_draft():
    assert accepted([4, 5, 6], [4, 5]) == [4, 5, 6]  # all confirmed, plus the pick after
    assert accepted([4, 9, 6], [4, 5]) == [4, 9]  # the first pick that differs ends it
    assert accepted([7], []) == [7]
    seq = np.array([1, 2, 3, 1, 2, 4, 1, 2])
    assert ngram_draft(seq, 2) == [4, 1] and ngram_draft(seq, 0) == []


def test_lookup_policy_adapts_its_draft_length_and_backs_off():
    """k: +2 after a fully accepted draft (at most K), -1 after a miss; with backoff, a missed one-token draft
    idles the row for 4 passes, then 8, ... (at most 64), until a draft is fully accepted."""
    b = SimpleNamespace(rows=[5], prompts=[[1, 2, 3, 1, 2, 3, 1, 2]], tokens=[[3]], limit=[50], reason=[None])
    stats = {"lookup_steps": 0, "drafted": 0, "accepted": 0}
    lk = Lookup(b, K=3, backoff=True, stats=stats)
    assert lk.k[5] == 3 and lk.propose(b) == [[1, 2, 3]] and stats["lookup_steps"] == 1
    lk.update(5, [1, 2, 3], [1, 9])  # one accepted of three
    assert lk.k[5] == 2 and (stats["drafted"], stats["accepted"]) == (3, 1)
    lk.update(5, [1, 2], [1, 2, 7])  # all accepted
    assert lk.k[5] == 3
    lk.k[5] = 1
    lk.update(5, [4], [6])  # a one-token draft missed: idle for 4 passes
    b.tokens[0] += [1, 2]
    assert [lk.propose(b) for _ in range(5)] == [[[]]] * 4 + [[[3]]] and lk.wait[5] == 8
    b.reason[0] = "eos"
    assert lk.propose(b) == [None]  # a finished row has no run
    assert Lookup(b, K=8, backoff=False, stats=stats).k[5] == 4
    lk = Lookup(b, K=8, backoff=False, stats=stats)
    lk.k[5] = 1
    lk.update(5, [4], [6])
    assert lk.idle[5] == 0 and lk.k[5] == 1  # one row: no backoff


def logp_table(rows: dict[int, dict[int, float]]) -> torch.Tensor:
    """Log-probabilities [V, V]: row t gives the next token's distribution after t (unlisted mass spread)."""
    t = torch.full((V, V), -1e4)
    for tok, nxt in rows.items():
        for v, p in nxt.items():
            t[tok, v] = math.log(p)
    return t


def best_by_search(table, prompt, n, eos, lp):
    """Exhaustive search: the completion of at most n tokens (ending at EOS or at n) with the best
    sum of log-probabilities / length ** lp."""
    best, live = None, [v for v in range(V) if (table[:, v] > -1e3).any()]
    for k in range(1, n + 1):
        for seq in itertools.product(live, repeat=k):
            if any(s == eos for s in seq[:-1]) or (k < n and seq[-1] != eos):
                continue
            ctx, score = prompt[-1], 0.0
            for s in seq:
                score += float(torch.log_softmax(table[ctx], -1)[s])
                ctx = s
            score /= k**lp
            if best is None or score > best[0]:
                best = (score, list(seq))
    return best


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
def test_beam_search_finds_the_best_sequence(length_penalty):
    """Greedy takes 1 (0.5) then a flat choice; the beams keep 2 (0.4), after which 3 and EOS are near certain.
    With length_penalty the shorter or longer finished hypotheses win as exhaustive search says."""
    eos = 15
    table = logp_table({0: {1: 0.5, 2: 0.4, 15: 0.1}, 1: {4: 0.34, 5: 0.33, 15: 0.33}, 2: {3: 0.95, 15: 0.05},
                        3: {15: 0.9, 6: 0.1}, 4: {15: 1.0}, 5: {15: 1.0}, 6: {15: 1.0}})  # fmt: skip
    engine = Engine(StandIn(table=table), eos_ids=[eos])
    greedy = engine.generate([[0]], SamplingParams(max_new_tokens=3, temperature=0))[0]
    assert greedy.tokens == [1, 4, 15]
    r = engine.generate([[0]], SamplingParams(max_new_tokens=3, num_beams=3, length_penalty=length_penalty))[0]
    score, want = best_by_search(table, [0], 3, eos, length_penalty)
    assert r.tokens == want and r.score == pytest.approx(score, abs=1e-4)
    assert r.finish_reason == "eos"
