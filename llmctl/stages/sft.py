"""`llmctl sft` and `llmctl lora`: supervised fine-tuning of a MODEL on chat / prompt-completion JSONL.

Both go through the one training loop. Full SFT trains every weight and checkpoints model directories; LoRA
freezes the base, trains peft adapters and checkpoints adapter folders (which `--adapter` and `lora merge`
take). Evaluation: val_loss / val_bpb over the supervised tokens of `data.val`, and held-out exact-match of
greedy completions when `eval.exact_match` names a {"prompt", "answer"} file.
"""

from __future__ import annotations

import sys

import torch

from llmctl import evaluate, loop, sftdata
from llmctl.checkpoint import find_resume, resolve_model_dir
from llmctl.dist import Dist
from llmctl.errors import UserError
from llmctl.policy import Policy
from llmctl.tokenizer import load_tokenizer


def make_evaluate(recipe, tok, block_size: int, dist: Dist):
    """val_loss / val_bpb (supervised tokens of data.val) and exact_match (eval.exact_match), all processes."""
    val = sftdata.load_examples(recipe.data.val, tok, block_size, quiet=not dist.is_main) if recipe.data.val else []
    val = val[: recipe.train.micro_batch_size * recipe.train.eval_batches][dist.rank::dist.world]
    em = evaluate.read_jsonl(recipe.eval.exact_match, "exact-match", recipe.eval.limit) if recipe.eval.exact_match \
        else []  # fmt: skip
    em_local = em[dist.rank::dist.world]
    tb = torch.as_tensor(tok.token_bytes(), dtype=torch.long)
    micro = recipe.train.micro_batch_size
    if not val and not em:
        return None

    def run(model) -> dict:
        model = dist.unwrap(model)
        out = {}
        if val:
            sums = torch.zeros(4, dtype=torch.float64)
            for i in range(0, len(val), micro):
                b = sftdata.collate(val[i:i + micro])
                h = model(b["idx"].to(dist.device), return_hidden=True)
                keep = b["targets"] != sftdata.IGNORE
                y = b["targets"][keep]
                nats = -evaluate.token_logprobs(model, h[keep.to(h.device)], y.to(h.device))[0]
                sums += evaluate.nats_bytes_sums(nats, tb[y])
            out["val_loss"], out["val_bpb"] = evaluate.loss_and_bpb(dist.all_sum(sums).cpu())
        if em:
            done = evaluate.exact_match(evaluate.generate_completions(
                model, tok, [r["prompt"] for r in em_local], recipe.eval.max_new_tokens, chat=recipe.eval.chat),
                em_local) if em_local else {"items": []}  # fmt: skip
            right = torch.tensor([float(sum(i["correct"] for i in done["items"])), float(len(done["items"]))])
            right = dist.all_sum(right)
            out["exact_match"] = float(right[0] / right[1])
        return out

    return run


def run(recipe, lora: bool = False) -> dict:
    dist = Dist(recipe.train.precision, seed=recipe.seed)
    resume = find_resume(recipe.out_dir)
    torch.manual_seed(recipe.seed)  # the LoRA initialisation
    policy = Policy(recipe.init_from, recipe.lora if lora else None, resume)
    model, tok = policy.model, policy.tok
    if resume is not None and dist.is_main:
        print(f"resuming from {resume}", file=sys.stderr)
    T = recipe.data.block_size or model.config.block_size
    if T > model.config.block_size:
        raise UserError(f"data.block_size {T} exceeds the model's block_size {model.config.block_size}")
    tc = recipe.train
    examples = sftdata.load_examples(recipe.data.train, tok, T, recipe.data.limit, quiet=not dist.is_main)
    batches = sftdata.SftBatches(examples, T, tc.micro_batch_size, tc.grad_accum, dist.rank, dist.world,
                                 recipe.seed, packing=recipe.data.packing)
    task = loop.Task(model=model, batches=batches, loss=sftdata.loss, count=sftdata.count, save_model=policy.save,
                     evaluate=make_evaluate(recipe, tok, T, dist), flops_per_token=model.flops_per_token(T))
    if dist.is_main:
        print(f"{'lora' if lora else 'sft'}: {policy.describe()}; {len(examples):,} examples, "
              f"{tc.max_steps} steps = {batches.epoch_of_step(tc.max_steps):.2f} epochs", file=sys.stderr)
    last = loop.train(recipe, task, dist, resume=resume)
    dist.end()
    return last


def show_mask(recipe, n: int = 3, out=None) -> None:
    """Print the first n training examples; supervised tokens in green on a terminal, inside [[...]] otherwise."""
    out = out or sys.stdout
    tok = load_tokenizer(resolve_model_dir(recipe.init_from))
    T = recipe.data.block_size or 10**9
    examples = sftdata.load_examples(recipe.data.train, tok, T, limit=n)
    color = out.isatty()
    for k, e in enumerate(examples):
        parts, run, cur = [], [], None
        for t, m in zip(e.ids.tolist(), e.mask.tolist()):
            if m != cur and run:
                parts.append((cur, tok.decode(run)))
                run = []
            cur = m
            run.append(t)
        parts.append((cur, tok.decode(run)))
        text = "".join((f"\x1b[1;32m{s}\x1b[0m" if color else f"[[{s}]]") if m else s for m, s in parts)
        n_sup = int(e.mask[1:].sum())
        out.write(f"--- example {k + 1}: {len(e.ids)} tokens, {n_sup} supervised\n{text}\n")
