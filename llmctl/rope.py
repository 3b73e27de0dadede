"""Rotary position embeddings: every Hugging Face RoPE type's frequencies, computed as transformers does, and
their application (HF's rotate_half convention, partial rotary)."""

from __future__ import annotations

import math

import torch

from llmctl.arch import ModelConfig


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """HF's rotate_half convention (weights need no permutation). x [B, nh, T, hd]; cos/sin [T, r] or [B, 1, T, r]
    with r <= hd: partial rotary turns the first r dims of each head and passes the rest."""
    r = cos.size(-1)
    if r < x.size(-1):
        return torch.cat((apply_rope(x[..., :r], cos, sin), x[..., r:]), dim=-1)
    return x * cos + rotate_half(x) * sin


def rope_inv_freq(cfg: ModelConfig, theta: float, rope_type: str, long: bool = False) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [r/2], cos/sin scale) of a RoPE type, as transformers' ROPE_INIT_FUNCTIONS compute them
    (`long`: longrope's long factors, used once a sequence passes original_max_position_embeddings). `dynamic` is
    the default within max_position_embeddings (= block_size), the only positions llmctl runs."""
    dim = int(cfg.head_dim * cfg.partial_rotary_factor)
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    p, scale = cfg.rope_scaling or {}, 1.0
    if rope_type == "linear":
        inv = inv / p["factor"]
    elif rope_type == "llama3":
        factor, lo, hi, old = p["factor"], p["low_freq_factor"], p["high_freq_factor"], p["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        inv = torch.where(~(wavelen < old / hi) * ~(wavelen > old / lo), smoothed, scaled)
    elif rope_type == "yarn":
        old = p["original_max_position_embeddings"]
        factor = p.get("factor") or cfg.block_size / old
        scale = p.get("attention_factor")
        if scale is None:
            mscale = lambda m: 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0  # noqa: E731
            scale = mscale(p["mscale"]) / mscale(p["mscale_all_dim"]) if p.get("mscale") and p.get("mscale_all_dim") \
                else mscale(1)  # fmt: skip
        fast, slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1
        corr = lambda rot: dim * math.log(old / (rot * 2 * math.pi)) / (2 * math.log(theta))  # noqa: E731
        lo, hi = corr(fast), corr(slow)
        if p.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / ((hi + 0.001 if lo == hi else hi) - lo)).clamp(0, 1)
        pos = theta ** (torch.arange(0, dim, 2).float() / dim)
        extra = 1 - ramp
        inv = 1.0 / (factor * pos) * (1 - extra) + 1.0 / pos * extra
    elif rope_type == "longrope":
        old = p["original_max_position_embeddings"]
        factor = p.get("factor") or cfg.block_size / old
        scale = p.get("attention_factor")
        if scale is None:
            scale = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(old))
        ext = torch.tensor(p["long_factor" if long else "short_factor"], dtype=torch.float32)
        inv = 1.0 / (ext * theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return inv, scale
