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

import contextlib
import math
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from llmctl import attention as cpu_attention
from llmctl import ops
from llmctl.config import ModelConfig

try:  # Intel AMX makes bf16 matmuls and attention fast on CPU; without it fp32 attention is faster than bf16
    CPU_HAS_AMX = bool(torch._C._cpu._init_amx())
except Exception:
    CPU_HAS_AMX = False


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


class KVCache:
    """Static key/value buffers per layer, [B, nkv, max_len, hd], and `pos`: how many positions are filled.

    `Transformer.forward(idx, cache=cache)` writes the new keys/values at `pos`, attends to everything before,
    then advances `pos`. `reorder(idx)` selects batch rows (beam search); `reset()` empties it.
    """

    def __init__(self, n_layer, batch_size, n_kv_head, max_len, head_dim, *, device=None, dtype=None):
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.pos = 0

    @property
    def max_len(self) -> int:
        return self.k[0].size(2)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v [B, nkv, T, hd] at positions pos..pos+T; return all keys/values so far [B, nkv, P+T, hd]."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions needed, max_len is {self.max_len}")
        self.k[layer][:, :, self.pos : end] = k
        self.v[layer][:, :, self.pos : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reorder(self, batch_idx: torch.Tensor) -> None:
        for buf in self.k + self.v:
            buf.copy_(buf.index_select(0, batch_idx))

    def reset(self) -> None:
        self.pos = 0


def attend(q, k, v, mask, cache, layer_idx, dropout_p):
    """Causal attention, q [B, nh, T, hd], k/v [B, nkv, T, hd] -> [B, T, nh*hd]; nkv < nh: grouped-query.
    mask None: plain causal (a single new token: all cached); else bool [*, 1, T, P+T], True = attend."""
    B, nh, T, hd = q.shape
    if cache is not None:
        k, v = cache.update(layer_idx, k, v)  # [B, nkv, P+T, hd]
        k, v = k.to(q.dtype), v.to(q.dtype)
    dtype, upcast = q.dtype, q.device.type == "cpu" and not CPU_HAS_AMX
    upcast = upcast and (dtype != torch.float32 or torch.is_autocast_enabled("cpu"))
    if upcast:  # CPU without AMX: bf16/fp16 flash attention is slower than fp32
        q, k, v = q.float(), k.float(), v.float()
    if cpu_attention.applies(q, k, mask, cache, dropout_p):  # fp32 CPU training / full forward: llmctl's kernels
        return cpu_attention.causal_attention(q, k, v)[0].to(dtype)
    causal = mask is None
    if T == 1:  # (a branch, not `and T > 1`: under dynamic shapes that would be a SymBool, which SDPA refuses)
        causal = False  # one new token sees its whole cache
    with torch.autocast("cpu", enabled=False) if upcast else contextlib.nullcontext():
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal,
                                           enable_gqa=k.size(1) != nh)  # fmt: skip
    return y.transpose(1, 2).reshape(B, T, nh * hd).to(dtype)  # [B, T, nh*hd]


# ---------------------------------------------------------------------------------------------------- llama family


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the weight, exactly like HF's LlamaRMSNorm."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        if _eager_training() and (x.requires_grad or self.weight.requires_grad):
            return ops.RMSNormFn.apply(x, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """HF's rotate_half convention (weights need no permutation). x [B, nh, T, hd]; cos/sin [T, hd] or [B, 1, T, hd]"""
    return x * cos + rotate_half(x) * sin


def _eager_training() -> bool:
    """Gradients on, not under torch.compile: where the hand-fused training paths below pay off. (The compiler
    fuses the plain formulation's elementwise passes itself, and measured no gain from these.)"""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        C, nh, nkv, hd = cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(C, nh * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(C, nkv * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(C, nkv * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(nh * hd, C, bias=cfg.attn_out_bias)
        self.nh, self.nkv, self.hd, self.layer_idx, self.dropout = nh, nkv, hd, layer_idx, cfg.dropout

    def forward(self, x, rope, mask, cache):
        B, T, _ = x.shape
        if _eager_training() and ops.fusable(self.q_proj, self.k_proj, self.v_proj):
            return self._forward_fused(x, rope, mask, cache)
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)  # [B, nh, T, hd]
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # [B, nkv, T, hd]
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # [B, nkv, T, hd]
        cos, sin = rope[0].to(q.dtype), rope[1].to(q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = attend(q, k, v, mask, cache, self.layer_idx, self.dropout if self.training else 0.0)
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
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=False)

    def forward(self, x):  # SwiGLU
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = LlamaAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = LlamaMLP(cfg)
        self.dropout = cfg.dropout

    def forward(self, x, rope, mask, cache):
        x = x + _drop(self.self_attn(self.input_layernorm(x), rope, mask, cache), self.dropout, self.training)
        return x + _drop(self.mlp(self.post_attention_layernorm(x)), self.dropout, self.training)


# ------------------------------------------------------------------------------------------------------------ gpt2


class GPT2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # fused q, k, v (HF Conv1D, transposed)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.nh, self.hd, self.layer_idx, self.dropout = cfg.n_head, cfg.head_dim, layer_idx, cfg.dropout

    def forward(self, x, rope, mask, cache):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x [B, T, C]
        q, k, v = (t.view(B, T, self.nh, self.hd).transpose(1, 2) for t in (q, k, v))  # [B, nh, T, hd]
        y = attend(q, k, v, mask, cache, self.layer_idx, self.dropout if self.training else 0.0)
        return self.c_proj(y)  # [B, T, C]


class GPT2MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.intermediate_size)
        self.c_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd)

    def forward(self, x):  # GELU, tanh approximation ("gelu_new")
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class GPT2Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.attn = GPT2Attention(cfg, layer_idx)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.mlp = GPT2MLP(cfg)
        self.dropout = cfg.dropout

    def forward(self, x, rope, mask, cache):
        x = x + _drop(self.attn(self.ln_1(x), rope, mask, cache), self.dropout, self.training)
        return x + _drop(self.mlp(self.ln_2(x)), self.dropout, self.training)


def _drop(x, p, training):
    return F.dropout(x, p, training) if p > 0 and training else x


# ----------------------------------------------------------------------------------------------------- the model


class Transformer(nn.Module):
    """A decoder-only transformer; `forward(idx)` -> logits, `forward(idx, targets)` -> summed token loss."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config
        self.gradient_checkpointing = False  # activation checkpointing per block (training only)
        if cfg.arch == "llama":
            self.model = nn.ModuleDict(dict(
                embed_tokens=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                layers=nn.ModuleList(LlamaBlock(cfg, i) for i in range(cfg.n_layer)),
                norm=RMSNorm(cfg.n_embd, cfg.norm_eps),
            ))  # fmt: skip
        else:
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                h=nn.ModuleList(GPT2Block(cfg, i) for i in range(cfg.n_layer)),
                ln_f=nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps),
            ))  # fmt: skip
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.tie_weights()
        self._init_rope()
        self.init_weights()

    # --- structure ---

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.layers if self.config.arch == "llama" else self.transformer.h

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens if self.config.arch == "llama" else self.transformer.wte

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.get_input_embeddings().weight

    def _init_rope(self) -> None:
        """cos/sin tables [block_size, hd], computed in fp32 exactly as HF's default rotary embedding does."""
        if self.config.arch != "llama":
            return
        cfg, dev = self.config, self.lm_head.weight.device
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=dev).float() / cfg.head_dim)
        freqs = torch.arange(cfg.block_size, device=dev).float()[:, None] * inv_freq  # [block_size, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [block_size, hd]
        self.register_buffer("rope_cos", emb.cos(), persistent=False)
        self.register_buffer("rope_sin", emb.sin(), persistent=False)

    def to_empty(self, *, device, recurse=True):
        """Materialise a model built on the meta device: re-tie embeddings and recompute the RoPE tables."""
        super().to_empty(device=device, recurse=recurse)
        self.tie_weights()
        self._init_rope()  # fp32 tables; forward casts them to the activations' dtype
        return self

    @torch.no_grad()
    def init_weights(self) -> None:
        """normal(0, init_std); residual projections (o_proj, down_proj, c_proj) std / sqrt(2 n_layer) as in GPT-2;
        zero biases; norms weight 1, bias 0."""
        std = self.config.init_std
        resid_std = std / math.sqrt(2 * self.config.n_layer)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, resid_std if name.endswith(("o_proj", "down_proj", "c_proj")) else std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, std)
            elif isinstance(m, (RMSNorm, nn.LayerNorm)):
                nn.init.ones_(m.weight)
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

    def _mask(self, T, P, attn_mask, device):
        """None (plain causal / single token) or bool [B or 1, 1, T, P+T], True = attend.

        attn_mask: optional bool/0-1 [B, P+T] key mask (False = padding, e.g. left padding) or a full bool mask
        broadcastable to [B, 1, T, P+T]; it is combined with causality. Every query may attend to itself, so
        padding rows never become all-masked (NaN)."""
        if attn_mask is None and (P == 0 or T == 1):
            return None
        i = torch.arange(P, P + T, device=device)[:, None]  # absolute query positions [T, 1]
        j = torch.arange(P + T, device=device)[None, :]  # key positions [1, P+T]
        m = j <= i  # [T, P+T]
        if attn_mask is not None:
            am = attn_mask.bool()
            m = m & (am[:, None, None, :] if am.dim() == 2 else am)
            m = m | (j == i)
        return m if m.dim() == 4 else m[None, None]

    # --- forward ---

    def forward(self, idx, targets=None, *, position_ids=None, cache=None, attn_mask=None, return_hidden=False):
        """idx [B, T] token ids. Returns logits [B, T, vocab] (fp32); with targets [B, T] (already shifted,
        -100 = ignore) the fp32 SUM of token cross-entropies; with return_hidden the final normed hidden states
        [B, T, C]. With a KVCache, attends to the cached positions too and advances cache.pos."""
        cfg = self.config
        B, T = idx.shape
        P = 0 if cache is None else cache.pos
        if position_ids is None and P + T > cfg.block_size:
            raise ValueError(f"sequence of {P + T} positions exceeds block_size {cfg.block_size}")
        if cfg.arch == "llama":
            x = self.model.embed_tokens(idx)  # [B, T, C]
            if position_ids is None:
                rope = (self.rope_cos[P : P + T], self.rope_sin[P : P + T])  # [T, hd]
            else:
                rope = (self.rope_cos[position_ids][:, None], self.rope_sin[position_ids][:, None])  # [B, 1, T, hd]
        else:
            pos = torch.arange(P, P + T, device=idx.device) if position_ids is None else position_ids
            x = _drop(self.transformer.wte(idx) + self.transformer.wpe(pos), cfg.dropout, self.training)  # [B, T, C]
            rope = None
        mask = self._mask(T, P, attn_mask, idx.device)
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if ckpt:
                x = checkpoint(block, x, rope, mask, cache, use_reentrant=False)
            else:
                x = block(x, rope, mask, cache)
        x = self.model.norm(x) if cfg.arch == "llama" else self.transformer.ln_f(x)  # [B, T, C]
        if cache is not None:
            cache.pos = P + T
        if return_hidden:
            return x
        if targets is None:
            return self.lm_head(x).float()  # [B, T, vocab]
        h, t = x.reshape(B * T, -1), targets.reshape(B * T)
        if type(self.lm_head) is not nn.Linear:  # wrapped (e.g. a LoRA layer): the plain, memory-hungry way
            logits = self.lm_head(h).float()  # [B*T, vocab]
            return F.cross_entropy(logits, t, ignore_index=-100, reduction="sum")
        w, dev = self.lm_head.weight, x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        if torch.is_grad_enabled() and (h.requires_grad or w.requires_grad):
            return ops.LinearCrossEntropy.apply(h, w, t, dtype)
        return ops.linear_cross_entropy(h, w, t, dtype)[0]
