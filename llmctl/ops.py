"""Fused training ops: each computes exactly what its plain formulation in model.py computes (tests/test_model.py
holds them to it), in fewer passes over memory, with hand-written backwards. Used by the eager training forward;
under torch.compile the plain formulation is traced instead (the compiler fuses it itself)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNormFn(torch.autograd.Function):
    """RMSNorm.forward as one autograd op: the same forward, a hand-written backward that saves only the normed
    activations and the inverse RMS (autograd's graph keeps ~4 tensors and runs ~10 elementwise passes)."""

    @staticmethod
    def forward(ctx, x, w, eps):
        xf = x.float()
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # [..., 1]
        y = xf * r  # fp32
        ctx.save_for_backward(y, r, w)
        ctx.dtype = x.dtype
        return w * y.to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        y, r, w = ctx.saved_tensors
        gx = gw = None
        if ctx.needs_input_grad[1]:
            gw = (g * y.to(ctx.dtype)).reshape(-1, w.numel()).sum(0).to(w.dtype)
        if ctx.needs_input_grad[0]:
            gy = (g * w).to(ctx.dtype).float()
            dot = (gy * y).mean(-1, keepdim=True)  # d rms terms: dx = r * (gy - y * mean(gy * y))
            gx = torch.addcmul(gy, y, dot, value=-1).mul_(r).to(ctx.dtype)
        return gx, gw, None


def swap_halves(x):
    h = x.size(-1) // 2
    return torch.cat((x[..., h:], x[..., :h]), dim=-1)


class RopeFn(torch.autograd.Function):
    """apply_rope as one autograd op: rotate_half(x) * sin == swap_halves(x) * signed_sin, so the forward is
    x * cos + swap(x) * ssin (3 passes instead of 5) and the backward g * cos + swap(g * ssin); saves no
    activations."""

    @staticmethod
    def forward(ctx, x, cos, ssin):
        ctx.save_for_backward(cos, ssin)
        return torch.addcmul(x * cos, swap_halves(x), ssin)

    @staticmethod
    def backward(ctx, g):
        cos, ssin = ctx.saved_tensors
        return torch.addcmul(swap_halves(g * ssin), g, cos), None, None


def fusable(*linears) -> bool:
    """Plain nn.Linear layers (no LoRA wrapper, no hooks) with matching biases: one matmul may replace them."""
    return all(type(m) is nn.Linear and not (m._forward_hooks or m._forward_pre_hooks) for m in linears) and (
        len({m.bias is None for m in linears}) == 1)


def cat_linear(x, *linears):
    """The outputs of several nn.Linear on the same input, concatenated on the last dim, as ONE matmul (weights
    concatenated on the fly: parameters and checkpoints keep HF's separate names). Training only: the copy of the
    weights is small next to a training batch's matmuls, and the backward gets one grad-input matmul instead of
    several plus their accumulation."""
    w = torch.cat([m.weight for m in linears])
    b = None if linears[0].bias is None else torch.cat([m.bias for m in linears])
    return F.linear(x, w, b)


def linear_cross_entropy(h, w, targets, dtype, need_h=False, need_w=False, chunk=None):
    """sum_i CE(h_i @ w.T, targets_i) over targets != -100, computed `chunk` rows at a time, with the gradients
    w.r.t. h [N, C] and w [V, C] (if asked) computed in the same pass. The [N, V] logits never exist whole:
    less memory, and each chunk's softmax stays in cache.
    Matmuls run in `dtype` (the autocast dtype), softmax and the loss in fp32."""
    N, V = h.size(0), w.size(0)
    chunk = chunk or max(64, 2**21 // V)  # ~8 MB of fp32 logits per chunk
    with torch.autocast(h.device.type, enabled=False):
        hc_all, wc = h.to(dtype), w.to(dtype)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(w, dtype=torch.float32) if need_w else None
        compiling = torch.compiler.is_compiling()
        for s in range(0, N, chunk):
            hc, tc = hc_all[s : s + chunk], targets[s : s + chunk]
            valid = (tc != -100)[:, None]  # [n, 1]
            tgt = torch.where(valid, tc[:, None], 0)  # [n, 1]
            logits = (hc @ wc.t()).float()  # [n, V]
            target_logit = logits.gather(1, tgt)  # [n, 1]
            if compiling:  # written out: the compiler fuses these passes itself (and does worse with softmax)
                m = logits.amax(dim=-1, keepdim=True)  # [n, 1]
                e = logits.sub_(m).exp_()  # [n, V], in place: one pass for both the loss and the softmax
                z = e.sum(dim=-1, keepdim=True)  # [n, 1]
                lse, p = m + z.log(), e.div_(z)
            else:
                m, arg = logits.max(dim=-1, keepdim=True)  # [n, 1]
                # the fused row-wise softmax kernel (each row read, exponentiated, written once while in cache);
                # at the row's argmax it is exp(0) / z = 1 / z (>= 1 / V, never underflows): log z = -log(p[arg])
                p = torch.softmax(logits, dim=-1)  # [n, V]
                del logits
                lse = m - p.gather(1, arg).log()  # [n, 1]
            loss = loss + ((lse - target_logit) * valid).sum()
            if need_h or need_w:
                p.scatter_add_(1, tgt, -valid.float())  # d CE / d logits = softmax - onehot
                p = p.to(dtype)  # ignored rows are zeroed below, on the [n, C] sides (V / C times cheaper)
                if need_h:
                    grad_h[s : s + chunk] = (p @ wc).mul_(valid)
                if need_w:
                    hv = hc * valid
                    if grad_w.dtype == dtype and not compiling:
                        grad_w.addmm_(p.t(), hv)  # accumulated inside the matmul: no [V, C] temporary
                    else:
                        grad_w += p.t() @ hv
    return loss, grad_h, grad_w


class LinearCrossEntropy(torch.autograd.Function):
    """linear_cross_entropy as an autograd op: the gradients come from the forward pass, backward only scales."""

    @staticmethod
    def forward(ctx, h, w, targets, dtype):
        loss, grad_h, grad_w = linear_cross_entropy(h, w, targets, dtype, *ctx.needs_input_grad[:2])
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        grad_h = None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype)
        grad_w = None if grad_w is None else grad_w * grad_loss
        return grad_h, grad_w, None, None


def drop(x, p, training):
    """Dropout, skipped (no op at all) when off."""
    return F.dropout(x, p, training) if p > 0 and training else x
