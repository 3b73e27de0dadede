"""Supervised fine-tuning data: JSONL rows -> (ids, loss mask) -> packed or padded micro-batches.

Rows are `{"messages": [...]}` (rendered through the tokenizer's chat template, loss on assistant turns) or
`{"prompt": ..., "completion": ...}` (BOS + prompt + completion + EOS, loss on the completion and EOS).

An example of n tokens gives n-1 (input, target) positions; a target is -100 (ignored) unless its token is
supervised. Packing concatenates examples into rows of `block_size` positions with `position_ids` restarting at
0 for each example and a block-diagonal causal mask, so no token attends across an example boundary: every
example's logits, hence the loss and the set of supervised tokens, are the same as when it is alone in a row
(padding, with packing off). The batch of step s is a pure function of (seed, s): epochs are shuffled with
`numpy.random.default_rng([seed, epoch])`, so resuming needs no data state.
"""

from __future__ import annotations

import sys
from bisect import bisect_right
from dataclasses import dataclass

import numpy as np
import torch

from llmctl.data import iter_jsonl
from llmctl.errors import UserError

IGNORE = -100


@dataclass
class Example:
    ids: np.ndarray  # int64 [n]
    mask: np.ndarray  # bool [n]: token supervised

    @property
    def n_inputs(self) -> int:
        return len(self.ids) - 1


def encode_row(tok, row) -> tuple[list[int], list[int]]:
    """(ids, mask) of one SFT row; raises UserError (without location) on a malformed row."""
    if isinstance(row, dict) and "messages" in row:
        return tok.encode_chat(row["messages"])
    if isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        bos = [] if tok.bos_id is None else [tok.bos_id]
        eos = [] if tok.eos_id is None else [tok.eos_id]
        p, c = bos + tok.encode(row["prompt"]), tok.encode(row["completion"]) + eos
        return p + c, [0] * len(p) + [1] * len(c)
    raise UserError('expected {"messages": [...]} or {"prompt": STRING, "completion": STRING}')


def load_examples(path, tok, max_len: int, limit: int | None = None, quiet: bool = False) -> list[Example]:
    """Encode an SFT JSONL file; examples are cut to max_len+1 tokens (max_len input positions); examples with
    no supervised token left are dropped (both counted on stderr)."""
    out, cut, dropped = [], 0, 0
    for lineno, row in iter_jsonl(path):
        if limit is not None and len(out) >= limit:
            break
        try:
            ids, mask = encode_row(tok, row)
        except UserError as e:
            raise UserError(f"{path}:{lineno}: {e}") from None
        if len(ids) > max_len + 1:
            ids, mask, cut = ids[: max_len + 1], mask[: max_len + 1], cut + 1
        m = np.asarray(mask, dtype=bool)
        if len(ids) < 2 or not m[1:].any():
            dropped += 1
            continue
        out.append(Example(np.asarray(ids, dtype=np.int64), m))
    if not quiet and (cut or dropped):
        print(f"warning: {path}: {cut} example(s) cut to {max_len + 1} tokens, {dropped} without supervised "
              "tokens dropped", file=sys.stderr)
    if not out:
        raise UserError(f"{path} holds no usable SFT examples")
    return out


def collate(examples: list[Example], length: int | None = None) -> dict:
    """One row per example, right-padded to `length` (default: the longest): idx, targets."""
    T = length or max(e.n_inputs for e in examples)
    idx = torch.zeros(len(examples), T, dtype=torch.long)
    targets = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for r, e in enumerate(examples):
        n = e.n_inputs
        idx[r, :n] = torch.from_numpy(e.ids[:-1])
        targets[r, :n] = torch.from_numpy(np.where(e.mask[1:], e.ids[1:], IGNORE))
    return {"idx": idx, "targets": targets}


def collate_packed(rows: list[list[Example]], length: int) -> dict:
    """Several examples per row: idx, targets, position_ids (restarting per example) and a bool attention
    mask [B, 1, T, T] that is causal within each example and blocks everything across examples."""
    B, T = len(rows), length
    idx = torch.zeros(B, T, dtype=torch.long)
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    doc = torch.full((B, T), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for d, e in enumerate(row):
            n = e.n_inputs
            idx[r, at:at + n] = torch.from_numpy(e.ids[:-1])
            targets[r, at:at + n] = torch.from_numpy(np.where(e.mask[1:], e.ids[1:], IGNORE))
            pos[r, at:at + n] = torch.arange(n)
            doc[r, at:at + n] = d
            at += n
    same = doc[:, :, None] == doc[:, None, :]  # [B, T, T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return {"idx": idx, "targets": targets, "position_ids": pos, "attn_mask": (same & causal)[:, None]}


def pack(examples: list[Example], order: np.ndarray, length: int) -> list[list[Example]]:
    """Examples in `order`, filled greedily into rows of at most `length` input positions."""
    rows, row, used = [], [], 0
    for i in order:
        e = examples[i]
        if row and used + e.n_inputs > length:
            rows.append(row)
            row, used = [], 0
        row.append(e)
        used += e.n_inputs
    if row:
        rows.append(row)
    return rows


class SftBatches:
    """step -> this process's micro-batches. Rows (a packed row, or one example when packing is off) are taken
    in order from epoch after epoch; the global batch of a step is micro * accum * world consecutive rows,
    process r taking rows [(m * world + r) * micro, ...) of micro-step m (as pretrain does)."""

    def __init__(self, examples: list[Example], block_size: int, micro: int, accum: int, rank: int, world: int,
                 seed: int, packing: bool = True):
        self.examples = [e if e.n_inputs <= block_size else Example(e.ids[:block_size + 1], e.mask[:block_size + 1])
                         for e in examples]
        self.T, self.packing = block_size, packing
        self.micro, self.accum, self.rank, self.world, self.seed = micro, accum, rank, world, seed
        self._epochs: list[list] = []  # rows of each epoch, built on demand
        self._starts = [0]  # global row index where each epoch starts

    def _epoch(self, e: int) -> list:
        while len(self._epochs) <= e:
            k = len(self._epochs)
            order = np.random.default_rng([self.seed, k]).permutation(len(self.examples))
            rows = pack(self.examples, order, self.T) if self.packing else [[self.examples[i]] for i in order]
            self._epochs.append(rows)
            self._starts.append(self._starts[-1] + len(rows))
        return self._epochs[e]

    def row(self, i: int) -> list[Example]:
        while self._starts[-1] <= i:
            self._epoch(len(self._epochs))
        e = bisect_right(self._starts, i) - 1
        return self._epochs[e][i - self._starts[e]]

    def epoch_of_step(self, step: int) -> float:
        """How many epochs the first `step` optimizer steps have covered."""
        i = step * self.micro * self.accum * self.world
        self.row(i)
        e = bisect_right(self._starts, i) - 1
        return e + (i - self._starts[e]) / max(1, len(self._epochs[e]))

    def __call__(self, step: int) -> list[dict]:
        base = step * self.micro * self.accum * self.world
        out = []
        for m in range(self.accum):
            lo = base + (m * self.world + self.rank) * self.micro
            rows = [self.row(i) for i in range(lo, lo + self.micro)]
            out.append(collate_packed(rows, self.T) if self.packing else collate([r[0] for r in rows]))
        return out


def count(batch: dict) -> int:
    return int((batch["targets"] != IGNORE).sum())


def loss(model, batch: dict) -> torch.Tensor:
    """fp32 sum of the cross-entropy over the supervised tokens of a micro-batch."""
    return model(batch["idx"], batch["targets"], position_ids=batch.get("position_ids"),
                 attn_mask=batch.get("attn_mask"))
