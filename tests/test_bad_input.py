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
    adapter: Path = None  # a lora run directory (1 step) on `model`
    mounts: Optional[tuple] = None  # (read-only fs, small tmpfs) when this process may mount
    tmp: Path = None

    @property
    def adapter_dir(self) -> Path:
        return self.adapter / "checkpoints/step-0000001"

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
    from llmctl.builtin import builtin_corpus

    corpus = d / "corpus.txt"
    corpus.write_text("\n\n".join(builtin_corpus()[:400]))
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
    w.adapter = d / "lora"
    r = run_llmctl(*w.sft_args("lora", w.adapter, "train.max_steps=1"))
    assert r.returncode == 0, r.stderr.decode()
    return w


def _load_cases() -> list[Case]:
    import badinput_recipes

    return CASES + list(badinput_recipes.CASES)


# --------------------------------------------------------------------------------------- commands, faults


def _mount_tmpfs(path: Path, size: str, ro: bool = False) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if ro else "")
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def mounts(tmp_path_factory):
    """A read-only file system and a scratch tmpfs (root only; else the cases that need them are skipped)."""
    d = tmp_path_factory.mktemp("mounts")
    ro, small = d / "ro", d / "small"
    ok = os.geteuid() == 0 and _mount_tmpfs(ro, "1m", ro=True) and _mount_tmpfs(small, "8m")
    yield (ro, small) if ok else None
    for m in (ro, small):
        subprocess.run(["umount", "-l", str(m)], capture_output=True)


def _ro(w: World) -> Path:
    if w.mounts is None:
        pytest.skip("needs root to mount a read-only tmpfs")
    return w.mounts[0]


def _copy_model(w: World, name: str) -> Path:
    import shutil

    dst = w.tmp / name
    shutil.copytree(w.model, dst)
    return dst


def _nan_model(w: World) -> Path:
    from safetensors.torch import load_file, save_file

    d = _copy_model(w, "nan-model")
    t = load_file(str(d / "model.safetensors"))
    k = next(k for k in t if k.endswith("mlp.down_proj.weight"))
    t[k][0, 0] = float("nan")
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def _truncated_model(w: World) -> Path:
    d = _copy_model(w, "cut-model")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return d


def _pickled_adapter(w: World) -> Path:
    import shutil

    d = w.tmp / "pickled"
    shutil.copytree(w.adapter_dir, d)
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")
    return d


def _damaged_run(w: World, *files: str) -> Path:
    """A copy of the pretrain run whose checkpoints all have `files` damaged."""
    import shutil

    run = w.tmp / "run"
    shutil.copytree(w.run, run)
    for ck in (run / "checkpoints").iterdir():
        for name in files:
            (ck / name).write_bytes(b"\x00garbage")
    return run


def _a_file(w: World) -> Path:
    f = w.tmp / "a-file"
    f.write_text("I am a file\n")
    return f


def _gen(w: World, *extra) -> list:
    return ["generate", "--model", w.model, "--max-new-tokens", 2, "--temperature", 0, *extra]


CASES: list[Case] = [
    # OS-level faults: one error line naming the path, exit 2
    Case("pretrain-out-dir-is-a-file", lambda w: w.pretrain_args(_a_file(w), "train.max_steps=1"), "a-file"),
    Case("pretrain-out-dir-under-a-file", lambda w: w.pretrain_args(_a_file(w) / "run", "train.max_steps=1"),
         "a-file"),
    Case("pretrain-read-only-fs", lambda w: w.pretrain_args(_ro(w) / "run", "train.max_steps=1"), "read-only"),
    Case("tokenize-train-read-only-fs", lambda w: ["tokenize", "train", w.corpus, "--vocab-size", 300, "--out",
                                                   _ro(w) / "tok"], "read-only"),
    Case("tokenize-encode-read-only-fs", lambda w: ["tokenize", "encode", w.corpus, "--tokenizer", w.tok, "--out",
                                                    _ro(w) / "shards"], "read-only"),
    Case("tasks-read-only-fs", lambda w: ["tasks", "--out", _ro(w) / "tasks", "--n-train", 5, "--n-test", 5],
         "read-only"),
    Case("lora-merge-read-only-fs", lambda w: ["lora", "merge", w.adapter_dir, "--out", _ro(w) / "merged"],
         "read-only"),
    Case("sft-read-only-fs", lambda w: w.sft_args("sft", _ro(w) / "sft", "train.max_steps=1"), "read-only"),
    # lora merge never overwrites what is there unless asked
    Case("lora-merge-into-non-empty-dir", lambda w: ["lora", "merge", w.adapter_dir, "--out", w.run], "not empty"),
    Case("lora-merge-into-its-base", lambda w: ["lora", "merge", w.adapter_dir, "--out", w.model], "base model"),
    Case("lora-merge-onto-a-file", lambda w: ["lora", "merge", w.adapter_dir, "--out", _a_file(w)], "file"),
    Case("lora-merge-missing-adapter", lambda w: ["lora", "merge", w.tmp / "nope", "--out", w.tmp / "m"], "nope"),
    # adapters and devices
    Case("adapter-is-a-pretrain-run", lambda w: _gen(w, "--adapter", w.run, "hi"), "not a LoRA adapter"),
    Case("adapter-is-a-model-dir", lambda w: _gen(w, "--adapter", w.model, "hi"), "not a LoRA adapter"),
    Case("adapter-pickled-bin", lambda w: _gen(w, "--adapter", _pickled_adapter(w), "hi"), "pickled"),
    Case("generate-device-cuda-absent", lambda w: _gen(w, "--device", "cuda", "hi"), "cuda"),
    Case("generate-device-unknown", lambda w: _gen(w, "--device", "tpu9", "hi"), "tpu9"),
    Case("eval-device-cuda-absent", lambda w: ["eval", "--model", w.model, "--task", "ppl", "--data", w.corpus,
                                               "--device", "cuda:0", "--limit", 2], "cuda"),
    # damaged or non-finite models
    Case("generate-nan-weights", lambda w: _gen(w, "--model", _nan_model(w), "hi"), "non-finite"),
    Case("sft-init-from-nan-weights", lambda w: w.sft_args("sft", w.tmp / "o", "train.max_steps=1",
                                                          f"init_from={_nan_model(w)}"), "non-finite"),
    Case("generate-truncated-safetensors", lambda w: _gen(w, "--model", _truncated_model(w), "hi"), "cannot read"),
    Case("sft-diverges-stops", lambda w: w.sft_args("sft", w.tmp / "o", "train.max_steps=12", "train.max_bad_steps=3",
                                                   "optim.lr=1e30", "optim.warmup_steps=0"), "non-finite",
         after=lambda w, r: b"3 steps in a row" in r.stderr),
    # a run whose every checkpoint is damaged is not silently restarted
    Case("resume-all-checkpoints-damaged", lambda w: w.pretrain_args(_damaged_run(w, "optimizer.pt"),
                                                                      "train.max_steps=3"), "no checkpoint"),
    Case("resume-damaged-trainer-state", lambda w: w.pretrain_args(_damaged_run(w, "trainer_state.json"),
                                                                    "train.max_steps=3"), "trainer_state.json"),
]


# --------------------------------------------------------------------------------------- the harness


@pytest.mark.parametrize("case", _load_cases(), ids=lambda c: c.id)
def test_bad_input(case: Case, world: World, mounts, tmp_path):
    world.tmp, world.mounts = tmp_path, mounts
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
    print(f"{case.id}: {errors[0]}")  # shown with -s
    assert _digest(world.root) == before, "an earlier output changed"
    if case.after is not None:
        assert case.after(world, r) is not False, err[-3000:]


def test_at_least_thirty_cases():
    assert len({c.id for c in _load_cases()}) >= 30


# --------------------------------------------------------------------------------------- faults mid-run


def _fill(mount: Path, leave: int) -> None:
    """Fill the file system at `mount` until `leave` bytes stay free."""
    st = os.statvfs(mount)
    free = st.f_bavail * st.f_frsize
    with open(mount / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.pt"])
def test_full_disk_while_saving_keeps_the_earlier_checkpoint(world, mounts, victim):
    """ENOSPC while writing a checkpoint file: one error line naming it, exit 2, no temporary step directory left,
    and the earlier checkpoint untouched (byte for byte) and loading in transformers with the same logits."""
    if mounts is None:
        pytest.skip("needs root to mount a small tmpfs")
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    small = mounts[1]
    for p in small.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    run = small / "run"
    r = run_llmctl(*world.pretrain_args(run, "train.max_steps=1"))
    assert r.returncode == 0, r.stderr.decode()
    step1 = run / "checkpoints/step-0000001"
    before = _digest(step1)
    x = torch.tensor([[1, 5, 9, 42, 7]])
    ref = AutoModelForCausalLM.from_pretrained(step1).eval()(x).logits
    sizes = {p.name: p.stat().st_size for p in step1.iterdir()}
    leave = sizes["model.safetensors"] // 2 if victim == "model.safetensors" else \
        sizes["model.safetensors"] + sizes["optimizer.pt"] // 2 + 64 * 1024
    _fill(small, leave)
    r = run_llmctl(*world.pretrain_args(run, "train.max_steps=2"))
    err = r.stderr.decode()
    assert r.returncode == 2 and "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0], errors
    assert victim in errors[0] or "step-0000002" in errors[0], errors[0]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000001"]
    assert _digest(step1) == before
    (small / "filler").unlink()
    got = AutoModelForCausalLM.from_pretrained(step1).eval()(x).logits
    assert torch.equal(got, ref)
    # with room again, the same command resumes from step 1 and completes
    r = run_llmctl(*world.pretrain_args(run, "train.max_steps=2"))
    assert r.returncode == 0 and (run / "checkpoints/step-0000002").is_dir(), r.stderr.decode()[-2000:]


@pytest.mark.parametrize("how", ["closed", "reader-gone"])
def test_closed_stderr_does_not_stop_training(world, tmp_path, how):
    """`llmctl pretrain ... 2>&-` and `... 2>&1 >/dev/null | head -1`: the run trains to max_steps, exit 0, and its
    checkpoints load."""
    from llmctl.hf import load_model

    out = tmp_path / "run"
    argv = [sys.executable, "-m", "llmctl", *map(str, world.pretrain_args(out, "train.max_steps=6",
                                                                         "train.save_every=3"))]
    if how == "closed":
        code = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=None, cwd=ROOT,
                              pass_fds=(), preexec_fn=lambda: os.close(2)).returncode
    else:
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
        p.stderr.readline()  # like `head -1`
        p.stderr.close()
        code = p.wait(timeout=300)
    assert code == 0
    steps = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert steps == ["step-0000003", "step-0000006"]
    for s in steps:
        load_model(out / "checkpoints" / s)


@pytest.mark.parametrize("damage", ["trainer_state.json", "optimizer.pt", "rng.pt", "model.safetensors"])
def test_damaged_newest_checkpoint_resumes_from_the_one_before(world, tmp_path, damage):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    f = run / "checkpoints/step-0000002" / damage
    f.write_bytes(f.read_bytes()[: max(1, f.stat().st_size // 3)])
    r = run_llmctl(*world.pretrain_args(run, "train.max_steps=3"))
    err = r.stderr.decode()
    assert r.returncode == 0, err[-3000:]
    warn = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warn) == 1 and "step-0000002" in warn[0] and damage in warn[0] and "step-0000001" in warn[0], warn
    assert "resuming from" in err and "step-0000001" in err
    assert (run / "checkpoints/step-0000003").is_dir()


def test_pruning_leftovers_and_killed_scratch_are_cleaned(world, tmp_path):
    """A kill mid-prune leaves `.del-step-*` (never taken for a checkpoint); a killed `tokenize encode` leaves its
    scratch folders (named by its pid): the next run removes both."""
    import shutil
    import tempfile

    from llmctl.checkpoint import latest_checkpoint, list_checkpoints

    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    half = run / "checkpoints/.del-step-0000009"
    shutil.copytree(run / "checkpoints/step-0000002", half)
    (half / "model.safetensors").unlink()
    assert [s for s, _ in list_checkpoints(run)] == [1, 2] and latest_checkpoint(run).name == "step-0000002"
    r = run_llmctl(*world.pretrain_args(run, "train.max_steps=3", "train.keep_last=2"))
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002", "step-0000003"]

    dead = 2**22 + 12345  # above the default pid_max, so no live process has it
    scratch = Path(tempfile.gettempdir()) / f"llmctl-datasets-{dead}-abc"
    shards_tmp = tmp_path / f".shards.tmp-{dead}-xyz"
    for d in (scratch, shards_tmp):
        d.mkdir()
        (d / "part").write_bytes(b"x" * 100)
    r = run_llmctl("tokenize", "encode", world.corpus, "--tokenizer", world.tok, "--out", tmp_path / "shards")
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert not scratch.exists() and not shards_tmp.exists()
    assert not list(Path(tempfile.gettempdir()).glob(f"llmctl-datasets-{dead}-*"))


def test_diverged_run_stops_and_the_last_good_checkpoint_loads(tmp_path):
    """Steps 1-2 are finite; from step 3 every loss is NaN: after train.max_bad_steps skipped steps in a row the
    run stops with a UserError naming the last checkpoint, which loads with the last good (step-2) weights."""
    import math

    import torch

    from llmctl import hf, loop
    from llmctl.config import PretrainRecipe, load_recipe
    from llmctl.dist import Dist
    from llmctl.errors import UserError
    from llmctl.model import ModelConfig, Transformer

    recipe = load_recipe(ROOT / "recipes/tiny/pretrain.yaml",
                         [f"out_dir={tmp_path / 'run'}", *TINY, "train.max_steps=20", "train.save_every=1",
                          "train.keep_last=0", "train.max_bad_steps=4"], PretrainRecipe)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(arch="llama", vocab_size=64, n_layer=1, n_head=2, n_embd=32, block_size=16))
    x = torch.randint(0, 64, (2, 16))
    calls = []

    def loss(m, b):
        calls.append(1)
        out = m(b["idx"], b["targets"])
        return out if len(calls) <= 2 else out * math.nan

    task = loop.Task(model=model, batches=lambda step: [{"idx": x, "targets": x}], loss=loss,
                     count=lambda b: b["targets"].numel(), save_model=lambda m, d: hf.save_model(m, d))
    with pytest.raises(UserError, match="4 steps in a row") as e:
        loop.train(recipe, task, Dist("fp32"))
    # steps 3-5 were skipped (their checkpoints hold the step-2 weights); step 6 was the 4th bad one: not saved
    assert "step-0000005, is intact" in str(e.value)
    cks = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    assert cks == [f"step-{i:07d}" for i in range(1, 6)]
    back = hf.load_model(tmp_path / "run")
    two = hf.load_model(tmp_path / "run/checkpoints/step-0000002")
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), two.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))
