"""Rows of tests/test_bad_input.py for recipes and data: out-of-range recipe values, bad bytes, bad shards."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
from test_bad_input import ROOT, Case

# ------------------------------------------------------------------------------------- recipe values

# (id, command, override, needle): every one caught by --dry-run, before anything is read or written.
RANGES = [
    ("lr-negative", "pretrain", "optim.lr=-0.1", "optim.lr: must be > 0, got -0.1"),
    ("lr-nan", "pretrain", "optim.lr=.nan", "optim.lr: must be a finite number"),
    ("lr-nan-string", "pretrain", "optim.lr=nan", "optim.lr: must be a finite number"),
    ("lr-inf", "pretrain", "optim.lr=.inf", "optim.lr: must be a finite number"),
    ("micro-batch-zero", "pretrain", "train.micro_batch_size=0", "train.micro_batch_size: must be >= 1, got 0"),
    ("max-steps-negative", "pretrain", "train.max_steps=-5", "train.max_steps: must be >= 1"),
    ("grad-accum-zero", "pretrain", "train.grad_accum=0", "train.grad_accum"),
    ("warmup-negative", "pretrain", "optim.warmup_steps=-1", "optim.warmup_steps: must be >= 0"),
    ("weight-decay-negative", "pretrain", "optim.weight_decay=-0.1", "optim.weight_decay"),
    ("eval-every-negative", "pretrain", "train.eval_every=-1", "train.eval_every"),
    ("save-every-negative", "pretrain", "train.save_every=-10", "train.save_every"),
    ("log-every-zero", "pretrain", "train.log_every=0", "train.log_every"),
    ("grad-clip-negative", "pretrain", "train.grad_clip=-1", "train.grad_clip"),
    ("beta2-one", "pretrain", "optim.beta2=1.0", "optim.beta2: must be in [0, 1), got 1"),
    ("eps-zero", "pretrain", "optim.eps=0", "optim.eps: must be > 0"),
    ("min-lr-ratio-above-one", "pretrain", "optim.min_lr_ratio=1.5", "optim.min_lr_ratio: must be in [0, 1]"),
    ("dropout-one", "pretrain", "model.dropout=1", "model.dropout: must be in [0, 1)"),
    ("n-layer-zero", "pretrain", "model.n_layer=0", "model.n_layer"),
    ("n-embd-not-multiple-of-heads", "pretrain", "model.n_embd=66", "model.n_embd: must be a multiple of"),
    ("n-kv-head-not-divisor", "pretrain", "model.n_kv_head=3", "model.n_kv_head: must divide"),
    ("threads-zero", "pretrain", "train.threads=0", "train.threads"),
    ("seed-negative", "pretrain", "seed=-1", "seed: must be"),
    ("sft-limit-zero", "sft", "data.limit=0", "data.limit: must be >= 1"),
    ("lora-r-zero", "lora", "lora.r=0", "lora.r: must be >= 1"),
    ("lora-alpha-negative", "lora", "lora.alpha=-16", "lora.alpha: must be > 0"),
    ("dpo-beta-zero", "dpo", "dpo.beta=0", "dpo.beta: must be > 0"),
    ("dpo-label-smoothing-half", "dpo", "dpo.label_smoothing=0.5", "dpo.label_smoothing: must be in [0, 0.5)"),
    ("grpo-group-of-one", "grpo", "rl.group_size=1", "rl.group_size: must be >= 2 for grpo"),
    ("grpo-minibatches-over-rollout", "grpo", "rl.minibatches=10000", "rl.minibatches: must be at most"),
    ("ppo-top-p-zero", "ppo", "rl.top_p=0", "rl.top_p: must be in (0, 1]"),
    ("ppo-lambda-above-one", "ppo", "rl.lam=1.5", "rl.lam: must be in [0, 1]"),
    ("ppo-temperature-zero", "ppo", "rl.temperature=0", "rl.temperature: must be > 0"),
    ("reward-with-lora", "reward", "lora.enabled=true", "lora.enabled: method reward"),
]


def _recipe_argv(w, command: str, *extra) -> list:
    out = w.tmp / "out"
    if command == "pretrain":
        return w.pretrain_args(out, *extra)
    if command in ("sft", "lora"):
        return w.sft_args(command, out, *extra)
    # rlhf: a data file that exists, so only the value under test is wrong
    return ["rlhf", ROOT / f"recipes/tiny/{command}.yaml", f"out_dir={out}", f"init_from={w.model}",
            f"data.train={w.sft}", "data.val=null", "eval.exact_match=null", *extra]


def _nothing_written(w, r):
    assert not (w.tmp / "out").exists()


def _no_stdout(w, r):
    assert r.stdout == b"", r.stdout


def _range_case(id, command, override, needle) -> Case:
    return Case(f"recipe-{id}", lambda w: [*_recipe_argv(w, command, override), "--dry-run"], needle,
                after=_no_stdout)


CASES: list = [_range_case(*row) for row in RANGES]

CASES += [
    # without --dry-run too: the recipe is refused before the run directory is made
    Case("recipe-max-steps-zero-no-dry-run", lambda w: _recipe_argv(w, "pretrain", "train.max_steps=0"),
         "train.max_steps: must be >= 1", after=_nothing_written),
    # a file the user names on the command line must exist (a missing one in the recipe file is skipped)
    Case("recipe-eval-file-named-and-missing",
         lambda w: [*_recipe_argv(w, "sft", f"eval.exact_match={w.tmp / 'nope.jsonl'}"), "--dry-run"],
         "eval.exact_match: no such file", after=_nothing_written),
    Case("recipe-val-dir-named-and-missing",
         lambda w: _recipe_argv(w, "pretrain", f"data.val={w.tmp / 'nowhere'}"),
         "data.val: no such file", after=_nothing_written),
]

# ------------------------------------------------------------------------------------- bad bytes


def _generate(w, *args) -> list:
    return ["generate", "--model", w.model, "--max-new-tokens", 2, "--temperature", 0, *args]


def _write(w, name: str, data: bytes):
    p = w.tmp / name
    p.write_bytes(data)
    return p


def _bad_sft(w, line2: bytes):
    """w.sft with `line2` as its second line."""
    good = w.sft.read_bytes().splitlines(keepends=True)
    return _write(w, "bad_sft.jsonl", good[0] + line2 + b"\n" + b"".join(good[1:]))


def _no_shards(w, r):
    assert not (w.tmp / "shards").exists()


LATIN1_ROW = b'{"prompt": "caf\xe9", "completion": " x"}'  # Latin-1, not UTF-8
SURROGATE_ROW = b'{"prompt": "a", "completion": "\\ud800"}'  # an unpaired \ud800 escape


CASES += [
    Case("generate-stdin-not-utf8", lambda w: _generate(w), "stdin:2: not UTF-8",
         stdin=lambda w: b"hello\ncaf\xe9\n"),
    Case("generate-json-stdin-not-utf8", lambda w: _generate(w, "--json"), "stdin:2: not UTF-8",
         stdin=lambda w: b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n'),
    Case("generate-json-lone-surrogate-escape", lambda w: _generate(w, "--json"), "stdin:1: not UTF-8",
         stdin=lambda w: b'{"prompt": "a\\udcff"}\n'),
    # Python keeps undecodable argument bytes as lone surrogates; subprocess writes them back as the bytes
    Case("generate-prompt-argument-not-utf8", lambda w: _generate(w, os.fsdecode(b"caf\xe9")), "PROMPT: not UTF-8"),
    Case("generate-stop-not-utf8", lambda w: _generate(w, "--stop", os.fsdecode(b"\xff"), "hi"), "--stop: not UTF-8"),
    Case("tokenize-encode-stdin-not-utf8", lambda w: ["tokenize", "encode", "--tokenizer", w.tok],
         "stdin:2: not UTF-8", stdin=lambda w: b"fine\n\xc3\x28 broken\n"),
    Case("tokenize-decode-stdin-not-utf8", lambda w: ["tokenize", "decode", "--tokenizer", w.tok],
         "stdin:1: not UTF-8", stdin=lambda w: b"1 2 \xff\n"),
    Case("tokenize-decode-id-with-underscore", lambda w: ["tokenize", "decode", "--tokenizer", w.tok],
         "stdin:2: not a token id", stdin=lambda w: b"1 2\n1_0\n"),
    Case("tokenize-decode-non-ascii-digit", lambda w: ["tokenize", "decode", "--tokenizer", w.tok],
         "stdin:1: not a token id", stdin=lambda w: "\u0663\n".encode()),
    Case("tokenize-decode-id-beyond-vocab", lambda w: ["tokenize", "decode", "--tokenizer", w.tok],
         "stdin:1: token id 400 out of range [0, 400)", stdin=lambda w: b"5 400\n"),
    Case("tokenize-decode-negative-id", lambda w: ["tokenize", "decode", "--tokenizer", w.tok],
         "out of range", stdin=lambda w: b"-1\n"),
    Case("tokenize-encode-corpus-not-utf8",
         lambda w: ["tokenize", "encode", _write(w, "c.txt", b"one\n\ntwo\nthr\xffee\n"), "--tokenizer", w.tok,
                    "--out", w.tmp / "shards"],
         "c.txt:4: not UTF-8", after=_no_shards),
    Case("sft-jsonl-not-utf8", lambda w: w.sft_args("sft", w.tmp / "out", "data.train=" + str(_bad_sft(w, LATIN1_ROW))),
         "bad_sft.jsonl:2: not UTF-8", after=_nothing_written),
    Case("sft-jsonl-lone-surrogate-escape",
         lambda w: w.sft_args("sft", w.tmp / "out", "data.train=" + str(_bad_sft(w, SURROGATE_ROW))),
         "bad_sft.jsonl:2: not UTF-8", after=_nothing_written),
    Case("sft-val-jsonl-not-utf8",
         lambda w: w.sft_args("sft", w.tmp / "out", "data.val=" + str(_bad_sft(w, LATIN1_ROW))),
         "bad_sft.jsonl:2: not UTF-8", after=_nothing_written),
    Case("eval-jsonl-not-utf8",
         lambda w: ["eval", "--model", w.model, "--task", "exact-match", "--data",
                    _write(w, "em.jsonl", b'{"prompt": "a", "answer": "b"}\n{"prompt": "\xe9", "answer": "b"}\n')],
         "em.jsonl:2: not UTF-8"),
]

# ------------------------------------------------------------------------------------- bad shards


def _shards(w, damage_meta=None, damage_tokens=None):
    """A copy of w.shards in w.tmp, damaged; returns its path."""
    d = w.tmp / "shards"
    shutil.copytree(w.shards, d)
    if damage_meta is not None:
        meta = json.loads((d / "meta.json").read_text())
        (d / "meta.json").write_text(json.dumps(damage_meta(meta)))
    if damage_tokens is not None:
        arr = np.fromfile(d / "train_00000.bin", dtype="<u2")
        damage_tokens(arr)
        arr.tofile(d / "train_00000.bin")
    return d


def _meta(**changes):
    def damage(meta):
        for k, v in changes.items():
            if v is _DROP:
                meta.pop(k)
            else:
                meta[k] = v
        return meta

    return damage


_DROP = object()


def _split(key, value):
    def damage(meta):
        meta["splits"]["train"][key] = value
        return meta

    return damage


def _shard_case(id, needle, **kw) -> Case:
    return Case(f"shards-{id}", lambda w: w.pretrain_args(w.tmp / "out", f"data.train={_shards(w, **kw)}"), needle,
                after=_nothing_written)


CASES += [
    _shard_case("meta-dtype-not-a-string", "'dtype' must be", damage_meta=_meta(dtype=5)),
    _shard_case("meta-dtype-float", "'dtype' must be", damage_meta=_meta(dtype="float32")),
    _shard_case("meta-vocab-size-string", "'vocab_size' must be a positive integer",
                damage_meta=_meta(vocab_size="400")),
    _shard_case("meta-no-splits", "'splits' must be", damage_meta=_meta(splits=_DROP)),
    _shard_case("meta-no-token-bytes", "'token_bytes' must be", damage_meta=_meta(token_bytes=_DROP)),
    _shard_case("meta-not-an-object", "unsupported token-shard format", damage_meta=lambda m: [m]),
    _shard_case("meta-shard-name-outside", "'splits.train.shards' must be",
                damage_meta=_split("shards", ["../../escape.bin"])),
    _shard_case("meta-shard-tokens-not-ints", "'splits.train.shard_tokens' must be",
                damage_meta=_split("shard_tokens", ["many"])),
    _shard_case("meta-token-count-off", "'splits.train.tokens' must be", damage_meta=_split("tokens", 3)),
    # a token id the vocabulary does not have: in a shard, or a meta.json claiming a smaller vocabulary
    _shard_case("token-beyond-vocab", "token id 60000 is outside the vocabulary",
                damage_tokens=lambda a: a.__setitem__(5, 60000)),
    _shard_case("meta-smaller-vocab", "is outside the vocabulary of 100 tokens", damage_meta=_meta(vocab_size=100)),
    # shards of a larger vocabulary than the tokenizer's (hash unchanged): refused before a model is built
    _shard_case("meta-other-vocab", "data.train:", damage_tokens=lambda a: a.__setitem__(5, 450),
                damage_meta=lambda m: {**m, "vocab_size": 500, "token_bytes": m["token_bytes"] + [1] * 100}),
    # data.train encoded with --val-fraction 0 and no data.val: the error says what to do
    _shard_case("no-val-split-and-no-data-val", "set data.val=DIR",
                damage_meta=lambda m: {**m, "splits": {"train": m["splits"]["train"],
                                                       "val": {"shards": [], "shard_tokens": [], "tokens": 0}}}),
]
