"""Open-weight families through one feature-declared model: for each family, a tiny random config written by
transformers' own class with its distinctive features on (llama3 / linear / longrope RoPE, partial rotary, NoPE
layers, sliding windows shorter than the sequence, q/k norms, sandwich and post norms, soft-capping, Granite's
multipliers, fused Phi-3 projections, tied embeddings) loads in llmctl with transformers' logits (fp32, 1e-4),
decodes through the KV cache as the full forward does, trains with transformers' loss and gradients, generates
transformers' greedy tokens, and is saved back as the same architecture with the same logits."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llmctl import hf  # noqa: E402
from llmctl.engine import Engine, SamplingParams  # noqa: E402
from llmctl.errors import UserError  # noqa: E402

V, T = 128, 20  # sequences longer than every sliding window below (8)
COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}  # fmt: skip
FAMILIES = {  # name: (config class, its arguments, llmctl features that must be on)
    "llama3.1": ("LlamaConfig", dict(rope_parameters=LLAMA3), dict(rope_type="llama3")),
    "llama3.2": ("LlamaConfig", dict(rope_parameters=LLAMA3, tie_word_embeddings=True, eos_token_id=[2, 5, 6]),
                 dict(tie_embeddings=True, eos_token_ids=(2, 5, 6))),  # (several EOS ids, saved back as a list)
    "mistral": ("MistralConfig", dict(sliding_window=8), dict(sliding_window=8)),
    "qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1,
                                  num_hidden_layers=3), dict(qkv_bias=True, sliding_window=8)),
    "qwen3": ("Qwen3Config", dict(head_dim=24, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                 "rope_theta": 1e6}), dict(qk_norm="head")),
    "gemma": ("GemmaConfig", dict(head_dim=16), dict(norm="rms1p", mlp="geglu")),
    "gemma2": ("Gemma2Config", dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                                    attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
               dict(norm_layout="sandwich", attn_softcap=5.0, final_softcap=3.0)),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=16, num_hidden_layers=3,
                                        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                                                            "rope_theta": 1e6},
                                                         "sliding_attention": {"rope_type": "default",
                                                                               "rope_theta": 10000.0}}),
               dict(qk_norm="head", rope_local_theta=10000.0)),
    "olmo2": ("Olmo2Config", dict(), dict(norm_layout="post", qk_norm="proj")),
    "phi3": ("Phi3Config", dict(sliding_window=12, original_max_position_embeddings=16,
                                rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                 "short_factor": [1.0, 1.1, 1.3, 1.7, 2.0, 2.5],
                                                 "long_factor": [1.5, 2.0, 3.0, 4.0, 6.0, 8.0],
                                                 "partial_rotary_factor": 0.75}, tie_word_embeddings=True),
             dict(fused_qkv=True, partial_rotary_factor=0.75, rope_type="longrope")),
    "granite": ("GraniteConfig", dict(embedding_multiplier=6.0, residual_multiplier=0.3, attention_multiplier=0.1,
                                      logits_scaling=4.0, attention_bias=True),
                dict(residual_scale=0.3, attn_scale=0.1, logits_scale=4.0)),
    "smollm3": ("SmolLM3Config", dict(no_rope_layers=[1, 0]), dict(no_rope_layers=(1, 0))),
    "pythia": ("GPTNeoXConfig", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                      "partial_rotary_factor": 0.5}, use_parallel_residual=True),
               dict(arch="neox", parallel_residual=True, partial_rotary_factor=0.5)),
    "gpt-neox-sequential": ("GPTNeoXConfig", dict(use_parallel_residual=False, hidden_act="gelu_new"),
                            dict(arch="neox", parallel_residual=False, mlp="gelu_tanh")),
}
TOL = dict(atol=1e-4, rtol=0)


def ids(B=2, n=T, seed=1):
    return torch.randint(3, V, (B, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, folder transformers wrote, the transformers model, llmctl's model loaded from the folder)."""
    cls, kw, _ = FAMILIES[request.param]
    torch.manual_seed(0)
    config = getattr(transformers, cls)(**{**COMMON, **kw})
    theirs = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms start at 1 (or 0 for Gemma's 1 + w) and biases at 0: perturb them
        for p in theirs.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    d = tmp_path_factory.mktemp(request.param)
    theirs.save_pretrained(d)
    return request.param, d, theirs.eval(), hf.load_model(d)


def test_features_and_logits_equal_transformers(family):
    name, d, theirs, ours = family
    for key, value in FAMILIES[name][2].items():
        assert getattr(ours.config, key) == value, key
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x).logits, **TOL)


def test_sliding_window_matters(family):
    name, d, theirs, ours = family
    if ours.config.sliding_window is None:
        pytest.skip("no sliding window")
    cfg = json.loads((d / "config.json").read_text())
    cfg["sliding_window"] = None if name != "gemma3" and name != "gemma2" else 64
    cfg.pop("use_sliding_window", None)
    (d.parent / f"{name}-nowindow").mkdir(exist_ok=True)
    other = hf.config_from_hf(cfg)
    assert other.sliding_window in (None, 64)
    from llmctl.model import Transformer

    full = Transformer(other).eval()
    full.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert (full(ids()) - ours(ids())).abs().max() > 1e-3  # the window changes the logits of this sequence


def test_kv_cache_decode_equals_full_forward(family):
    name, d, theirs, ours = family
    n = 16 if ours.config.rope_type == "longrope" else T  # longrope switches factors past 16: so does HF's cache
    x = ids(n=n)
    with torch.no_grad():
        full = ours(x)
        cache = ours.new_cache(2, n)
        steps = [ours(x[:, :5], cache=cache)] + [ours(x[:, i : i + 1], cache=cache) for i in range(5, n)]
    torch.testing.assert_close(torch.cat(steps, 1), full, **TOL)


@pytest.mark.parametrize("path", ["fast", "plain"])
def test_loss_and_gradients_equal_transformers(family, path, monkeypatch):
    """`fast`: llmctl's training paths where they apply (fused ops, its attention kernels); `plain`: PyTorch's."""
    name, d, theirs, ours = family
    if path == "plain":
        import llmctl.attention
        import llmctl.model

        monkeypatch.setattr(llmctl.model, "_eager_training", lambda: False)
        monkeypatch.setattr(llmctl.attention, "applies", lambda *a: False)
    x = ids(seed=3)
    ours.train(), theirs.train()
    ours.zero_grad(), theirs.zero_grad()
    loss = ours(x[:, :-1], x[:, 1:]) / x[:, 1:].numel()
    loss.backward()
    ref = theirs(x, labels=x).loss
    ref.backward()
    ours.eval(), theirs.eval()
    torch.testing.assert_close(loss, ref, atol=0, rtol=1e-4)
    grads = dict(theirs.named_parameters())
    for k, p in ours.named_parameters():
        g = grads[k].grad
        assert (p.grad - g).abs().max() <= 1e-4 * g.abs().max() + 1e-7, k


def test_greedy_generate_equals_transformers(family):
    name, d, theirs, ours = family
    prompts = [ids(1, 5, seed=4)[0].tolist(), ids(1, 11, seed=5)[0].tolist()]
    n = 10 if ours.config.rope_type == "longrope" else 24  # within longrope's original positions
    res = Engine(ours, eos_ids=[]).generate(prompts, SamplingParams(max_new_tokens=n, temperature=0))
    slow = Engine(ours, eos_ids=[], fast=False).generate(prompts, SamplingParams(max_new_tokens=n, temperature=0))
    assert [r.tokens for r in slow] == [r.tokens for r in res]  # the model's forward, and the native step if it applies
    for p, r in zip(prompts, res):
        out = theirs.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)  # fmt: skip
        assert r.tokens == out[0, len(p):].tolist()


def test_saved_back_as_the_same_architecture(family, tmp_path):
    name, d, theirs, ours = family
    hf.save_model(ours, tmp_path)
    mine, src = json.loads((tmp_path / "config.json").read_text()), json.loads((d / "config.json").read_text())
    assert mine["architectures"] == src["architectures"] and mine["model_type"] == src["model_type"]
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(again) is type(theirs)
    x = ids(seed=6)
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, theirs(x).logits, **TOL)
    assert hf.load_config(tmp_path) == ours.config


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_mixture_of_experts_is_refused_clearly(model_type):
    with pytest.raises(UserError, match="mixture of experts"):
        hf.config_from_hf({"model_type": model_type, **COMMON})


# ------------------------------------------------------------------------------------- the stages, per family


def _llmctl(*commands):
    """Run llmctl commands one after the other in one process (the CLI's own entry, one interpreter start)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = ("import json, sys\nfrom llmctl.cli import app\nfor argv in json.loads(sys.argv[1]):\n"
            "    rc = app(argv, standalone_mode=False)\n    assert not isinstance(rc, int) or rc == 0, (argv, rc)\n")
    r = subprocess.run([sys.executable, "-c", code, json.dumps([[str(a) for a in c] for c in commands])],
                       capture_output=True, text=True, cwd=root,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)})  # fmt: skip
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory, tok_dir):
    """Every family's folder (an llmctl tokenizer in it) and a few steps of `sft`, `lora` and `rlhf method=dpo`
    from it, all commands through the CLI in one process (one interpreter start for the lot)."""
    from llmctl.tokenizer import load_tokenizer

    tok, root = load_tokenizer(tok_dir), tmp_path_factory.mktemp("stages")
    rows = [{"prompt": f"{a} plus {b} is", "completion": f" {a + b}"} for a in range(4) for b in range(3)]
    pairs = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": " no"} for r in rows]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    steps = ["train.max_steps=2", "train.micro_batch_size=4", "train.eval_every=0", "train.log_every=1"]
    commands, configs = [], {}
    for name, (cls, kw, _) in FAMILIES.items():
        torch.manual_seed(0)
        configs[name] = config = getattr(transformers, cls)(**{**COMMON, **kw, "vocab_size": tok.vocab_size,
                                                               "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
                                                               "pad_token_id": tok.pad_id})  # fmt: skip
        d = root / name
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(d / "base")
        tok.save(d / "base")
        commands += [[kind, f"recipes/tiny/{kind}.yaml", f"out_dir={d / kind}", f"init_from={d / 'base'}",
                      f"data.train={root / 'sft.jsonl'}", "data.val=null", "eval.exact_match=null", *steps]
                     for kind in ("sft", "lora")]  # fmt: skip
        commands.append(["rlhf", "recipes/tiny/dpo.yaml", f"out_dir={d / 'dpo'}", f"init_from={d / 'base'}",
                         f"data.train={root / 'pairs.jsonl'}", "data.val=null", *steps])  # fmt: skip
    _llmctl(*commands)
    return root, configs


@pytest.mark.parametrize("name", list(FAMILIES))
def test_sft_lora_and_dpo_run_on_the_family(name, stage_runs):
    """`sft`, `lora` and `rlhf method=dpo` ran a few steps from the family's folder; the LoRA adapter loads in
    peft on the transformers model with llmctl's logits; the sft and dpo checkpoints are the family's
    architecture again."""
    from peft import PeftModel

    from llmctl import lora

    root, configs = stage_runs
    d, config = root / name, configs[name]
    for kind in ("sft", "dpo"):
        saved = json.loads((d / kind / "checkpoints/step-0000002/config.json").read_text())
        assert saved["architectures"] == config.architectures or saved["model_type"] == config.model_type
    x = ids(1, 12, seed=7)
    ck, base = d / "lora/checkpoints/step-0000002", d / "base"
    with torch.no_grad():
        ours = lora.load(hf.load_model(base), ck).get_base_model()(x)
        theirs = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(str(base)), str(ck))
        torch.testing.assert_close(ours, theirs.eval()(x).logits, **TOL)
        assert (ours - hf.load_model(base)(x)).abs().max() > 0  # the adapter trained


def test_transformers_4_config_files_read_the_same():
    """config.json files as transformers 4 wrote them (rope_scaling + rope_theta, rope_local_base_freq, rotary_pct,
    no layer_types) give the same switches as transformers 5's."""
    base = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2)  # fmt: skip
    llama32 = hf.config_from_hf({**base, "model_type": "llama", "rope_theta": 500000.0, "tie_word_embeddings": True,
                                 "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
    assert (llama32.rope_type, llama32.rope_theta, llama32.rope_scaling["factor"]) == ("llama3", 5e5, 32.0)
    gemma3 = hf.config_from_hf({**base, "model_type": "gemma3_text", "head_dim": 16, "rope_theta": 1e6,
                                "rope_local_base_freq": 10000.0, "sliding_window": 8, "sliding_window_pattern": 2,
                                "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "query_pre_attn_scalar": 16})
    assert gemma3.layer_types == ("sliding_attention", "full_attention") * 2
    assert (gemma3.rope_local_theta, gemma3.rope_theta, gemma3.rope_type) == (1e4, 1e6, "linear")
    phi4 = hf.config_from_hf({**base, "model_type": "phi3", "partial_rotary_factor": 0.75,
                              "original_max_position_embeddings": 32, "max_position_embeddings": 64,
                              "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 6, "long_factor": [2.0] * 6}})
    assert (phi4.rope_type, phi4.partial_rotary_factor, phi4.rope_scaling["original_max_position_embeddings"]) == \
        ("longrope", 0.75, 32)
    pythia = hf.config_from_hf({**base, "model_type": "gpt_neox", "rotary_pct": 0.25, "rotary_emb_base": 10000,
                                "num_key_value_heads": None})
    assert (pythia.arch, pythia.partial_rotary_factor, pythia.parallel_residual) == ("neox", 0.25, True)
    mistral = hf.config_from_hf({**base, "model_type": "mistral", "sliding_window": 4096, "max_position_embeddings": 4096})
    assert mistral.sliding_window is None and mistral.plain  # a window as long as the context: the fast paths stay
    qwen3 = hf.config_from_hf({**base, "model_type": "qwen3", "use_sliding_window": False, "sliding_window": None,
                               "max_window_layers": 28, "rope_theta": 1e6})
    assert qwen3.sliding_window is None and qwen3.qk_norm == "head"
