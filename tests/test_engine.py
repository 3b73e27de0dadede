"""The generation engine: greedy and beam search equal transformers' `generate`, the fast decode step equals the
full forward, samplers draw from the truncated distributions, seeds reproduce, rows stop on their own."""

import numpy as np
import pytest
import torch
from scipy import stats

from llmctl import hf
from llmctl.engine import Engine, SamplingParams, sample
from llmctl.engine.step import FastDecode
from llmctl.model import KVCache, ModelConfig, Transformer

V = 512  # the conftest tokenizer's vocabulary


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(arch="llama", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(arch=arch, vocab_size=V, n_layer=2, n_head=4, n_embd=64, block_size=96, init_std=0.1,
               eos_token_id=2, pad_token_id=0)  # fmt: skip
    if arch == "llama":
        cfg["n_kv_head"] = 2  # grouped-query attention
    cfg.update(kw)
    return Transformer(ModelConfig(**cfg)).eval()


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, V, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request, tmp_path_factory):
    """(llmctl model, transformers model) with the same weights, through a saved checkpoint folder."""
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp(f"model-{request.param}")
    hf.save_model(make_model(request.param), d)
    return hf.load_model(d), AutoModelForCausalLM.from_pretrained(d).eval()


def hf_generate(model, ids, eos, **kw):
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         pad_token_id=0, eos_token_id=eos, **kw)[0, len(ids):].tolist()  # fmt: skip
    return out


def test_greedy_equals_transformers_batched_prompts_of_different_lengths(pair):
    ours, theirs = pair
    prompts = prompts_of([7, 1, 19, 4, 12])
    # an EOS the model actually emits, so that some rows stop early (and the batch is compacted)
    free = Engine(ours, eos_ids=[]).generate(prompts, SamplingParams(max_new_tokens=24, temperature=0))
    eos = free[2].tokens[5]
    res = Engine(ours, eos_ids=[eos]).generate(prompts, SamplingParams(max_new_tokens=24, temperature=0))
    assert {r.finish_reason for r in res} == {"eos", "length"}
    for p, r in zip(prompts, res):
        assert r.tokens == hf_generate(theirs, p, eos, max_new_tokens=24, do_sample=False)
        assert r.finish_reason == ("eos" if r.tokens[-1] == eos else "length")
    # the model's own forward (no FastDecode) gives the same tokens
    slow = Engine(ours, eos_ids=[eos], fast=False).generate(prompts, SamplingParams(max_new_tokens=24, temperature=0))
    assert [r.tokens for r in slow] == [r.tokens for r in res]


def test_repetition_penalty_equals_transformers(pair):
    ours, theirs = pair
    prompts = prompts_of([6, 11])
    res = Engine(ours, eos_ids=[]).generate(prompts, SamplingParams(max_new_tokens=16, temperature=0,
                                                                    repetition_penalty=1.5))  # fmt: skip
    for p, r in zip(prompts, res):
        assert r.tokens == hf_generate(theirs, p, None, max_new_tokens=16, do_sample=False, repetition_penalty=1.5)


@pytest.mark.parametrize("length_penalty", [1.0, 0.3])
def test_beam_search_equals_transformers(pair, length_penalty):
    ours, theirs = pair
    prompts = prompts_of([5, 9, 2], seed=1)
    free = Engine(ours, eos_ids=[]).generate(prompts, SamplingParams(max_new_tokens=14, temperature=0))
    eos = free[0].tokens[3]
    engine = Engine(ours, eos_ids=[eos])
    for p in prompts:
        r = engine.generate([p], SamplingParams(max_new_tokens=14, num_beams=3, length_penalty=length_penalty))[0]
        ref = hf_generate(theirs, p, eos, max_new_tokens=14, num_beams=3, do_sample=False,
                          length_penalty=length_penalty)  # fmt: skip
        if eos in ref:
            ref = ref[: ref.index(eos) + 1]  # transformers pads after EOS
        assert r.tokens == ref
        assert r.finish_reason == ("eos" if ref[-1] == eos else "length") and r.score is not None


@pytest.mark.parametrize("kw", [dict(arch="llama"), dict(arch="gpt2"), dict(arch="llama", qkv_bias=True),
                                dict(arch="llama", qkv_bias=True, attn_out_bias=True, n_kv_head=4)])  # fmt: skip
@pytest.mark.parametrize("native", [True, False])
def test_kv_cache_decode_logits_equal_full_forward(kw, native):
    """Prefill + one-token decode steps (FastDecode and the model's forward), with left padding, give the
    logits of the full forward of each unpadded sequence (fp32, 1e-4); FastDecode's steps with and without the
    native step (llmctl/native/csrc/decode.cpp: batched rows, verify passes)."""
    m = make_model(**kw)
    a, b = prompts_of([14, 5], seed=3)
    cont = prompts_of([6, 6], seed=4)
    full = [m(torch.tensor([x + c]))[0] for x, c in zip((a, b), cont)]  # [T, V] each
    engine = Engine(m)
    fast = FastDecode(m)
    if native and (fast.native is None or fast._sgemm is None):
        pytest.skip("no native decode step here")
    if not native:
        fast.native = None
    with torch.no_grad():
        for step_fn in ("fast", "model"):
            L = 14
            idx = torch.tensor([a, [0] * (L - len(b)) + b])
            mask = torch.ones(2, L + 6, dtype=torch.bool)
            mask[1, : L - len(b)] = False
            lens = torch.tensor([14, 5])
            pos = (torch.arange(L)[None] - (L - lens)[:, None]).clamp(min=0)
            cache = m.new_cache(2, L + 6)
            m(idx, position_ids=pos, attn_mask=mask[:, :L], cache=cache)
            for t in range(6):
                x = torch.tensor([cont[0][t], cont[1][t]])
                if step_fn == "fast":
                    logits = fast(x, cache, lens + t, mask[:, : L + t + 1])
                else:
                    logits = m(x[:, None], position_ids=(lens + t)[:, None], attn_mask=mask[:, : L + t + 1],
                               cache=cache)[:, -1]  # fmt: skip
                for r, n in enumerate((14, 5)):
                    torch.testing.assert_close(logits[r], full[r][n + t], atol=1e-4, rtol=0)
        # unpadded single row, no mask / position ids
        cache = m.new_cache(1, 20)
        m(torch.tensor([a]), cache=cache)
        for t in range(6):
            logits = fast(torch.tensor([cont[0][t]]), cache)
            torch.testing.assert_close(logits[0], full[0][14 + t], atol=1e-4, rtol=0)
        # speculative decoding's verify pass: several positions of one row at once, over stale cache slots
        cache.pos = 14
        torch.testing.assert_close(fast.verify(torch.tensor(cont[0][:5]), cache), full[0][14:19], atol=1e-4, rtol=0)
        assert cache.pos == 19
        # batched verify pass (rows advancing on their own): runs of 3 and 1 tokens, then of 0 and 2, left padding
        # in row 1, stale slots past each row's run
        cache = m.new_cache(2, L + 9)
        m(idx, position_ids=pos, attn_mask=mask[:, :L], cache=cache)
        key_mask = torch.cat([mask[:, :L], torch.ones(2, 9, dtype=torch.bool)], 1)
        done = [0, 0]  # continuation tokens already in the cache, per row
        for runs in ([3, 1], [0, 2], [2, 3]):
            rows = torch.tensor([r for r, n in enumerate(runs) for _ in range(n)])
            j = torch.tensor([i for n in runs for i in range(n)])
            x = torch.tensor([cont[r][done[r] + i] for r, n in enumerate(runs) for i in range(n)])
            start, position = L + torch.tensor(done), lens + torch.tensor(done)
            logits = fast.verify_rows(x, cache, rows, j, start, position, key_mask, max(runs))
            want = torch.stack([full[r][n + done[r] + i] for r, n in enumerate((14, 5)) for i in range(runs[r])])
            torch.testing.assert_close(logits, want, atol=1e-4, rtol=0)
            done = [d + n - (n > 1) for d, n in zip(done, runs)]  # the last token of a run rejected: stale slot
    assert engine.fast is not None


@pytest.mark.parametrize("kw", [dict(arch="llama", qkv_bias=True, attn_out_bias=True), dict(arch="llama", n_kv_head=4, tie_embeddings=True),
                                dict(arch="gpt2")])  # fmt: skip
@pytest.mark.parametrize("share", [False, True])
def test_native_decode_step_equals_pytorch(kw, share, monkeypatch, tmp_path):
    """The native steps (llmctl/native/csrc/decode.cpp, built here into a fresh cache) -- one row, and rows of a left-padded
    batch (matmuls through PyTorch's BLAS) -- give the PyTorch step's logits and cache entries, at 1 and 2 threads
    (work split across threads), on sizes that are no multiple of the vector width; past the model's context the
    one-row step leaves the token to PyTorch."""
    from llmctl import native

    monkeypatch.setenv("LLMCTL_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_tried", False)
    if native.load() is None:
        pytest.skip(f"no native decode step here: {native.reason}")
    assert list((tmp_path / "native").glob("llmctl-*.so"))
    m = make_model(vocab_size=509, n_embd=72, n_head=4, block_size=40, **kw)
    fast = FastDecode(m, share=share)
    assert fast.native is not None and fast._sgemm is not None
    idx = torch.randint(5, 509, (1, 40), generator=torch.Generator().manual_seed(1))
    full, cfg = m(idx)[0], m.config
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with torch.no_grad():
                caches = [KVCache(cfg.n_layer, 1, cfg.n_kv_head, 44, cfg.head_dim) for _ in range(2)]  # 4 spare slots
                for c in caches:
                    m(idx[:, :3], cache=c)
                for t in range(3, 40):
                    got = fast(idx[0, t : t + 1], caches[0])
                    native_step, fast.native = fast.native, None
                    want = fast(idx[0, t : t + 1], caches[1])
                    fast.native = native_step
                    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
                    torch.testing.assert_close(got[0], full[t], atol=1e-4, rtol=0)
                    assert caches[0].pos == caches[1].pos == t + 1
                for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
                    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
                # past the context: the PyTorch step decides (here: RoPE / learned positions end, an error)
                with pytest.raises((IndexError, RuntimeError)):
                    fast(idx[0, :1], caches[0])
                # the batched step: 3 rows, left-padded (mask, positions)
                lens = torch.tensor([9, 4, 6])
                mask = torch.arange(9 + 8)[None] >= (9 - lens)[:, None]
                caches = [KVCache(cfg.n_layer, 3, cfg.n_kv_head, 17, cfg.head_dim) for _ in range(2)]
                pre = torch.stack([idx[0, :9], idx[0, 5:14], idx[0, 10:19]])
                pos = (torch.arange(9)[None] - (9 - lens)[:, None]).clamp(min=0)
                for c3 in caches:
                    m(pre, position_ids=pos, attn_mask=mask[:, :9], cache=c3)
                for t in range(8):
                    x = idx[0, 9 + t : 10 + t].expand(3)
                    got = fast(x, caches[0], lens + t, mask[:, : 10 + t])
                    native_step, fast.native = fast.native, None
                    want = fast(x, caches[1], lens + t, mask[:, : 10 + t])
                    fast.native = native_step
                    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
                for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
                    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv("LLMCTL_NATIVE", "0")
    assert native.load() is None and FastDecode(m).native is None


def test_compiled_static_decode_step_equals_eager(monkeypatch):
    """The static-shape step (whole-cache attention, slot writes) traced whole by torch.compile (fullgraph; the
    eager backend here, inductor / CUDA graphs in use) gives the same tokens, greedy and sampled. (With the native
    step off: on CPU it would run instead.)"""
    monkeypatch.setenv("LLMCTL_NATIVE", "0")
    m = make_model()
    prompts = prompts_of([7, 1, 12])
    sp = SamplingParams(max_new_tokens=12, temperature=0)
    compiled = Engine(m, eos_ids=[], compile="eager")
    eager = Engine(m, eos_ids=[])
    assert [r.tokens for r in compiled.generate(prompts, sp)] == [r.tokens for r in eager.generate(prompts, sp)]
    sp = SamplingParams(max_new_tokens=12, top_p=0.9, seed=5)
    assert [r.tokens for r in compiled.generate(prompts[:2], sp)] == [r.tokens for r in eager.generate(prompts[:2], sp)]


def test_fast_decode_follows_weight_updates_and_sharing():
    m = make_model()
    p = prompts_of([6])
    engine = Engine(m, eos_ids=[])
    before = engine.generate(p, SamplingParams(max_new_tokens=8, temperature=0))[0].tokens
    with torch.no_grad():
        for w in m.parameters():
            w.mul_(1.5)  # an optimizer step, in place
    after = engine.generate(p, SamplingParams(max_new_tokens=8, temperature=0))[0].tokens
    assert after == Engine(m, eos_ids=[], fast=False).generate(p, SamplingParams(max_new_tokens=8, temperature=0))[0].tokens
    assert after != before
    opt = torch.optim.AdamW(m.parameters(), lr=0.05, fused=True)  # fused: updates without bumping versions
    for w in m.parameters():
        w.grad = torch.randn_like(w)
    opt.step()
    stepped = engine.generate(p, SamplingParams(max_new_tokens=8, temperature=0))[0].tokens
    assert stepped == Engine(m, eos_ids=[], fast=False).generate(p, SamplingParams(max_new_tokens=8, temperature=0))[0].tokens
    assert stepped != after
    after = stepped
    shared = Engine(m, eos_ids=[], share_weights=True)  # the model's weights become views of the fused copies
    assert shared.generate(p, SamplingParams(max_new_tokens=8, temperature=0))[0].tokens == after
    assert m(torch.tensor(p)).shape == (1, 6, V)


def test_ngram_draft():
    from llmctl.engine.lookup import ngram_draft

    seq = np.array
    assert ngram_draft(seq([1, 2, 3, 1, 2, 4, 1, 2]), 2) == [4, 1]  # the most recent occurrence of (1, 2)
    assert ngram_draft(seq([7, 1, 2, 3, 9, 1, 2, 3]), 3) == [9, 1, 2]  # the longest n-gram first
    assert ngram_draft(seq([9, 1, 2, 1, 2]), 5) == [1, 2, 1, 2, 1]  # a cycle continues into the draft
    assert ngram_draft(seq([5, 5]), 3) == [5, 5, 5]
    assert ngram_draft(seq([1, 2, 3]), 4) == [] and ngram_draft(seq([4]), 2) == [] and ngram_draft(seq([4, 4]), 0) == []


@pytest.mark.parametrize("fast", [True, False])
def test_prompt_lookup_gives_the_tokens_of_plain_decoding(tok, fast):
    """Speculative decoding by prompt lookup (on by default for one-prompt batches) gives the tokens of plain
    decoding, greedy and sampled (same seed), with penalties, EOS and stop strings inside accepted drafts and
    streaming (drafts accepted and rejected along the way)."""
    m = make_model()
    on, off = Engine(m, tok, eos_ids=[], fast=fast), Engine(m, tok, eos_ids=[], fast=fast, prompt_lookup=0)
    p = prompts_of([9])[0] * 3
    cases = [SamplingParams(max_new_tokens=40, temperature=0), SamplingParams(max_new_tokens=40, temperature=0.3, seed=3),
             SamplingParams(max_new_tokens=40, temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, seed=1),
             SamplingParams(max_new_tokens=40, temperature=0, repetition_penalty=1.3),
             SamplingParams(max_new_tokens=40, temperature=0.5, frequency_penalty=0.3, presence_penalty=0.2, seed=2)]
    for sp in cases:
        a, b = on.generate([p], sp)[0], off.generate([p], sp)[0]
        assert a.tokens == b.tokens and a.finish_reason == b.finish_reason == "length"
    assert on.stats["drafted"] > on.stats["accepted"] > 0 and off.stats["drafted"] == 0
    free = off.generate([p], cases[0])[0].tokens
    eos = free[12]
    for e in (on, off):
        e.eos_ids = {eos}
    a, b = on.generate([p], cases[0])[0], off.generate([p], cases[0])[0]
    assert a.tokens == b.tokens == free[: free.index(eos) + 1] and a.finish_reason == "eos"
    stop = tok.decode(free[15:17])
    sp = cases[0].replace(stop=[stop], ignore_eos=True)
    a, b = on.generate([p], sp)[0], off.generate([p], sp)[0]
    assert (a.tokens, a.text, a.finish_reason) == (b.tokens, b.text, b.finish_reason)
    s = on.stream(p, sp)
    assert "".join(s) == b.text and s.result.tokens == b.tokens
    with pytest.raises(ValueError, match="prompt_lookup"):
        Engine(m, prompt_lookup=-1)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_prompt_lookup_gives_the_tokens_of_plain_decoding(tok, arch):
    """Greedy batches speculate row by row (on by default): the tokens of plain batched decoding, with rows of
    different lengths, limits and repetitiveness, EOS and stop strings inside accepted drafts, the context's end,
    and finished rows dropped from the batch along the way."""
    m = make_model(arch)
    on, off = Engine(m, tok, eos_ids=[]), Engine(m, tok, eos_ids=[], prompt_lookup=0)
    p = prompts_of([9, 4, 17, 6, 12, 3])
    p[0], p[3] = p[0] * 3, p[3] * 4
    sp = SamplingParams(max_new_tokens=40, temperature=0)
    params = [sp, sp.replace(max_new_tokens=7), sp, sp.replace(max_new_tokens=0), sp.replace(max_new_tokens=60), sp]
    a, b = on.generate(p, params), off.generate(p, params)
    assert [r.tokens for r in a] == [r.tokens for r in b] and [len(r.tokens) for r in a] == [40, 7, 40, 0, 60, 40]
    assert on.stats["drafted"] > on.stats["accepted"] > 0 and off.stats["drafted"] == 0
    free, texts = [r.tokens for r in b], [r.text for r in b if len(r.text) > 8][:3]
    for e in (on, off):  # EOS: a token each row produces after a while
        e.eos_ids = {free[0][20], free[2][10]}
    a, b = on.generate(p, sp), off.generate(p, sp)
    assert [(r.tokens, r.finish_reason) for r in a] == [(r.tokens, r.finish_reason) for r in b]
    assert {r.finish_reason for r in a} >= {"eos"}
    for e in (on, off):
        e.eos_ids = set()
    stops = [sp.replace(stop=[t[len(t) // 2 : len(t) // 2 + 3]]) for t in texts]  # from the middle of the texts
    stops = (stops * 2)[: len(p)]
    a, b = on.generate(p, stops), off.generate(p, stops)
    assert [(r.tokens, r.text, r.finish_reason) for r in a] == [(r.tokens, r.text, r.finish_reason) for r in b]
    assert "stop" in {r.finish_reason for r in a}
    long = [(x * 20)[:n] for x, n in zip(p, (54, 60, 50))]  # rows stop at the context's end (block_size 96)
    a, b = on.generate(long, sp.replace(max_new_tokens=60)), off.generate(long, sp.replace(max_new_tokens=60))
    assert [r.tokens for r in a] == [r.tokens for r in b] and [len(r.tokens) for r in a] == [42, 36, 46]


# ---------------------------------------------------------------------------------------------------- samplers


def truncated(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """The reference: transformers' order (temperature, top-k, top-p, min-p), each renormalised."""
    x = np.asarray(logits, dtype=np.float64) / temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.ones_like(p, dtype=bool)
    if top_k:
        keep[order[top_k:]] = False
    if top_p < 1:
        q = np.where(keep, p, 0) / np.where(keep, p, 0).sum()
        before = np.cumsum(q[order]) - q[order]
        keep[order[before >= top_p]] = False
    if min_p:
        keep &= p >= min_p * p.max()
    p = np.where(keep, p, 0)
    return p / p.sum()


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.7), dict(top_k=4), dict(top_p=0.8),
                                dict(top_p=0.5, temperature=1.5), dict(min_p=0.2), dict(top_k=6, top_p=0.9),
                                dict(top_k=8, top_p=0.85, min_p=0.1, temperature=0.8)])  # fmt: skip
def test_sampler_matches_truncated_distribution(kw):
    logits = torch.tensor([2.0, 1.7, 1.5, 1.0, 0.9, 0.5, 0.1, 0.0, -0.3, -1.0, -2.0, -4.0])
    n = 40000
    g = torch.Generator().manual_seed(0)
    B = n
    col = lambda v, dt=torch.float32: torch.full((B,), v, dtype=dt)  # noqa: E731
    tok = sample(logits.expand(B, -1).contiguous(), torch.rand(B, generator=g), col(kw.get("temperature", 1.0)),
                 col(kw.get("top_k", 0), torch.long) if "top_k" in kw else None,
                 col(kw.get("top_p", 1.0)) if "top_p" in kw else None,
                 col(kw.get("min_p", 0.0)) if "min_p" in kw else None)  # fmt: skip
    counts = np.bincount(tok.numpy(), minlength=len(logits))
    expect = truncated(logits.numpy(), **kw)
    assert counts[expect == 0].sum() == 0  # truncated tokens are never drawn
    support = expect > 0
    chi2, pval = stats.chisquare(counts[support], expect[support] * n)
    assert pval > 1e-3, (counts, expect * n)


def test_sampler_rows_are_independent():
    """Mixed settings in one batch: each row follows its own settings (greedy rows via Engine)."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    u = torch.tensor([0.3, 0.99, 0.5])
    both = sample(logits, u, torch.tensor([1.0, 0.5, 2.0]), torch.tensor([0, 3, 0]), torch.tensor([0.9, 1.0, 1.0]))
    for i, (k, p, t) in enumerate([(0, 0.9, 1.0), (3, 1.0, 0.5), (0, 1.0, 2.0)]):
        one = sample(logits[i : i + 1], u[i : i + 1], torch.tensor([t]), torch.tensor([k]), torch.tensor([p]))
        assert one.item() == both[i].item()


def test_seeds_reproduce_and_do_not_depend_on_the_batch():
    m = make_model()
    engine = Engine(m, eos_ids=[])
    p = prompts_of([6, 13, 3, 9])
    sp = SamplingParams(max_new_tokens=20, top_p=0.95, temperature=1.2, seed=7)
    alone = engine.generate([p[0]], sp)[0].tokens
    assert engine.generate([p[0]], sp)[0].tokens == alone
    assert engine.generate([p[0]], sp.replace(seed=8))[0].tokens != alone
    batch = engine.generate(p, [sp, sp.replace(seed=1), sp.replace(temperature=0), sp.replace(top_k=5, seed=2)])
    assert batch[0].tokens == alone
    assert batch[2].tokens == engine.generate([p[2]], sp.replace(temperature=0))[0].tokens
    torch.manual_seed(3)
    a = engine.generate([p[1]], sp.replace(seed=None))[0].tokens
    torch.manual_seed(3)
    assert engine.generate([p[1]], sp.replace(seed=None))[0].tokens == a  # seed None: from torch's global RNG


def test_frequency_and_presence_penalties():
    m = make_model()
    engine = Engine(m, eos_ids=[])
    p = prompts_of([5])
    plain = engine.generate(p, SamplingParams(max_new_tokens=30, temperature=0))[0].tokens
    assert len(set(plain)) < len(plain)  # a random model repeats itself
    for kw in (dict(frequency_penalty=100.0), dict(presence_penalty=100.0)):
        toks = engine.generate(p, SamplingParams(max_new_tokens=30, temperature=0, **kw))[0].tokens
        assert len(set(toks)) == len(toks)


# ------------------------------------------------------------------------------------------ stopping and text


def test_stop_strings_eos_length_and_streaming(tok):
    m = make_model()
    engine = Engine(m, tok, eos_ids=[])
    p = [tok.bos_id] + tok.encode("The Python")
    free = engine.generate([p], SamplingParams(max_new_tokens=30, temperature=0))[0]
    assert free.finish_reason == "length" and free.completion_tokens == 30
    assert free.text == tok.decode(free.tokens)
    stop = free.text[5:8]
    r = engine.generate([p], SamplingParams(max_new_tokens=30, temperature=0, stop=[stop, "\x00never"]))[0]
    assert r.finish_reason == "stop" and r.text == free.text[: free.text.index(stop)]
    assert r.tokens == free.tokens[: len(r.tokens)] and len(r.tokens) < 30
    # the stop string's tokens are generated (and counted), its text is cut
    assert stop in tok.decode(r.tokens)
    s = engine.stream(p, SamplingParams(max_new_tokens=30, temperature=0, stop=[stop]))
    deltas = list(s)
    assert "".join(deltas) == r.text and s.result.text == r.text and len(deltas) > 1
    eos = free.tokens[10]
    r = Engine(m, tok, eos_ids=[eos]).generate([p], SamplingParams(max_new_tokens=30, temperature=0))[0]
    assert r.finish_reason == "eos" and r.tokens == free.tokens[: free.tokens.index(eos) + 1]
    assert r.text == tok.decode(r.tokens[:-1])
    # ignore_eos / stop_token_ids
    r = Engine(m, tok, eos_ids=[eos]).generate([p], SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True))[0]
    assert r.tokens == free.tokens
    r = engine.generate([p], SamplingParams(max_new_tokens=30, temperature=0, stop_token_ids=(eos,)))[0]
    assert r.finish_reason == "eos" and r.tokens[-1] == eos


def test_rows_stop_on_their_own_and_limits():
    m = make_model()
    engine = Engine(m, eos_ids=[])
    p = prompts_of([4, 8, 6, 3, 5])
    alone = [engine.generate([x], SamplingParams(max_new_tokens=n, temperature=0))[0].tokens
             for x, n in zip(p, (3, 20, 0, 7, 1))]  # fmt: skip
    batch = engine.generate(p, [SamplingParams(max_new_tokens=n, temperature=0) for n in (3, 20, 0, 7, 1)])
    assert [r.tokens for r in batch] == alone
    assert [r.completion_tokens for r in batch] == [3, 20, 0, 7, 1]
    # sampled rows with penalties: dropping finished rows from the batch keeps every row's own state
    sps = [SamplingParams(max_new_tokens=n, top_k=k, seed=n, repetition_penalty=1.3, frequency_penalty=0.5)
           for n, k in zip((3, 20, 0, 7, 1), (0, 10, 0, 5, 0))]  # fmt: skip
    alone = [engine.generate([x], sp)[0].tokens for x, sp in zip(p, sps)]
    assert [r.tokens for r in engine.generate(p, sps)] == alone
    # batch_size chunks keep the order
    chunked = engine.generate(p, sps, batch_size=2)
    assert [r.tokens for r in chunked] == alone
    # the context ends generation: block_size 96
    r = engine.generate([list(range(5, 90))], SamplingParams(max_new_tokens=50, temperature=0))[0]
    assert r.completion_tokens == 96 - 85 and r.finish_reason == "length"
    with pytest.raises(ValueError, match="no room"):
        engine.generate([list(range(5, 101))], SamplingParams())
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate([[]], SamplingParams())


def test_fit_prompt_and_params_validation():
    engine = Engine(make_model(), eos_ids=[])
    ids = list(range(100))
    out, cut = engine.fit_prompt(ids, 16, keep_first=1)
    assert cut and len(out) == 96 - 16 and out[0] == 0 and out[-1] == 99 and out[1] == 100 - 79
    assert engine.fit_prompt(ids[:10], 16) == (ids[:10], False)
    with pytest.raises(ValueError, match="below the model's context"):
        engine.fit_prompt(ids, 96)
    for bad, msg in [(dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(max_new_tokens=-1), "max_new"),
                     (dict(temperature=-1), "temperature"), (dict(num_beams=0), "num_beams"), (dict(stop=[""]), "stop"),
                     (dict(min_p=2), "min_p"), (dict(top_k=-2), "top_k")]:  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            SamplingParams(**bad)
    assert SamplingParams(stop="x").stop == ("x",)
