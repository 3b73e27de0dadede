"""`llmctl rlhf` with `method: reward`: a reward model trained on preference pairs {"prompt", "chosen", "rejected"}.

The model is `reward.RewardModel`: the init_from transformer with a scalar head read at each sequence's last token,
every weight trained with the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected) (`losses.bradley_terry_loss`).
Pairs are encoded as DPO's (examples.encode_preference: the chat template with data.chat, else prefix + prompt
+ response + eos, prefix: chat.prefix_ids), rows right-padded with the tokenizer's pad id. Checkpoints are
sequence-classification folders (`AutoModelForSequenceClassification` loads them, `reward.load_reward_model` too).

The loop's unit (`count`, its `tokens` and `tok_per_s`) is the PAIR, and the loss is the sum of the per-pair
losses, so every figure is a mean over pairs. Training figures: accuracy (r_c > r_r, ties one half), margin
(r_c - r_r), reward_chosen, reward_rejected, len_chosen, len_rejected (tokens). Evaluation on data.val (at most
eval.limit pairs), every process a share, summed: val_loss, val_acc, val_margin. Batches are a pure function of
(seed, step) (examples.EpochBatches), so resuming needs no data state.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch

from llmctl import examples, hf, loop, losses
from llmctl.checkpoint import resolve_model_dir
from llmctl.dist import Tally, setup
from llmctl.errors import UserError
from llmctl.model import unwrap
from llmctl.policy import context, describe
from llmctl.reward import RewardModel, load_reward_model, save_reward_model
from llmctl.tokenizer import load_tokenizer

FIGURES = ("accuracy", "margin", "reward_chosen", "reward_rejected", "len_chosen", "len_rejected")


@dataclass
class Built:
    task: loop.Task
    tok: object
    train: list
    val: list


def run(recipe) -> dict:
    dist, resume = setup(recipe)
    built = build(recipe, dist, resume)
    last = loop.train(recipe, built.task, dist, resume=resume)
    dist.end()
    return last


def build(recipe, dist, resume=None) -> Built:
    base_dir = resolve_model_dir(recipe.init_from)
    tok = load_tokenizer(base_dir)
    if tok.pad_id is None:
        raise UserError(f"a reward model needs a pad token (transformers pools the last non-pad token); the "
                        f"tokenizer of {base_dir} has none")  # fmt: skip
    if resume is not None:  # the model: every weight trains
        model = load_reward_model(resume, device=dist.device)
    else:
        model = RewardModel.from_causal_lm(hf.load_model(base_dir, device=dist.device))
    hf.check_vocab(tok, model.config, base_dir)
    model.backbone.gradient_checkpointing = recipe.train.gradient_checkpointing
    T, tc, pad, quiet = context(recipe, model.config), recipe.train, tok.pad_id, not dist.is_main
    train = examples.load_pairs(recipe.data.train, tok, recipe.data.chat, T, recipe.data.limit, quiet)  # data
    val = examples.load_pairs(recipe.data.val, tok, recipe.data.chat, T, recipe.eval.limit, quiet) \
        if recipe.data.val else []  # fmt: skip
    val_local = val[dist.rank :: dist.world]

    def collate(pairs):  # chosen rows first
        return examples.pad_right([p.chosen.ids for p in pairs] + [p.rejected.ids for p in pairs], pad)

    batches = examples.EpochBatches(len(train), recipe.seed, lambda ix: collate([train[i] for i in ix]),
                                    tc.micro_batch_size, tc.grad_accum, dist.rank, dist.world)  # fmt: skip
    tally = Tally(dist)

    def loss(model, batch):  # the loss: a sum over pairs
        m = batch["idx"].size(0) // 2
        r = model(batch["idx"], attention_mask=batch["attention_mask"])  # [2m]
        rc, rr = r[:m], r[m:]
        n = batch["attention_mask"].sum(1).float()
        tally.add(n=m, accuracy=losses.pair_accuracy(rc - rr), margin=rc - rr, reward_chosen=rc, reward_rejected=rr,
                  len_chosen=n[:m], len_rejected=n[m:])  # fmt: skip
        return losses.bradley_terry_loss(rc, rr).sum()

    def run_eval(model) -> dict:
        model = unwrap(model)
        sums = torch.zeros(4, dtype=torch.float64)  # correct, loss, margin, pairs
        for s in range(0, len(val_local), tc.micro_batch_size):
            chunk = val_local[s : s + tc.micro_batch_size]
            b = collate(chunk)
            r = model(b["idx"].to(dist.device), attention_mask=b["attention_mask"].to(dist.device)).float().cpu()
            rc, rr = r[: len(chunk)], r[len(chunk) :]
            sums += torch.stack([losses.pair_accuracy(rc - rr).sum(), losses.bradley_terry_loss(rc, rr).sum(),
                                 (rc - rr).sum(), torch.tensor(float(len(chunk)))]).double()  # fmt: skip
        sums = dist.all_sum(sums).cpu()
        n = sums[3].clamp_min(1)
        return {"val_loss": float(sums[1] / n), "val_acc": float(sums[0] / n), "val_margin": float(sums[2] / n)}

    def save(model, out_dir):
        save_reward_model(model, out_dir, pad_token_id=pad, tokenizer_dir=tok.path)

    pair_tokens = float(np.mean([len(p.chosen.ids) + len(p.rejected.ids) for p in train]))
    task = loop.Task(model=model, batches=batches, loss=loss, count=lambda b: b["idx"].size(0) // 2,
                     save_model=save, evaluate=run_eval if val else None, stats=lambda: tally.means(FIGURES),
                     flops_per_token=model.backbone.flops_per_token(T) * pair_tokens)  # fmt: skip
    if dist.is_main:
        print(f"reward: {describe(model, base_dir)}; {len(train):,} pairs, {tc.max_steps} steps = "
              f"{batches.epoch_of_step(tc.max_steps):.2f} epochs", file=sys.stderr)
    return Built(task=task, tok=tok, train=train, val=val)
