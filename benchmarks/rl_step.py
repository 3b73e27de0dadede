"""Seconds per RL step (GRPO, PPO) split into generation, scoring and training, against the plain SFT step, in one run.

Every RL step here draws a new rollout batch (rl.epochs 1, rl.minibatches 1) of prompts x group sequences:
`prompts` prompts sampled `group` times each for GRPO, prompts x group prompts sampled once for PPO, at most
`max_new_tokens` tokens each at temperature 1 through the generate engine. The step is timed in its three
parts, as llmctl/stages/rl.py runs them:
  generate_s  sampling the completions (llmctl.engine, KV cache);
  score_s     the no-grad forward passes over prompt + completion: old log-probs (and PPO's values) under the
              policy, log-probs under the reference, rewards, advantages (GAE for PPO);
  train_s     loss, backward, gradient clipping and the AdamW step over the same sequences.
The baseline, sft_step_s, is the plain SFT step (`model(idx, targets)` cross-entropy over the same response
tokens, backward, clip, AdamW) on the same model and the same GRPO batch. Steps after `--warmup` are averaged.

    python benchmarks/rl_step.py [--model runs/demo/pretrain] [--prompts 16] [--group 8] [--steps 5]

--model defaults to runs/demo/pretrain (what `make demo` writes) when it exists, else a randomly initialised model
of the same shape (4 layers, 128 wide) with a tokenizer trained on the builtin corpus. The prompts are sums of
two 2-digit numbers in the chat template. Prints one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmctl import optim
from llmctl.config import RlhfRecipe, from_dict
from llmctl.dist import Dist
from llmctl.stages import rl


def default_model(tmp: Path) -> str:
    demo = ROOT / "runs" / "demo" / "pretrain"
    if demo.exists():
        return str(demo)
    from llmctl import hf
    from llmctl.builtin import builtin_corpus
    from llmctl.model import ModelConfig, Transformer
    from llmctl.tokenizer import train_tokenizer

    tok = train_tokenizer(builtin_corpus()[:2000], vocab_size=4096)
    tok.save(tmp / "tok")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(arch="llama", vocab_size=tok.vocab_size, n_layer=4, n_head=4, n_kv_head=2,
                                    n_embd=128, block_size=128, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                    pad_token_id=tok.pad_id))  # fmt: skip
    model.init_weights()
    hf.save_model(model, tmp / "model", tokenizer_dir=tmp / "tok")
    return str(tmp / "model")


def rl_steps(method: str, args, model: str, data: Path, out: Path) -> tuple[dict, dict]:
    recipe = from_dict(RlhfRecipe, {
        "out_dir": str(out), "seed": 0, "method": method, "init_from": model, "data": {"train": str(data)},
        "train": {"micro_batch_size": args.micro_batch_size, "grad_clip": 1.0},
        "optim": {"lr": 1e-5}, "rl": {"prompts_per_step": args.prompts * (args.group if method == "ppo" else 1),
                                      "group_size": args.group,
                                      "max_new_tokens": args.max_new_tokens, "temperature": 1.0}})  # fmt: skip
    dist = Dist("fp32", seed=0)
    task = rl.build(recipe, dist, None)
    rt = task.batches.__self__
    model_ = task.model.train()
    opt = optim.make_optimizer(model_, recipe.optim, dist.device)
    rows = []
    for step in range(args.warmup + args.steps):
        before = dict(rt.timings)
        t0 = time.perf_counter()
        micro = task.batches(step)
        t1 = time.perf_counter()
        n = sum(task.count(b) for b in micro)
        for b in micro:
            (task.loss(model_, b) / n).backward()
        torch.nn.utils.clip_grad_norm_(model_.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        gen = rt.timings["generate_s"] - before["generate_s"]
        rows.append({"generate_s": gen, "score_s": (t1 - t0) - gen, "train_s": t2 - t1, "step_s": t2 - t0,
                     "response_tokens": n})  # fmt: skip
    rows = rows[args.warmup :]
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    mean["sequences"] = len(rt.buffer["idx"])
    return mean, rt.buffer


def sft_steps(args, model: str, buffer: dict) -> dict:
    """The plain SFT step on the same sequences: cross-entropy over the response tokens."""
    from llmctl import hf
    from llmctl.config import SftOptimSection

    m = hf.load_model(model).train()
    opt = optim.make_optimizer(m, SftOptimSection(lr=1e-5), torch.device("cpu"))
    targets = torch.where(buffer["keep"], buffer["targets"], -100)
    N, times = len(targets), []
    for _ in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        n = int((targets != -100).sum())
        for s in range(0, N, args.micro_batch_size):
            (m(buffer["idx"][s : s + args.micro_batch_size], targets[s : s + args.micro_batch_size]) / n).backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    times = times[args.warmup :]
    return {"step_s": sum(times) / len(times), "sequences": N}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompts", type=int, default=16, help="prompts per rollout batch")
    ap.add_argument("--group", type=int, default=8, help="GRPO samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--micro-batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or default_model(tmp)
        data = tmp / "prompts.jsonl"
        g = torch.Generator().manual_seed(0)
        pairs = torch.randint(10, 100, (512, 2), generator=g).tolist()
        data.write_text("".join(json.dumps({"prompt": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n"
                                for a, b in pairs))  # fmt: skip
        grpo, buffer = rl_steps("grpo", args, model, data, tmp / "grpo")
        ppo, _ = rl_steps("ppo", args, model, data, tmp / "ppo")
        sft = sft_steps(args, model, buffer)
    out = {
        "benchmark": "rl_step", "model": model, "device": "cpu", "threads": args.threads,
        "torch": torch.__version__, "machine": platform.machine(),
        "prompts": args.prompts, "group": args.group, "max_new_tokens": args.max_new_tokens,
        "grpo": grpo, "ppo": ppo, "sft": sft,
        "ratios": {"grpo_step_over_sft_step": grpo["step_s"] / sft["step_s"],
                   "grpo_train_over_sft_step": grpo["train_s"] / sft["step_s"],
                   "ppo_step_over_sft_step": ppo["step_s"] / sft["step_s"]},
    }  # fmt: skip
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
