"""llmctl::causal_attention (llmctl/attention.py, llmctl/native/csrc/attention.cpp): fp32 CPU causal attention with its
own backward, for training and full forwards; natively where the library builds, through PyTorch's CPU flash
attention otherwise. Both must give torch's scaled_dot_product_attention, forward and gradients."""

import pytest
import torch
import torch.nn.functional as F

from llmctl import attention, native
from llmctl.model import ModelConfig, Transformer, attend

# (B, T, H, Hk, hd): T no multiple of the row tile (8) or the key tile (32), grouped-query heads, hd 16..128
CASES = [(2, 37, 4, 2, 32), (1, 5, 2, 2, 16), (3, 130, 4, 4, 64), (2, 64, 6, 3, 48), (1, 100, 4, 1, 128)]


@pytest.fixture(params=["native", "pytorch"])
def path(request, monkeypatch):
    if request.param == "native":
        if native.load() is None:
            pytest.skip(f"no native library here: {native.reason}")
    else:
        monkeypatch.setenv("LLMCTL_NATIVE", "0")
        assert native.load() is None
    return request.param


def qkv(B, T, H, Hk, hd, seed=0):
    """q, k, v as a model makes them: head views of one projection ([B, T, H + 2 Hk, hd]), strided, leaves."""
    x = torch.randn(B, T, H + 2 * Hk, hd, generator=torch.Generator().manual_seed(seed))
    return [t.transpose(1, 2).detach().requires_grad_() for t in x.split([H, Hk, Hk], dim=2)]


def reference(q, k, v):
    B, H, T, hd = q.shape
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.size(1) != H)
    return y.transpose(1, 2).reshape(B, T, H * hd)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-T{}-H{}-Hk{}-hd{}".format(*c))
@pytest.mark.parametrize("threads", [1, 2])
def test_causal_attention_equals_sdpa(case, threads, path):
    q, k, v = qkv(*case)
    assert attention.applies(q, k, None, None, 0.0)
    q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = attend(q, k, v, None, None, 0, 0.0)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
        y.backward(g)
    finally:
        torch.set_num_threads(n)
    want = reference(q2, k2, v2)
    want.backward(g)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=0)
    for got, ref in ((q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_causal_attention_is_deterministic():
    q, k, v = qkv(2, 70, 4, 2, 32)
    runs = []
    for _ in range(2):
        for t in (q, k, v):
            t.grad = None
        y = attend(q, k, v, None, None, 0, 0.0)
        y.square().sum().backward()
        runs.append([y.detach(), q.grad, k.grad, v.grad])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_applies_only_to_plain_fp32_cpu_causal_attention():
    q, k, v = qkv(1, 8, 2, 2, 16)
    assert attention.applies(q, k, None, None, 0.0)
    assert not attention.applies(q, k, None, None, 0.1)  # dropout: SDPA
    assert not attention.applies(q, k, torch.ones(1, 1, 8, 8, dtype=torch.bool), None, 0.0)  # a mask
    assert not attention.applies(q[:, :, :1], k[:, :, :1], None, None, 0.0)  # one token
    assert not attention.applies(q.bfloat16(), k.bfloat16(), None, None, 0.0)
    q8, k8, _ = qkv(1, 8, 2, 2, 8)
    assert not attention.applies(q8, k8, None, None, 0.0)  # head size no multiple of 16


@pytest.mark.parametrize("kw", [dict(arch="llama", n_kv_head=2), dict(arch="gpt2")])
def test_model_training_with_causal_attention_equals_sdpa_and_compiles(kw, path, monkeypatch):
    """A model whose heads take the op (hd 16) gives SDPA's loss and gradients, eagerly and traced whole by
    torch.compile (fullgraph: the op and its backward are opaque to the compiler, no graph break)."""
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_embd=64, block_size=32, **kw)).train()
    gen = torch.Generator().manual_seed(3)
    idx, targets = torch.randint(0, 97, (2, 30), generator=gen), torch.randint(0, 97, (2, 30), generator=gen)
    hits = []
    applies = attention.applies

    def spy(*a):
        hits.append(applies(*a))
        return hits[-1]

    def run(model):
        m.zero_grad()
        loss = model(idx, targets)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    monkeypatch.setattr(attention, "applies", spy)
    eager = run(m)
    assert hits and all(hits)
    compiled = run(torch.compile(m, fullgraph=True, backend="aot_eager"))
    monkeypatch.setattr(attention, "applies", lambda *a: False)
    want = run(m)
    for got in (eager, compiled):
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
        for n in want[1]:
            torch.testing.assert_close(got[1][n], want[1][n], atol=1e-5, rtol=1e-5, msg=n)


@pytest.mark.parametrize("native_pass", ["forward", "backward"])
def test_either_backward_follows_either_forward(native_pass, monkeypatch):
    """The two passes choose their path separately (few tasks for the threads -> PyTorch's), so a native forward's
    log-sum-exp must serve PyTorch's backward and the other way round."""
    if native.load() is None:
        pytest.skip(f"no native library here: {native.reason}")
    q, k, v = qkv(2, 37, 4, 2, 32)
    q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
    monkeypatch.setenv("LLMCTL_NATIVE", "1" if native_pass == "forward" else "0")
    y = attend(q, k, v, None, None, 0, 0.0)
    monkeypatch.setenv("LLMCTL_NATIVE", "0" if native_pass == "forward" else "1")
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    y.backward(g)
    want = reference(q2, k2, v2)
    want.backward(g)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=0)
    for got, ref in ((q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
