"""Greedy decoding through the Python API: load a MODEL (model dir or run dir), decode with the KV cache.

    python examples/sample.py runs/demo/pretrain "The Python interpreter" --max-new-tokens 40
"""

import argparse

import torch

from llmctl.hf import load_model
from llmctl.tokenizer import load_tokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("prompt")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    args = ap.parse_args()
    model, tok = load_model(args.model).eval(), load_tokenizer(args.model)
    ids = [tok.bos_id] + tok.encode(args.prompt)
    n = min(args.max_new_tokens, model.config.block_size - len(ids))
    cache = model.new_cache(1, len(ids) + n)
    x = torch.tensor([ids])
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(x, cache=cache)[0, -1].argmax())
            if nxt == tok.eos_id:
                break
            out.append(nxt)
            x = torch.tensor([[nxt]])
    print(args.prompt + tok.decode(out))


if __name__ == "__main__":
    main()
