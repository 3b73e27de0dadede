"""JSONL examples -- SFT rows, preference pairs, prompts, evaluation records -- read, checked and encoded; packing
and collate; and the one step -> micro-batch slicer of every training stage.

Files (`load`): `.jsonl` / `.jsonl.gz`, one JSON object a line, blank lines skipped. Each kind has a shape (SHAPES);
a row that does not fit, or that its encoder refuses, is a UserError naming FILE:LINE.
    sft           {"messages": [...]} (the chat template; loss on assistant turns) or {"prompt", "completion"}
                  (prefix + prompt + completion + eos, prefix: what the tokenizer puts before a text,
                  chat.prefix_ids, bos for llmctl's tokenizers; loss on the completion and eos)
    preference    {"prompt", "chosen", "rejected"}: two sequences sharing the prompt, loss on each response
    prompts       {"prompt", "answer" (optional)}: RL prompts
    exact-match   {"prompt", "answer"}; mc {"question", "choices", "answer": INDEX}: `llmctl eval` records
An encoded example of n tokens gives n-1 (input, target) positions; a target is IGNORE unless its token is
supervised. Sequences longer than the context are cut at the right; an example left without supervised tokens
is dropped (both counted in one warning).

Packing (`pack`, `collate_packed`) puts several examples in a row of `block_size` positions with `position_ids`
restarting at 0 for each and a block-diagonal causal mask: no token attends across an example boundary, so every
example's logits (hence the loss and its supervised tokens) are those it has alone in a padded row.

Batches (`StepBatches`) are a pure function of (seed, step), so resuming needs no data state: row i of a run is
row i mod (rows of the epoch) of epoch e (`EpochRows`: epochs shuffled by numpy.random.default_rng([seed, e])).
The global batch of step s is rows [s G, (s + 1) G), G = micro x accum x world; process r takes rows
[(m world + r) micro, ... + micro) for micro-step m, so any process count sees the same global batch (and
gradient accumulation equals the large batch).
"""

from __future__ import annotations

import sys
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from llmctl.chat import prefix_ids
from llmctl.data import iter_jsonl
from llmctl.errors import UserError

IGNORE = -100


# ------------------------------------------------------------------------------------------------ records


def _check_mc(row: dict) -> str | None:
    ch = row.get("choices")
    if not isinstance(row.get("question"), str):
        return 'field "question" must be a string'
    if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) and c for c in ch):
        return 'field "choices" must be a list of at least 2 non-empty strings'
    a = row.get("answer")
    if type(a) is not int or not 0 <= a < len(ch):
        return f'field "answer" must be the index of the right choice (an integer in [0, {len(ch) - 1}])'
    return None


def _check_em(row: dict) -> str | None:
    a = row.get("answer")
    ok = lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool)  # noqa: E731
    if not isinstance(row.get("prompt"), str):
        return 'field "prompt" must be a string'
    if not (ok(a) or (isinstance(a, list) and a and all(ok(v) for v in a))):
        return 'field "answer" must be a string, a number or a non-empty list of them'
    return None


def _check_prompt(row: dict) -> str | None:  # "answer": any JSON (a reward function may read it)
    return None if isinstance(row.get("prompt"), str) else 'field "prompt" must be a string'


def _check_pref(row: dict) -> str | None:
    for k in ("prompt", "chosen", "rejected"):
        if not isinstance(row.get(k), str):
            return f'field "{k}" must be a string'
    if not row["chosen"] or not row["rejected"]:
        return 'fields "chosen" and "rejected" must not be empty'
    return None


SHAPES: dict[str, tuple[str, Callable[[dict], str | None] | None]] = {
    "sft": ('{"messages": [...]} or {"prompt": STRING, "completion": STRING}', None),  # encode_sft checks
    "preference": ('{"prompt": ..., "chosen": ..., "rejected": ...}', _check_pref),
    "prompts": ('{"prompt": ..., "answer": ...}', _check_prompt),
    "exact-match": ('{"prompt": ..., "answer": ...}', _check_em),
    "mc": ('{"question": ..., "choices": [...], "answer": INDEX}', _check_mc),
}


def load(path, kind: str, limit: int | None = None, encode: Callable | None = None) -> list:
    """The rows of a JSONL file of `kind` (see SHAPES), each turned into an example by `encode(row)` (None: the row
    itself; an encoder returning None drops the row), the first `limit` kept ones. A bad row is a UserError naming
    FILE:LINE; a file without any is one too."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"no such file: {p}" if not p.exists() else f"expected a JSONL file, got a directory: {p}")
    shape, check = SHAPES[kind]
    out = []
    for lineno, row in iter_jsonl(p):
        if limit is not None and len(out) >= limit:
            break
        problem = (check(row) if check else None) if isinstance(row, dict) else f"expected an object {shape}"
        if problem:
            raise UserError(f"{p}:{lineno}: {problem} ({kind} records are {shape})")
        try:
            item = encode(row) if encode else row
        except UserError as e:
            raise UserError(f"{p}:{lineno}: {e}") from None
        if item is not None:
            out.append(item)
    if not out:
        raise UserError(f"{p} holds no usable {kind} records")
    return out


# ------------------------------------------------------------------------------------------------ encoding


@dataclass
class Example:
    ids: np.ndarray  # int64 [n]
    mask: np.ndarray  # bool [n]: token supervised

    @property
    def n_inputs(self) -> int:
        return len(self.ids) - 1


@dataclass
class Pair:
    chosen: Example
    rejected: Example


def encode_sft(tok, row) -> tuple[list[int], list[int]]:
    """(ids, mask) of one SFT row; raises UserError (without location) on a malformed row."""
    if isinstance(row, dict) and "messages" in row:
        return tok.encode_chat(row["messages"])
    if isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        eos = [] if tok.eos_id is None else [tok.eos_id]
        p, c = prefix_ids(tok) + tok.encode(row["prompt"]), tok.encode(row["completion"]) + eos
        return p + c, [0] * len(p) + [1] * len(c)
    raise UserError(f"expected {SHAPES['sft'][0]}")


def encode_preference(tok, row: dict, chat: bool) -> tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]:
    """((ids, mask) of chosen, (ids, mask) of rejected); the mask is 1 on the response tokens. With chat the prompt
    is a user message and the response the assistant turn, else as an SFT prompt-completion row."""
    def one(response):
        if chat:
            return tok.encode_chat([{"role": "user", "content": row["prompt"]},
                                    {"role": "assistant", "content": response}])  # fmt: skip
        return encode_sft(tok, {"prompt": row["prompt"], "completion": response})

    return one(row["chosen"]), one(row["rejected"])


class _Cutter:
    """Encoded sequences -> Examples of at most max_tokens tokens, counting those cut and those left without a
    supervised target (dropped: None)."""

    def __init__(self, max_tokens: int):
        self.max, self.cut, self.dropped = max_tokens, 0, 0

    def __call__(self, ids, mask) -> Example | None:
        if len(ids) > self.max:
            ids, mask, self.cut = ids[: self.max], mask[: self.max], self.cut + 1
        m = np.asarray(mask, dtype=bool)
        if len(ids) < 2 or not m[1:].any():
            self.dropped += 1
            return None
        return Example(np.asarray(ids, dtype=np.int64), m)

    def warn(self, path, what: str, quiet: bool) -> None:
        if not quiet and (self.cut or self.dropped):
            print(f"warning: {path}: {self.cut} sequence(s) cut to {self.max} tokens, {self.dropped} {what} without "
                  "supervised tokens left dropped", file=sys.stderr)


def load_sft(path, tok, max_len: int, limit: int | None = None, quiet: bool = False) -> list[Example]:
    """An SFT file's examples, cut to max_len + 1 tokens (max_len input positions)."""
    cutter = _Cutter(max_len + 1)
    out = load(path, "sft", limit, lambda row: cutter(*encode_sft(tok, row)))
    cutter.warn(path, "example(s)", quiet)
    return out


def load_pairs(path, tok, chat: bool, max_tokens: int, limit: int | None = None, quiet: bool = False) -> list[Pair]:
    """A preference file's pairs, each sequence cut to max_tokens; a pair losing a side's response is dropped."""
    cutter = _Cutter(max_tokens)

    def encode(row):
        sides = [cutter(ids, mask) for ids, mask in encode_preference(tok, row, chat)]
        if None in sides:
            cutter.dropped -= sides.count(None) - 1  # count the pair once
            return None
        return Pair(*sides)

    out = load(path, "preference", limit, encode)
    cutter.warn(path, "pair(s)", quiet)
    return out


def load_prompts(path, limit: int | None = None, need_answer: str | None = None) -> list[dict]:
    """{"prompt", "answer"} rows of an RL prompt file; need_answer: why every row must have an answer."""
    def encode(row):
        if need_answer and row.get("answer") is None:
            raise UserError(f'{need_answer} needs an "answer" in every row')
        return {"prompt": row["prompt"], "answer": row.get("answer")}

    return load(path, "prompts", limit, encode)


# ------------------------------------------------------------------------------------------------ collate


def _targets(e: Example) -> torch.Tensor:
    return torch.from_numpy(np.where(e.mask[1:], e.ids[1:], IGNORE))


def collate(examples: list[Example], length: int | None = None) -> dict:
    """One row per example, right-padded to `length` (default: the longest): idx, targets."""
    T = length or max(e.n_inputs for e in examples)
    idx = torch.zeros(len(examples), T, dtype=torch.long)
    targets = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for r, e in enumerate(examples):
        idx[r, : e.n_inputs] = torch.from_numpy(e.ids[:-1])
        targets[r, : e.n_inputs] = _targets(e)
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
            idx[r, at : at + n] = torch.from_numpy(e.ids[:-1])
            targets[r, at : at + n] = _targets(e)
            pos[r, at : at + n] = torch.arange(n)
            doc[r, at : at + n] = d
            at += n
    same = doc[:, :, None] == doc[:, None, :]  # [B, T, T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return {"idx": idx, "targets": targets, "position_ids": pos, "attn_mask": (same & causal)[:, None]}


def collate_pairs(pairs: list[Pair]) -> dict:
    """Causal-LM rows, the chosen sequences first, then the rejected: idx, targets (response tokens only)."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs])


def pad_right(seqs, pad_id: int) -> dict:
    """Whole sequences right-padded with pad_id: idx, attention_mask (1 = a real token)."""
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    att = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        idx[i, : len(s)] = torch.as_tensor(s)
        att[i, : len(s)] = 1
    return {"idx": idx, "attention_mask": att}


def collate_completions(prompts: list[list[int]], seqs: list[list[int]], pad_id: int) -> dict:
    """Prompt + completion sequences as causal-LM rows, right-padded with pad_id: idx, targets, and keep (bool:
    the positions whose target is a completion token)."""
    N, L = len(seqs), max(len(s) for s in seqs) - 1
    b = {"idx": torch.full((N, L), pad_id, dtype=torch.long), "targets": torch.zeros(N, L, dtype=torch.long),
         "keep": torch.zeros(N, L, dtype=torch.bool)}  # fmt: skip
    for i, (s, p) in enumerate(zip(seqs, prompts)):
        b["idx"][i, : len(s) - 1] = torch.tensor(s[:-1])
        b["targets"][i, : len(s) - 1] = torch.tensor(s[1:])
        b["keep"][i, len(p) - 1 : len(s) - 1] = True
    return b


def count(batch: dict) -> int:
    """Supervised targets in a micro-batch (the unit the loop normalises a loss sum by)."""
    return int((batch["targets"] != IGNORE).sum())


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


# ------------------------------------------------------------------------------------------------ batches


class EpochRows:
    """Row i of an endless stream of epochs over n items, epoch e in the order numpy.random.default_rng([seed, e])
    .permutation(n). A row is one item's index, or with `rows_of(order)` what it makes of an epoch's order (e.g.
    packed rows)."""

    def __init__(self, n: int, seed: int, rows_of: Callable | None = None):
        self.n, self.seed, self.rows_of = n, seed, rows_of or (lambda order: [int(i) for i in order])
        self._epochs: list[list] = []  # rows of each epoch, built on demand
        self._starts = [0]  # global row index where each epoch starts

    def _locate(self, i: int) -> tuple[int, int]:
        while self._starts[-1] <= i:
            rows = self.rows_of(np.random.default_rng([self.seed, len(self._epochs)]).permutation(self.n))
            self._epochs.append(rows)
            self._starts.append(self._starts[-1] + len(rows))
        e = bisect_right(self._starts, i) - 1
        return e, i - self._starts[e]

    def __getitem__(self, i: int):
        e, k = self._locate(i)
        return self._epochs[e][k]

    def epoch_at(self, i: int) -> float:
        """How many epochs the first i rows cover."""
        e, k = self._locate(i)
        return e + k / max(1, len(self._epochs[e]))


class StepBatches:
    """step -> this process's micro-batches (see the module doc): make(range of global row indices) -> one
    micro-batch, for micro-steps m = 0 .. accum - 1."""

    def __init__(self, make: Callable[[range], dict], micro: int, accum: int, rank: int, world: int):
        self.make, self.micro, self.accum, self.rank, self.world = make, micro, accum, rank, world
        self.rows_per_step = micro * accum * world

    def rows(self, step: int) -> list[range]:
        base = step * self.rows_per_step
        return [range(lo, lo + self.micro) for lo in
                (base + (m * self.world + self.rank) * self.micro for m in range(self.accum))]  # fmt: skip

    def __call__(self, step: int) -> list[dict]:
        return [self.make(r) for r in self.rows(step)]


class EpochBatches(StepBatches):
    """StepBatches over epochs of n items (`order`: EpochRows): make(list of rows) -> one micro-batch."""

    def __init__(self, n: int, seed: int, make: Callable[[list], dict], micro: int, accum: int, rank: int, world: int,
                 rows_of: Callable | None = None):  # fmt: skip
        self.order = EpochRows(n, seed, rows_of)
        super().__init__(lambda r: make([self.order[i] for i in r]), micro, accum, rank, world)

    def epoch_of_step(self, step: int) -> float:
        """How many epochs the first `step` optimizer steps cover."""
        return self.order.epoch_at(step * self.rows_per_step)


def sft_batches(examples: list[Example], block_size: int, micro: int, accum: int, rank: int, world: int, seed: int,
                packing: bool = True) -> EpochBatches:
    """SFT micro-batches: packed rows of block_size positions, or one padded example a row."""
    examples = [e if e.n_inputs <= block_size else Example(e.ids[: block_size + 1], e.mask[: block_size + 1])
                for e in examples]  # fmt: skip
    if packing:
        return EpochBatches(len(examples), seed, lambda rows: collate_packed(rows, block_size), micro, accum, rank,
                            world, lambda order: pack(examples, order, block_size))  # fmt: skip
    return EpochBatches(len(examples), seed, lambda rows: collate([examples[i] for i in rows]), micro, accum, rank,
                        world)  # fmt: skip
