"""The transformer: the Llama family (Llama, Mistral, Qwen2-style qkv bias) and GPT-2, in one file.

Module tree and parameter names are exactly Hugging Face's, so `state_dict()` maps 1:1 onto the keys of
`LlamaForCausalLM` / `Qwen2ForCausalLM` / `GPT2LMHeadModel` and peft adapters transfer both ways:

    llama: model.embed_tokens, model.layers[i].{input_layernorm, self_attn.{q,k,v,o}_proj,
           post_attention_layernorm, mlp.{gate,up,down}_proj}, model.norm, lm_head
    gpt2:  transformer.{wte, wpe}, transformer.h[i].{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj},
           transformer.ln_f, lm_head (tied to wte)

Every projection is an nn.Linear (HF GPT-2's Conv1D weights are transposed by llmctl/hf.py). Shapes in comments:
B batch, T new tokens, P tokens already in the KV cache, C n_embd, nh/nkv query/key-value heads, hd head_dim.
"""

from __future__ import annotations

import math
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from llmctl import ops
from llmctl.gpt import GPT2Block, NeoXBlock
from llmctl.ops import drop
from llmctl.arch import ModelConfig
from llmctl.attention import CPU_HAS_AMX, KVCache, attend  # noqa: F401  (the model's names for them)
from llmctl.rope import apply_rope, rope_inv_freq



def unwrap(model: nn.Module, kind: type | None = None) -> nn.Module:
    """The module inside torch.compile (`_orig_mod`), DDP / FSDP (`module`) and peft (`get_base_model()`) wrappers,
    in any nesting: the first of type `kind`, or with no kind the innermost. TypeError when there is none."""
    while kind is None or not isinstance(model, kind):
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if inner is None and hasattr(model, "get_base_model"):
            inner = model.get_base_model()
        if inner is None:
            if kind is None:
                return model
            raise TypeError(f"expected an llmctl {kind.__name__}, got {type(model).__name__}")
        model = inner
    return model


# ---------------------------------------------------------------------------------------------------- llama family


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, exactly like HF's: Llama casts back before the weight (x * w); Gemma's variant
    (`offset`, its weights start at 0) multiplies by (1 + w) in fp32 and casts after."""

    def __init__(self, dim: int, eps: float, offset: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x):
        if not self.offset and _eager_training() and (x.requires_grad or self.weight.requires_grad):
            return ops.RMSNormFn.apply(x, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (x * (1.0 + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)


def _eager_training() -> bool:
    """Gradients on, not under torch.compile: where the hand-fused training paths below pay off. (The compiler
    fuses the plain formulation's elementwise passes itself, and measured no gain from these.)"""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


class LlamaAttention(nn.Module):
    """Llama's attention and its families' switches: fused qkv_proj (Phi-3), q/k norms per head (Qwen3, Gemma 3) or
    over the projection (OLMo 2), partial or no RoPE, a sliding window (in the mask), scale and soft-capping."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        C, nh, nkv, hd = cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim
        if cfg.fused_qkv:
            self.qkv_proj = nn.Linear(C, (nh + 2 * nkv) * hd, bias=cfg.qkv_bias)
        else:
            self.q_proj = nn.Linear(C, nh * hd, bias=cfg.qkv_bias)
            self.k_proj = nn.Linear(C, nkv * hd, bias=cfg.qkv_bias)
            self.v_proj = nn.Linear(C, nkv * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(nh * hd, C, bias=cfg.attn_out_bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            q_dim, k_dim = (hd, hd) if cfg.qk_norm == "head" else (nh * hd, nkv * hd)
            self.q_norm = RMSNorm(q_dim, cfg.norm_eps, cfg.norm == "rms1p")
            self.k_norm = RMSNorm(k_dim, cfg.norm_eps, cfg.norm == "rms1p")
        self.nh, self.nkv, self.hd, self.layer_idx, self.dropout = nh, nkv, hd, layer_idx, cfg.dropout
        self.scale, self.softcap = cfg.attn_scale, cfg.attn_softcap
        self.fast = cfg.plain  # the fused training path (one qkv matmul, RoPE on q and k in one op) applies

    def forward(self, x, rope, mask, cache):
        B, T, _ = x.shape
        if self.fast and _eager_training() and ops.fusable(self.q_proj, self.k_proj, self.v_proj):
            return self._forward_fused(x, rope, mask, cache)
        nh, nkv, hd = self.nh, self.nkv, self.hd
        if hasattr(self, "qkv_proj"):
            q, k, v = self.qkv_proj(x).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "proj":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.view(B, T, nh, hd), k.view(B, T, nkv, hd), v.view(B, T, nkv, hd)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, hd]
        if rope is not None:
            cos, sin = rope[0].to(q.dtype), rope[1].to(q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = attend(q, k, v, mask, cache, self.layer_idx, self.dropout if self.training else 0.0, self.scale,
                   self.softcap)  # fmt: skip
        return self.o_proj(y)  # [B, T, C]

    def _forward_fused(self, x, rope, mask, cache):
        """The training forward: q, k, v from one matmul; RoPE on q and k together, in [B, T, heads, hd] layout."""
        B, T, _ = x.shape
        nh, nkv = self.nh, self.nkv
        qkv = ops.cat_linear(x, self.q_proj, self.k_proj, self.v_proj).view(B, T, nh + 2 * nkv, self.hd)
        qk, v = qkv.split([nh + nkv, nkv], dim=2)
        cos, sin = rope[0].to(qkv.dtype), rope[1].to(qkv.dtype)  # [T, hd] or [B, 1, T, hd]
        cos, sin = (cos[:, None], sin[:, None]) if cos.dim() == 2 else (cos.transpose(1, 2), sin.transpose(1, 2))
        half = self.hd // 2
        ssin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        q, k = ops.RopeFn.apply(qk, cos, ssin).split([nh, nkv], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, hd]
        y = attend(q, k, v, mask, cache, self.layer_idx, self.dropout if self.training else 0.0)
        return self.o_proj(y)  # [B, T, C]


class LlamaMLP(nn.Module):
    """A gated MLP: down(act(gate(x)) * up(x)), act silu (SwiGLU) or tanh GELU (GeGLU, Gemma); gate and up may be
    one gate_up_proj (Phi-3: its output's first half is the gate)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, I, bias = cfg.n_embd, cfg.intermediate_size, cfg.mlp_bias
        if cfg.fused_gate_up:
            self.gate_up_proj = nn.Linear(C, 2 * I, bias=bias)
        else:
            self.gate_proj = nn.Linear(C, I, bias=bias)
            self.up_proj = nn.Linear(C, I, bias=bias)
        self.down_proj = nn.Linear(I, C, bias=bias)
        self.geglu = cfg.mlp == "geglu"

    def forward(self, x):
        if hasattr(self, "gate_up_proj"):
            g, u = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            g, u = self.gate_proj(x), self.up_proj(x)
        return self.down_proj((F.gelu(g, approximate="tanh") if self.geglu else F.silu(g)) * u)


# where each layout puts its norms: (before attention, after attention, before the MLP, after the MLP)
NORM_NAMES = {
    "pre": ("input_layernorm", None, "post_attention_layernorm", None),
    "post": (None, "post_attention_layernorm", None, "post_feedforward_layernorm"),  # OLMo 2
    "sandwich": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"),  # Gemma 2 / 3  # fmt: skip
}


class LlamaBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.norms = NORM_NAMES[cfg.norm_layout]
        for name in self.norms[:1]:
            if name:
                setattr(self, name, RMSNorm(cfg.n_embd, cfg.norm_eps, cfg.norm == "rms1p"))
        self.self_attn = LlamaAttention(cfg, layer_idx)
        for name in self.norms[1:]:
            if name:
                setattr(self, name, RMSNorm(cfg.n_embd, cfg.norm_eps, cfg.norm == "rms1p"))
        self.mlp = LlamaMLP(cfg)
        self.dropout, self.residual_scale = cfg.dropout, cfg.residual_scale
        self.window, self.rope_kind = cfg.window(layer_idx), cfg.uses_rope(layer_idx) and cfg.layer_type(layer_idx)

    def _norm(self, i, x):
        return x if self.norms[i] is None else getattr(self, self.norms[i])(x)

    def forward(self, x, rope, mask, cache):
        h = drop(self._norm(1, self.self_attn(self._norm(0, x), rope, mask, cache)), self.dropout, self.training)
        x = x + (h if self.residual_scale == 1 else h * self.residual_scale)
        h = drop(self._norm(3, self.mlp(self._norm(2, x))), self.dropout, self.training)
        return x + (h if self.residual_scale == 1 else h * self.residual_scale)


# ----------------------------------------------------------------------------------------------------- the model


# each module tree: (root, its embedding, its blocks, its final norm), Hugging Face's names
TREES = {"llama": ("model", "embed_tokens", "layers", "norm"), "gpt2": ("transformer", "wte", "h", "ln_f"),
         "neox": ("gpt_neox", "embed_in", "layers", "final_layer_norm")}  # fmt: skip


class Transformer(nn.Module):
    """A decoder-only transformer; `forward(idx)` -> logits, `forward(idx, targets)` -> summed token loss."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config
        self.gradient_checkpointing = False  # activation checkpointing per block (training only)
        root, emb, layers, norm = TREES[cfg.arch]
        block = {"llama": LlamaBlock, "gpt2": GPT2Block, "neox": NeoXBlock}[cfg.arch]
        tree = {emb: nn.Embedding(cfg.vocab_size, cfg.n_embd)}
        if cfg.arch == "gpt2":
            tree["wpe"] = nn.Embedding(cfg.block_size, cfg.n_embd)
        tree[layers] = nn.ModuleList(block(cfg, i) for i in range(cfg.n_layer))
        tree[norm] = (RMSNorm(cfg.n_embd, cfg.norm_eps, cfg.norm == "rms1p") if cfg.arch == "llama"
                      else nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps))  # fmt: skip
        setattr(self, root, nn.ModuleDict(tree))
        # the layer kinds a forward builds RoPE tables and masks for (fixed by the config: found once, not per call)
        self._rope_kinds = {getattr(b, "rope_kind", False) for b in self.blocks} - {False}
        self._windows = {getattr(b, "window", None) for b in self.blocks}
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.tie_weights()
        self._init_rope()
        self.init_weights()

    # --- structure ---

    def _part(self, i: int) -> nn.Module:
        root = TREES[self.config.arch]
        return getattr(self, root[0])[root[i]]

    @property
    def blocks(self) -> nn.ModuleList:
        return self._part(2)

    def get_input_embeddings(self) -> nn.Embedding:
        return self._part(1)

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.get_input_embeddings().weight

    def _init_rope(self) -> None:
        """cos/sin tables [block_size, r] (r: the rotary dims of a head), computed in fp32 exactly as HF's rotary
        embeddings do: `rope_cos` / `rope_sin` for full-attention layers, `rope_*_sliding` where sliding layers
        have their own base (Gemma 3), `rope_*_long` for longrope's long factors."""
        if self.config.arch == "gpt2":
            return
        cfg, dev = self.config, self.lm_head.weight.device
        tables = {"": (cfg.rope_theta, cfg.rope_type, False)}
        if cfg.rope_local_theta is not None:
            tables["_sliding"] = (cfg.rope_local_theta, "default", False)
        if cfg.rope_type == "longrope":
            tables["_long"] = (cfg.rope_theta, "longrope", True)
        for suffix, (theta, kind, long) in tables.items():
            inv_freq, scale = rope_inv_freq(cfg, theta, kind, long)
            freqs = torch.arange(cfg.block_size, device=dev).float()[:, None] * inv_freq.to(dev)  # [block_size, r/2]
            emb = torch.cat((freqs, freqs), dim=-1)  # [block_size, r]
            self.register_buffer("rope_cos" + suffix, emb.cos() * scale, persistent=False)
            self.register_buffer("rope_sin" + suffix, emb.sin() * scale, persistent=False)

    def _ropes(self, P: int, T: int, position_ids) -> dict:
        """Each layer kind's (cos, sin): [T, r], or [B, 1, T, r] with position_ids."""
        cfg, out = self.config, {}
        long = cfg.rope_type == "longrope" and (
            P + T if position_ids is None else int(position_ids.max()) + 1) > cfg.rope_scaling["original_max_position_embeddings"]
        for kind in self._rope_kinds:
            suffix = "_long" if long else "_sliding" if kind == "sliding_attention" and cfg.rope_local_theta else ""
            cos, sin = getattr(self, "rope_cos" + suffix), getattr(self, "rope_sin" + suffix)
            if position_ids is None:
                out[kind] = (cos[P : P + T], sin[P : P + T])  # [T, r]
            else:
                out[kind] = (cos[position_ids][:, None], sin[position_ids][:, None])  # [B, 1, T, r]
        return out

    def to_empty(self, *, device, recurse=True):
        """Materialise a model built on the meta device: re-tie embeddings and recompute the RoPE tables."""
        super().to_empty(device=device, recurse=recurse)
        self.tie_weights()
        self._init_rope()  # fp32 tables; forward casts them to the activations' dtype
        return self

    @torch.no_grad()
    def init_weights(self) -> None:
        """normal(0, init_std); residual projections (o_proj, down_proj, c_proj) std / sqrt(2 n_layer) as in GPT-2;
        zero biases; norms the identity (weight 1, Gemma's 0; bias 0)."""
        std = self.config.init_std
        resid_std = std / math.sqrt(2 * self.config.n_layer)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, resid_std if name.endswith(("o_proj", "down_proj", "c_proj", "dense", "dense_4h_to_h")) else std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, std)
            elif isinstance(m, (RMSNorm, nn.LayerNorm)):
                (nn.init.zeros_ if getattr(m, "offset", False) else nn.init.ones_)(m.weight)  # Gemma's 1 + w
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    # --- accounting ---

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (tied weights counted once). exclude_embeddings drops the token and position tables
        and the output projection (the "non-embedding" count of scaling-law papers)."""
        skip = set()
        if exclude_embeddings:
            skip = {id(self.get_input_embeddings().weight), id(self.lm_head.weight)}
            if self.config.arch == "gpt2":
                skip.add(id(self.transformer.wpe.weight))
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B / nanoGPT: 6 N + 12 L H Q T, where N counts
        the matmul weights (every Linear, lm_head included; embedding lookups excluded)."""
        cfg = self.config
        n = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6 * n + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len

    # --- inference helpers ---

    def new_cache(self, batch_size: int, max_len: int | None = None, device=None, dtype=None) -> KVCache:
        """An empty KV cache for `batch_size` sequences of up to `max_len` (default block_size) positions;
        device and dtype default to the model's."""
        cfg = self.config
        max_len = cfg.block_size if max_len is None else max_len
        if max_len > cfg.block_size:
            raise ValueError(f"KV cache max_len {max_len} exceeds the model's block_size {cfg.block_size}")
        w = self.lm_head.weight
        return KVCache(cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_dim,
                       device=device or w.device, dtype=dtype or w.dtype)  # fmt: skip

    def _mask(self, T, P, attn_mask, device, window=None, position_ids=None):
        """None (plain causal / single token) or bool [B or 1, 1, T, P+T], True = attend.

        attn_mask: optional bool/0-1 [B, P+T] key mask (False = padding, e.g. left padding) or a full bool mask
        broadcastable to [B, 1, T, P+T]; it is combined with causality. Every query may attend to itself, so
        padding rows never become all-masked (NaN). window: a sliding window, key j seen from query i only when
        j > i - window, counted in cache slots as HF's masks are (left padding shifts query and key alike)."""
        if window is not None and P + T <= window:
            window = None  # nothing is out of reach: plain causal
        if attn_mask is None and window is None and (P == 0 or T == 1):
            return None
        i = torch.arange(P, P + T, device=device)[:, None]  # absolute query positions [T, 1]
        j = torch.arange(P + T, device=device)[None, :]  # key positions [1, P+T]
        m = j <= i  # [T, P+T]
        if window is not None:
            m = m & (j > i - window)
        if attn_mask is not None:
            am = attn_mask.bool()
            m = m & (am[:, None, None, :] if am.dim() == 2 else am)
            m = m | (j == i)
        return m if m.dim() == 4 else m[None, None]

    # --- forward ---

    def logits(self, y):
        """The lm_head's output as logits (fp32): Granite's scaling, Gemma 2's final soft-capping."""
        cfg, y = self.config, y.float()
        if cfg.logits_scale != 1:
            y = y / cfg.logits_scale
        if cfg.final_softcap is not None:
            y = torch.tanh(y / cfg.final_softcap) * cfg.final_softcap
        return y

    def forward(self, idx, targets=None, *, position_ids=None, cache=None, attn_mask=None, return_hidden=False):
        """idx [B, T] token ids. Returns logits [B, T, vocab] (fp32); with targets [B, T] (already shifted,
        -100 = ignore) the fp32 SUM of token cross-entropies; with return_hidden the final normed hidden states
        [B, T, C]. With a KVCache, attends to the cached positions too and advances cache.pos."""
        cfg = self.config
        B, T = idx.shape
        P = 0 if cache is None else cache.pos
        if position_ids is None and P + T > cfg.block_size:
            raise ValueError(f"sequence of {P + T} positions exceeds block_size {cfg.block_size}")
        if cfg.arch != "gpt2":
            x = self.get_input_embeddings()(idx)  # [B, T, C]
            if cfg.embed_scale != 1:  # Gemma: sqrt(C) in the weights' dtype; Granite: its multiplier
                x = x * torch.tensor(cfg.embed_scale, dtype=x.dtype)
            ropes = self._ropes(P, T, position_ids)
        else:
            pos = torch.arange(P, P + T, device=idx.device) if position_ids is None else position_ids
            x = drop(self.transformer.wte(idx) + self.transformer.wpe(pos), cfg.dropout, self.training)  # [B, T, C]
            ropes = {}
        masks = {w: self._mask(T, P, attn_mask, idx.device, w) for w in self._windows}
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            rope, mask = ropes.get(getattr(block, "rope_kind", False)), masks[getattr(block, "window", None)]
            if ckpt:
                x = checkpoint(block, x, rope, mask, cache, use_reentrant=False)
            else:
                x = block(x, rope, mask, cache)
        x = self._part(3)(x)  # the final norm [B, T, C]
        if cache is not None:
            cache.pos = P + T
        if return_hidden:
            return x
        if targets is None:
            return self.logits(self.lm_head(x))  # [B, T, vocab]
        h, t = x.reshape(B * T, -1), targets.reshape(B * T)
        if type(self.lm_head) is not nn.Linear or cfg.logits_scale != 1 or cfg.final_softcap is not None:
            # the plain, memory-hungry way (a LoRA lm_head; logits scaled or soft-capped)
            logits = self.logits(self.lm_head(h))  # [B*T, vocab]
            return F.cross_entropy(logits, t, ignore_index=-100, reduction="sum")
        w, dev = self.lm_head.weight, x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        if torch.is_grad_enabled() and (h.requires_grad or w.requires_grad):
            return ops.LinearCrossEntropy.apply(h, w, t, dtype)
        return ops.linear_cross_entropy(h, w, t, dtype)[0]
