"""An llmctl model in llama.cpp's terms: the GGUF architecture of its family, the hyperparameter keys, and each
tensor under llama.cpp's name and in its layout (the `gguf` package's name map, as llama.cpp's own converter uses):

- RoPE: llama.cpp's LLAMA, GRANITE and SMOLLM3 rotate consecutive pairs of a head's dimensions, Hugging Face
  rotates its two halves; q / k rows are permuted per head as convert_hf_to_gguf.py does (the other archs rotate
  halves, as HF does; GPT-2 has no RoPE);
- Gemma's RMSNorm weights are stored as 1 + w (llama.cpp multiplies by the weight);
- GPT-NeoX's fused query_key_value is per head [q k v]; llama.cpp wants [all q; all k; all v];
- an attention scale llama.cpp fixes for the arch (1 / sqrt(head_dim), Gemma 2's query_pre_attn_scalar ignored)
  is reached by scaling q (its projection, or its norm's weight where q is normalised) by ours / theirs.

A family or a feature llama.cpp's arch cannot compute exactly is refused with one UserError naming it."""

from __future__ import annotations

import math

from llmctl.errors import UserError

DTYPES = ("f32", "f16", "bf16", "q8_0")
# llmctl family -> (GGUF architecture, RoPE pairing: "norm" consecutive pairs (q / k permuted), "neox" halves)
ARCHS = {
    "llama": ("LLAMA", "norm"), "mistral": ("LLAMA", "norm"), "granite": ("GRANITE", "norm"),
    "smollm3": ("SMOLLM3", "norm"), "qwen2": ("QWEN2", "neox"), "qwen3": ("QWEN3", "neox"),
    "gemma": ("GEMMA", "neox"), "gemma2": ("GEMMA2", "neox"), "gemma3_text": ("GEMMA3", "neox"),
    "olmo2": ("OLMO2", "neox"), "phi3": ("PHI3", "neox"), "gpt2": ("GPT2", None), "gpt_neox": ("GPTNEOX", "neox"),
}  # fmt: skip
FAMILIES = tuple(ARCHS)
SMOLLM3_NOPE_STEP = 4  # llama.cpp's smollm3: every 4th layer has no RoPE (hard-coded there)


def family(cfg) -> str:
    """The Hugging Face family a ModelConfig saves as (hf.config_to_hf's choice)."""
    if cfg.arch != "llama":
        return {"gpt2": "gpt2", "neox": "gpt_neox"}[cfg.arch]
    return cfg.model_type or ("qwen2" if cfg.qkv_bias and not cfg.attn_out_bias else "llama")


def _close(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-6)
    return a == b


def _expected(cfg, fam: str) -> dict:
    """The feature switches llama.cpp's arch for `fam` computes (what this config must have to export exactly)."""
    want = dict(norm="rms", norm_layout="pre", qk_norm=None, mlp="swiglu", fused_qkv=False, fused_gate_up=False,
                mlp_bias=False, attn_softcap=None, final_softcap=None, embed_scale=1.0, residual_scale=1.0,
                logits_scale=1.0, rope_local_theta=None, partial_rotary_factor=1.0, no_rope_layers=None,
                sliding_window=None, parallel_residual=False)  # fmt: skip
    if fam in ("gpt2", "gpt_neox"):
        want.update(norm=cfg.norm, mlp=cfg.mlp, qkv_bias=cfg.qkv_bias, attn_out_bias=cfg.attn_out_bias,
                    partial_rotary_factor=cfg.partial_rotary_factor, parallel_residual=cfg.parallel_residual)
        return want
    want.update(qkv_bias=fam in ("llama", "mistral", "granite", "qwen2") and cfg.qkv_bias,
                attn_out_bias=fam in ("llama", "mistral", "granite") and cfg.attn_out_bias)
    if fam in ("llama", "mistral", "granite"):
        want["mlp_bias"] = cfg.mlp_bias
    if fam.startswith("gemma"):
        want.update(norm="rms1p", mlp="geglu", embed_scale=math.sqrt(cfg.n_embd), tie_embeddings=True)
    if fam in ("gemma2", "gemma3_text"):
        want.update(norm_layout="sandwich", final_softcap=cfg.final_softcap, sliding_window=cfg.sliding_window)
    if fam == "gemma2":
        want["attn_softcap"] = cfg.attn_softcap if cfg.attn_softcap is not None else "a value (llama.cpp always caps)"
    if fam == "gemma3_text":
        want.update(qk_norm="head", rope_local_theta=cfg.rope_local_theta)
    if fam == "qwen3":
        want["qk_norm"] = "head"
    if fam == "olmo2":
        want.update(norm_layout="post", qk_norm="proj")
    if fam == "phi3":
        want.update(fused_qkv=True, fused_gate_up=True, partial_rotary_factor=cfg.partial_rotary_factor)
    if fam == "granite":
        want.update(embed_scale=cfg.embed_scale, residual_scale=cfg.residual_scale, logits_scale=cfg.logits_scale)
    if fam == "smollm3":
        nope = tuple(int((i + 1) % SMOLLM3_NOPE_STEP != 0) for i in range(cfg.n_layer))
        want["no_rope_layers"] = None if all(nope) else nope
    return want


def check(cfg) -> str:
    """The family of `cfg` if llama.cpp computes it exactly; else a UserError naming the family or the feature."""
    fam = family(cfg)
    if fam not in ARCHS:
        raise UserError(f"cannot export {fam} to GGUF: llama.cpp has no architecture for it (exported families: "
                        f"{', '.join(FAMILIES)})")  # fmt: skip
    for key, value in _expected(cfg, fam).items():
        have = getattr(cfg, key)
        if not _close(have, value):
            if key == "no_rope_layers" and fam == "smollm3":
                value = f"no RoPE on every {SMOLLM3_NOPE_STEP}th layer"
            raise UserError(f"cannot export this {fam} model to GGUF: llama.cpp's {ARCHS[fam][0].lower()} needs "
                            f"{key} = {value!r}, the model has {have!r}")  # fmt: skip
    rope_ok = ("default", "linear") + (("llama3",) if ARCHS[fam][0] == "LLAMA" else ())
    if fam != "gpt2" and cfg.rope_type not in rope_ok:
        raise UserError(f"cannot export this {fam} model to GGUF: RoPE type {cfg.rope_type!r} (llmctl exports "
                        f"{', '.join(rope_ok)} for {fam})")  # fmt: skip
    return fam


def gguf_arch(fam: str):
    import gguf

    return getattr(gguf.MODEL_ARCH, ARCHS[fam][0])


def add_hparams(w, cfg, fam: str) -> None:
    """The architecture's hyperparameter keys."""
    import gguf

    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_vocab_size(cfg.vocab_size)
    if fam in ("gpt2", "gpt_neox"):
        w.add_layer_norm_eps(cfg.norm_eps)
    else:
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    if fam != "gpt2":
        w.add_rope_dimension_count(int(cfg.head_dim * cfg.partial_rotary_factor))
        w.add_rope_freq_base(cfg.rope_theta)
        if cfg.rope_type == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
    if fam == "gpt_neox":
        w.add_parallel_residual(cfg.parallel_residual)
    if fam in ("gemma2", "gemma3_text"):
        if cfg.sliding_window is not None:
            w.add_sliding_window(cfg.sliding_window)
        w.add_sliding_window_pattern([cfg.layer_type(i) == "sliding_attention" for i in range(cfg.n_layer)])
        w.add_final_logit_softcapping(float(cfg.final_softcap or 0.0))
    if cfg.rope_local_theta is not None:
        w.add_rope_freq_base_swa(cfg.rope_local_theta)
    if cfg.attn_softcap is not None:
        w.add_attn_logit_softcapping(cfg.attn_softcap)
    if fam == "granite":
        w.add_embedding_scale(cfg.embed_scale)
        w.add_residual_scale(cfg.residual_scale)
        w.add_logit_scale(cfg.logits_scale)
        w.add_attention_scale(cfg.attn_scale if cfg.attn_scale is not None else cfg.head_dim**-0.5)


def _q_factor(cfg, fam: str) -> float:
    """ours / llama.cpp's attention scale (1 when equal): q is scaled by it so that the scores agree."""
    if fam in ("granite", "gpt2", "gpt_neox") or cfg.attn_scale is None:
        return 1.0
    big = {"gemma2": 46, "gemma3_text": 62}.get(fam) == cfg.n_layer  # Gemma 27B: llama.cpp's own rule
    theirs = (cfg.n_embd / cfg.n_head) ** -0.5 if big else cfg.head_dim**-0.5
    return cfg.attn_scale / theirs


def _permute(t, n_head: int):
    """Rotate-half rows -> llama.cpp's consecutive pairs, per head (convert_hf_to_gguf.py's LlamaModel.permute)."""
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def _convert(key: str, t, cfg, fam: str, q_factor: float):
    import torch

    nh, nkv, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    if cfg.norm == "rms1p" and key.endswith("norm.weight"):
        t = t + 1
    if q_factor != 1:
        if cfg.qk_norm:
            t = t * q_factor if key.endswith("self_attn.q_norm.weight") else t
        elif key.endswith(("q_proj.weight", "q_proj.bias")):
            t = t * q_factor
        elif key.endswith(("qkv_proj.weight", "qkv_proj.bias")):
            t = t.clone()
            t[: nh * hd] *= q_factor
    if ARCHS[fam][1] == "norm":
        if key.endswith(("q_proj.weight", "q_proj.bias")):
            t = _permute(t, nh)
        elif key.endswith(("k_proj.weight", "k_proj.bias")):
            t = _permute(t, nkv)
    if fam == "gpt_neox" and ".attention.query_key_value." in key:
        parts = t.reshape(nh, 3, hd, *t.shape[1:])
        t = torch.cat([parts[:, i].reshape(nh * hd, *t.shape[1:]) for i in range(3)])
    return t


def tensors(model, fam: str):
    """(llama.cpp name, float32 numpy array) for every weight of `model`, in llama.cpp's layout."""
    import gguf
    import torch

    cfg = model.config
    names = gguf.get_tensor_name_map(gguf_arch(fam), cfg.n_layer)
    state = model.state_dict()
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)  # llama.cpp reuses token_embd
    q_factor = _q_factor(cfg, fam)
    for key, t in state.items():
        t = _convert(key, t.detach().to("cpu", torch.float32), cfg, fam, q_factor)
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"cannot export {fam} to GGUF: no llama.cpp name for tensor {key}")
        yield name, t.contiguous().numpy()
    if cfg.rope_type == "llama3":
        yield "rope_freqs.weight", _llama3_factors(cfg)


def _llama3_factors(cfg):
    """Llama 3.1's per-frequency RoPE divisors, as llama.cpp reads them (rope_freqs)."""
    import numpy as np

    s = cfg.rope_scaling
    factor, low, high, old = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0), \
        s["original_max_position_embeddings"]  # fmt: skip
    out = []
    for i in range(0, cfg.head_dim, 2):
        wavelen = 2 * math.pi * cfg.rope_theta ** (i / cfg.head_dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def add_tensor(w, name: str, arr, dtype: str) -> None:
    """One tensor in `dtype` (f32 | f16 | bf16 | q8_0); 1-D tensors (norms, biases) stay f32, as llama.cpp's
    converter keeps them; a q8_0 row not a multiple of 32 long falls back to f16."""
    import gguf
    import numpy as np

    Q = gguf.GGMLQuantizationType
    if arr.ndim < 2 or dtype == "f32":
        w.add_tensor(name, arr.astype(np.float32))
    elif dtype == "f16" or (dtype == "q8_0" and arr.shape[-1] % 32):
        w.add_tensor(name, arr.astype(np.float16))
    else:
        qtype = Q.BF16 if dtype == "bf16" else Q.Q8_0
        w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)


def file_type(dtype: str):
    import gguf

    T = gguf.LlamaFileType
    return {"f32": T.ALL_F32, "f16": T.MOSTLY_F16, "bf16": T.MOSTLY_BF16, "q8_0": T.MOSTLY_Q8_0}[dtype]


def write(model, tok, path, dtype: str) -> dict:
    """Write `model` with `tok` as a GGUF file at `path` (weights in `dtype`, fsynced); returns the special ids."""
    import os

    import gguf

    from llmctl.export.vocab import add_vocab

    cfg = model.config
    fam = check(cfg)
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf_arch(fam)])
    add_hparams(w, cfg, fam)
    w.add_file_type(file_type(dtype))
    ids = add_vocab(w, tok, cfg.vocab_size)
    for name, arr in tensors(model, fam):
        add_tensor(w, name, arr, dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return ids
