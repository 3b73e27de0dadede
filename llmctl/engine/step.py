"""The decode step over the KV cache: the one-token step of a Transformer, lean and fast, for the engine.

`Transformer.forward` is written for training and readability; at decode time (one token per row) a small model
on a CPU spends as much time dispatching ops as multiplying. FastDecode computes the same logits with fewer,
larger ops: q/k/v and gate/up projections fused into one matmul each, weights stored [in, out] (faster
matrix-vector and small-batch products on CPU), the residual adds fused into the output projections, RoPE as
one fused multiply-add. Tests hold its logits to the full forward's (fp32, 1e-4).

A model with 16-bit weights (bf16 / fp16) on CPU keeps them in 16 bits here too (the fused matrices, the embedding,
lm_head: no fp32 copy), and everything else in fp32 (`dtype`): norms' and biases' small copies, RoPE, attention, the
KV cache, activations and logits; each matmul widens the weights to fp32 (the native step in registers as it reads
them). Tests hold it to the full forward of the same weights in fp32 (1e-4).

fp32 on CPU, the same step runs natively (llmctl/native/csrc/decode.cpp, on these same fused weights and the same
KV cache, through the ctypes Structures of llmctl/native/abi.py): a one-row token in one call, and for rows of a
batch and verify passes everything but the matmuls, which go to the sgemm of PyTorch's own BLAS. Where it does not
apply (another device or dtype, no compiler, an index out of range) the PyTorch step runs; tests hold the two to
each other.
"""

from __future__ import annotations

import ctypes
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from llmctl.model import Transformer

_OPTIMIZER_STEPS = 0  # optimizer steps taken in this process (any optimizer), counted by a global post-step hook
_HOOKED = False


def _count_step(*_):
    global _OPTIMIZER_STEPS
    _OPTIMIZER_STEPS += 1


def _hook_optimizers() -> None:
    """Count every optimizer step: fused optimizers (torch's fused AdamW on CPU, for one) update parameters in
    place without bumping their autograd version counters, so those alone miss a training step."""
    global _HOOKED
    if not _HOOKED:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(_count_step)
        _HOOKED = True


class FastDecode:
    """The one-token decode step of a plain llmctl Transformer (same math as `Transformer.forward` with a KV
    cache). Its weights are fused, transposed copies, rebuilt when the model's parameters change (`refresh`, e.g.
    between RL rollouts); `share=True` instead re-points the model's own Linear weights at them (views: no extra
    memory, in-place updates seen at once; the model keeps working, with non-contiguous weights). Not for
    wrapped layers such as LoRA's (`supported`): the engine then uses the model's forward."""

    def __init__(self, model, share: bool = False):
        _hook_optimizers()
        self.model, self.cfg, self.share = model, model.config, share
        self._build()

    @staticmethod
    def supported(model) -> bool:
        """An llmctl Transformer whose Linear layers are plain ones, with no family feature the step lacks (sliding
        windows, q/k norms, soft-capping, ...: `ModelConfig.plain`); others decode through the model's forward."""
        lin = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        return (isinstance(model, Transformer) and (model.config.arch == "gpt2" or model.config.arch == "llama" and model.config.plain)
                and all(type(m) is torch.nn.Linear for m in lin))  # fmt: skip

    def _version(self) -> tuple[int, int]:
        """Changes whenever a parameter may have: in-place ops and copies bump its version counter, and any
        optimizer step (fused ones bump nothing) bumps the process-wide step count."""
        return sum(p._version for p in self.model.parameters()), _OPTIMIZER_STEPS

    def refresh(self) -> None:
        if (not self.share or self.wide) and self._version() != self.version:  # (wide: fp32 copies of norms, biases)
            self._build()

    @torch.no_grad()
    def _build(self) -> None:
        cfg, m = self.cfg, self.model
        w = m.lm_head.weight
        # activations, KV cache, logits: fp32 for 16-bit weights on CPU, else the weights' dtype
        self.wide = w.device.type == "cpu" and w.dtype in (torch.bfloat16, torch.float16)
        self.dtype = torch.float32 if self.wide else w.dtype
        small = (lambda t: None if t is None else t.to(self.dtype)) if self.wide else (lambda t: t)  # noqa: E731
        if cfg.arch == "llama":
            self.norm_w = small(m.model.norm.weight)
        else:
            self.ln_f, self.wpe = self._ln(m.transformer.ln_f), small(m.transformer.wpe.weight)
        self.layers = []
        for blk in m.blocks:
            if cfg.arch == "llama":
                a, mlp = blk.self_attn, blk.mlp
                qkv = self._fuse(a.q_proj, a.k_proj, a.v_proj)
                gu = self._fuse(mlp.gate_proj, mlp.up_proj)
                self.layers.append((small(blk.input_layernorm.weight), *qkv, *self._fuse(a.o_proj),
                                    small(blk.post_attention_layernorm.weight), *gu, *self._fuse(mlp.down_proj)))  # fmt: skip
            else:
                self.layers.append((self._ln(blk.ln_1), *self._fuse(blk.attn.c_attn), *self._fuse(blk.attn.c_proj),
                                    self._ln(blk.ln_2), *self._fuse(blk.mlp.c_fc), *self._fuse(blk.mlp.c_proj)))  # fmt: skip
        self.lm_rows = None  # sharing a tied embedding: logits = (E @ h.T).T with E [V, C] as it is
        if cfg.tie_embeddings and self.share:  # (x @ E.T is slower than either for a few rows; as fast from ~16
            # rows on, and then the transposed [V, M] result's copy costs more than it saves)
            self.lm_rows = m.lm_head.weight.detach()
            self.lm_head = self.lm_rows.t()
        elif cfg.tie_embeddings:  # the embedding keeps its layout: a transposed copy
            self.lm_head = m.lm_head.weight.detach().t().contiguous()
        else:
            self.lm_head = self._fuse(m.lm_head)[0]
        if cfg.arch == "llama":
            half, dtype = cfg.head_dim // 2, self.dtype
            sign = torch.cat([-torch.ones(half), torch.ones(half)]).to(m.rope_sin)
            # rotate_half(x) * sin == flip_halves(x) * (sign * sin); RoPE at a position is then x @ R with
            # R = eye * cos + swap * (sign * sin), swap[(j + half) % hd, j] = 1: one batched matmul per layer
            self.cos, self.sin = m.rope_cos.to(dtype), (m.rope_sin * sign).to(dtype)
            hd = cfg.head_dim
            self.eye = torch.eye(hd, dtype=dtype, device=self.cos.device)
            self.swap = self.eye[(torch.arange(hd) + half) % hd]
        self._native_setup()
        self.version = self._version()

    def _native_setup(self) -> None:
        """Point the native step (llmctl/native/) at the weights, where it applies: on CPU, contiguous, matrices in
        fp32, bf16 or fp16 (abi.WDTYPES) and the rest in fp32."""
        cfg, m = self.cfg, self.model
        self.native = None
        w = m.lm_head.weight
        if w.device.type != "cpu" or self.dtype != torch.float32 or cfg.head_dim > 512 or cfg.n_head % cfg.n_kv_head:
            return
        from llmctl import native
        from llmctl.native import abi

        lib = native.load()
        if lib is None:
            return
        llama = cfg.arch == "llama"
        if llama:
            emb, glob = m.model.embed_tokens.weight, [self.cos, self.sin, self.norm_w, None]
            eps, n_pos = cfg.norm_eps, min(self.cos.size(0), self.sin.size(0))
        else:
            emb, glob = m.transformer.wte.weight, [self.wpe, None, self.ln_f.weight, self.ln_f.bias]
            eps, n_pos = self.ln_f.eps, self.wpe.size(0)
        lm = self.lm_rows if self.lm_rows is not None else self.lm_head
        layers = []  # per layer: Layer's 12 weights (None: absent)
        for layer in self.layers:
            if llama:
                ln1, wqkv, bqkv, wo, bo, ln2, w1, _, w2, _ = layer
                layers.append([ln1, None, wqkv, bqkv, wo, bo, ln2, None, w1, None, w2, None])
            else:
                ln1, wqkv, bqkv, wo, bo, ln2, w1, b1, w2, b2 = layer
                if ln1.eps != eps or ln2.eps != eps:
                    return
                layers.append([ln1.weight, ln1.bias, wqkv, bqkv, wo, bo, ln2.weight, ln2.bias, w1, b1, w2, b2])
        keep = [emb, *glob, lm, *(t for ts in layers for t in ts)]
        matrices = {id(t) for t in [emb, lm, *(ts[i] for ts in layers for i in (2, 4, 8, 10))]}
        wd = str(w.dtype).removeprefix("torch.")
        if wd not in abi.WDTYPES or any(
                t is not None and (t.dtype != (w.dtype if id(t) in matrices else torch.float32) or not t.is_contiguous())
                for t in keep):  # fmt: skip
            return
        self._keep = keep  # the tensors behind the pointers
        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        self._layers = (abi.Layer * cfg.n_layer)(*(abi.Layer(*map(ptr, ts)) for ts in layers))  # k / v: per cache
        inter = self.layers[0][6].size(1) // (2 if llama else 1)
        self._model = abi.Model(gpt2=int(not llama), n_layer=cfg.n_layer, C=cfg.n_embd, nh=cfg.n_head,
                                nkv=cfg.n_kv_head, hd=cfg.head_dim, inter=inter, V=cfg.vocab_size,
                                wdtype=abi.WDTYPES.index(wd),
                                lm_rows=int(self.lm_rows is not None), n_pos=n_pos, eps=float(eps),
                                scale=cfg.head_dim**-0.5, emb=ptr(emb), pe=ptr(glob[0]), sin=ptr(glob[1]),
                                normw=ptr(glob[2]), normb=ptr(glob[3]), lm_head=ptr(lm),
                                layers=self._layers)  # fmt: skip
        self._mp, self._tokens = ctypes.pointer(self._model), abi.Tokens()
        self._tp = ctypes.pointer(self._tokens)
        self._work, self._cache_ptrs = None, None
        self.native, self._sgemm = lib, native.sgemm()

    def _bind(self, cache) -> bool:
        """Point the native step at this cache's buffers (fp32, contiguous, CPU: else False)."""
        bufs = [t for kv in zip(cache.k, cache.v) for t in kv]
        key = (*(t.data_ptr() for t in bufs), *cache.k[0].shape)  # every buffer: a new cache may reuse some addresses
        if key != self._cache_ptrs:
            c, shape = self.cfg, cache.k[0].shape
            if len(bufs) != 2 * c.n_layer or shape[1] != c.n_kv_head or shape[3] != c.head_dim:
                return False
            if any(t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu" or t.shape != shape
                   for t in bufs):  # fmt: skip
                return False
            for layer, k, v in zip(self._layers, cache.k, cache.v):
                layer.kc, layer.vc = k.data_ptr(), v.data_ptr()
            self._model.L, self._model.B = cache.max_len, shape[0]
            self._cache_ptrs = key
        return True

    def _scratch(self, n: int) -> torch.Tensor:
        """The native steps' scratch buffer, at least n floats (grown as needed, kept)."""
        if self._work is None or self._work.numel() < n:
            self._work = torch.empty(n)
        return self._work

    def _native_step(self, token: int, cache) -> torch.Tensor | None:
        """One token of a one-row cache through the native step, at slot and position cache.pos: logits [1, V]
        fp32 (the caller advances pos). None (nothing written) where it does not apply."""
        P = cache.pos
        if not self._bind(cache):
            return None
        work = self._scratch(int(self.native.llmctl_work_floats(self._mp)))
        out = torch.empty(1, self.cfg.vocab_size)
        if self.native.llmctl_decode(self._mp, token, P, P, out.data_ptr(), work.data_ptr()):
            return None  # an index out of range, nothing written: PyTorch's step decides
        return out

    def _native_rows(self, x, cache, rows, slots, pos, mask=None, out=None) -> torch.Tensor | None:
        """Tokens x [M] through the native batched step: x[m] goes to slot slots[m] of cache row rows[m] at position
        pos[m] and attends to that row's slots <= slots[m] where mask [B, >= slots + 1] (None: all) -> logits
        [M, V] fp32, or of the tokens x[out] only. None (nothing written) where it does not apply."""
        if self._sgemm is None or x.device.type != "cpu" or not self._bind(cache):
            return None
        if mask is not None and (mask.dtype != torch.bool or mask.stride(-1) != 1):
            return None
        M = x.size(0)
        x, rows, slots, pos = (t.to(torch.long).contiguous() for t in (x, rows, slots, pos))
        n_out = M if out is None else out.numel()
        if out is not None:
            out = out.to(torch.long).contiguous()
        t = self._tokens  # (limit = slots: each token attends up to its own slot)
        t.M, t.tok, t.rows, t.pos = M, x.data_ptr(), rows.data_ptr(), pos.data_ptr()
        t.slots = t.limit = slots.data_ptr()
        t.mask, t.mstride = (None, 0) if mask is None else (mask.data_ptr(), mask.stride(0))
        t.out, t.n_out = None if out is None else out.data_ptr(), n_out
        work = self._scratch(int(self.native.llmctl_step_floats(self._mp, M)))
        logits = torch.empty(n_out, self.cfg.vocab_size)
        err = self.native.llmctl_step(self._mp, self._tp, logits.data_ptr(), work.data_ptr(), self._sgemm)
        return None if err else logits

    def _ln(self, ln):
        """A LayerNorm as it is, or (16-bit weights on CPU) its fp32 copy."""
        if not self.wide:
            return ln
        return SimpleNamespace(weight=ln.weight.detach().to(self.dtype), eps=ln.eps, normalized_shape=ln.normalized_shape,
                               bias=None if ln.bias is None else ln.bias.detach().to(self.dtype))  # fmt: skip

    def _fuse(self, *lins):
        """The Linear layers' weights concatenated along `out` and transposed to [in, out]; their bias (or None)."""
        w = torch.cat([lin.weight.detach() for lin in lins]).t().contiguous()
        b = torch.cat([lin.bias.detach() for lin in lins]) if lins[0].bias is not None else None
        if self.share:  # the model's weights become views of the fused copy
            o = 0
            for lin in lins:
                n = lin.weight.size(0)
                lin.weight.data = w[:, o : o + n].t()
                if b is not None:
                    lin.bias.data = b[o : o + n]
                o += n
        return w, b if b is None or not self.wide else b.to(self.dtype)

    def __call__(self, x, cache, position=None, mask=None):
        """x [B] next tokens; position [B] their positions (None: cache.pos for all); mask [B, cache.pos + 1]
        key mask (None: attend to all) -> logits [B, V] (fp32). Writes the cache and advances cache.pos."""
        P = cache.pos
        if P + 1 > cache.max_len:
            raise ValueError(f"KV cache full: {P + 1} positions needed, max_len is {cache.max_len}")
        if self.native is not None:
            B = x.size(0)
            if B == 1 and position is None and mask is None and cache.k[0].size(0) == 1:
                out = self._native_step(int(x), cache)
            else:
                slots = torch.full((B,), P, dtype=torch.long)
                out = self._native_rows(x, cache, torch.arange(B), slots, slots if position is None else position,
                                        mask)  # fmt: skip
            if out is not None:
                cache.pos = P + 1
                return out

        def kv(i, k, v):  # k, v [B, nkv, hd] -> all keys / values so far [B, nkv, P+1, hd]
            kc, vc = cache.k[i], cache.v[i]
            kc[:, :, P] = k
            vc[:, :, P] = v
            return kc[:, :, : P + 1], vc[:, :, : P + 1]

        out = self._step(x, P if position is None else position, None if mask is None else mask[:, None, None, :], kv)
        cache.pos = P + 1
        return out

    def verify(self, x, cache):
        """x [T]: consecutive tokens of a one-row cache's sequence, at positions cache.pos .. cache.pos + T - 1 ->
        logits [T, V] (fp32), each position attending to the cache and to the tokens before it (speculative
        decoding's verify pass: the T positions run as T rows of the same step). Writes the cache; advances pos."""
        P, T = cache.pos, x.size(0)
        if P + T > cache.max_len or cache.k[0].size(0) != 1:
            raise ValueError(f"verify needs a one-row cache with room for {P + T} positions")
        if self.native is not None:
            slots = torch.arange(P, P + T)
            out = self._native_rows(x, cache, torch.zeros(T, dtype=torch.long), slots, slots)
            if out is not None:
                cache.pos = P + T
                return out

        def kv(i, k, v):  # k, v [T, nkv, hd] -> the row's keys / values so far, once per position [T, nkv, P+T, hd]
            kc, vc = cache.k[i], cache.v[i]
            kc[0, :, P : P + T] = k.transpose(0, 1)
            vc[0, :, P : P + T] = v.transpose(0, 1)
            return kc[:, :, : P + T].expand(T, -1, -1, -1), vc[:, :, : P + T].expand(T, -1, -1, -1)

        pos = torch.arange(P, P + T, device=x.device)
        mask = torch.arange(P + T, device=x.device)[None, :] <= pos[:, None]  # [T, P+T] causal
        out = self._step(x, pos, mask[:, None, None, :], kv)
        cache.pos = P + T
        return out

    def verify_rows(self, x, cache, rows, j, start, position, key_mask, T, out=None):
        """Batched verify pass, rows advancing on their own (llmctl/engine/lookup.py): x [M] holds, for each cache row
        r, a run of consecutive tokens (x[m] is token j[m] of row rows[m]'s run, j < T, runs sorted by row then j;
        a row may have none) that go to cache slots start[r] + j at positions position[r] + j. Token j of row r
        attends to the slots s <= start[r] + j where key_mask [B, >= S] is True (S = the last slot written + 1;
        False on left padding). The projections run on the M tokens; attention on runs padded to T. -> logits [M, V]
        (fp32), or of the tokens x[out] only. Leaves cache.pos alone. Also a batch's prefill without padding:
        runs = the prompts, start = their left-padded offsets, position = 0, out = each prompt's last token."""
        B, M, dev = start.size(0), x.size(0), x.device
        slots = start[rows] + j
        S = int(slots.max()) + 1
        if S > cache.max_len:
            raise ValueError(f"KV cache full: {S} positions needed, max_len is {cache.max_len}")
        if self.native is not None:
            logits = self._native_rows(x, cache, rows, slots, position[rows] + j, key_mask, out)
            if logits is not None:
                return logits
        am = (torch.arange(S, device=dev) <= (start[:, None] + torch.arange(T, device=dev))[:, :, None])
        am = (am & key_mask[:, None, :S])[:, None]  # [B, 1, T, S]
        pad = None if M == B * T else rows * T + j  # where each token sits in the padded [B * T] layout

        def kv(i, k, v):  # k, v [M, nkv, hd] -> the rows' keys / values [B, nkv, S, hd]
            kc, vc = cache.k[i], cache.v[i]
            kc[rows, :, slots] = k
            vc[rows, :, slots] = v
            return kc[:, :, :S], vc[:, :, :S]

        return self._step(x, position[rows] + j, am, kv, T, pad, out)

    def static_step(self, x, ks, vs, slot, position, mask):
        """The same step with static shapes, for torch.compile / CUDA graphs: the new keys / values go to cache
        slot `slot` (a 1-element long tensor) of the whole buffers ks / vs ([B, nkv, max_len, hd] per layer), and
        attention spans the whole buffer, so mask [B, max_len] must hide the unwritten slots (and padding).
        position [B] long. Does not touch a KVCache's `pos`."""

        def kv(i, k, v):
            ks[i].index_copy_(2, slot, k[:, :, None])
            vs[i].index_copy_(2, slot, v[:, :, None])
            return ks[i], vs[i]

        return self._step(x, position, mask[:, None, None, :], kv)

    def _step(self, x, pos, am, kv, T=1, pad=None, out=None):
        """Embed x [B] at positions pos (int or [B]), run the blocks (kv(layer, k, v) stores the new keys / values
        and returns the ones to attend to; am: key mask [B, 1, 1, S] or None), return logits [B, V] fp32.
        T > 1: runs of up to T tokens of R cache rows (kv returns [R, nkv, S, hd], am is [R, 1, T, S]); x's tokens
        sit at positions `pad` of the padded [R * T] layout (None: x is that layout). out: the logits of these
        tokens only (index into x)."""
        cfg, m, mm = self.cfg, self.model, _widen if self.wide else _mm
        B, nh, nkv, hd = x.size(0), cfg.n_head, cfg.n_kv_head, cfg.head_dim
        llama = cfg.arch == "llama"
        if llama:
            h = m.model.embed_tokens(x).to(self.dtype)  # [B, C]
            cos, sin = self.cos[pos], self.sin[pos]  # [hd] or [B, hd]
            if cos.dim() == 1:
                cos, sin = cos[None], sin[None]
            rot = torch.addcmul(self.eye * cos[:, None], self.swap, sin[:, None])  # [B or 1, hd, hd]
        else:
            h = m.transformer.wte(x).to(self.dtype) + self.wpe[torch.full_like(x, pos) if isinstance(pos, int) else pos]
        for i, layer in enumerate(self.layers):
            if llama:
                ln1, wqkv, bqkv, wo, bo, ln2, wgu, _, wd, _ = layer
                xn = _rms(h, ln1, cfg.norm_eps)
                qkv = (mm(xn, wqkv) if bqkv is None else mm(xn, wqkv, bqkv)).view(B, nh + 2 * nkv, hd)
                qk = qkv[:, : nh + nkv]
                qk = torch.matmul(qk, rot)  # RoPE: qk * cos + rotate_half(qk) * sin
                q, k, v = qk[:, :nh], qk[:, nh:], qkv[:, nh + nkv :]
            else:
                ln1, wqkv, bqkv, wo, bo, ln2, wfc, bfc, wp, bp = layer
                xn = F.layer_norm(h, ln1.normalized_shape, ln1.weight, ln1.bias, ln1.eps)
                qkv = mm(xn, wqkv, bqkv).view(B, 3 * nh, hd)
                q, k, v = qkv[:, :nh], qkv[:, nh : 2 * nh], qkv[:, 2 * nh :]
            kk, vv = kv(i, k, v)
            if kk.dtype != q.dtype:  # a cache the model's forward made (beam search's prefill) in the weights' dtype
                kk, vv = kk.to(q.dtype), vv.to(q.dtype)
            if T == 1 and pad is None:
                y = F.scaled_dot_product_attention(q[:, :, None], kk, vv, attn_mask=am, enable_gqa=nkv != nh)
                y = y.view(B, nh * hd)
            else:
                R = kk.size(0)
                if pad is not None:
                    q = q.new_zeros(R * T, nh, hd).index_copy_(0, pad, q)
                q = q.view(R, T, nh, hd).transpose(1, 2)
                y = F.scaled_dot_product_attention(q, kk, vv, attn_mask=am, enable_gqa=nkv != nh)
                y = y.transpose(1, 2).reshape(R * T, nh * hd)
                if pad is not None:
                    y = y.index_select(0, pad)
            h = mm(y, wo, h)  # residual add fused
            if bo is not None:
                h = h + bo
            if llama:
                gu = mm(_rms(h, ln2, cfg.norm_eps), wgu)
                inter = gu.size(1) // 2
                h = mm(F.silu(gu[:, :inter]) * gu[:, inter:], wd, h)
            else:
                xn = F.layer_norm(h, ln2.normalized_shape, ln2.weight, ln2.bias, ln2.eps)
                h = mm(F.gelu(mm(xn, wfc, bfc), approximate="tanh"), wp, h) + bp
        if out is not None:  # logits of these tokens only
            h = h.index_select(0, out)
            B = h.size(0)
        ln = None if llama else self.ln_f
        h = _rms(h, self.norm_w, cfg.norm_eps) if llama else F.layer_norm(h, ln.normalized_shape, ln.weight, ln.bias,
                                                                          ln.eps)  # fmt: skip
        rows = self.lm_rows if self.lm_rows is None or not self.wide else self.lm_rows.to(self.dtype)
        if rows is not None and B >= 16:  # enough rows: h @ E.T as fast, and no transposing copy
            return F.linear(h, rows).float()
        if rows is not None:
            out = torch.mm(rows, h.t()).t()
            return (out.contiguous() if B > 1 else out).float()
        return mm(h, self.lm_head).float()


def _mm(x, w, add=None):
    """(add +) x @ w."""
    return x @ w if add is None else torch.addmm(add, x, w)


def _widen(x, w, add=None):
    """_mm for fp32 activations x and 16-bit weights w: w widened to fp32 (exact), fp32 products."""
    return _mm(x, w.to(x.dtype), add)


def _rms(x, w, eps):
    """RMSNorm as llmctl.model.RMSNorm (fp32 statistics, cast back before the weight); fp32: the fused op."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, w.shape, w, eps)
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
