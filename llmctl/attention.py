"""Causal self-attention for fp32 on CPU as one custom op, `llmctl::causal_attention`, with its own backward.

`attend` (below: the model's attention, over a KV cache, masks, scales and soft-capping) sends plain causal attention here (no KV cache, no mask, no dropout, head size a multiple of 16, fp32
on CPU: the CPU training and full-forward path, eager or under torch.compile, which keeps the op opaque). Its
forward and backward run natively (llmctl/native/csrc/attention.cpp through llmctl.native); where the native library
can't be had (no compiler, `LLMCTL_NATIVE=0`), or a pass has fewer (batch row, head) tasks than threads, they run
PyTorch's own CPU flash attention instead, with the same outputs (its log-sum-exp is the same too, so either
backward follows either forward). The op returns the attention output already as [B, T, H * hd] (what the output
projection reads) and each query row's log-sum-exp, which the backward uses in place of the probabilities.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from llmctl import native


def _strides(t: torch.Tensor) -> list[int]:  # [B, heads, T, hd] -> element strides (batch, time, head)
    return [t.stride(0), t.stride(2), t.stride(1)]


def _dims(q, k, v, *extra: int) -> np.ndarray:
    """The kernels' int64 arguments: B, T, H, Hk, hd, the (batch, time, head) strides of q, k, v, those of the
    output / dq (contiguous [B, T, H, hd]), then `extra`."""
    B, H, T, hd = q.shape
    return np.array([B, T, H, k.size(1), hd, *_strides(q), *_strides(k), *_strides(v), T * H * hd, H * hd, hd, *extra],
                    dtype=np.int64)  # fmt: skip


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("llmctl::causal_attention", mutates_args=(), device_types="cpu")
def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, H, T, hd], k/v [B, Hk, T, hd] (H a multiple of Hk), fp32 -> (out [B, T, H*hd], lse [B, H, T])."""
    B, H, T, hd = q.shape
    lib = native.load()
    if lib is None or B * H < torch.get_num_threads():  # the kernel's tasks: (batch row, head) pairs; too few
        k, v = (t.repeat_interleave(H // k.size(1), dim=1) for t in (k, v))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)[:2]
        return out.transpose(1, 2).reshape(B, T, H * hd), lse.contiguous()
    q, k, v = _rows(q), _rows(k), _rows(v)
    out = q.new_empty(B, T, H * hd)
    lse = q.new_empty(B, H, T)
    dims = _dims(q, k, v)
    if lib.llmctl_attn_fwd(dims.ctypes.data, *(t.data_ptr() for t in (q, k, v, out, lse)), hd**-0.5):
        raise RuntimeError("llmctl_attn_fwd: unsupported shape")
    return out, lse


@causal_attention.register_fake
def _(q, k, v):
    B, H, T, hd = q.shape
    return q.new_empty(B, T, H * hd), q.new_empty(B, H, T)


@torch.library.custom_op("llmctl::causal_attention_backward", mutates_args=(), device_types="cpu")
def causal_attention_backward(
    g: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of causal_attention's output g [B, T, H*hd] -> dq [B, T, H, hd], dk, dv [B, T, Hk, hd]."""
    B, H, T, hd = q.shape
    Hk = k.size(1)
    lib = native.load()
    if lib is None or B * Hk < torch.get_num_threads():  # tasks: (batch row, key/value head) pairs
        o4 = out.view(B, T, H, hd).transpose(1, 2)
        g4 = g.contiguous().view(B, T, H, hd).transpose(1, 2)
        kk, vv = (t.repeat_interleave(H // Hk, dim=1) for t in (k, v))
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            g4, q, kk, vv, o4, lse, 0.0, True
        )
        dk, dv = (t.view(B, Hk, H // Hk, T, hd).sum(2) for t in (dk, dv))  # a group's heads share their k, v
        return dq.transpose(1, 2).contiguous(), dk.transpose(1, 2).contiguous(), dv.transpose(1, 2).contiguous()
    q, k, v, g = _rows(q), _rows(k), _rows(v), g.contiguous()
    dq = q.new_empty(B, T, H, hd)
    dk, dv = k.new_empty(B, T, Hk, hd), v.new_empty(B, T, Hk, hd)
    dims = _dims(q, k, v, T * Hk * hd, Hk * hd, hd)  # then dk / dv's (contiguous [B, T, Hk, hd])
    ptrs = (t.data_ptr() for t in (q, k, v, out, lse, g, dq, dk, dv))
    if lib.llmctl_attn_bwd(dims.ctypes.data, *ptrs, hd**-0.5):
        raise RuntimeError("llmctl_attn_bwd: unsupported shape")
    return dq, dk, dv


@causal_attention_backward.register_fake
def _(g, q, k, v, out, lse):
    B, H, T, hd = q.shape
    return q.new_empty(B, T, H, hd), k.new_empty(B, T, k.size(1), hd), v.new_empty(B, T, k.size(1), hd)


def _setup(ctx, inputs, output):
    q, k, v = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)


def _backward(ctx, g, _glse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = causal_attention_backward(g, q, k, v, out, lse)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


causal_attention.register_autograd(_backward, setup_context=_setup)


def applies(q: torch.Tensor, k: torch.Tensor, mask, cache, dropout_p: float) -> bool:
    """Whether attend's call is one this op computes: plain causal self-attention over T > 1 fresh tokens, fp32 on
    CPU, no dropout, head size a multiple of 16 (the kernels' vector width), H a multiple of Hk."""
    return (mask is None and cache is None and dropout_p == 0.0 and q.device.type == "cpu"
            and q.dtype == torch.float32 and k.dtype == torch.float32 and q.size(2) > 1 and q.size(-1) % 16 == 0
            and q.size(1) % k.size(1) == 0 and q.size(2) == k.size(2))  # fmt: skip


# ------------------------------------------------------------------------------------ the model's attention

try:  # Intel AMX makes bf16 matmuls and attention fast on CPU; without it fp32 attention is faster than bf16
    CPU_HAS_AMX = bool(torch._C._cpu._init_amx())
except Exception:
    CPU_HAS_AMX = False


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


def attend(q, k, v, mask, cache, layer_idx, dropout_p, scale=None, softcap=None):
    """Causal attention, q [B, nh, T, hd], k/v [B, nkv, T, hd] -> [B, T, nh*hd]; nkv < nh: grouped-query.
    mask None: plain causal (a single new token: all cached); else bool [*, 1, T, P+T], True = attend.
    scale: None = hd ** -0.5; softcap: scores -> softcap * tanh(scores / softcap) before the mask (Gemma 2)."""
    B, nh, T, hd = q.shape
    if cache is not None:
        k, v = cache.update(layer_idx, k, v)  # [B, nkv, P+T, hd]
        k, v = k.to(q.dtype), v.to(q.dtype)
    dtype, upcast = q.dtype, q.device.type == "cpu" and not CPU_HAS_AMX
    upcast = upcast and (dtype != torch.float32 or torch.is_autocast_enabled("cpu"))
    if upcast:  # CPU without AMX: bf16/fp16 flash attention is slower than fp32
        q, k, v = q.float(), k.float(), v.float()
    if softcap is not None:  # no fused kernel computes this: the explicit formulation, softmax in fp32
        k, v = k.repeat_interleave(nh // k.size(1), 1), v.repeat_interleave(nh // v.size(1), 1)
        s = torch.matmul(q, k.transpose(2, 3)) * (hd**-0.5 if scale is None else scale)
        s = torch.tanh(s / softcap) * softcap
        if mask is not None or T > 1:
            m = mask if mask is not None else torch.ones(T, k.size(2), dtype=torch.bool, device=q.device).tril(k.size(2) - T)
            s = s.masked_fill(~m, torch.finfo(s.dtype).min)
        p = F.dropout(F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), dropout_p, dropout_p > 0)
        return torch.matmul(p, v).transpose(1, 2).reshape(B, T, nh * hd).to(dtype)
    if scale is None and applies(q, k, mask, cache, dropout_p):  # fp32 CPU training: llmctl's kernels
        return causal_attention(q, k, v)[0].to(dtype)
    causal = mask is None
    if T == 1:  # (a branch, not `and T > 1`: under dynamic shapes that would be a SymBool, which SDPA refuses)
        causal = False  # one new token sees its whole cache
    with torch.autocast("cpu", enabled=False) if upcast else contextlib.nullcontext():
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal,
                                           enable_gqa=k.size(1) != nh, scale=scale)  # fmt: skip
    return y.transpose(1, 2).reshape(B, T, nh * hd).to(dtype)  # [B, T, nh*hd]
