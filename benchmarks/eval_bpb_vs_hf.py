"""`llmctl eval --task bpb` throughput against a plain transformers forward loop, in one run.

Both sides score the same token stream of one checkpoint (written by llmctl, loaded by
`transformers.AutoModelForCausalLM` with sdpa attention on the other side) under the same sliding windows
(context L, stride S) and the same batch of windows, in fp32, under torch.inference_mode. llmctl runs
`llmctl.evaluate.score_stream` (the code behind `--task bpb` once the corpus is tokenized); the baseline is
the textbook loop: `model(input_ids).logits`, `F.cross_entropy(..., reduction="none")` over every position,
then the counted positions' nats and bytes summed. The stream is random token ids with random byte lengths
(1-8, 0 for the 5 special tokens): throughput does not depend on the text. Sides alternate for --rounds rounds
and each keeps its best round; the bpb of both sides is printed too (they agree to ~1e-9).

    python benchmarks/eval_bpb_vs_hf.py [--preset demo|small] [--batch 8] [--tokens 60000] [--threads N]

Prints one JSON document on stdout; ratio = llmctl tokens/s / transformers tokens/s, for stride L/2 (the
default of `--task bpb`) and stride L (disjoint windows).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmctl import evaluate, hf  # noqa: E402
from llmctl.model import ModelConfig, Transformer  # noqa: E402

PRESETS = {  # demo: the model `make demo` trains (recipes/tiny/pretrain.yaml, vocab 4096)
    "demo": dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=128, block_size=128, vocab_size=4096),
    "small": dict(n_layer=6, n_head=8, n_kv_head=8, n_embd=256, block_size=256, vocab_size=8192),
}


def hf_loop(model, ids: np.ndarray, token_bytes: np.ndarray, L: int, S: int, batch: int) -> dict:
    """The baseline, written independently: HF-guide windows, full logits, per-token cross-entropy."""
    n, starts, news, done, begin = len(ids), [], [], 1, 0
    while done < n:
        begin = min(begin, max(0, n - L - 1))
        end = min(begin + L + 1, n)
        starts.append(begin)
        news.append(end - done)
        done, begin = end, begin + S
    x_all = torch.as_tensor(ids)
    tb = torch.as_tensor(token_bytes)
    nats_text, nbytes, count = 0.0, 0, 0
    for i in range(0, len(starts), batch):
        b = torch.tensor(starts[i : i + batch])
        w = x_all[b[:, None] + torch.arange(L + 1)]  # [B, L + 1]
        logits = model(input_ids=w[:, :-1]).logits  # [B, L, V]
        nats = F.cross_entropy(logits.transpose(1, 2), w[:, 1:], reduction="none")  # [B, L]
        k = torch.tensor(news[i : i + batch])
        counted = torch.arange(L)[None, :] >= (L - k)[:, None]  # the last k positions of each window
        by = tb[w[:, 1:]] * counted  # [B, L]
        nats_text += nats[by > 0].double().sum().item()
        nbytes += int(by.sum())
        count += int(k.sum())
    return {"bpb": nats_text / (math.log(2) * nbytes), "tokens": count}


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=60_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig(arch="llama", **PRESETS[args.preset])
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    ids = rng.integers(5, cfg.vocab_size, size=args.tokens)
    token_bytes = np.concatenate([np.zeros(5, np.int64), rng.integers(1, 9, size=cfg.vocab_size - 5)])
    with tempfile.TemporaryDirectory() as d:
        hf.save_model(Transformer(cfg), d)
        ours = hf.load_model(d)
        theirs = AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa", dtype=torch.float32).eval()
    L = cfg.block_size
    results = []
    for S in (L // 2, L):
        best = {"llmctl": math.inf, "transformers": math.inf}
        for _ in range(args.rounds):
            with torch.inference_mode():
                a, ta = timed(lambda: evaluate.score_stream(ours, ids, token_bytes, context=L, stride=S,
                                                            batch_size=args.batch, show_progress=False))  # fmt: skip
                b, tb = timed(lambda: hf_loop(theirs, ids, token_bytes, L, S, args.batch))
            best["llmctl"], best["transformers"] = min(best["llmctl"], ta), min(best["transformers"], tb)
        assert a["tokens"] == b["tokens"]
        results.append({
            "stride": S, "windows": a["windows"], "tokens": a["tokens"],
            "llmctl_tok_per_s": round(a["tokens"] / best["llmctl"]),
            "transformers_tok_per_s": round(b["tokens"] / best["transformers"]),
            "ratio": round(best["transformers"] / best["llmctl"], 3),
            "bpb_llmctl": a["bpb"], "bpb_transformers": b["bpb"], "bpb_rel_diff": abs(a["bpb"] / b["bpb"] - 1),
        })  # fmt: skip
    import transformers

    print(json.dumps({
        "benchmark": "eval --task bpb vs transformers forward loop", "preset": args.preset,
        "model": {k: getattr(cfg, k) for k in ("arch", "n_layer", "n_head", "n_kv_head", "n_embd", "block_size",
                                                "vocab_size")},
        "params": ours.num_params(), "batch": args.batch, "context": L, "dtype": "float32",
        "device": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__, "results": results,
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
