"""The transformer: config validation, HF parameter names, KV-cache decode == full forward, loss, autocast,
gradient checkpointing, initialisation and accounting helpers. Tiny models, CPU, deterministic."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmctl.config import llama_intermediate_size
from llmctl.model import KVCache, ModelConfig, Transformer
from llmctl.optim import param_groups

V = 96


def tiny(arch="llama", **kw) -> Transformer:
    torch.manual_seed(0)
    base = dict(arch=arch, vocab_size=V, n_layer=2, n_head=4, n_embd=32, block_size=48)
    if arch == "llama":
        base.update(n_kv_head=2, rope_theta=500.0)
    base.update(kw)
    model = Transformer(ModelConfig(**base))
    with torch.no_grad():  # non-trivial norms and biases, so every parameter matters in comparisons
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def ids(B=2, T=20, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------------ config


def test_config_defaults():
    c = ModelConfig(arch="llama", n_embd=256, n_head=8)
    assert (c.n_kv_head, c.head_dim, c.intermediate_size, c.tie_embeddings) == (8, 32, 704, False)
    assert llama_intermediate_size(4096) == 10944 and llama_intermediate_size(4096, 256) == 11008  # Llama-2 7B
    g = ModelConfig(arch="gpt2", n_embd=64, n_head=4)
    assert (g.intermediate_size, g.tie_embeddings) == (256, True)


@pytest.mark.parametrize("kw, msg", [
    (dict(arch="bert"), "model.arch"),
    (dict(n_embd=30, n_head=4), "divisible"),
    (dict(n_head=4, n_kv_head=3), "n_kv_head"),
    (dict(arch="gpt2", n_head=4, n_kv_head=2), "grouped-query"),
    (dict(n_layer=0), "n_layer"),
    (dict(attn_out_bias=True), "qkv_bias"),
    (dict(dropout=1.0), "dropout"),
])  # fmt: skip
def test_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ModelConfig(**{"n_embd": 32, "n_head": 4, **kw})


# ------------------------------------------------------------------------------------------------- structure


def test_hf_parameter_names_llama():
    m = tiny("llama", qkv_bias=True)
    keys = set(m.state_dict())
    for k in ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
              "model.layers.1.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight",
              "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.bias",
              "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight",
              "model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.gate_proj.weight",
              "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"]:  # fmt: skip
        assert k in keys, k
    assert "model.layers.0.self_attn.o_proj.bias" not in keys
    assert not any("rope" in k for k in keys)  # RoPE tables are non-persistent buffers
    assert m.state_dict()["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 8, 32)  # GQA: 2 kv heads


def test_hf_parameter_names_gpt2_and_tying():
    m = tiny("gpt2")
    keys = set(m.state_dict())
    for k in ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias",
              "transformer.h.0.ln_1.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias",
              "transformer.h.0.attn.c_proj.weight", "transformer.h.0.ln_2.bias", "transformer.h.0.mlp.c_fc.weight",
              "transformer.h.0.mlp.c_proj.weight", "lm_head.weight"]:  # fmt: skip
        assert k in keys, k
    assert m.lm_head.weight is m.transformer.wte.weight
    assert m.get_input_embeddings() is m.transformer.wte
    assert m.transformer.h[0].attn.c_attn.weight.shape == (96, 32)  # nn.Linear layout [out, in]
    tied = tiny("llama", tie_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight


def test_meta_init_and_to_empty():
    cfg = tiny("llama", tie_embeddings=True).config
    with torch.device("meta"):
        m = Transformer(cfg)
    m.to_empty(device="cpu")
    assert m.lm_head.weight is m.model.embed_tokens.weight
    ref = Transformer(cfg)
    assert torch.equal(m.rope_cos, ref.rope_cos) and torch.equal(m.rope_sin, ref.rope_sin)


# ----------------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_loss_is_summed_cross_entropy(arch):
    m = tiny(arch)
    idx = ids()
    targets = ids(seed=2)
    targets[0, :5] = -100
    logits = m(idx)
    assert logits.shape == (2, 20, V) and logits.dtype == torch.float32
    ref = F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-100, reduction="sum")
    loss = m(idx, targets)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref)
    hidden = m(idx, return_hidden=True)
    assert hidden.shape == (2, 20, 32)
    torch.testing.assert_close(m.lm_head(hidden), logits)


@pytest.mark.parametrize("arch, tie", [("llama", False), ("llama", True), ("gpt2", True)])
def test_chunked_loss_gradients_match_plain_cross_entropy(arch, tie):
    m = tiny(arch, tie_embeddings=tie).train()
    idx, targets = ids(), ids(seed=2)
    targets[1, 3:9] = -100

    def grads(loss):
        m.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    ref_loss = F.cross_entropy(m(idx).view(-1, V), targets.view(-1), reduction="sum")
    ref = grads(ref_loss)
    loss = m(idx, targets)
    torch.testing.assert_close(loss, ref_loss)
    got = grads(loss)
    assert got.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], msg=n)
    with torch.no_grad():  # loss only, no gradient work
        torch.testing.assert_close(m(idx, targets), ref_loss)
    m.get_input_embeddings().weight.requires_grad_(False)  # frozen head (e.g. LoRA): gradients still flow to h
    m.lm_head.weight.requires_grad_(False)
    got = grads(m(idx, targets))
    for n in got:
        torch.testing.assert_close(got[n], ref[n], msg=n)
    assert (m.lm_head.weight.grad is None) and len(got) == len(ref) - (1 if tie else 2)


@pytest.mark.parametrize("kw", [dict(), dict(qkv_bias=True, n_kv_head=1), dict(n_kv_head=4)])
def test_fused_training_path_matches_plain_formulation(kw, monkeypatch):
    """The eager training path (q/k/v as one matmul, RoPE and RMSNorm as single autograd ops) gives the plain
    formulation's loss and gradients (the one torch.compile traces), with position_ids too."""
    import llmctl.model as model_lib

    m = tiny("llama", **kw).train()
    idx, targets = ids(), ids(seed=2)
    targets[1, 3:9] = -100
    pos = torch.arange(20).repeat(2, 1) + torch.tensor([[0], [7]])

    def run():
        out = {}
        for name, kwargs in (("plain", {}), ("positions", {"position_ids": pos})):
            m.zero_grad()
            loss = m(idx, targets, **kwargs)
            loss.backward()
            out[name] = (loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()})
        return out

    got = run()
    monkeypatch.setattr(model_lib, "_eager_training", lambda: False)
    ref = run()
    for case in ref:
        torch.testing.assert_close(got[case][0], ref[case][0])
        for n in ref[case][1]:
            torch.testing.assert_close(got[case][1][n], ref[case][1][n], msg=f"{case} {n}")


def test_loss_in_bf16_weights():
    m = tiny("llama").to(torch.bfloat16).train()
    loss = m(ids(), ids(seed=2))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert m.lm_head.weight.grad.dtype == torch.bfloat16
    assert m.model.layers[0].self_attn.q_proj.weight.grad.dtype == torch.bfloat16


def test_torch_compile_fullgraph_training_forward():
    """No graph breaks in the training forward (aot_eager: the tracing inductor would see, without codegen time)."""
    m = tiny("llama").train()
    idx, targets = ids(), ids(seed=2)
    ref = m(idx, targets)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    loss = compiled(idx, targets)
    loss.backward()
    torch.testing.assert_close(loss, ref)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], msg=n)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_kv_cache_decode_equals_full_forward(arch):
    m = tiny(arch)
    idx = ids(T=24)
    full = m(idx)
    with torch.no_grad():
        # prefill 9 tokens, then one token at a time
        cache = m.new_cache(2, 32)
        assert isinstance(cache, KVCache) and cache.k[0].shape == (2, m.config.n_kv_head, 32, 8)
        out = [m(idx[:, :9], cache=cache)]
        out += [m(idx[:, t : t + 1], cache=cache) for t in range(9, 24)]
        assert cache.pos == 24
        torch.testing.assert_close(torch.cat(out, 1), full, atol=1e-4, rtol=0)
        # prefill in two chunks (the second attends to the first), then decode
        cache = m.new_cache(2)
        out = [m(idx[:, :6], cache=cache), m(idx[:, 6:17], cache=cache)]
        out += [m(idx[:, t : t + 1], cache=cache) for t in range(17, 24)]
        torch.testing.assert_close(torch.cat(out, 1), full, atol=1e-4, rtol=0)
        cache.reset()
        torch.testing.assert_close(m(idx[:, :5], cache=cache), full[:, :5], atol=1e-4, rtol=0)


def test_kv_cache_limits():
    m = tiny()
    with pytest.raises(ValueError, match="block_size"):
        m.new_cache(1, 49)
    cache = m.new_cache(1, 4)
    with pytest.raises(ValueError, match="KV cache full"):
        m(ids(B=1, T=5), cache=cache)
    with pytest.raises(ValueError, match="block_size"):
        m(ids(B=1, T=49))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padding_with_attn_mask_and_position_ids(arch):
    """The hook for batched generation: left-padded rows give the logits of the unpadded sequences."""
    m = tiny(arch)
    a, b = ids(B=1, T=10, seed=3), ids(B=1, T=6, seed=4)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, :4] = False
    pos = (mask.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        cache = m.new_cache(2, 16)
        out = m(batch, position_ids=pos, attn_mask=mask, cache=cache)
        nxt = torch.tensor([[5], [7]])
        mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.bool)], 1)
        step = m(nxt, position_ids=pos[:, -1:] + 1, attn_mask=mask2, cache=cache)
    torch.testing.assert_close(out[0], m(a)[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[1, 4:], m(b)[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(step[1, 0], m(torch.cat([b, nxt[1:]], 1))[0, -1], atol=1e-4, rtol=0)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bf16_autocast_forward_and_backward(arch):
    m = tiny(arch).train()
    idx = ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = m(idx)
        loss = m(idx, ids(seed=2))
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    ref = m.eval()(idx)
    assert (logits - ref).abs().max() < 0.1  # bf16 noise only
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # cached decode under autocast too
        cache = m.new_cache(2)
        m(idx[:, :5], cache=cache)
        assert torch.isfinite(m(idx[:, 5:6], cache=cache)).all()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gradient_checkpointing_same_gradients(arch):
    m = tiny(arch).train()
    idx, targets = ids(), ids(seed=2)
    grads = []
    for ckpt in (False, True):
        m.zero_grad()
        m.gradient_checkpointing = ckpt
        m(idx, targets).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], msg=n)


def test_dropout_only_in_training():
    m = tiny("gpt2", dropout=0.5)
    idx = ids()
    torch.testing.assert_close(m(idx), m(idx))
    m.train()
    assert not torch.allclose(m(idx), m(idx))


# ------------------------------------------------------------------------------------------------------ helpers


def test_init_weights():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(arch="llama", vocab_size=512, n_layer=8, n_head=4, n_embd=128, qkv_bias=True))
    std = m.model.layers[0].self_attn.q_proj.weight.std().item()
    resid = m.model.layers[0].self_attn.o_proj.weight.std().item()
    assert abs(std - 0.02) < 0.002 and abs(resid - 0.02 / math.sqrt(16)) < 0.001
    assert abs(m.model.layers[0].mlp.down_proj.weight.std().item() - 0.005) < 0.001
    assert torch.all(m.model.layers[0].self_attn.q_proj.bias == 0) and torch.all(m.model.norm.weight == 1)


def test_num_params_flops_and_param_groups():
    m = tiny("llama")
    C, V_, L, I = 32, V, 2, llama_intermediate_size(32)
    per_layer = C * 32 + 2 * C * 16 + 32 * C + 3 * C * I + 2 * C  # q, k+v (GQA), o, mlp, 2 norms
    assert m.num_params() == L * per_layer + C + 2 * V_ * C
    assert m.num_params(exclude_embeddings=True) == L * per_layer + C
    assert m.flops_per_token(48) == 6 * (L * (per_layer - 2 * C) + V_ * C) + 12 * L * 4 * 8 * 48
    g = tiny("gpt2")
    assert g.num_params() == sum(p.numel() for p in g.parameters())  # tied weight counted once
    decay, no_decay = param_groups(g, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    assert not any(p is g.transformer.wte.weight or p is g.transformer.wpe.weight for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(g.parameters()))
    untied = param_groups(tiny("llama"), 0.1)[0]["params"]
    assert any(p is m.lm_head.weight for p in param_groups(m, 0.1)[0]["params"]) and len(untied) == 2 * 7 + 1
