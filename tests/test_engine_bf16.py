"""16-bit weights on CPU (`generate --dtype bf16|fp16`): FastDecode keeps the matrices in 16 bits (no fp32 copy)
and computes in fp32, so its logits equal the fp32 full forward of the same (rounded) weights (1e-4): the native
step (one row; batched rows and verify passes, few rows through its gemv kernels, more through widened panels and
sgemm) and the PyTorch step alike; the engine's tokens equal those of the fp32 model with the rounded weights;
the CLI takes --dtype."""

import pytest
import torch
from typer.testing import CliRunner

from llmctl import hf
from llmctl.cli import app
from llmctl.engine import Engine, SamplingParams
from llmctl.engine.step import FastDecode
from llmctl.model import KVCache, ModelConfig, Transformer

V = 509  # no multiple of the vector width

pytestmark = pytest.mark.usefixtures("one_thread")


def models(tmp_path, dtype, **kw):
    """(16-bit model loaded as load_engine loads it, fp32 model holding the same rounded weights, fp32 original)."""
    torch.manual_seed(0)
    cfg = dict(arch="llama", vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=72, block_size=64,
               init_std=0.1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    cfg.update(kw)
    if cfg["arch"] == "gpt2":
        cfg.pop("n_kv_head")
    m = Transformer(ModelConfig(**cfg)).eval()
    with torch.no_grad():  # biases and norm weights away from their zero / one init
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    hf.save_model(m, tmp_path)
    m16, ref = hf.load_model(tmp_path, dtype=dtype), hf.load_model(tmp_path)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.to(dtype).float())
    return m16, ref, m


def prefill(fast, ids, max_len):
    """A one-row fp32 cache holding `ids`, through FastDecode's rows (as the engine prefills 16-bit models)."""
    cache = KVCache(fast.cfg.n_layer, 1, fast.cfg.n_kv_head, max_len, fast.cfg.head_dim)
    n = len(ids)
    fast.verify_rows(torch.tensor(ids), cache, torch.zeros(n, dtype=torch.long), torch.arange(n),
                     torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                     torch.ones(1, max_len, dtype=torch.bool), n)  # fmt: skip
    cache.pos = n
    return cache


LLAMA, TIED, BIASES, GPT2 = (dict(arch="llama"), dict(arch="llama", tie_embeddings=True, n_kv_head=4),
                             dict(arch="llama", qkv_bias=True, attn_out_bias=True), dict(arch="gpt2"))
BF16, FP16 = torch.bfloat16, torch.float16
CASES = [  # (dtype, model, native step, shared weights): each kernel and layout (a tied lm_head shared: [V, C] rows)
    (BF16, LLAMA, True, True), (BF16, TIED, True, True), (BF16, TIED, True, False), (BF16, BIASES, True, True),
    (BF16, GPT2, True, False), (FP16, TIED, True, True), (FP16, GPT2, True, True), (FP16, BIASES, True, False),
    (BF16, TIED, False, True), (BF16, GPT2, False, False), (FP16, BIASES, False, False),
]  # fmt: skip


@pytest.mark.parametrize("dtype,kw,native,share", CASES)
def test_16bit_fast_decode_equals_fp32_forward_of_the_same_weights(tmp_path, dtype, kw, native, share):
    m16, ref, m32 = models(tmp_path, dtype, **kw)
    fast = FastDecode(m16, share=share)
    assert fast.wide and fast.dtype == torch.float32
    if native and fast.native is None:
        pytest.skip("no native decode step here")
    if not native:
        fast.native = None
    # the matrices stay 16-bit: no fp32 copy (sharing: the model's Linear weights are views of the fused ones)
    mats = [t for layer in fast.layers for t in layer if isinstance(t, torch.Tensor) and t.dim() == 2]
    assert mats and all(t.dtype == dtype for t in mats) and fast.lm_head.dtype == dtype
    if share:
        lin = m16.blocks[0].self_attn.q_proj if kw["arch"] == "llama" else m16.blocks[0].attn.c_attn
        assert lin.weight.untyped_storage().data_ptr() == fast.layers[0][1].untyped_storage().data_ptr()
    idx = torch.randint(5, V, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, full32 = ref(idx)[0], m32(idx)[0]
        threads = torch.get_num_threads()
        try:
            for n in (1, 2):
                torch.set_num_threads(n)
                cache = prefill(fast, idx[0, :12].tolist(), 32)  # 12 rows: widened panels through sgemm
                for t in range(12, 20):  # one row
                    got = fast(idx[0, t : t + 1], cache)[0]
                    torch.testing.assert_close(got, full[t], atol=1e-4, rtol=0)
                    assert (got - full32[t]).abs().max() < 0.05 * full32[t].abs().max()  # the rounding's own cost
                assert cache.k[0].dtype == torch.float32
                # a verify pass of 8 positions (lm_head over 8 rows: panels), then of 3 (the gemv kernels)
                torch.testing.assert_close(fast.verify(idx[0, 20:28], cache), full[20:28], atol=1e-4, rtol=0)
                cache.pos = 26
                torch.testing.assert_close(fast.verify(idx[0, 26:29], cache), full[26:29], atol=1e-4, rtol=0)
        finally:
            torch.set_num_threads(threads)


@pytest.mark.parametrize("kw", [dict(arch="llama"), dict(arch="gpt2", tie_embeddings=True)])
def test_16bit_engine_gives_the_tokens_of_the_fp32_model_with_the_same_weights(tmp_path, kw):
    """Batched prompts of different lengths (left padding), greedy with and without prompt lookup, sampled with a
    seed, and beam search (its prefill through the model's own bf16 forward: close, not equal)."""
    m16, ref, _ = models(tmp_path, torch.bfloat16, **kw)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(5, V, (n,), generator=g).tolist() for n in (9, 3, 14)]
    for lookup in (0, 8):
        a, b = Engine(m16, eos_ids=[], prompt_lookup=lookup), Engine(ref, eos_ids=[], prompt_lookup=lookup)
        assert a.fast.wide
        for sp in (SamplingParams(max_new_tokens=16, temperature=0), SamplingParams(max_new_tokens=16, top_p=0.9, seed=5)):
            assert [r.tokens for r in a.generate(prompts, sp)] == [r.tokens for r in b.generate(prompts, sp)]
            assert a.generate(prompts[:1], sp)[0].tokens == b.generate(prompts[:1], sp)[0].tokens
    beams = SamplingParams(max_new_tokens=6, num_beams=2)
    assert len(Engine(m16, eos_ids=[]).generate(prompts[:1], beams)[0].tokens) == 6


def test_generate_dtype_flag(tmp_path, tok_dir):
    from conftest import save_tiny_llama

    d = save_tiny_llama(tmp_path / "m", tok_dir, 64)
    runner = CliRunner()
    outs = {}
    for dt in ("fp32", "bf16", "fp16"):
        r = runner.invoke(app, ["generate", "--model", str(d), "--dtype", dt, "--temperature", "0",
                                "--max-new-tokens", "8", "--ignore-eos", "hello"])  # fmt: skip
        assert r.exit_code == 0, r.stderr
        outs[dt] = r.stdout
    assert outs["fp32"].strip() and all(o.count("\n") == 1 for o in outs.values())
    r = runner.invoke(app, ["generate", "--model", str(d), "--dtype", "fp8", "hello"])
    assert r.exit_code == 2 and r.stderr.strip().splitlines() == ["error: --dtype must be fp32, bf16 or fp16, got 'fp8'"]
