"""Hugging Face checkpoint folders: config.json <-> ModelConfig, model.safetensors <-> Transformer, tokenizer files.

A folder written by `save_model` loads with `transformers.AutoModelForCausalLM.from_pretrained` and gives the same
logits; `load_model` reads local checkpoints of the Llama family (llama, mistral, qwen2) and GPT-2. Weights are read
from safetensors only: nothing is ever unpickled.

Mapping: llmctl llama -> LlamaForCausalLM (attention_bias = qkv_bias = attn_out_bias), or Qwen2ForCausalLM when only
the q/k/v projections have biases; gpt2 -> GPT2LMHeadModel, whose Conv1D weights are the transpose of our nn.Linear
weights. Mistral checkpoints load as llama; a sliding window shorter than max_position_embeddings becomes the
block_size (exact for every sequence llmctl then accepts, but the model is saved back as a plain Llama with that
context length).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from llmctl.checkpoint import read_safetensors, resolve_model_dir, writing
from llmctl.errors import UserError
from llmctl.config import ModelConfig
from llmctl.model import TREES, Transformer, unwrap

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
GPT2_CONV1D = re.compile(r"\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
# buffers some older HF checkpoints contain: GPT-2's causal mask, Llama's rotary inverse frequencies
IGNORED_KEYS = re.compile(r"(\.attn\.(bias|masked_bias)|\.rotary_emb\.inv_freq)$")
DEFAULT_RMS_EPS = 1e-6  # LlamaConfig / MistralConfig / Qwen2Config default
DEFAULT_MAX_POS = {"llama": 2048, "mistral": 131072, "qwen2": 32768, "qwen3": 32768, "gemma": 8192, "gemma2": 8192,
                   "gemma3_text": 131072, "phi3": 4096, "smollm3": 32768}  # fmt: skip


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    dt = getattr(torch, str(dtype), None)
    if not isinstance(dt, torch.dtype):
        raise UserError(f"unknown dtype: {dtype!r} (use float32, bfloat16 or float16)")
    return dt


# ---------------------------------------------------------------------------------------------------- config.json


# One table maps each Hugging Face model_type onto ModelConfig's feature switches (reading) and back (writing):
# `features` are the family's fixed switches; `read(d)` the switches its config.json sets; every family shares
# Llama's module names (Phi-3's fused qkv_proj / gate_up_proj included), so weights map 1:1 both ways.
FAMILIES = {
    "llama": dict(arch="LlamaForCausalLM"),
    "mistral": dict(arch="MistralForCausalLM"),
    "qwen2": dict(arch="Qwen2ForCausalLM", features=dict(qkv_bias=True)),
    "qwen3": dict(arch="Qwen3ForCausalLM", features=dict(qk_norm="head")),
    "gemma": dict(arch="GemmaForCausalLM", features=dict(norm="rms1p", mlp="geglu", embed_scale="sqrt")),
    "gemma2": dict(arch="Gemma2ForCausalLM", features=dict(norm="rms1p", norm_layout="sandwich", mlp="geglu",
                                                           embed_scale="sqrt")),
    "gemma3_text": dict(arch="Gemma3ForCausalLM", features=dict(norm="rms1p", norm_layout="sandwich", mlp="geglu",
                                                                embed_scale="sqrt", qk_norm="head")),
    "olmo2": dict(arch="Olmo2ForCausalLM", features=dict(norm_layout="post", qk_norm="proj")),
    "phi3": dict(arch="Phi3ForCausalLM", features=dict(fused_qkv=True, fused_gate_up=True)),
    "granite": dict(arch="GraniteForCausalLM"),
    "smollm3": dict(arch="SmolLM3ForCausalLM"),
}
MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "phimoe", "deepseek_v2", "deepseek_v3",
             "dbrx", "jamba", "llama4", "gpt_oss")  # fmt: skip
GELU_TANH = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")
LLAMA_TYPES = tuple(FAMILIES)


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The config.json dict transformers needs to rebuild `cfg` as its family (read by transformers 4.x and 5.x)."""
    common = dict(
        vocab_size=cfg.vocab_size, bos_token_id=cfg.bos_token_id,
        eos_token_id=list(cfg.eos_token_ids) if cfg.eos_token_ids else cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id, tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std,
        use_cache=True, dtype=_dtype_name(dtype), torch_dtype=_dtype_name(dtype),
    )  # fmt: skip
    if cfg.arch == "gpt2":
        return dict(
            architectures=["GPT2LMHeadModel"], model_type="gpt2", n_positions=cfg.block_size, n_ctx=cfg.block_size,
            n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.intermediate_size,
            activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps, resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, scale_attn_weights=True,
            scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False, **common,
        )  # fmt: skip
    if cfg.arch == "neox":
        rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {}),
                "partial_rotary_factor": cfg.partial_rotary_factor}  # fmt: skip
        return dict(sorted(dict(
            architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox", hidden_size=cfg.n_embd,
            num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, intermediate_size=cfg.intermediate_size,
            hidden_act="gelu_new" if cfg.mlp == "gelu_tanh" else "gelu", max_position_embeddings=cfg.block_size,
            layer_norm_eps=cfg.norm_eps, use_parallel_residual=cfg.parallel_residual, rope_parameters=rope,
            rotary_pct=cfg.partial_rotary_factor, rotary_emb_base=cfg.rope_theta, attention_bias=cfg.qkv_bias,
            attention_dropout=cfg.dropout, hidden_dropout=cfg.dropout, **common).items()))  # fmt: skip
    mt = cfg.model_type or ("qwen2" if cfg.qkv_bias and not cfg.attn_out_bias else "llama")
    rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})}
    if cfg.partial_rotary_factor != 1:
        rope["partial_rotary_factor"] = cfg.partial_rotary_factor
    d = dict(
        architectures=[FAMILIES[mt]["arch"]], model_type=mt, hidden_size=cfg.n_embd,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim, max_position_embeddings=cfg.block_size,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, rope_parameters=rope, attention_dropout=cfg.dropout,
        rope_scaling=None if cfg.rope_type == "default" else {k: v for k, v in rope.items() if k != "rope_theta"},
        attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias, sliding_window=cfg.sliding_window,
        **{"hidden_activation" if mt.startswith("gemma") else "hidden_act":
           "gelu_pytorch_tanh" if cfg.mlp == "geglu" else "silu"}, **common,
    )  # fmt: skip
    if cfg.partial_rotary_factor != 1:
        d["partial_rotary_factor"] = cfg.partial_rotary_factor
    if cfg.layer_types:
        d["layer_types"] = list(cfg.layer_types)
    if mt in ("qwen2", "qwen3", "smollm3"):
        d.update(use_sliding_window=cfg.sliding_window is not None, max_window_layers=cfg.n_layer)
    if mt == "llama":
        d.update(pretraining_tp=1, attention_bias=cfg.qkv_bias)
    if mt.startswith("gemma"):
        q = cfg.head_dim if cfg.attn_scale is None else cfg.attn_scale**-2
        d.update(query_pre_attn_scalar=round(q) if abs(q - round(q)) < 1e-6 else q,
                 attn_logit_softcapping=cfg.attn_softcap, final_logit_softcapping=cfg.final_softcap)  # fmt: skip
    if mt == "gemma3_text":
        local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
        d.update(rope_parameters={"full_attention": rope, "sliding_attention": local},
                 rope_local_base_freq=local["rope_theta"], use_bidirectional_attention=False)  # fmt: skip
    if mt == "granite":
        d.update(embedding_multiplier=cfg.embed_scale, residual_multiplier=cfg.residual_scale,
                 attention_multiplier=cfg.attn_scale or cfg.head_dim**-0.5, logits_scaling=cfg.logits_scale)
    if mt == "smollm3":
        d["no_rope_layers"] = list(cfg.no_rope_layers or [1] * cfg.n_layer)
    if mt == "phi3":
        d.update(original_max_position_embeddings=(cfg.rope_scaling or {}).get("original_max_position_embeddings",
                 cfg.block_size), resid_pdrop=cfg.dropout, embd_pdrop=0.0)  # fmt: skip
    return dict(sorted(d.items()))


def _first_id(v):
    """Token ids may be lists in HF configs (several eos tokens): keep the first."""
    if isinstance(v, list):
        return v[0] if v else None
    return v


def _rope(d: dict, mt: str) -> dict:
    """The ModelConfig RoPE fields of a config.json: HF 5's rope_parameters (per layer type for Gemma 3) or 4's
    rope_scaling + rope_theta."""
    rp = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    out = {}
    if "full_attention" in rp or "sliding_attention" in rp:  # per layer type
        local = rp.get("sliding_attention") or {}
        rp = dict(rp.get("full_attention") or {})
        if local.get("rope_type", local.get("type", "default")) != "default":
            raise UserError("unsupported checkpoint: scaled RoPE on sliding layers")
        out["rope_local_theta"] = float(local.get("rope_theta", 10000.0))
    elif mt == "gemma3_text":
        out["rope_local_theta"] = float(d.get("rope_local_base_freq", 10000.0))
    kind = rp.pop("rope_type", rp.pop("type", "default")) or "default"
    theta = float(rp.pop("rope_theta", d.get("rope_theta", 1e6 if mt == "gemma3_text" else 10000.0)))
    partial = rp.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if kind not in ("default", "linear", "dynamic", "yarn", "longrope", "llama3"):
        raise UserError(f"unsupported checkpoint: RoPE type {kind!r}")
    if kind in ("llama3", "yarn", "longrope"):
        rp["original_max_position_embeddings"] = (d.get("original_max_position_embeddings")
                                                  or rp.get("original_max_position_embeddings")
                                                  or d.get("max_position_embeddings"))  # fmt: skip
    return dict(out, rope_type=kind, rope_theta=theta, partial_rotary_factor=float(partial),
                rope_scaling=rp if kind != "default" else None)  # fmt: skip


def _layers(d: dict, mt: str, n: int) -> dict:
    """Sliding windows per layer (Mistral: all; Qwen: from max_window_layers; Gemma 2/3: layer_types)."""
    window, types = d.get("sliding_window"), d.get("layer_types")
    if mt in ("qwen2", "qwen3", "smollm3") and not d.get("use_sliding_window", False):
        window, types = None, None
    if mt == "gemma2" and types is None:
        types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    if mt == "gemma3_text" and types is None:
        pattern = d.get("sliding_window_pattern", 6)
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    if mt in ("qwen2", "qwen3", "smollm3") and window is not None and types is None:
        types = ["sliding_attention" if i >= d.get("max_window_layers", n) else "full_attention" for i in range(n)]
    block = d.get("max_position_embeddings", DEFAULT_MAX_POS.get(mt, 2048))
    if window is None or window >= block or (types and "sliding_attention" not in types):
        return dict(sliding_window=None, layer_types=None)  # (a window that spans the context changes nothing)
    if types and "full_attention" not in types:
        types = None
    return dict(sliding_window=int(window), layer_types=types)


def config_from_hf(d: dict) -> ModelConfig:
    """A ModelConfig from a Hugging Face config.json dict; anything llmctl cannot reproduce exactly is a UserError."""
    mt = d.get("model_type")
    if d.get("quantization_config"):
        raise UserError("unsupported checkpoint: quantized weights (quantization_config); use the full-precision model")
    eos = d.get("eos_token_id")
    ids = dict(bos_token_id=_first_id(d.get("bos_token_id")), eos_token_id=_first_id(eos),
               eos_token_ids=tuple(eos) if isinstance(eos, list) and len(eos) > 1 else None,
               pad_token_id=_first_id(d.get("pad_token_id")))  # fmt: skip
    try:
        if mt == "gpt2":
            act = d.get("activation_function", "gelu_new")
            if act not in GELU_TANH:
                raise UserError(f"unsupported checkpoint: gpt2 activation_function {act!r} (tanh-approximated GELU only)")
            if not d.get("scale_attn_weights", True) or d.get("scale_attn_by_inverse_layer_idx", False):
                raise UserError("unsupported checkpoint: gpt2 with non-standard attention scaling")
            if d.get("add_cross_attention", False):
                raise UserError("unsupported checkpoint: gpt2 with cross-attention")
            return ModelConfig(
                arch="gpt2", vocab_size=d["vocab_size"], n_layer=d["n_layer"], n_head=d["n_head"],
                n_embd=d["n_embd"], intermediate_size=d.get("n_inner"), block_size=d["n_positions"],
                norm_eps=d.get("layer_norm_epsilon", 1e-5), tie_embeddings=d.get("tie_word_embeddings", True),
                dropout=d.get("resid_pdrop", 0.0), init_std=d.get("initializer_range", 0.02), **ids,
            )  # fmt: skip
        if mt == "gpt_neox":
            act = d.get("hidden_act", "gelu")
            if act not in ("gelu", *GELU_TANH):
                raise UserError(f"unsupported checkpoint: gpt_neox hidden_act {act!r} (GELU only)")
            rope = _rope({**d, "rope_theta": d.get("rope_theta", d.get("rotary_emb_base", 10000.0)),
                          "partial_rotary_factor": d.get("partial_rotary_factor", d.get("rotary_pct", 0.25))}, mt)
            bias = d.get("attention_bias", True)
            return ModelConfig(
                arch="neox", vocab_size=d["vocab_size"], n_layer=d["num_hidden_layers"], n_head=d["num_attention_heads"],
                n_embd=d["hidden_size"], intermediate_size=d["intermediate_size"],
                block_size=d.get("max_position_embeddings", 2048), norm_eps=d.get("layer_norm_eps", 1e-5),
                qkv_bias=bias, attn_out_bias=bias, mlp="gelu" if act == "gelu" else "gelu_tanh",
                parallel_residual=d.get("use_parallel_residual", True), tie_embeddings=d.get("tie_word_embeddings", False),
                dropout=d.get("attention_dropout", 0.0) or 0.0, init_std=d.get("initializer_range", 0.02), **rope, **ids,
            )  # fmt: skip
        if mt in MOE_TYPES:
            raise UserError(f"unsupported checkpoint: model_type {mt!r} is a mixture of experts (not supported yet)")
        if mt in FAMILIES:
            f = dict(FAMILIES[mt].get("features", {}))
            gemma = mt.startswith("gemma")
            act = d.get("hidden_activation", d.get("hidden_act")) if gemma else d.get("hidden_act", "silu")
            if act in GELU_TANH or (gemma and act is None):
                f["mlp"] = "geglu"
            elif act not in ("silu", "swish"):
                raise UserError(f"unsupported checkpoint: hidden_act {act!r} (gated MLP with silu or tanh GELU only)")
            n, C, nh = d["num_hidden_layers"], d["hidden_size"], d["num_attention_heads"]
            hd = d.get("head_dim") or C // nh
            bias = d.get("attention_bias", False)
            if f.pop("embed_scale", None) == "sqrt":
                f["embed_scale"] = C**0.5
            if gemma:
                f.update(attn_scale=d.get("query_pre_attn_scalar", hd) ** -0.5, final_softcap=d.get("final_logit_softcapping"))
                if mt == "gemma2":
                    f["attn_softcap"] = d.get("attn_logit_softcapping")
            if mt == "granite":
                f.update(embed_scale=float(d.get("embedding_multiplier", 1.0)), attn_scale=float(d.get("attention_multiplier", 1.0)),
                         residual_scale=float(d.get("residual_multiplier", 1.0)), logits_scale=float(d.get("logits_scaling", 1.0)))  # fmt: skip
            if mt == "smollm3":
                nope = d.get("no_rope_layers") or [int((i + 1) % d.get("no_rope_layer_interval", 4) != 0) for i in range(n)]
                f["no_rope_layers"] = None if all(nope) else nope
            qkv_bias, out_bias = f.pop("qkv_bias", bias), bias and mt != "qwen2"
            default = "qwen2" if qkv_bias and not out_bias else "llama"  # what a model llmctl pretrains saves as
            return ModelConfig(
                arch="llama", model_type=None if mt == default else mt, vocab_size=d["vocab_size"], n_layer=n, n_head=nh,
                n_kv_head=d.get("num_key_value_heads"), n_embd=C, head_dim=hd, intermediate_size=d["intermediate_size"],
                block_size=d.get("max_position_embeddings", DEFAULT_MAX_POS.get(mt, 2048)),
                norm_eps=d.get("rms_norm_eps", DEFAULT_RMS_EPS), qkv_bias=qkv_bias, attn_out_bias=out_bias, mlp_bias=d.get("mlp_bias", False),
                tie_embeddings=d.get("tie_word_embeddings", gemma or mt == "smollm3"),
                dropout=d.get("attention_dropout", 0.0) or 0.0, init_std=d.get("initializer_range", 0.02),
                **_rope(d, mt), **_layers(d, mt, n), **f, **ids,
            )  # fmt: skip
    except KeyError as e:
        raise UserError(f"incompatible checkpoint: config.json has no {e.args[0]!r}") from None
    except (ValueError, TypeError) as e:
        raise UserError(f"incompatible checkpoint: {e}") from None
    raise UserError(f"unsupported checkpoint: model_type {mt!r} (llmctl reads {', '.join(LLAMA_TYPES)}, gpt2 and gpt_neox)")


def load_config(path) -> ModelConfig:
    """The ModelConfig of a model or run directory (no weights read)."""
    return config_from_hf(_read_json(resolve_model_dir(path) / "config.json"))


def _read_json(p: Path) -> dict:
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {p}: {e}") from None
    if not isinstance(d, dict):
        raise UserError(f"{p}: expected a JSON object")
    return d


# ------------------------------------------------------------------------------------------------------ save / load


def save_model(model, out_dir, *, tokenizer_dir=None, dtype=None) -> Path:
    """Write a Hugging Face model folder: config.json, model.safetensors, generation_config.json and the tokenizer
    files found in `tokenizer_dir` (a folder, or a tokenizer.json path). dtype: weights dtype (default: the model's)."""
    model = unwrap(model, Transformer)
    cfg = model.config
    dtype = _as_dtype(dtype) if dtype is not None else model.lm_head.weight.dtype
    tied = "lm_head.weight" if cfg.tie_embeddings else None  # HF re-ties it from the embedding
    gen = {k: getattr(cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if getattr(cfg, k) is not None}
    if cfg.eos_token_ids:
        gen["eos_token_id"] = list(cfg.eos_token_ids)  # every EOS id, as the source had them
    state = {("embed_out.weight" if cfg.arch == "neox" and k == "lm_head.weight" else k): t  # NeoX's own name
             for k, t in model.state_dict().items() if k != tied}  # fmt: skip
    return write_folder(out_dir, state, cfg.arch, dtype,
                        {"config.json": config_to_hf(cfg, dtype), "generation_config.json": gen}, tokenizer_dir)


def write_folder(out_dir, state: dict, arch: str, dtype, files: dict, tokenizer_dir=None) -> Path:
    """A Hugging Face folder: model.safetensors from `state` in `dtype` (GPT-2's projections transposed to its
    Conv1D layout), the JSON `files` (name -> object) and the tokenizer files of `tokenizer_dir`."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k, t in state.items():
        if arch == "gpt2" and GPT2_CONV1D.search(k):
            t = t.t()  # nn.Linear [out, in] -> Conv1D [in, out]
        tensors[k] = t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype).contiguous()
    with writing(out / "model.safetensors"):
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name, obj in files.items():
        with writing(out / name):
            (out / name).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    copy_tokenizer(tokenizer_dir, out)
    return out


def copy_tokenizer(tokenizer_dir, out) -> None:
    """Copy the tokenizer files of `tokenizer_dir` (a directory or its tokenizer.json; None: nothing) into `out`."""
    if tokenizer_dir is None:
        return
    src, out = Path(tokenizer_dir), Path(out)
    src = src.parent if src.is_file() else src
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and (src / name).resolve() != (out / name).resolve():
            with writing(out / name):
                shutil.copyfile(src / name, out / name)


def _weight_files(d: Path) -> list[Path]:
    if (d / "model.safetensors").is_file():
        return [d / "model.safetensors"]
    index = d / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(_read_json(index).get("weight_map", {}).values()))
        if not names:
            raise UserError(f"incompatible checkpoint: {index} lists no weights")
        for n in names:
            if not isinstance(n, str) or Path(n).name != n or not (d / n).is_file():
                raise UserError(f"incompatible checkpoint: shard {n!r} listed in {index.name} is missing")
        return [d / n for n in names]
    if any(d.glob("*.bin")) or any(d.glob("*.pt")) or any(d.glob("*.pth")):
        raise UserError(f"{d} has pickled weights only (pytorch_model.bin); llmctl reads safetensors only — "
                        "convert them with transformers (save_pretrained(..., safe_serialization=True))")  # fmt: skip
    raise UserError(f"incompatible checkpoint: no model.safetensors in {d}")


def load_state(params: dict, files, rename, arch: str, what: str = "checkpoint") -> tuple[set, list]:
    """Copy the tensors of safetensors `files` into `params` (name -> tensor); rename(key) gives a tensor's name
    in `params` (None: skip it); GPT-2 Conv1D weights are transposed. Returns (names loaded, unexpected keys)."""
    loaded, unexpected = set(), []
    for f in files:
        for key, t in read_safetensors(f):
            name = rename(key)
            if name is None:
                continue
            if name not in params:
                unexpected.append(key)
                continue
            if arch == "gpt2" and GPT2_CONV1D.search(name) and t.dim() == 2:
                t = t.t()  # Conv1D [in, out] -> nn.Linear [out, in]
            p = params[name]
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise UserError(f"incompatible {what}: {key} in {f} holds non-finite values (NaN / Inf); "
                                "refusing to load it")
            if t.shape != p.shape:
                raise UserError(f"incompatible {what}: {key} has shape {list(t.shape)}, "
                                f"the config implies {list(p.shape)}")  # fmt: skip
            with torch.no_grad():
                p.copy_(t)
            loaded.add(name)
    return loaded, unexpected


def check_keys(d, missing: list, unexpected: list, what: str = "checkpoint", hint: str = "") -> None:
    if missing or unexpected:
        parts = [f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}"] if missing else []
        parts += [f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"] if unexpected else []
        raise UserError(f"incompatible {what} {d}: " + "; ".join(parts) + hint)


def load_model(path, *, device="cpu", dtype=torch.float32) -> Transformer:
    """A Transformer (in eval mode) from a model directory or a run directory's newest complete checkpoint."""
    d = resolve_model_dir(path)
    cfg = config_from_hf(_read_json(d / "config.json"))
    files = _weight_files(d)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to(_as_dtype(dtype))  # (on the meta device: no work), then materialised with fp32 RoPE tables
    model.to_empty(device=device)
    params = dict(model.state_dict(keep_vars=True))
    if cfg.tie_embeddings:
        params.pop("lm_head.weight")
    prefix = TREES[cfg.arch][0] + "."

    def rename(key):
        key = "lm_head.weight" if key == "embed_out.weight" else key  # GPT-NeoX's name before transformers 5
        name = key if key in params or key.startswith("lm_head.") else prefix + key  # base-model files
        skip = IGNORED_KEYS.search(name) or (name == "lm_head.weight" and cfg.tie_embeddings)
        return None if skip else name

    loaded, unexpected = load_state(params, files, rename, cfg.arch)
    check_keys(d, sorted(set(params) - loaded), unexpected)
    return model.eval()


def load(path, *, device="cpu", dtype=torch.float32):
    """(model, tokenizer) of a MODEL (model directory, run directory or local Hugging Face folder)."""
    from llmctl.tokenizer import load_tokenizer

    d = resolve_model_dir(path)
    tok = load_tokenizer(d)
    model = load_model(d, device=device, dtype=dtype)
    check_vocab(tok, model.config, d)
    return model, tok


def check_vocab(tok, config: ModelConfig, where) -> None:
    """A tokenizer with more tokens than the model has embeddings is a UserError naming `where`."""
    if tok.vocab_size > config.vocab_size:
        raise UserError(f"tokenizer / model vocab mismatch in {where}: the tokenizer has {tok.vocab_size} tokens, "
                        f"the model {config.vocab_size}")

