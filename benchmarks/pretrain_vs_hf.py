"""Training tokens/s: llmctl's training loop against a plain transformers LlamaForCausalLM loop, in one run.

Both sides train the same architecture (default: 6 layers, 256 wide, 8 heads, block 256, vocab 8192, ~6M
parameters without embeddings... see "params" in the output) on the same random token batches (batch 8),
with the same AdamW (fused where available, same decay groups and hyper-parameters), gradient clipping at 1.0,
and the same dtype (fp32, or bf16 autocast). llmctl runs through `llmctl.loop.train` (the code behind
`llmctl pretrain`); the baseline is the textbook transformers loop: `model(input_ids, labels=...).loss`,
backward, clip, step. The sides alternate for `--rounds` rounds and the best round of each is kept.

    python benchmarks/pretrain_vs_hf.py [--precision fp32 bf16] [--steps 20] [--modes eager compiled]

llmctl runs in two modes: `eager`, and `compiled` (`train.compile: true`, as the GPU recipes set it; its
compilation happens in the warm-up steps, which are not timed). The baseline is always transformers eager.
Prints one JSON document on stdout; each ratio is llmctl tokens/s over transformers tokens/s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmctl import loop, optim  # noqa: E402
from llmctl.config import PretrainRecipe, from_dict  # noqa: E402
from llmctl.dist import Dist  # noqa: E402
from llmctl.model import ModelConfig, Transformer  # noqa: E402


def batches(vocab, batch, block, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, block + 1), generator=g) for _ in range(steps)]


def run_llmctl(cfg: ModelConfig, data, args, precision: str, compile: bool) -> float:
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights()
    with tempfile.TemporaryDirectory() as out:
        recipe = from_dict(PretrainRecipe, {
            "out_dir": out, "tokenizer": "-", "data": {"train": "-"},
            "train": {"max_steps": len(data), "micro_batch_size": args.batch, "precision": precision,
                      "eval_every": 0, "save_every": 0, "log_every": 1, "grad_clip": 1.0, "compile": compile},
            "optim": {"lr": 3e-4, "warmup_steps": 2, "weight_decay": 0.1}})
        task = loop.Task(model=model, batches=lambda s: [{"idx": data[s][:, :-1], "targets": data[s][:, 1:]}],
                         loss=lambda m, b: m(b["idx"], b["targets"]), count=lambda b: b["targets"].numel(),
                         save_model=lambda m, d: None)
        loop.train(recipe, task, Dist(precision))
        events = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in events if "tok_per_s" in e][args.warmup:]
    tokens = sum(args.batch * args.block for _ in steps)
    seconds = sum(args.batch * args.block / e["tok_per_s"] for e in steps)
    return tokens / seconds


def run_hf(cfg: ModelConfig, data, args, precision: str) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.intermediate_size,
                         num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                         num_key_value_heads=cfg.n_kv_head, max_position_embeddings=cfg.block_size,
                         rms_norm_eps=cfg.norm_eps, tie_word_embeddings=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(hf_cfg).train()
    opt = optim.make_optimizer(model, from_dict(PretrainRecipe, {}).optim, torch.device("cpu"))
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
    times = []
    for w in data:
        t0 = time.perf_counter()
        with ctx():
            loss = model(input_ids=w[:, :-1], labels=w[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    times = times[args.warmup:]
    return len(times) * args.batch * args.block / sum(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--n-head", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ModelConfig(arch="llama", vocab_size=args.vocab, n_layer=args.n_layer, n_head=args.n_head,
                      n_embd=args.n_embd, block_size=args.block)
    data = batches(args.vocab, args.batch, args.block, args.steps)
    results = {}
    for precision in args.precision:
        best = dict.fromkeys(["transformers", *args.modes], 0.0)
        for _ in range(args.rounds):
            best["transformers"] = max(best["transformers"], run_hf(cfg, data, args, precision))
            for mode in args.modes:
                best[mode] = max(best[mode], run_llmctl(cfg, data, args, precision, mode == "compiled"))
        res = {"transformers_tok_per_s": round(best["transformers"], 1)}
        for mode in args.modes:
            res[f"llmctl_{mode}_tok_per_s"] = round(best[mode], 1)
            res[f"ratio_{mode}"] = round(best[mode] / best["transformers"], 3)
        results[precision] = res
    n_params = sum(p.numel() for p in Transformer(cfg).parameters())
    print(json.dumps({
        "benchmark": "pretrain_vs_hf", "baseline": "transformers LlamaForCausalLM training loop",
        "model": {"n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head, "block_size": cfg.block_size,
                  "vocab_size": cfg.vocab_size, "params": n_params,
                  "params_non_embedding": n_params - 2 * cfg.vocab_size * cfg.n_embd},
        "batch": args.batch, "steps_timed": args.steps - args.warmup, "rounds": args.rounds,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.machine(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
