"""Continuous batching (llmctl/engine/batcher.py): requests that join and leave a running batch get the tokens they
get alone through `Engine.generate` (the path of `llmctl generate`), whatever else is in flight; queueing,
cancelling, logprobs, streaming and shutdown."""

import asyncio
import threading
import time

import pytest
import torch

from llmctl.engine import Engine, SamplingParams
from llmctl.engine.batcher import Batcher
from llmctl.model import ModelConfig, Transformer

V = 512  # the conftest tokenizer's vocabulary

pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(**kw):
    torch.manual_seed(0)
    cfg = dict(arch="llama", vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=96,
               init_std=0.1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    cfg.update(kw)
    return Transformer(ModelConfig(**cfg)).eval()


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, V, (n,), generator=g).tolist() for n in lengths]


SETTINGS = [
    SamplingParams(max_new_tokens=20, temperature=0),
    SamplingParams(max_new_tokens=33, seed=1),
    SamplingParams(max_new_tokens=12, seed=2, top_k=20, temperature=0.8),
    SamplingParams(max_new_tokens=25, seed=3, top_p=0.8, repetition_penalty=1.3),
    SamplingParams(max_new_tokens=18, seed=4, min_p=0.05, frequency_penalty=0.5, presence_penalty=0.3),
    SamplingParams(max_new_tokens=30, temperature=0, repetition_penalty=1.2),
    SamplingParams(max_new_tokens=40, seed=5, ignore_eos=True),
    SamplingParams(max_new_tokens=9, seed=6, temperature=1.5),
]


def alone(engine, prompts, params):
    """Each prompt through Engine.generate on its own (what `llmctl generate` does with one prompt)."""
    return [engine.generate([p], s)[0] for p, s in zip(prompts, params)]


def run_staggered(batcher, prompts, params, gap=0.0, logprobs=None):
    """Submit the prompts one after another (a gap apart, so that they join a running batch), collect every
    request's events on its own thread; -> (requests, events per request)."""
    reqs, events, threads = [], [], []
    for p, s in zip(prompts, params):
        req = batcher.submit(p, s, logprobs=logprobs)
        evs = []
        t = threading.Thread(target=lambda r=req, e=evs: e.extend(r.events()))
        t.start()
        reqs.append(req), events.append(evs), threads.append(t)
        time.sleep(gap)
    for t in threads:
        t.join(60)
    return reqs, events


@pytest.mark.parametrize("kind", ["fast", "model-forward"])
def test_rows_joining_a_running_batch_get_the_tokens_they_get_alone(kind, tok):
    # model-forward: a sliding window and q/k norms (no fused decode step): the model's own forward with the
    # left-padded masks, the window counted on each row's own tokens
    model = make_model() if kind == "fast" else make_model(sliding_window=6, qk_norm="head")
    engine = Engine(model, tok)
    assert (engine.fast is not None) == (kind == "fast")
    prompts = prompts_of([5, 17, 3, 30, 9, 1, 12, 22] * 2)
    params = (SETTINGS * 2)[: len(prompts)]
    want = alone(engine, prompts, params)
    batcher = Batcher(engine, max_rows=16)
    sizes, orig = [], batcher.step
    batcher.step = lambda b, new, logits: sizes.append(len(b.rows)) or orig(b, new, logits)
    try:
        reqs, events = run_staggered(batcher, prompts, params, gap=0.003)
    finally:
        batcher.close()
    assert batcher.stats["finished"] == len(prompts) and batcher.stats["steps"] > 0
    # rows joined a batch that was running (it grew between steps) and left it while others went on
    assert any(b > a for a, b in zip(sizes, sizes[1:])) and any(b < a for a, b in zip(sizes, sizes[1:]))
    assert max(sizes) >= 4
    for req, evs, w in zip(reqs, events, want):
        r = req.result
        assert (r.tokens, r.finish_reason, r.text) == (w.tokens, w.finish_reason, w.text)
        assert evs[-1].result is r and all(e.result is None for e in evs[:-1])
        assert "".join(e.text for e in evs) == r.text  # the streamed deltas add up to the text
        assert [t for e in evs for t in e.tokens] == r.tokens


def test_queueing_under_a_row_and_token_budget(tok):
    engine = Engine(make_model(), tok)
    prompts = prompts_of([4, 8, 2, 6, 10, 3, 7])
    params = [SamplingParams(max_new_tokens=15, seed=i, ignore_eos=True) for i in range(len(prompts))]
    want = alone(engine, prompts, params)
    seen = []
    batcher = Batcher(engine, max_rows=2, max_tokens=40)
    orig = batcher.step

    def spy(b, new, logits):  # the batch never holds more than the budgets allow
        seen.append((len(b.rows), sum(len(p) + n for p, n in zip(b.prompts, b.limit))))
        return orig(b, new, logits)

    batcher.step = spy
    try:
        reqs = [batcher.submit(p, s) for p, s in zip(prompts, params)]
        results = [list(r.events())[-1].result for r in reqs]
    finally:
        batcher.close()
    assert [r.tokens for r in results] == [w.tokens for w in want]
    assert max(n for n, _ in seen) == 2 and max(t for _, t in seen) <= 40


def test_cancel_frees_the_row_and_the_others_go_on(tok):
    engine = Engine(make_model(), tok)
    prompts = prompts_of([6, 9, 4])
    long = SamplingParams(max_new_tokens=80, seed=0, ignore_eos=True)
    short = [SamplingParams(max_new_tokens=10, seed=i, ignore_eos=True) for i in (1, 2)]
    want = alone(engine, prompts[1:], short)
    batcher = Batcher(engine, max_rows=2)
    try:
        big = batcher.submit(prompts[0], long)
        it = big.events()
        first = next(it)  # it is running
        assert first.tokens and batcher.stats["live"] >= 1
        big.cancel()
        rest = list(it)
        assert rest[-1].result.finish_reason == "cancelled"
        assert len(big.result.tokens) < 80
        # both rows are free again: the next two requests run together and give their own tokens
        reqs = [batcher.submit(p, s) for p, s in zip(prompts[1:], short)]
        assert [list(r.events())[-1].result.tokens for r in reqs] == [w.tokens for w in want]
    finally:
        batcher.close()
    # leaving the events loop early cancels too (a client that went away)
    batcher = Batcher(engine, max_rows=2)
    try:
        req = batcher.submit(prompts[0], long)
        for _ in req.events():
            break
        deadline = time.time() + 10
        while req.result is None and time.time() < deadline:
            time.sleep(0.01)
        assert req.result.finish_reason == "cancelled"
    finally:
        batcher.close()


def test_logprobs_are_the_models_log_softmax(tok):
    model = make_model()
    engine = Engine(model, tok)
    prompts = prompts_of([5, 11])
    params = [SamplingParams(max_new_tokens=8, seed=0, repetition_penalty=1.5), SamplingParams(max_new_tokens=6)]
    batcher = Batcher(engine)
    try:
        reqs, events = run_staggered(batcher, prompts, params, logprobs=3)
    finally:
        batcher.close()
    for p, req, evs in zip(prompts, reqs, events):
        toks = req.result.tokens
        lps = [lp for e in evs for lp in (e.logprobs or [])]
        assert [lp.token for lp in lps] == toks
        with torch.no_grad():  # the full forward over prompt + completion: position i predicts token i + 1
            ref = model(torch.tensor([p + toks]))[0, len(p) - 1 : -1].float().log_softmax(-1)
        for i, lp in enumerate(lps):
            assert lp.logprob == pytest.approx(ref[i, toks[i]].item(), abs=1e-4)
            top_v, top_i = ref[i].topk(3)
            assert [t for t, _ in lp.top] == top_i.tolist()
            assert [v for _, v in lp.top] == pytest.approx(top_v.tolist(), abs=1e-4)


def test_stop_strings_stream_and_asyncio(tok):
    engine = Engine(make_model(), tok)
    prompt = prompts_of([7])[0]
    free = engine.generate([prompt], SamplingParams(max_new_tokens=30, seed=3, ignore_eos=True))[0]
    stop = free.text[10:12]  # a stop string that occurs in the completion
    params = SamplingParams(max_new_tokens=30, seed=3, ignore_eos=True, stop=(stop,))
    want = engine.generate([prompt], params)[0]
    assert want.finish_reason == "stop"
    batcher = Batcher(engine)

    async def consume():
        return [ev async for ev in batcher.submit(prompt, params).aevents()]

    try:
        evs = asyncio.run(consume())
    finally:
        batcher.close()
    assert "".join(e.text for e in evs) == want.text == evs[-1].result.text
    assert evs[-1].result.finish_reason == "stop"
    assert all(stop not in e.text for e in evs)


def test_close_drains_or_cancels_and_submit_checks(tok):
    engine = Engine(make_model(), tok)
    prompt = prompts_of([5])[0]
    batcher = Batcher(engine)
    with pytest.raises(ValueError, match="no room"):
        batcher.submit(list(range(5, 101)), SamplingParams())
    with pytest.raises(ValueError, match="at least one token"):
        batcher.submit([], SamplingParams())
    with pytest.raises(ValueError, match="beam"):
        batcher.submit(prompt, SamplingParams(num_beams=2))
    reqs = [batcher.submit(prompt, SamplingParams(max_new_tokens=30, seed=i, ignore_eos=True)) for i in range(3)]
    batcher.close(drain=True)
    assert [len(r.result.tokens) for r in reqs] == [30, 30, 30]
    with pytest.raises(RuntimeError):
        batcher.submit(prompt, SamplingParams())
    batcher = Batcher(engine, max_rows=1)
    reqs = [batcher.submit(prompt, SamplingParams(max_new_tokens=90, seed=i, ignore_eos=True)) for i in range(3)]
    next(reqs[0].events())
    batcher.close(drain=False)
    assert {r.result.finish_reason for r in reqs} == {"cancelled"}
