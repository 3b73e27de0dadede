"""The error contract, table-driven: every bad input or fault below, through the real CLI, exits with its
documented code, prints exactly one `error:` line and no traceback, and leaves what was already written (the
checkpoints, shards, models and tokenizers of a small world built once) unchanged byte for byte.

A case is a row: an id, a function that builds the command line in a `World` (and may prepare the bad file),
the exit code, a word the error line must hold, optional stdin bytes, and an optional check run afterwards.
Rows come from this file (commands, checkpoints, faults) and from `badinput_recipes.py` (recipes and data).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

TINY = ["model.n_layer=2", "model.n_head=4", "model.n_kv_head=2", "model.n_embd=64", "model.block_size=32",
        "train.micro_batch_size=4", "train.log_every=1", "train.eval_every=0", "train.eval_batches=2",
        "optim.warmup_steps=1", "optim.lr=1e-2"]


def run_llmctl(*args, stdin: bytes | None = None, env=None, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmctl", *map(str, args)], input=stdin if stdin is not None else b"",
                          capture_output=True, env={**os.environ, "LLMCTL_DEBUG": "0", **(env or {})},
                          cwd=cwd or ROOT, timeout=timeout)


@dataclass
class World:
    """What a user already has: a tokenizer, token shards, a pretrained run (2 checkpoints), SFT data. Each case
    also gets its own scratch directory `tmp`."""

    root: Path
    tok: Path
    shards: Path
    run: Path  # a pretrain run directory with checkpoints step-0000001 and step-0000002
    corpus: Path
    sft: Path  # SFT JSONL
    tmp: Path = None

    @property
    def model(self) -> Path:
        return self.run / "checkpoints/step-0000002"

    def pretrain_args(self, out, *extra) -> list:
        return ["pretrain", ROOT / "recipes/tiny/pretrain.yaml", f"out_dir={out}", f"tokenizer={self.tok}",
                f"data.train={self.shards}", *TINY, *extra]

    def sft_args(self, kind, out, *extra) -> list:
        recipe = ROOT / f"recipes/tiny/{kind}.yaml"
        return [kind, recipe, f"out_dir={out}", f"init_from={self.model}", f"data.train={self.sft}",
                "data.val=null", "eval.exact_match=null", "train.log_every=1", "train.eval_every=0",
                "train.micro_batch_size=2", *extra]


@dataclass
class Case:
    id: str
    argv: Callable[[World], list]  # builds the command line; may write the bad input into w.tmp
    needle: str = ""  # a word the error line holds (case-insensitive)
    code: int = 2
    stdin: Optional[Callable[[World], bytes]] = None
    env: dict = field(default_factory=dict)
    after: Optional[Callable[[World, subprocess.CompletedProcess], None]] = None  # extra checks


def _digest(root: Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    d = tmp_path_factory.mktemp("world")
    from llmctl.builtin import builtin_documents

    corpus = d / "corpus.txt"
    corpus.write_text("\n\n".join(builtin_documents()[:400]))
    for args in (["tokenize", "train", corpus, "--vocab-size", 400, "--out", d / "tok"],
                 ["tokenize", "encode", corpus, "--tokenizer", d / "tok", "--out", d / "shards",
                  "--val-fraction", 0.05]):
        r = run_llmctl(*args)
        assert r.returncode == 0, r.stderr.decode()
    w = World(root=d, tok=d / "tok", shards=d / "shards", run=d / "run", corpus=corpus, sft=d / "sft.jsonl")
    r = run_llmctl(*w.pretrain_args(w.run, "train.max_steps=2", "train.save_every=1", "train.keep_last=0"))
    assert r.returncode == 0, r.stderr.decode()
    import json

    w.sft.write_text("".join(json.dumps({"prompt": f"Q{i}: what is {i}+1?", "completion": f" {i + 1}"}) + "\n"
                             for i in range(16)))
    return w


def _load_cases() -> list[Case]:
    import badinput_recipes

    return CASES + list(badinput_recipes.CASES)


# --------------------------------------------------------------------------------------- commands, faults

CASES: list[Case] = []


# --------------------------------------------------------------------------------------- the harness


@pytest.mark.parametrize("case", _load_cases(), ids=lambda c: c.id)
def test_bad_input(case: Case, world: World, tmp_path):
    world.tmp = tmp_path
    before = _digest(world.root)
    argv = case.argv(world)
    stdin = case.stdin(world) if case.stdin else None
    r = run_llmctl(*argv, stdin=stdin, env=case.env)
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == case.code, f"exit {r.returncode}, expected {case.code}; stderr:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, f"expected one error: line, got {errors}; stderr:\n{err[-3000:]}"
    assert case.needle.lower() in errors[0].lower(), errors[0]
    assert _digest(world.root) == before, "an earlier output changed"
    if case.after is not None:
        case.after(world, r)


def test_at_least_thirty_cases():
    assert len({c.id for c in _load_cases()}) >= 30
