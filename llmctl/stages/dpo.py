"""`llmctl rlhf` with `method: dpo`: direct preference optimisation on pairs {"prompt", "chosen", "rejected"}.

Encoding (examples.encode_preference): with data.chat the prompt is a user message and the response the assistant
turn, through the chat template; else prefix + prompt + response + eos (prefix: chat.prefix_ids, bos for llmctl's
tokenizers). The response tokens (with the end-of-turn token) are what the summed log-probs cover. A sequence
longer than the context is cut at the right; a pair that loses every response token of one side is dropped (both
counted on stderr).

The loss is `losses.dpo_loss` on summed response log-probs (evaluate.token_logprobs), with beta, label smoothing
(conservative DPO) and the IPO variant (dpo.loss_type: ipo). The reference log-probs are computed once at start-up,
over the whole training (and validation) set, from `Policy.reference()`: ref_from, else init_from, or with LoRA the
policy itself with its adapters disabled (no second copy). They are a pure function of the reference, computed in
fixed chunks of the data order, so a resumed run gets the very same numbers; data-parallel processes compute a
share each and add them up. A full fine-tuning reference is freed once they are computed.

The loop's unit is the PAIR and the loss the sum of the per-pair losses, so every figure is a mean over pairs.
Training figures: accuracy (implicit reward of chosen > rejected), margin, reward_chosen / reward_rejected
(beta (log p - log p_ref)), logp_chosen / logp_rejected, len_chosen / len_rejected (response tokens). Evaluation
on data.val (at most eval.limit pairs), every process a share, summed: val_loss, val_acc (log p(chosen) >
log p(rejected), ties one half), val_reward_acc (implicit reward), val_margin; and exact_match of greedy
completions when eval.exact_match names a {"prompt", "answer"} file. Batches are a pure function of (seed, step).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch

from llmctl import evaluate, examples, loop, losses
from llmctl.dist import Tally, setup
from llmctl.model import unwrap
from llmctl.policy import Policy, context

FIGURES = ("accuracy", "margin", "reward_chosen", "reward_rejected", "logp_chosen", "logp_rejected", "len_chosen",
           "len_rejected")  # fmt: skip


@dataclass
class Built:
    task: loop.Task
    tok: object
    train: list
    val: list
    policy: Policy
    ref: torch.Tensor  # [N, 2] reference log-probs (chosen, rejected) of the training pairs
    val_ref: torch.Tensor  # of this process's validation pairs


def run(recipe) -> dict:
    dist, resume = setup(recipe)
    torch.manual_seed(recipe.seed)  # the LoRA initialisation
    built = build(recipe, dist, resume)
    last = loop.train(recipe, built.task, dist, resume=resume)
    dist.end()
    return last


def sequence_logps(model, batch: dict) -> torch.Tensor:
    """Summed log p of each row's supervised tokens [R] (fp32, with gradient when enabled); `model` may be wrapped
    (DDP): the head projects only the supervised positions."""
    idx, targets = batch["idx"], batch["targets"]
    h = model(idx, return_hidden=True)  # [R, T, C]
    keep = targets != examples.IGNORE  # [R, T]
    lp = evaluate.token_logprobs(unwrap(model), h[keep], targets[keep])[0]  # [N]
    return torch.zeros(idx.size(0), dtype=torch.float32, device=idx.device).index_add(0, keep.nonzero()[:, 0], lp)


@torch.no_grad()
def reference_logps(ref, pairs: list, indices, micro: int, device, autocast) -> torch.Tensor:
    """[len(pairs), 2] summed response log-probs (chosen, rejected) under `ref`, for the pairs in `indices` (the
    others stay 0), computed `micro` pairs at a time in the order of `indices`."""
    out = torch.zeros(len(pairs), 2, dtype=torch.float32)
    indices, was_training = list(indices), ref.training
    ref.eval()
    try:
        for s in range(0, len(indices), micro):
            chunk = indices[s : s + micro]
            b = {k: v.to(device) for k, v in examples.collate_pairs([pairs[i] for i in chunk]).items()}
            with autocast():
                lp = sequence_logps(ref, b).float().cpu()
            out[chunk, 0], out[chunk, 1] = lp[: len(chunk)], lp[len(chunk) :]
    finally:
        ref.train(was_training)
    return out


def build(recipe, dist, resume=None) -> Built:
    policy = Policy(recipe.init_from, recipe.lora if recipe.lora.enabled else None, resume, ref_from=recipe.ref_from)
    model, tok, tc, dc = policy.model.to(dist.device), policy.tok, recipe.train, recipe.dpo
    T, quiet = context(recipe, model.config), not dist.is_main
    train = examples.load_pairs(recipe.data.train, tok, recipe.data.chat, T + 1, recipe.data.limit, quiet)  # data
    val = examples.load_pairs(recipe.data.val, tok, recipe.data.chat, T + 1, recipe.eval.limit, quiet) \
        if recipe.data.val else []  # fmt: skip
    val_local = val[dist.rank :: dist.world]
    # the reference log-probs, once: each process a share of the training pairs (summed), its own val pairs
    with policy.reference() as ref:
        ref_train = dist.all_sum(reference_logps(ref, train, range(dist.rank, len(train), dist.world),
                                                 tc.micro_batch_size, dist.device, dist.autocast)).cpu()  # fmt: skip
        ref_val = reference_logps(ref, val_local, range(len(val_local)), tc.micro_batch_size, dist.device,
                                  dist.autocast)  # fmt: skip
    policy._ref = None  # a full fine-tuning reference is no longer needed: free its copy

    def make(ix):
        b = examples.collate_pairs([train[i] for i in ix])
        b["ref"] = torch.cat([ref_train[ix, 0], ref_train[ix, 1]])
        return b

    batches = examples.EpochBatches(len(train), recipe.seed, make, tc.micro_batch_size, tc.grad_accum, dist.rank,
                                    dist.world)  # fmt: skip
    tally = Tally(dist)

    def pair_losses(lp, ref_lp):
        m = lp.size(0) // 2
        return losses.dpo_loss(lp[:m], lp[m:], ref_lp[:m], ref_lp[m:], dc.beta, dc.label_smoothing, dc.loss_type)

    def loss(model_, batch):  # the loss: a sum over pairs
        lp = sequence_logps(model_, batch)
        m = lp.size(0) // 2
        per_pair, rc, rr = pair_losses(lp, batch["ref"])
        n = (batch["targets"] != examples.IGNORE).sum(1).float()
        tally.add(n=m, accuracy=losses.pair_accuracy(rc - rr), margin=rc - rr, reward_chosen=rc, reward_rejected=rr,
                  logp_chosen=lp[:m], logp_rejected=lp[m:], len_chosen=n[:m], len_rejected=n[m:])  # fmt: skip
        return per_pair.sum()

    em = evaluate.held_out_exact_match(recipe.eval.exact_match, recipe.eval, tok, dist)

    def run_eval(model_) -> dict:
        lm, out = unwrap(model_), {}
        if val:
            sums = torch.zeros(5, dtype=torch.float64)  # logp acc, loss, implicit-reward acc, margin, pairs
            for s in range(0, len(val_local), tc.micro_batch_size):
                chunk = val_local[s : s + tc.micro_batch_size]
                b = {k: v.to(dist.device) for k, v in examples.collate_pairs(chunk).items()}
                lp = sequence_logps(lm, b).float().cpu()
                r = ref_val[s : s + len(chunk)]
                per_pair, rc, rr = pair_losses(lp, torch.cat([r[:, 0], r[:, 1]]))
                m = len(chunk)
                sums += torch.stack([losses.pair_accuracy(lp[:m] - lp[m:]).sum(), per_pair.sum(),
                                     losses.pair_accuracy(rc - rr).sum(), (rc - rr).sum(),
                                     torch.tensor(float(m))]).double()  # fmt: skip
            sums = dist.all_sum(sums).cpu()
            n = sums[4].clamp_min(1)
            out.update(val_loss=float(sums[1] / n), val_acc=float(sums[0] / n), val_reward_acc=float(sums[2] / n),
                       val_margin=float(sums[3] / n))  # fmt: skip
        if em:
            out.update(em(lm))
        return out

    pair_tokens = float(np.mean([len(p.chosen.ids) + len(p.rejected.ids) for p in train]))
    task = loop.Task(model=model, batches=batches, loss=loss, count=lambda b: b["idx"].size(0) // 2,
                     save_model=policy.save, evaluate=run_eval if (val or em) else None,
                     stats=lambda: tally.means(FIGURES), flops_per_token=model.flops_per_token(T) * pair_tokens)
    if dist.is_main:
        print(f"dpo: {policy.describe()}; {len(train):,} pairs, {tc.max_steps} steps = "
              f"{batches.epoch_of_step(tc.max_steps):.2f} epochs; beta {dc.beta}, {dc.loss_type}"
              + (f", label smoothing {dc.label_smoothing}" if dc.label_smoothing else ""), file=sys.stderr)
    return Built(task=task, tok=tok, train=train, val=val, policy=policy, ref=ref_train, val_ref=ref_val)
