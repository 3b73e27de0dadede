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
from llmctl.model import Transformer, unwrap

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
LLAMA_TYPES = ("llama", "mistral", "qwen2")
GPT2_CONV1D = re.compile(r"\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
# buffers some older HF checkpoints contain: GPT-2's causal mask, Llama's rotary inverse frequencies
IGNORED_KEYS = re.compile(r"(\.attn\.(bias|masked_bias)|\.rotary_emb\.inv_freq)$")
DEFAULT_RMS_EPS = 1e-6  # LlamaConfig / MistralConfig / Qwen2Config default
DEFAULT_MAX_POS = {"llama": 2048, "mistral": 131072, "qwen2": 32768}


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


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The config.json dict transformers needs to rebuild `cfg` (read by both transformers 4.x and 5.x)."""
    common = dict(
        vocab_size=cfg.vocab_size, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
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
    d = dict(
        hidden_size=cfg.n_embd, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim,
        hidden_act="silu", max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        rope_scaling=None, attention_dropout=cfg.dropout, **common,
    )  # fmt: skip
    if cfg.qkv_bias and not cfg.attn_out_bias:  # Llama's attention_bias would add an o_proj bias too
        d.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=False,
                 sliding_window=None, max_window_layers=cfg.n_layer)  # fmt: skip
    else:
        d.update(architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=cfg.qkv_bias,
                 mlp_bias=False, pretraining_tp=1)  # fmt: skip
    return dict(sorted(d.items()))


def _first_id(v):
    """Token ids may be lists in HF configs (several eos tokens): keep the first."""
    if isinstance(v, list):
        return v[0] if v else None
    return v


def _rope_theta(d: dict) -> float:
    rp = d.get("rope_parameters") or {}
    rs = d.get("rope_scaling") or {}
    for src, name in ((rp, "rope_parameters"), (rs, "rope_scaling")):
        kind = src.get("rope_type", src.get("type", "default"))
        if kind not in (None, "default"):
            raise UserError(f"unsupported checkpoint: {name} of type {kind!r} (only default RoPE is supported)")
    theta = rp.get("rope_theta", d.get("rope_theta", 10000.0))
    return float(theta)


def config_from_hf(d: dict) -> ModelConfig:
    """A ModelConfig from a Hugging Face config.json dict; anything llmctl cannot reproduce exactly is a UserError."""
    mt = d.get("model_type")
    if d.get("quantization_config"):
        raise UserError("unsupported checkpoint: quantized weights (quantization_config); use the full-precision model")
    ids = dict(bos_token_id=_first_id(d.get("bos_token_id")), eos_token_id=_first_id(d.get("eos_token_id")),
               pad_token_id=_first_id(d.get("pad_token_id")))  # fmt: skip
    try:
        if mt == "gpt2":
            act = d.get("activation_function", "gelu_new")
            if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
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
        if mt in LLAMA_TYPES:
            act = d.get("hidden_act", "silu")
            if act not in ("silu", "swish"):
                raise UserError(f"unsupported checkpoint: hidden_act {act!r} (SwiGLU with silu only)")
            if d.get("mlp_bias", False):
                raise UserError("unsupported checkpoint: mlp_bias (biases in the MLP)")
            block_size = d.get("max_position_embeddings", DEFAULT_MAX_POS[mt])
            window = d.get("sliding_window")
            if mt == "qwen2" and not d.get("use_sliding_window", False):
                window = None
            if window is not None and window < block_size:  # exact as long as sequences fit in the window
                block_size = window
            qkv_bias = {"qwen2": True, "mistral": False}.get(mt, d.get("attention_bias", False))
            return ModelConfig(
                arch="llama", vocab_size=d["vocab_size"], n_layer=d["num_hidden_layers"],
                n_head=d["num_attention_heads"], n_kv_head=d.get("num_key_value_heads"), n_embd=d["hidden_size"],
                head_dim=d.get("head_dim"), intermediate_size=d["intermediate_size"], block_size=block_size,
                rope_theta=_rope_theta(d), norm_eps=d.get("rms_norm_eps", DEFAULT_RMS_EPS), qkv_bias=qkv_bias,
                attn_out_bias=qkv_bias and mt == "llama", tie_embeddings=d.get("tie_word_embeddings", False),
                dropout=d.get("attention_dropout", 0.0) or 0.0, init_std=d.get("initializer_range", 0.02), **ids,
            )  # fmt: skip
    except KeyError as e:
        raise UserError(f"incompatible checkpoint: config.json has no {e.args[0]!r}") from None
    except (ValueError, TypeError) as e:
        raise UserError(f"incompatible checkpoint: {e}") from None
    raise UserError(f"unsupported checkpoint: model_type {mt!r} (llmctl reads {', '.join(LLAMA_TYPES)} and gpt2)")


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
    return write_folder(out_dir, {k: t for k, t in model.state_dict().items() if k != tied}, cfg.arch, dtype,
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
    model.to_empty(device=device)
    model.to(_as_dtype(dtype))
    params = dict(model.state_dict(keep_vars=True))
    if cfg.tie_embeddings:
        params.pop("lm_head.weight")
    prefix = "model." if cfg.arch == "llama" else "transformer."

    def rename(key):
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

