"""The generate engine through the Python API: load a MODEL (model dir, checkpoint or run dir), then stream a
greedy completion, sample a batch with seeds, and run a beam search.

    python examples/sample.py runs/demo/pretrain "The Python interpreter" --max-new-tokens 40
"""

import argparse

from llmctl.chat import encode_prompt, fit_prompt
from llmctl.engine import Engine, SamplingParams
from llmctl.hf import load_model
from llmctl.tokenizer import load_tokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("prompt")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    args = ap.parse_args()
    tok = load_tokenizer(args.model)
    engine = Engine(load_model(args.model), tok)  # eval mode, fp32 on CPU
    # prompts are token ids: the tokenizer's prefix (BOS for llmctl's, as in pretraining) + the text, the ids
    # AutoTokenizer(prompt) gives; cut to the context keeping that prefix and the end (as `llmctl generate`)
    ids, _ = fit_prompt(tok, encode_prompt(tok, args.prompt), engine.block_size, args.max_new_tokens)

    print("greedy, streamed:")
    stream = engine.stream(ids, SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0))
    print(args.prompt, end="", flush=True)
    for delta in stream:
        print(delta, end="", flush=True)
    print(f"\n  [{stream.result.finish_reason}, {stream.result.completion_tokens} tokens]")

    print("three seeded samples in one batch (top-p 0.9, stop at a newline):")
    params = [SamplingParams(max_new_tokens=args.max_new_tokens, top_p=0.9, stop=["\n"], seed=s) for s in range(3)]
    for r in engine.generate([ids] * 3, params):
        print(f"  {args.prompt}{r.text}  [{r.finish_reason}]")

    r = engine.generate([ids], SamplingParams(max_new_tokens=args.max_new_tokens, num_beams=4))[0]
    print(f"beam search (4 beams, score {r.score:.3f}):\n  {args.prompt}{r.text}")


if __name__ == "__main__":
    main()
