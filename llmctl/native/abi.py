"""The native library's C interface, mirrored: ctypes Structures field for field as the structs of
llmctl/native/csrc/decode.cpp (`LlmctlModel`, `LlmctlLayer`, `LlmctlTokens`), and every exported function's
signature. `bind` declares the signatures on a loaded library and checks that it agrees with these Structures on
their sizes (`llmctl_struct_sizes`)."""

from __future__ import annotations

import ctypes

ptr, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class Layer(ctypes.Structure):
    """One block's weights (None: an absent bias) and its KV cache ([B, nkv, max_len, hd] each, contiguous)."""

    _fields_ = [(name, ptr) for name in ("ln1w", "ln1b", "wqkv", "bqkv", "wo", "bo", "ln2w", "ln2b",
                                         "w1", "b1", "w2", "b2", "kc", "vc")]  # fmt: skip


class Model(ctypes.Structure):
    """The model: its shape, the cache's (max_len L, rows B), the norms' eps, attention's scale and the weights.
    pe: gpt2's wpe [n_pos, C] or llama's cos [n_pos, hd]; sin: llama's signed sin [n_pos, hd]; lm_rows: lm_head is
    [V, C] (a tied embedding as it is) rather than [C, V]. wdtype: the matrices' (emb, lm_head, each Layer's wqkv,
    wo, w1, w2) element type, WDTYPES; every other tensor is fp32."""

    _fields_ = [*((name, i64) for name in ("gpt2", "n_layer", "C", "nh", "nkv", "hd", "inter", "V", "L", "lm_rows",
                                           "n_pos", "B", "wdtype")),
                ("eps", f32), ("scale", f32),
                *((name, ptr) for name in ("emb", "pe", "sin", "normw", "normb", "lm_head")),
                ("layers", ctypes.POINTER(Layer))]  # fmt: skip


class Tokens(ctypes.Structure):
    """llmctl_step's M tokens: token m goes to slot slots[m] of cache row rows[m] at position pos[m] and attends to
    that row's slots <= limit[m] where mask[row * mstride + slot] (mask None: all); the logits of tokens `out`
    (None: all M)."""

    _fields_ = [("M", i64), *((name, ptr) for name in ("tok", "rows", "slots", "limit", "pos", "mask")),
                ("mstride", i64), ("out", ptr), ("n_out", i64)]  # fmt: skip


WDTYPES = ("float32", "bfloat16", "float16")  # Model.wdtype's codes, by torch dtype name
P = ctypes.POINTER
SIGNATURES = {  # name: (argument types, result type)
    "llmctl_struct_sizes": ([P(i64)], i64),
    "llmctl_decode": ([P(Model), i64, i64, i64, ptr, ptr], ctypes.c_int),  # model, token, slot, pos, logits, work
    "llmctl_work_floats": ([P(Model)], i64),
    "llmctl_step": ([P(Model), P(Tokens), ptr, ptr, ptr], ctypes.c_int),  # model, tokens, logits, work, sgemm
    "llmctl_step_floats": ([P(Model), i64], i64),
    "llmctl_attn_fwd": ([ptr, ptr, ptr, ptr, ptr, ptr, f32], ctypes.c_int),  # dims (int64 [17]), q, k, v, o, lse
    "llmctl_attn_bwd": ([*[ptr] * 10, f32], ctypes.c_int),  # dims, q, k, v, o, lse, do, dq, dk, dv, scale
}
SYMBOLS = tuple(SIGNATURES)
STRUCTS = (Model, Layer, Tokens)  # in llmctl_struct_sizes' order


def bind(lib: ctypes.CDLL) -> str | None:
    """Declare the signatures on a loaded library; what disagrees with these Structures (None: nothing)."""
    for name, (args, res) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    sizes = (i64 * 8)()
    n = lib.llmctl_struct_sizes(sizes)
    want = [ctypes.sizeof(s) for s in STRUCTS]
    if list(sizes[:n]) != want:
        return f"has struct sizes {list(sizes[:n])}, not this llmctl's {want}"
    return None
