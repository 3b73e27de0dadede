"""Hugging Face checkpoints: llmctl -> transformers and transformers -> llmctl give the same logits (fp32, 1e-4),
config round trips, sharded files, old GPT-2 layouts, tokenizer files, peft adapters, and load errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from llmctl.errors import UserError  # noqa: E402
from llmctl.hf import config_from_hf, config_to_hf, load_config, load_model, save_model  # noqa: E402
from llmctl.model import ModelConfig, Transformer  # noqa: E402

V = 128
TOL = dict(atol=1e-4, rtol=0)


def ids(B=2, T=24, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def ours(**kw) -> Transformer:
    torch.manual_seed(0)
    base = dict(vocab_size=V, n_layer=2, n_head=4, n_embd=32, block_size=64, bos_token_id=1, eos_token_id=2)
    model = Transformer(ModelConfig(**{**base, **kw}))
    with torch.no_grad():  # perturb norms and biases so that a wrong mapping shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def hf_load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


# ---------------------------------------------------------------------------------------- llmctl -> transformers


@pytest.mark.parametrize("kw, hf_class", [
    (dict(arch="llama", n_kv_head=2, rope_theta=777.0), "LlamaForCausalLM"),
    (dict(arch="llama", qkv_bias=True, n_kv_head=2), "Qwen2ForCausalLM"),
    (dict(arch="llama", tie_embeddings=True, qkv_bias=True, attn_out_bias=True, head_dim=16), "LlamaForCausalLM"),
    (dict(arch="gpt2"), "GPT2LMHeadModel"),
])  # fmt: skip
def test_llmctl_to_transformers(tmp_path, kw, hf_class):
    m = ours(**kw)
    save_model(m, tmp_path)
    assert {"config.json", "model.safetensors", "generation_config.json"} <= {p.name for p in tmp_path.iterdir()}
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == [hf_class]
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert ("lm_head.weight" in keys) == (not m.config.tie_embeddings)  # tied head omitted, as HF does
    hf = hf_load(tmp_path)
    assert type(hf).__name__ == hf_class
    idx = ids()
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, m(idx), **TOL)
        # HF mean loss (labels shifted inside) == our summed loss / token count
        hf_loss = hf(idx, labels=idx).loss
        our_loss = m(idx[:, :-1], idx[:, 1:]) / idx[:, 1:].numel()
    torch.testing.assert_close(hf_loss, our_loss, **TOL)
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert gen["bos_token_id"] == 1 and gen["eos_token_id"] == 2
    assert config_from_hf(cfg) == m.config  # config.json round trip


def test_save_unwraps_compiled_model_and_copies_tokenizer(tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (tok / "tokenizer_config.json").write_text("{}")
    m = ours(arch="llama")
    save_model(torch.compile(m), tmp_path / "out", tokenizer_dir=tok, dtype="bfloat16")
    out = tmp_path / "out"
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert not (out / "special_tokens_map.json").exists()
    sd = load_file(out / "model.safetensors")
    assert all(not k.startswith(("_orig_mod.", "module.")) for k in sd)
    assert all(t.dtype == torch.bfloat16 for t in sd.values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = load_model(out)  # fp32 by default
    assert loaded.lm_head.weight.dtype == torch.float32 and not loaded.training
    torch.testing.assert_close(loaded(ids()), m(ids()), atol=0.1, rtol=0)


# ---------------------------------------------------------------------------------------- transformers -> llmctl


def _hf_tiny(kind):
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64, bos_token_id=1, eos_token_id=2)  # fmt: skip
    if kind == "llama":
        return transformers.LlamaConfig(num_key_value_heads=2, rope_theta=1234.0, rms_norm_eps=1e-5,
                                        attention_bias=True, head_dim=16, **common)  # fmt: skip
    if kind == "mistral":
        return transformers.MistralConfig(num_key_value_heads=1, sliding_window=None, rope_theta=50000.0, **common)
    if kind == "qwen2":
        return transformers.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **common)
    return transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                   bos_token_id=1, eos_token_id=2)  # fmt: skip


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "gpt2"])
def test_transformers_to_llmctl(tmp_path, kind):
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(_hf_tiny(kind)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.02 * torch.randn_like(p))  # biases and norms away from 0 / 1
    hf.save_pretrained(tmp_path)
    m = load_model(tmp_path)
    idx = ids()
    with torch.no_grad():
        torch.testing.assert_close(m(idx), hf(idx).logits, **TOL)
    assert m.config.bos_token_id == 1 and m.config.eos_token_id == 2


def test_config_from_hf_variants():
    base = dict(model_type="llama", vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4)  # fmt: skip
    c = config_from_hf({**base, "rope_theta": 5e5})  # transformers 4 style; no num_key_value_heads, head_dim
    assert (c.rope_theta, c.n_kv_head, c.head_dim, c.block_size, c.norm_eps) == (5e5, 4, 8, 2048, 1e-6)
    c = config_from_hf({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}, "eos_token_id": [5, 6]})
    assert c.rope_theta == 7.0 and c.eos_token_id == 5
    c = config_from_hf({**base, "model_type": "mistral", "max_position_embeddings": 8192, "sliding_window": 4096})
    assert (c.block_size, c.sliding_window, c.model_type) == (8192, 4096, "mistral")  # a real window (issue 16)
    c = config_from_hf({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}})
    assert c.rope_type == "llama3" and c.rope_scaling["factor"] == 8.0  # transformers 4's key, read too
    d = config_to_hf(ModelConfig(arch="llama", n_embd=32, n_head=4, rope_theta=3.0))
    assert d["rope_theta"] == 3.0 and d["rope_parameters"] == {"rope_type": "default", "rope_theta": 3.0}


@pytest.mark.parametrize("patch, msg", [
    ({"model_type": "bert"}, "model_type 'bert'"),
    ({"rope_scaling": {"rope_type": "su-v2", "factor": 8.0}}, "RoPE type 'su-v2'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}}, "original_max_position_embeddings|factor"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_key_value_heads": 3}, "n_kv_head"),
    ({"model_type": "mixtral"}, "mixture of experts"),
    ({"hidden_size": None}, "incompatible"),
])  # fmt: skip
def test_config_from_hf_unsupported(patch, msg):
    d = dict(model_type="llama", vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
             num_attention_heads=4)  # fmt: skip
    d.update(patch)
    if d["hidden_size"] is None:
        del d["hidden_size"]
    with pytest.raises(UserError, match=msg):
        config_from_hf(d)


def test_sharded_checkpoint_and_run_dir(tmp_path):
    m = ours(arch="llama")
    model_dir = tmp_path / "run" / "checkpoints" / "step-0000010"
    save_model(m, model_dir)
    sd = load_file(model_dir / "model.safetensors")
    (model_dir / "model.safetensors").unlink()
    keys = sorted(sd)
    half = {k: sd[k] for k in keys[: len(keys) // 2]}, {k: sd[k] for k in keys[len(keys) // 2 :]}
    weight_map = {}
    for i, part in enumerate(half):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file(part, model_dir / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    loaded = load_model(tmp_path / "run")  # run directory -> newest complete checkpoint
    torch.testing.assert_close(loaded(ids()), m(ids()), atol=0, rtol=0)
    assert load_config(tmp_path / "run") == m.config


def test_old_gpt2_layout(tmp_path):
    """Keys without the `transformer.` prefix and the attn.bias / masked_bias buffers of old GPT-2 files."""
    m = ours(arch="gpt2")
    save_model(m, tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    sd["h.0.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
    sd["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(sd, tmp_path / "model.safetensors")
    torch.testing.assert_close(load_model(tmp_path)(ids()), m(ids()), atol=0, rtol=0)


def test_load_errors(tmp_path):
    m = ours(arch="llama")
    save_model(m, tmp_path / "ok")
    # pickled weights only
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    (bin_dir / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(UserError, match="safetensors only"):
        load_model(bin_dir)
    # unsupported architecture
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    (tmp_path / "ok" / "config.json").write_text(json.dumps({**cfg, "model_type": "t5"}))
    with pytest.raises(UserError, match="model_type 't5'"):
        load_model(tmp_path / "ok")
    (tmp_path / "ok" / "config.json").write_text(json.dumps(cfg))
    # missing, unexpected and mis-shaped keys
    sd = load_file(tmp_path / "ok" / "model.safetensors")
    for change, msg in [
        (lambda d: d.pop("model.layers.1.mlp.up_proj.weight"), r"missing keys \['model.layers.1.mlp.up_proj.weight'\]"),
        (lambda d: d.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(1)}), "unexpected keys"),
        (lambda d: d.update({"model.norm.weight": torch.zeros(7)}), "shape"),
    ]:  # fmt: skip
        bad = dict(sd)
        change(bad)
        save_file(bad, tmp_path / "ok" / "model.safetensors")
        with pytest.raises(UserError, match=f"incompatible checkpoint.*{msg}"):
            load_model(tmp_path / "ok")
    (tmp_path / "ok" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot read"):
        load_model(tmp_path / "ok")
    with pytest.raises(UserError):
        load_model(tmp_path / "nowhere")


@pytest.mark.parametrize("arch, targets", [
    ("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    ("gpt2", ["c_attn", "c_proj", "c_fc"]),
])  # fmt: skip
def test_peft_adapter_from_llmctl_loads_on_transformers(tmp_path, arch, targets):
    peft = pytest.importorskip("peft")
    m = ours(arch=arch)
    save_model(m, tmp_path / "base")
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    pm = peft.get_peft_model(m, lcfg)
    pm.save_pretrained(tmp_path / "adapter")
    idx = ids()
    with torch.no_grad():
        ours_logits = pm(idx)
        hf = peft.PeftModel.from_pretrained(hf_load(tmp_path / "base"), tmp_path / "adapter").eval()
        torch.testing.assert_close(hf(idx).logits, ours_logits, **TOL)
        with pm.disable_adapter():
            assert (pm(idx) - ours_logits).abs().max() > 1e-3  # the adapter does something
