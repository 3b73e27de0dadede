"""`llmctl pretrain`: a decoder-only transformer from scratch on token shards.

setup -> data (token shards: random windows of block_size + 1 tokens a step, fixed val windows) -> the model
(config from the recipe's model section and the tokenizer) -> the loss (summed next-token cross-entropy) ->
loop.train (evaluation: val_loss / val_bpb; checkpoints: model directories transformers loads)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from llmctl import hf, loop
from llmctl.config import model_config
from llmctl.shards import NoSplit, TokenShards
from llmctl.dist import Dist, setup
from llmctl.errors import UserError
from llmctl.evaluate import val_loss_bpb
from llmctl.examples import StepBatches
from llmctl.losses import lm_loss
from llmctl.model import Transformer, unwrap
from llmctl.tokenizer import load_tokenizer


def window_batches(shards: TokenShards, block_size: int, micro: int, accum: int, rank: int, world: int,
                   seed: int) -> StepBatches:
    """Random windows of block_size + 1 tokens: the global batch of step s is G = micro x accum x world windows
    at offsets drawn by numpy.random.default_rng([seed, s]) (examples.StepBatches slices it over processes and
    micro-steps)."""
    high = len(shards) - (block_size + 1) + 1
    if high <= 0:
        raise UserError(f"training data holds {len(shards)} tokens, fewer than block_size+1 = {block_size + 1}")
    G = micro * accum * world

    def make(rows: range) -> dict:
        step, k = divmod(rows.start, G)
        offsets = np.random.default_rng([seed, step]).integers(0, high, size=G)
        w = shards.get(offsets[k : k + len(rows)], block_size + 1)
        return {"idx": w[:, :-1].contiguous(), "targets": w[:, 1:].contiguous()}

    return StepBatches(make, micro, accum, rank, world)


def val_windows(shards: TokenShards, block_size: int, n: int) -> np.ndarray:
    """n fixed, evenly spaced windows over the val split (non-overlapping when it is long enough)."""
    high = len(shards) - (block_size + 1)
    if high < 0:
        raise UserError(f"validation data holds {len(shards)} tokens, fewer than block_size+1 = {block_size + 1}")
    return np.linspace(0, high, num=n).astype(np.int64)


def make_evaluate(shards: TokenShards, token_bytes: np.ndarray, block_size: int, micro: int, batches: int,
                  dist: Dist):
    """val_loss (mean nats per token) and val_bpb (bits per UTF-8 byte, over tokens that stand for bytes)."""
    offsets = val_windows(shards, block_size, micro * batches)[dist.rank::dist.world]
    tb = torch.as_tensor(token_bytes, dtype=torch.long)

    def evaluate(model) -> dict:
        windows = (shards.get(offsets[i : i + micro], block_size + 1) for i in range(0, len(offsets), micro))
        batches = ({"idx": w[:, :-1], "targets": w[:, 1:]} for w in windows)
        return val_loss_bpb(unwrap(model), batches, tb, dist)  # the bare model: no gradient sync, its lm_head

    return evaluate


def val_shards(recipe, dist: Dist) -> TokenShards:
    """data.val's val split -- or its train split when it has none: a directory encoded on its own (with
    --val-fraction 0) to hold out a separate file -- else data.train's val split."""
    if not recipe.data.val:
        try:
            return TokenShards(recipe.data.train, "val")
        except NoSplit as e:
            raise UserError(f"data.train: {e}; set data.val=DIR (token shards of held-out text, e.g. `llmctl "
                            f"tokenize encode held_out.txt --val-fraction 0 --out DIR`) or re-encode with "
                            "--val-fraction > 0") from None
    ds = TokenShards(recipe.data.val, "val", fallback="train")
    if ds.split != "val" and Path(recipe.data.val).suffix != ".bin" and dist.is_main:
        print(f"data.val: {ds.path} has no val split; validating on its train split ({len(ds):,} tokens)",
              file=sys.stderr)
    return ds


def run(recipe) -> dict:
    dist, resume = setup(recipe)
    tok = load_tokenizer(recipe.tokenizer)
    train_data, val_data = TokenShards(recipe.data.train, "train"), val_shards(recipe, dist)  # data
    cfg = model_config(recipe.model, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                       pad_token_id=tok.pad_id)
    for name, ds in (("data.train", train_data), ("data.val", val_data)):
        if ds.meta.get("tokenizer_hash") != tok.hash():
            raise UserError(f"{name} was encoded with another tokenizer than {recipe.tokenizer} "
                            f"(hash {str(ds.meta.get('tokenizer_hash'))[:12]} vs {tok.hash()[:12]}); "
                            "re-run `llmctl tokenize encode` with this tokenizer")
        if ds.vocab_size != tok.vocab_size or ds.max_id >= cfg.vocab_size or len(ds.token_bytes) < cfg.vocab_size:
            raise UserError(f"{name}: {ds.path} holds token ids up to {ds.max_id} for a vocabulary of "
                            f"{ds.vocab_size} ({len(ds.token_bytes)} token_bytes), but the tokenizer and the model "
                            f"have {tok.vocab_size}; re-run `llmctl tokenize encode` with this tokenizer")
    if resume is not None:  # the model: every weight trains
        model = hf.load_model(resume)
        if model.config != cfg:
            raise UserError(f"incompatible checkpoint: {resume} holds a different model than the recipe")
    else:
        torch.manual_seed(recipe.seed)
        model = Transformer(cfg)
        model.init_weights()
    tc = recipe.train
    task = loop.Task(
        model=model,
        batches=window_batches(train_data, cfg.block_size, tc.micro_batch_size, tc.grad_accum, dist.rank,
                               dist.world, recipe.seed),
        loss=lm_loss,  # summed next-token cross-entropy
        count=lambda b: b["targets"].numel(),
        save_model=lambda m, d: hf.save_model(m, d, tokenizer_dir=tok.path),
        evaluate=make_evaluate(val_data, train_data.token_bytes, cfg.block_size, tc.micro_batch_size,
                               tc.eval_batches, dist),
        flops_per_token=model.flops_per_token(cfg.block_size),
    )
    if dist.is_main:
        n = model.num_params()
        print(f"model: {cfg.arch} {n / 1e6:.2f}M parameters; training {len(train_data):,} tokens, "
              f"{dist.world} process(es), global batch {tc.micro_batch_size * tc.grad_accum * dist.world} x "
              f"{cfg.block_size}", file=sys.stderr)
    last = loop.train(recipe, task, dist, resume=resume)
    dist.end()
    return last
