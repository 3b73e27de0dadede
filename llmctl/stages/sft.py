"""`llmctl sft` and `llmctl lora`: supervised fine-tuning of a MODEL on chat / prompt-completion JSONL.

Full SFT trains every weight and checkpoints model directories; LoRA freezes the base, trains peft adapters and
checkpoints adapter folders (which `--adapter` and `lora merge` take). The loss is the summed cross-entropy of the
supervised tokens (llmctl/examples.py: assistant turns, or the completion and eos), normalised by their count in
the loop. Evaluation: val_loss / val_bpb over the supervised tokens of data.val, and held-out exact_match of greedy
completions when eval.exact_match names a {"prompt", "answer"} file.
"""

from __future__ import annotations

import sys

import torch

from llmctl import evaluate, examples, loop, losses
from llmctl.checkpoint import resolve_model_dir
from llmctl.dist import Dist, setup
from llmctl.model import unwrap
from llmctl.policy import Policy, context
from llmctl.tokenizer import load_tokenizer


def run(recipe, lora: bool = False) -> dict:
    dist, resume = setup(recipe)
    torch.manual_seed(recipe.seed)  # the LoRA initialisation
    policy = Policy(recipe.init_from, recipe.lora if lora else None, resume)  # model and trainable set
    model, tok, tc = policy.model, policy.tok, recipe.train
    T = context(recipe, model.config)
    train = examples.load_sft(recipe.data.train, tok, T, recipe.data.limit, quiet=not dist.is_main)  # data
    batches = examples.sft_batches(train, T, tc.micro_batch_size, tc.grad_accum, dist.rank, dist.world,
                                   recipe.seed, packing=recipe.data.packing)  # fmt: skip
    task = loop.Task(model=model, batches=batches, loss=losses.lm_loss, count=examples.count, save_model=policy.save,
                     evaluate=make_evaluate(recipe, tok, T, dist), flops_per_token=model.flops_per_token(T))
    if dist.is_main:
        print(f"{'lora' if lora else 'sft'}: {policy.describe()}; {len(train):,} examples, {tc.max_steps} steps = "
              f"{batches.epoch_of_step(tc.max_steps):.2f} epochs", file=sys.stderr)
    last = loop.train(recipe, task, dist, resume=resume)  # the loop, checkpoints included
    dist.end()
    return last


def make_evaluate(recipe, tok, block_size: int, dist: Dist):
    """val_loss / val_bpb (supervised tokens of data.val) and exact_match (eval.exact_match), all processes."""
    val = examples.load_sft(recipe.data.val, tok, block_size, quiet=not dist.is_main) if recipe.data.val else []
    val = val[: recipe.train.micro_batch_size * recipe.train.eval_batches][dist.rank :: dist.world]
    em = evaluate.held_out_exact_match(recipe.eval.exact_match, recipe.eval, tok, dist)
    tb = torch.as_tensor(tok.token_bytes(), dtype=torch.long)
    micro = recipe.train.micro_batch_size
    if not val and not em:
        return None

    def run(model) -> dict:
        model = unwrap(model)
        out = {}
        if val:
            batches = (examples.collate(val[i : i + micro]) for i in range(0, len(val), micro))
            out.update(evaluate.val_loss_bpb(model, batches, tb, dist))
        if em:
            out.update(em(model))
        return out

    return run


def show_mask(recipe, n: int = 3, out=None) -> None:
    """Print the first n training examples; supervised tokens in green on a terminal, inside [[...]] otherwise."""
    out = out or sys.stdout
    tok = load_tokenizer(resolve_model_dir(recipe.init_from))
    T = recipe.data.block_size or 10**9
    color = out.isatty()
    for k, e in enumerate(examples.load_sft(recipe.data.train, tok, T, limit=n)):
        parts, run, cur = [], [], None
        for t, m in zip(e.ids.tolist(), e.mask.tolist()):
            if m != cur and run:
                parts.append((cur, tok.decode(run)))
                run = []
            cur = m
            run.append(t)
        parts.append((cur, tok.decode(run)))
        text = "".join((f"\x1b[1;32m{s}\x1b[0m" if color else f"[[{s}]]") if m else s for m, s in parts)
        out.write(f"--- example {k + 1}: {len(e.ids)} tokens, {int(e.mask[1:].sum())} supervised\n{text}\n")
