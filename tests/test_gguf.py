"""`llmctl export gguf`: every exported family, as a tiny random model with an llmctl tokenizer, written at f32 and
verified in llama.cpp (llama-cpp-python: token ids of the probe texts, 32 greedy tokens, logits within 1e-3);
f16 / bf16 / q8_0 files load and generate; a wrong tensor fails the export and leaves no usable .gguf;
--no-verify, --force, refusals and the CLI's errors. llama.cpp is a peer here, never a mock."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")
transformers = pytest.importorskip("transformers")

from llmctl import hf  # noqa: E402
from llmctl.errors import UserError  # noqa: E402
from llmctl.export import layout  # noqa: E402
from llmctl.stages import export as stage  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64)  # fmt: skip
FAMILIES = {  # name: (transformers config class, its arguments)
    "llama3.1": ("LlamaConfig", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 16})),
    "llama-bias": ("LlamaConfig", dict(attention_bias=True, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", dict()),
    "qwen3": ("Qwen3Config", dict(head_dim=24, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                 "rope_theta": 1e6})),
    "gemma": ("GemmaConfig", dict(head_dim=16)),
    "gemma2": ("Gemma2Config", dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                                    attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=24, num_hidden_layers=3,
                                        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                                                            "rope_theta": 1e6},
                                                         "sliding_attention": {"rope_type": "default",
                                                                               "rope_theta": 10000.0}})),
    "olmo2": ("Olmo2Config", dict()),
    "phi3": ("Phi3Config", dict(sliding_window=None, num_key_value_heads=4)),
    "granite": ("GraniteConfig", dict(embedding_multiplier=6.0, residual_multiplier=0.3, attention_multiplier=0.1,
                                      logits_scaling=4.0)),
    "smollm3": ("SmolLM3Config", dict(num_hidden_layers=4, no_rope_layers=[1, 1, 1, 0])),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=64)),
    "pythia": ("GPTNeoXConfig", dict(num_key_value_heads=4, hidden_act="gelu_new", use_parallel_residual=True,
                                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                      "partial_rotary_factor": 0.5})),
}  # fmt: skip


def family_dir(root: Path, name: str, tok_dir) -> Path:
    """A Hugging Face folder of the family (random weights, norms and biases perturbed) with llmctl's tokenizer."""
    from llmctl.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    cls, kw = FAMILIES[name]
    common = {} if name == "gpt2" else COMMON
    torch.manual_seed(0)
    config = getattr(transformers, cls)(**{**common, **kw, "vocab_size": tok.vocab_size, "bos_token_id": tok.bos_id,
                                           "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id})  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    d = root / name
    model.save_pretrained(d)
    hf.copy_tokenizer(tok_dir, d)
    return d


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tok_dir):
    """llmctl's own model: its llama, its tokenizer (what `llmctl pretrain` writes)."""
    from conftest import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("llama"), tok_dir, block_size=64)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_exports_at_f32_and_llama_cpp_agrees(name, tmp_path, tok_dir):
    d = family_dir(tmp_path, name, tok_dir)
    res = stage.run(d, tmp_path / "m.gguf")
    v = res["verified"]
    assert v["probes"] == 7 and v["tokens"] == 32 and v["top1_agreement"] == 1.0
    assert v["max_logit_diff"] <= 1e-3
    assert (tmp_path / "m.gguf").is_file() and not list(tmp_path.glob("*.unverified"))


def test_llmctl_model_round_trips_tokens_metadata_and_greedy_text(llama_dir, tmp_path, tok):
    """llmctl's own llama and tokenizer: the GGUF carries the gpt-2 pre-tokenizer, BOS / EOS / EOT, add_bos_token
    and the chat template; llama.cpp's own sampler (greedy) gives llmctl's 32 tokens; the Modelfile has ChatML."""
    import gguf

    from llmctl.chat import encode_prompt
    from llmctl.engine import Engine, SamplingParams

    out = tmp_path / "tiny.gguf"
    stage.run(llama_dir, out)
    fields = gguf.GGUFReader(out).fields

    def value(key):
        f = fields[key]
        return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]].tolist()

    assert value("general.architecture") == "llama" and value("tokenizer.ggml.pre") == "gpt-2"
    assert value("tokenizer.ggml.add_bos_token") is True
    assert (value("tokenizer.ggml.bos_token_id"), value("tokenizer.ggml.eos_token_id"),
            value("tokenizer.ggml.eot_token_id")) == (tok.bos_id, tok.eos_id, tok.im_end_id)  # fmt: skip
    assert value("tokenizer.chat_template") == tok.chat_template
    prompt = encode_prompt(tok, "The meaning of life is")
    model = hf.load_model(llama_dir)
    ours = Engine(model, tok, eos_ids=[], prompt_lookup=0).generate(
        [prompt], SamplingParams(max_new_tokens=32, temperature=0))[0].tokens  # fmt: skip
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, n_threads=2, seed=0, verbose=False)
    theirs = []
    for t in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
        theirs.append(t)
        if len(theirs) == 32:
            break
    assert theirs == ours
    mf = (tmp_path / "tiny.Modelfile").read_text()
    assert mf.startswith("FROM ./tiny.gguf\n") and "<|im_start|>{{ .Role }}" in mf
    assert 'PARAMETER stop "<|eos|>"' in mf and 'PARAMETER stop "<|im_end|>"' in mf


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_rounded_exports_load_and_generate(dtype, llama_dir, tmp_path):
    v = stage.run(llama_dir, tmp_path / f"m-{dtype}.gguf", dtype=dtype)["verified"]
    assert v["tokens"] == 32 and v["top1_agreement"] >= 0.9
    size = (tmp_path / f"m-{dtype}.gguf").stat().st_size
    f32 = stage.run(llama_dir, tmp_path / "m.gguf", verify=False)["path"].stat().st_size
    assert size < 0.7 * f32


def test_a_wrong_tensor_fails_the_export_and_leaves_no_usable_gguf(llama_dir, tmp_path, monkeypatch):
    """Forgetting llama.cpp's rotary permutation of q / k (a real converter bug) is caught by the verification."""
    monkeypatch.setattr(layout, "_permute", lambda t, n_head: t)
    out = tmp_path / "bad.gguf"
    with pytest.raises(UserError, match="llama.cpp disagrees with llmctl: greedy token|logits differ"):
        stage.run(llama_dir, out)
    assert not out.exists() and not (tmp_path / "bad.Modelfile").exists()
    assert (tmp_path / "bad.gguf.unverified").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.gguf.unverified"]  # no temporary file left
    res = stage.run(llama_dir, out, verify=False)  # --no-verify writes it as it is
    assert res["verified"] is None and out.is_file()


def test_adapter_is_merged_before_export(llama_dir, tmp_path):
    """--adapter: a peft LoRA adapter merged through llmctl's LoRA code; the verified file is not the base."""
    import numpy as np
    from peft import LoraConfig, get_peft_model

    base = transformers.AutoModelForCausalLM.from_pretrained(llama_dir)
    torch.manual_seed(1)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 init_lora_weights=False))  # fmt: skip
    peft_model.save_pretrained(tmp_path / "adapter")
    a = stage.run(llama_dir, tmp_path / "a.gguf", adapter=str(tmp_path / "adapter"))
    b = stage.run(llama_dir, tmp_path / "b.gguf", verify=False)
    assert a["verified"]["max_logit_diff"] <= 1e-3
    logits = []
    for p in (a["path"], b["path"]):
        llm = llama_cpp.Llama(model_path=str(p), n_ctx=16, n_threads=2, logits_all=True, verbose=False)
        llm.eval([1, 50, 60, 70])
        logits.append(np.array(llm.scores[:4]))
    assert np.abs(logits[0] - logits[1]).max() > 1e-2


def test_unsupported_features_are_refused_by_name(tmp_path, tok_dir):
    cfg = hf.load_config(family_dir(tmp_path, "mistral", tok_dir))
    cfg.sliding_window = 8
    with pytest.raises(UserError, match="sliding_window"):
        layout.check(cfg)
    cfg.sliding_window, cfg.rope_type = None, "yarn"
    with pytest.raises(UserError, match="RoPE type 'yarn'"):
        layout.check(cfg)


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "llmctl", *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=ROOT)  # fmt: skip


def test_cli_exports_and_its_errors_exit_2(llama_dir, tmp_path, tok_dir):
    out = tmp_path / "m.gguf"
    r = _cli("export", "gguf", llama_dir, "--out", out, "--dtype", "q8_0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out) and "verified in llama.cpp" in r.stderr
    before = out.read_bytes()
    for args, msg in [(["--out", out], "already exists (pass --force"),
                      (["--out", tmp_path / "x.gguf", "--dtype", "q4"], "--dtype must be one of"),
                      (["--out", tmp_path / "nodir" / "x.gguf"], "no directory")]:  # fmt: skip
        r = _cli("export", "gguf", llama_dir, *args)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and msg in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert out.read_bytes() == before  # nothing already saved is damaged
    r = _cli("export", "gguf", tmp_path / "missing", "--out", tmp_path / "y.gguf")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
