"""The training loop through `llmctl pretrain`: resume = uninterrupted, accumulation = large batch,
2 processes = 1 process, val_loss = transformers' loss, signals, non-finite losses, error lines."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import sigterm_after_losses

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/tiny/pretrain.yaml"
TINY = ["model.n_layer=2", "model.n_head=4", "model.n_kv_head=2", "model.n_embd=64", "model.block_size=32",
        "train.micro_batch_size=4", "train.log_every=1", "train.eval_every=4", "train.eval_batches=2",
        "optim.warmup_steps=2", "optim.lr=1e-2"]


def llmctl(*args, env=None, check=True):
    r = subprocess.run([sys.executable, "-m", "llmctl", *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, cwd=ROOT)
    if check:
        assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    corpus = d / "corpus.txt"
    from llmctl.builtin import builtin_corpus

    docs = builtin_corpus()
    corpus.write_text("\n\n".join(docs[:800]))
    llmctl("tokenize", "train", corpus, "--vocab-size", 512, "--out", d / "tok")
    llmctl("tokenize", "encode", corpus, "--tokenizer", d / "tok", "--out", d / "shards", "--val-fraction", 0.05)
    return d


def pretrain(data, out, *extra, env=None, check=True, launcher=None):
    args = [RECIPE, f"out_dir={out}", f"tokenizer={data / 'tok'}", f"data.train={data / 'shards'}", *TINY, *extra]
    if launcher is None:
        return llmctl("pretrain", *args, env=env, check=check)
    r = subprocess.run([*launcher, "-m", "llmctl", "pretrain", *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def events(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def losses(out):
    return {e["step"]: e["loss"] for e in events(out) if "loss" in e}


def test_run_directory_layout_and_metrics(data, tmp_path):
    out = tmp_path / "run"
    r = pretrain(data, out, "train.max_steps=8", "train.save_every=4", "train.keep_last=0")
    assert r.stdout == ""  # results only on stdout; logs on stderr
    assert (out / "config.yaml").exists()
    steps = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert steps == ["step-0000004", "step-0000008"]
    ck = out / "checkpoints/step-0000008"
    for f in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
              "tokenizer_config.json", "optimizer.pt", "rng.pt", "trainer_state.json"):
        assert (ck / f).exists(), f
    ev = events(out)
    train = [e for e in ev if "loss" in e]
    assert [e["step"] for e in train] == list(range(1, 9))
    assert all({"loss", "lr", "tokens", "tok_per_s"} <= e.keys() for e in train)
    assert train[-1]["tokens"] == 8 * 4 * 32
    evals = [e for e in ev if "val_loss" in e]
    assert [e["step"] for e in evals] == [0, 4, 8] and all("val_bpb" in e for e in evals)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]


def test_keep_last_prunes_old_checkpoints(data, tmp_path):
    out = tmp_path / "run"
    pretrain(data, out, "train.max_steps=6", "train.save_every=2", "train.keep_last=2")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000004", "step-0000006"]


def test_resume_equals_uninterrupted(data, tmp_path):
    # N steps, then the same command with the horizon 2N resumes at N; a constant schedule after warmup makes
    # the first N steps identical to those of the straight 2N-step run.
    straight, split = tmp_path / "straight", tmp_path / "split"
    const = ["optim.schedule=constant", "train.eval_every=3"]
    pretrain(data, straight, "train.max_steps=8", *const)
    pretrain(data, split, "train.max_steps=4", *const)
    r = pretrain(data, split, "train.max_steps=8", *const)
    assert "resuming" in r.stderr
    a, b = losses(straight), losses(split)
    assert sorted(b) == list(range(1, 9))
    for s in range(1, 9):
        assert b[s] == a[s], (s, b[s], a[s])
    ev = events(split)
    assert [e["step"] for e in ev if "loss" in e] == list(range(1, 9))  # nothing logged twice
    assert [e["step"] for e in ev if "val_loss" in e] == [0, 3, 4, 6, 8]


def test_grad_accumulation_equals_large_batch(data, tmp_path):
    big, acc = tmp_path / "big", tmp_path / "acc"
    pretrain(data, big, "train.max_steps=4", "train.micro_batch_size=8", "train.grad_accum=1")
    pretrain(data, acc, "train.max_steps=4", "train.micro_batch_size=4", "train.grad_accum=2")
    a, b = losses(big), losses(acc)
    for s in a:
        assert math.isclose(a[s], b[s], rel_tol=1e-5), (s, a[s], b[s])


LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533"],
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", "29534"],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_processes_equal_one(data, tmp_path, launcher):
    one, two = tmp_path / "one", tmp_path / "two"
    pretrain(data, one, "train.max_steps=4", "train.micro_batch_size=4", "train.grad_accum=2")
    r = pretrain(data, two, "train.max_steps=4", "train.micro_batch_size=4", "train.grad_accum=1",
                 launcher=LAUNCHERS[launcher], env={"OMP_NUM_THREADS": "1"})
    assert "2 process(es)" in r.stderr
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        assert math.isclose(a[s], b[s], rel_tol=1e-5), (s, a[s], b[s])
    va = [e["val_loss"] for e in events(one) if "val_loss" in e]
    vb = [e["val_loss"] for e in events(two) if "val_loss" in e]
    assert np.allclose(va, vb, rtol=1e-5)


def test_transformers_loss_matches_val_loss(data, tmp_path):
    transformers = pytest.importorskip("transformers")
    from llmctl.shards import TokenShards
    from llmctl.stages.pretrain import val_windows

    out = tmp_path / "run"
    pretrain(data, out, "train.max_steps=4")
    val = [e for e in events(out) if "val_loss" in e][-1]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "checkpoints/step-0000004").eval()
    shards = TokenShards(data / "shards", "val")
    w = shards.get(val_windows(shards, 32, 4 * 2), 33)
    with torch.no_grad():
        logits = hf(w[:, :-1]).logits.float()
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten()).item()
    assert math.isclose(loss, val["val_loss"], rel_tol=1e-4), (loss, val["val_loss"])


def test_sigterm_saves_at_step_boundary_and_the_same_command_resumes_exactly(data, tmp_path):
    """Interrupt a cosine-schedule run with SIGTERM, run the very same command again: every loss equals those
    of an uninterrupted run."""
    steps = ["train.max_steps=150", "train.save_every=0", "train.eval_every=50"]
    straight, out = tmp_path / "straight", tmp_path / "run"
    pretrain(data, straight, *steps)
    args = [sys.executable, "-m", "llmctl", "pretrain", RECIPE, f"out_dir={out}", f"tokenizer={data / 'tok'}",
            f"data.train={data / 'shards'}", *TINY, *steps]
    code, err = sigterm_after_losses(args, out, 3)
    assert code == 143, err  # stopped by SIGTERM: checkpoint saved, exit 128 + 15
    assert "SIGTERM" in err
    first = max(losses(out))
    assert first < 150, "the run ended before the signal arrived"
    assert [c.name for c in (out / "checkpoints").iterdir()] == [f"step-{first:07d}"]
    r = pretrain(data, out, *steps)
    assert "resuming" in r.stderr
    a, b = losses(straight), losses(out)
    assert sorted(b) == list(range(1, 151))
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]][:3]
    va = {e["step"]: e["val_loss"] for e in events(straight) if "val_loss" in e}
    vb = {e["step"]: e["val_loss"] for e in events(out) if "val_loss" in e}
    assert va == vb


def test_nonfinite_loss_never_reaches_weights(data, tmp_path):
    from llmctl import loop
    from llmctl.config import PretrainRecipe, load_recipe
    from llmctl.dist import Dist
    from llmctl.model import ModelConfig, Transformer

    recipe = load_recipe(RECIPE, [f"out_dir={tmp_path / 'run'}", *TINY, "train.max_steps=3", "train.save_every=0"],
                         PretrainRecipe)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(arch="llama", vocab_size=64, n_layer=1, n_head=2, n_embd=32, block_size=16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 64, (2, 16))
    task = loop.Task(model=model, batches=lambda step: [{"idx": x, "targets": x}],
                     loss=lambda m, b: m(b["idx"], b["targets"]) * float("nan"),
                     count=lambda b: b["targets"].numel(), save_model=lambda m, d: None)
    last = loop.train(recipe, task, Dist("fp32"))
    assert not math.isfinite(last["loss"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert json.loads((tmp_path / "run/checkpoints/step-0000003/trainer_state.json").read_text())["skipped"] == 3


def test_data_errors_exit_2(data, tmp_path):
    r = pretrain(data, tmp_path / "r", "data.train=/nonexistent/shards", check=False)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    other = tmp_path / "tok2"
    llmctl("tokenize", "train", data / "corpus.txt", "--vocab-size", 300, "--out", other)
    r = pretrain(data, tmp_path / "r", f"tokenizer={other}", check=False)
    assert r.returncode == 2 and "another tokenizer" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # a resumed run whose recipe changed the model is refused, and the checkpoint is left alone
    out = tmp_path / "run"
    pretrain(data, out, "train.max_steps=2")
    r = pretrain(data, out, "train.max_steps=4", "model.n_layer=3", check=False)
    assert r.returncode == 2 and "incompatible checkpoint" in r.stderr
    assert (out / "checkpoints/step-0000002/model.safetensors").exists()


def test_val_dir_encoded_on_its_own_validates_on_its_tokens(data, tmp_path):
    """data.val=DIR with no val split (`tokenize encode held_out.txt --val-fraction 0`, the usual way to hold out
    a separate file) validates on all of DIR, saying so once; the figures are DIR's, not data.train's."""
    from llmctl.builtin import builtin_corpus

    held = tmp_path / "held_out.txt"
    held.write_text("\n\n".join(builtin_corpus()[-5:]))  # in data.train too: what matters is what is scored
    llmctl("tokenize", "encode", held, "--tokenizer", data / "tok", "--out", tmp_path / "val", "--val-fraction", 0)
    r = pretrain(data, tmp_path / "run", f"data.val={tmp_path / 'val'}", "train.max_steps=2")
    notes = [line for line in r.stderr.splitlines() if line.startswith("data.val:")]
    assert len(notes) == 1 and "has no val split; validating on its train split" in notes[0], r.stderr
    ours = [e for e in events(tmp_path / "run") if "val_loss" in e]
    assert [e["step"] for e in ours] == [0, 2]
    pretrain(data, tmp_path / "default", "train.max_steps=2")
    theirs = [e for e in events(tmp_path / "default") if "val_loss" in e]
    assert ours[0]["val_loss"] != theirs[0]["val_loss"]  # the same initial weights, other tokens


def test_shards_of_another_vocabulary_are_refused_before_training(data, tmp_path):
    """Shards whose meta.json names this tokenizer (hash) but whose ids and vocabulary are larger than its."""
    import shutil

    from llmctl.tokenizer import load_tokenizer

    other = tmp_path / "tok300"
    llmctl("tokenize", "train", data / "corpus.txt", "--vocab-size", 300, "--out", other)
    bad = tmp_path / "shards"
    shutil.copytree(data / "shards", bad)
    meta = json.loads((bad / "meta.json").read_text())
    meta["tokenizer_hash"] = load_tokenizer(other).hash()
    (bad / "meta.json").write_text(json.dumps(meta))
    r = pretrain(data, tmp_path / "run", f"tokenizer={other}", f"data.train={bad}", check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data.train: "), r.stderr
    assert "for a vocabulary of 512" in lines[0] and "the tokenizer and the model have 300" in lines[0]
    assert not (tmp_path / "run").exists()
