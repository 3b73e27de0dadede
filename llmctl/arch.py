"""The architecture: ModelConfig, one decoder-only transformer declared by features (the recipes' model section,
config.json through hf.FAMILIES, the Transformer). No torch here: `--dry-run` checks it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from llmctl.schema import bounded, check_fields, choice

ARCHS = ("llama", "gpt2", "neox")
ROPE_KEYS = {"default": (), "linear": ("factor",), "dynamic": ("factor",), "yarn": ("original_max_position_embeddings",),
             "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
ROPE_TYPES = tuple(ROPE_KEYS)



def llama_intermediate_size(n_embd: int, multiple_of: int = 64) -> int:
    """SwiGLU hidden size: 8/3 * n_embd (same parameter count as a 4x GELU MLP), rounded up to a multiple of 64."""
    return multiple_of * math.ceil(8 * n_embd / 3 / multiple_of)


@dataclass
class ModelConfig:
    """The architecture: the one model config (recipes' model section, config.json, the Transformer). Every field
    declares its domain (schema.py); __post_init__ fills the derived defaults (None -> a value) and checks the
    combination, naming the key (ValueError; a recipe turns it into a UserError, so --dry-run catches it)."""

    arch: str = choice("llama", *ARCHS)  # llama (RoPE, RMSNorm, SwiGLU, GQA); gpt2 (learned positions, LayerNorm,
    # GELU); neox (GPT-NeoX / Pythia: RoPE, LayerNorm, GELU, parallel residual)
    vocab_size: int = bounded(32000, ge=1)
    n_layer: int = bounded(12, ge=1)
    n_head: int = bounded(12, ge=1)
    n_embd: int = bounded(768, ge=1)  # a multiple of n_head (llama: of 2 n_head, for rotary embeddings)
    n_kv_head: Optional[int] = bounded(None, ge=1)  # None -> n_head; fewer = grouped-query attention (llama only)
    head_dim: Optional[int] = bounded(None, ge=1)  # None -> n_embd // n_head
    intermediate_size: Optional[int] = bounded(None, ge=1)  # None -> llama: llama_intermediate_size; gpt2: 4 n_embd
    block_size: int = bounded(1024, ge=1)  # maximum number of positions
    rope_theta: float = bounded(10000.0, gt=0)
    norm_eps: float = bounded(1e-5, gt=0)
    qkv_bias: bool = False  # biases on q/k/v projections (Qwen2); gpt2 always has biases
    attn_out_bias: bool = False  # bias on o_proj as well (Llama's attention_bias=True sets both)
    tie_embeddings: Optional[bool] = None  # None -> llama False, gpt2 True
    dropout: float = bounded(0.0, ge=0, lt=1)  # attention probabilities, residual branches (and gpt2 embeddings)
    bos_token_id: Optional[int] = bounded(None, ge=0)
    eos_token_id: Optional[int] = bounded(None, ge=0)
    eos_token_ids: Optional[tuple] = None  # all of the model's EOS ids when there are several (Llama 3 instruct)
    pad_token_id: Optional[int] = bounded(None, ge=0)
    init_std: float = bounded(0.02, gt=0)
    # --- family features (llama arch; hf.FAMILIES maps each Hugging Face model_type onto them) ---
    model_type: Optional[str] = None  # the HF family saved as (None: llama, or qwen2 for q/k/v biases alone)
    rope_type: str = choice("default", *ROPE_TYPES)  # HF's rope types; their parameters in rope_scaling
    rope_scaling: Optional[dict] = None  # factor, original_max_position_embeddings, low/high_freq_factor, ...
    rope_local_theta: Optional[float] = bounded(None, gt=0)  # sliding layers' own RoPE base (default type; Gemma 3)
    partial_rotary_factor: float = bounded(1.0, gt=0, le=1)  # RoPE on the first fraction of each head (Phi-4-mini)
    no_rope_layers: Optional[tuple] = None  # per layer: 1 RoPE, 0 none (NoPE; SmolLM3)
    sliding_window: Optional[int] = bounded(None, ge=1)  # keys j > i - window, on the sliding layers
    layer_types: Optional[tuple] = None  # per layer full_attention / sliding_attention (None: all sliding if a window)
    norm: str = choice("rms", "rms", "rms1p")  # RMSNorm (x * w) or Gemma's (x * (1 + w))
    norm_layout: str = choice("pre", "pre", "post", "sandwich")  # pre-norm; post-sublayer (OLMo 2); pre + post (Gemma 2/3)
    qk_norm: Optional[str] = choice(None, "head", "proj")  # RMSNorm of q and k per head (Qwen3, Gemma 3) or whole (OLMo 2)
    mlp: str = choice("swiglu", "swiglu", "geglu", "gelu", "gelu_tanh")  # llama: gated, silu or tanh GELU (Gemma); neox: GELU
    fused_qkv: bool = False  # one qkv_proj / gate_up_proj Linear (Phi-3), in the family's own layout
    fused_gate_up: bool = False
    mlp_bias: bool = False
    attn_scale: Optional[float] = bounded(None, gt=0)  # None: head_dim ** -0.5 (Gemma 2: query_pre_attn_scalar ** -0.5)
    attn_softcap: Optional[float] = bounded(None, gt=0)  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_softcap: Optional[float] = bounded(None, gt=0)  # logits, likewise
    embed_scale: float = bounded(1.0, gt=0)  # embeddings times this (Gemma: sqrt(n_embd); Granite's multiplier)
    residual_scale: float = bounded(1.0, gt=0)  # sublayer outputs times this before the residual add (Granite)
    logits_scale: float = bounded(1.0, gt=0)  # logits divided by this (Granite's logits_scaling)
    parallel_residual: bool = False  # neox: x + attn(ln1(x)) + mlp(ln2(x))

    @property
    def plain(self) -> bool:
        """No family feature on but a RoPE table (any type save longrope, which switches tables): the fused training
        ops and the native decode step apply as they are."""
        return (self.rope_type != "longrope" and self.rope_local_theta is None and self.partial_rotary_factor == 1
                and not self.no_rope_layers and self.sliding_window is None and self.norm == "rms"
                and self.norm_layout == "pre" and self.qk_norm is None and self.mlp == "swiglu" and not self.fused_qkv
                and not self.fused_gate_up and not self.mlp_bias and self.attn_scale is None
                and self.attn_softcap is None and self.final_softcap is None and self.embed_scale == 1
                and self.residual_scale == 1 and self.logits_scale == 1)  # fmt: skip

    def layer_type(self, i: int) -> str:
        if self.layer_types:
            return self.layer_types[i]
        return "full_attention" if self.sliding_window is None else "sliding_attention"

    def window(self, i: int) -> int | None:
        """Layer i's sliding window (None: full attention)."""
        return self.sliding_window if self.layer_type(i) == "sliding_attention" else None

    def uses_rope(self, i: int) -> bool:
        return self.arch != "gpt2" and (not self.no_rope_layers or bool(self.no_rope_layers[i]))

    def __post_init__(self):
        check_fields(self, "model.")
        nh = self.n_head
        if self.head_dim is None:
            if self.n_embd % nh:
                raise ValueError(f"model.n_embd: must be a multiple of model.n_head ({nh}), got {self.n_embd} "
                                 f"({self.n_embd} is not divisible by {nh})")
            self.head_dim = self.n_embd // nh
            if self.arch != "gpt2" and self.head_dim % 2:
                raise ValueError(f"model.n_embd: llama needs an even head size n_embd / n_head (rotary "
                                 f"embeddings), got {self.n_embd} / {nh} = {self.head_dim}")
        elif self.arch != "gpt2" and self.head_dim % 2:
            raise ValueError(f"model.head_dim: must be even (rotary embeddings), got {self.head_dim}")
        if self.n_kv_head is None:
            self.n_kv_head = nh
        if nh % self.n_kv_head:
            raise ValueError(f"model.n_kv_head: must divide model.n_head ({nh}), got {self.n_kv_head}")
        if self.arch != "llama" and self.n_kv_head != nh:
            raise ValueError(f"model.n_kv_head: {self.arch} has no grouped-query attention (n_kv_head must be null or "
                             f"model.n_head = {nh}), got {self.n_kv_head}")
        if self.arch != "llama" and self.head_dim * nh != self.n_embd:
            raise ValueError(f"model.head_dim: {self.arch} needs head_dim * n_head == n_embd")
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd if self.arch != "llama" else llama_intermediate_size(self.n_embd)
        if self.tie_embeddings is None:
            self.tie_embeddings = self.arch == "gpt2"
        for key in ("layer_types", "no_rope_layers"):
            v = getattr(self, key)
            if v is not None:
                setattr(self, key, tuple(v))
                if len(v) != self.n_layer:
                    raise ValueError(f"model.{key}: needs one entry per layer ({self.n_layer}), got {len(v)}")
        if self.layer_types and not set(self.layer_types) <= {"full_attention", "sliding_attention"}:
            raise ValueError(f"model.layer_types: full_attention or sliding_attention, got {sorted(set(self.layer_types))}")
        need = ROPE_KEYS[self.rope_type]
        missing = [k for k in need if not isinstance((self.rope_scaling or {}).get(k), (int, float, list))]
        if missing:
            raise ValueError(f"model.rope_scaling: rope_type {self.rope_type} needs {', '.join(missing)}")
        if self.rope_type == "longrope":
            for k in ("short_factor", "long_factor"):
                if len(self.rope_scaling[k]) != int(self.head_dim * self.partial_rotary_factor) // 2:
                    raise ValueError(f"model.rope_scaling: {k} needs one factor per rotary frequency")
        if self.attn_out_bias and not self.qkv_bias:
            raise ValueError("model.attn_out_bias: needs model.qkv_bias (no HF architecture has an o_proj bias alone)")
