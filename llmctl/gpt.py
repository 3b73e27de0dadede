"""The GPT module trees: GPT-2 (learned positions, Conv1D weights stored as nn.Linear) and GPT-NeoX / Pythia
(rotary, per-head fused q/k/v, parallel residual), with Hugging Face's parameter names."""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from llmctl.arch import ModelConfig
from llmctl.attention import attend
from llmctl.ops import drop
from llmctl.rope import apply_rope


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
        x = x + drop(self.attn(self.ln_1(x), rope, mask, cache), self.dropout, self.training)
        return x + drop(self.mlp(self.ln_2(x)), self.dropout, self.training)


class NeoXAttention(nn.Module):
    """GPT-NeoX's attention: one query_key_value projection laid out per head as [q | k | v], partial rotary."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.query_key_value = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.qkv_bias)
        self.dense = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.attn_out_bias)
        self.nh, self.hd, self.layer_idx, self.dropout = cfg.n_head, cfg.head_dim, layer_idx, cfg.dropout

    def forward(self, x, rope, mask, cache):
        B, T, C = x.shape
        q, k, v = self.query_key_value(x).view(B, T, self.nh, 3 * self.hd).transpose(1, 2).chunk(3, dim=-1)
        cos, sin = rope[0].to(q.dtype), rope[1].to(q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = attend(q, k, v.contiguous(), mask, cache, self.layer_idx, self.dropout if self.training else 0.0)
        return self.dense(y)  # [B, T, C]


class NeoXMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.n_embd, cfg.intermediate_size)
        self.dense_4h_to_h = nn.Linear(cfg.intermediate_size, cfg.n_embd)
        self.approximate = "tanh" if cfg.mlp == "gelu_tanh" else "none"  # GELU, exact unless gelu_new / fast

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate=self.approximate))


class NeoXBlock(nn.Module):
    """GPT-NeoX / Pythia: LayerNorms with biases, and (use_parallel_residual) attention and MLP side by side."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.attention = NeoXAttention(cfg, layer_idx)
        self.mlp = NeoXMLP(cfg)
        self.dropout, self.parallel, self.rope_kind = cfg.dropout, cfg.parallel_residual, "full_attention"

    def forward(self, x, rope, mask, cache):
        a = drop(self.attention(self.input_layernorm(x), rope, mask, cache), self.dropout, self.training)
        if self.parallel:
            return drop(self.mlp(self.post_attention_layernorm(x)), self.dropout, self.training) + a + x
        x = a + x
        return drop(self.mlp(self.post_attention_layernorm(x)), self.dropout, self.training) + x
