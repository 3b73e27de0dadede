"""Greedy completions of a MODEL with 16-bit weights against fp32: how many are the same, token for token.

Prompts: the first --prompt-tokens tokens (BOS included) of --n documents of the builtin corpus, taken from its end (the last
documents, the ones a 5% val split holds out). Each side runs `generation.load_engine(MODEL, dtype=...)` (what
`llmctl generate --dtype` runs), prompt lookup off, --new-tokens tokens per prompt (no EOS stop), one prompt at a
time. Prints one JSON document: completions identical, the fraction, and the mean length of the common prefix.

    python benchmarks/greedy_agreement.py --model runs/demo/pretrain [--dtype bf16] [--n 24] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from llmctl.builtin import builtin_corpus
    from llmctl.chat import encode_prompt
    from llmctl.engine import SamplingParams
    from llmctl.generation import load_engine

    torch.set_num_threads(args.threads)
    ref, test = load_engine(args.model, "cpu", prompt_lookup=0), load_engine(args.model, "cpu", prompt_lookup=0,
                                                                             dtype=args.dtype)  # fmt: skip
    tok = ref.tokenizer
    docs = [d for d in builtin_corpus() if len(d) > 200][-args.n :]
    prompts = [encode_prompt(tok, d, chat=False)[: args.prompt_tokens] for d in docs]  # as generate encodes
    sp = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    same, prefix = 0, []
    for p in prompts:
        a, b = ref.generate([p], sp)[0].tokens, test.generate([p], sp)[0].tokens
        same += a == b
        prefix.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)))
    print(json.dumps({"model": str(args.model), "dtype": args.dtype, "completions": len(prompts),
                      "new_tokens": args.new_tokens, "identical": same, "fraction_identical": round(same / len(prompts), 3),
                      "mean_common_prefix_tokens": round(sum(prefix) / len(prefix), 2)}))  # fmt: skip


if __name__ == "__main__":
    main()
