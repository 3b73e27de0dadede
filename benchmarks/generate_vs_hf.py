"""Generation speed: llmctl's engine against transformers' `generate`, on the same checkpoint, in one run.

For each model shape (default: the ~6M-parameter llama of benchmarks/pretrain_vs_hf.py -- 6 layers, n_embd 256,
8 heads, block 256, vocab 8192 -- and a GPT-2-124M-shaped model), a randomly initialised model is saved once
as a Hugging Face folder; llmctl loads it with `llmctl.hf.load_model`, transformers with
`AutoModelForCausalLM.from_pretrained`. Both run fp32 on the same device with the same thread count and the same
sampling settings, generate exactly --new-tokens tokens per prompt (no EOS), and alternate for --rounds rounds;
the best round of each side is kept.

- batch1: one prompt of --prompt-len tokens; decode tokens/s = new tokens / wall time (prefill included);
- batched: --batch prompts of different lengths (uniform in [prompt-len/2, 2*prompt-len]), left-padded by
  transformers, generated together; throughput = all new tokens / wall time.

llmctl runs as `llmctl generate` does: with its default speculative decoding by prompt lookup for one-prompt batches
and for greedy batches (Engine(prompt_lookup=8), llmctl/engine/lookup.py: the same tokens, verified in one forward
pass per draft; a greedy batch drafts up to 3 tokens per row, its rows advancing on their own). Every entry also
reports llmctl with it off ("llmctl_no_lookup_tok_s", "ratio_no_lookup") and what the lookup did ("lookup":
drafted / accepted tokens, verify passes); batch1 entries add transformers with its own prompt lookup
(`prompt_lookup_num_tokens`=8, "transformers_prompt_lookup_tok_s"; the ratio stays against plain `generate`).
The models are randomly initialised: greedy decoding falls into loops, which prompt lookup predicts well (75-90% of
drafts accepted), so its gains here exceed what real text gets; "ratio_no_lookup" is the engine without it.
Sampled runs at temperature 0.8 draw from near-flat distributions and rarely repeat: no drafts there.

Greedy runs also check that the sides produce the same tokens ("same_tokens"). The machine's load average is
recorded before and after: on a shared machine, compare ratios (both sides ran side by side), not tok/s.

    python benchmarks/generate_vs_hf.py [--models llama-6m gpt2-124m] [--sampling greedy top-p] [--threads N]

Prints one JSON document on stdout; each ratio is llmctl tokens/s over transformers tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmctl import hf  # noqa: E402
from llmctl.engine import Engine, SamplingParams  # noqa: E402
from llmctl.model import ModelConfig, Transformer  # noqa: E402

SHAPES = {
    "llama-6m": dict(arch="llama", vocab_size=8192, n_layer=6, n_head=8, n_embd=256, block_size=256),
    "gpt2-124m": dict(arch="gpt2", vocab_size=50257, n_layer=12, n_head=12, n_embd=768, block_size=1024),
}
SAMPLING = {"greedy": dict(temperature=0.0), "top-p": dict(temperature=0.8, top_p=0.9)}


def make_prompts(n, prompt_len, vocab, seed=0, vary=True):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(max(1, prompt_len // 2), 2 * prompt_len + 1, (n,), generator=g) if vary else [prompt_len] * n
    return [torch.randint(0, vocab, (int(k),), generator=g).tolist() for k in lens]


def run_llmctl(engine, prompts, sampling, new_tokens, lookup=None):
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, seed=0, **sampling)
    default = engine.prompt_lookup
    if lookup is not None:
        engine.prompt_lookup = lookup
    try:
        t0 = time.perf_counter()
        res = engine.generate(prompts, params)
        dt = time.perf_counter() - t0
    finally:
        engine.prompt_lookup = default
    assert all(r.completion_tokens == new_tokens for r in res)
    return len(prompts) * new_tokens / dt, [r.tokens for r in res]


def run_hf(model, prompts, sampling, new_tokens, **extra):
    L = max(map(len, prompts))
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    mask = torch.zeros(len(prompts), L, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):], mask[i, L - len(p):] = torch.tensor(p), 1
    kw = dict(do_sample=False) if sampling["temperature"] == 0 else dict(do_sample=True, top_k=0, **sampling)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=None,
                             pad_token_id=0, eos_token_id=None, **kw, **extra)
    dt = time.perf_counter() - t0
    assert out.shape[1] == L + new_tokens
    return len(prompts) * new_tokens / dt, out[:, L:].tolist()


def bench(name, args):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = ModelConfig(**SHAPES[name])
    with tempfile.TemporaryDirectory() as d:
        hf.save_model(Transformer(cfg), d)
        ours = Engine(hf.load_model(d), eos_ids=[], share_weights=True)  # as `llmctl generate` does
        theirs = AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa").eval()
    theirs.generation_config.eos_token_id = None
    out = {"params": ours.model.num_params()}
    lookup = ours.prompt_lookup
    for mode in args.sampling:
        for kind, prompts in (("batch1", make_prompts(1, args.prompt_len, cfg.vocab_size, vary=False)),
                              ("batched", make_prompts(args.batch, args.prompt_len, cfg.vocab_size))):
            if kind not in args.kinds:
                continue
            hf_lookup = kind == "batch1" and not args.no_hf_lookup
            sides = {"llmctl": lambda n: run_llmctl(ours, prompts, SAMPLING[mode], n),
                     "llmctl_no_lookup": lambda n: run_llmctl(ours, prompts, SAMPLING[mode], n, lookup=0),
                     "transformers": lambda n: run_hf(theirs, prompts, SAMPLING[mode], n)}  # fmt: skip
            if hf_lookup:
                sides["transformers_prompt_lookup"] = lambda n: run_hf(theirs, prompts, SAMPLING[mode], n,
                                                                       prompt_lookup_num_tokens=lookup)  # fmt: skip
            best = dict.fromkeys(sides, 0.0)
            tokens = {}
            same = same_lookup = True
            for run in sides.values():  # warm-up
                run(4)
            for _ in range(args.rounds):  # the sides alternate; the best round of each is kept
                for side, run in sides.items():
                    if side == "llmctl":
                        ours.stats.update(lookup_steps=0, drafted=0, accepted=0)
                    tps, tokens[side] = run(args.new_tokens)
                    best[side] = max(best[side], tps)
                    if side == "llmctl":
                        stats = dict(ours.stats)
                same = same and all(t == tokens["transformers"] for t in tokens.values())
                same_lookup = same_lookup and tokens["llmctl"] == tokens["llmctl_no_lookup"]
            h = best["transformers"]
            r = {"llmctl_tok_s": round(best["llmctl"], 1), "transformers_tok_s": round(h, 1),
                 "ratio": round(best["llmctl"] / h, 2),
                 "llmctl_no_lookup_tok_s": round(best["llmctl_no_lookup"], 1),
                 "ratio_no_lookup": round(best["llmctl_no_lookup"] / h, 2)}  # fmt: skip
            if hf_lookup:
                r["transformers_prompt_lookup_tok_s"] = round(best["transformers_prompt_lookup"], 1)
            r["lookup"] = {"drafted": stats["drafted"], "accepted": stats["accepted"],
                           "verify_passes": stats["lookup_steps"]}  # fmt: skip
            r["lookup_same_tokens"] = same_lookup  # with and without it (sampling too: same seed, same tokens)
            r["prompts"] = len(prompts)
            if mode == "greedy":
                r["same_tokens"] = same
            out[f"{kind}/{mode}"] = r
            print(f"{name} {kind} {mode}: {r}", file=sys.stderr, flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--sampling", nargs="+", default=["greedy", "top-p"], choices=list(SAMPLING))
    ap.add_argument("--kinds", nargs="+", default=["batch1", "batched"], choices=["batch1", "batched"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-hf-lookup", action="store_true", help="skip transformers' prompt-lookup runs")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    res = {"device": "cpu", "threads": torch.get_num_threads(), "load_avg_before": os.getloadavg()[0],
           "torch": torch.__version__,
           "transformers": transformers.__version__, "cpu": platform.processor() or platform.machine(),
           "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "rounds": args.rounds,
           "sampling": {k: SAMPLING[k] for k in args.sampling}, "models": {}}
    for name in args.models:
        res["models"][name] = bench(name, args)
    res["load_avg_after"] = os.getloadavg()[0]
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
