"""`llmctl rlhf` methods reward and dpo (llmctl/stages/reward.py, dpo.py): the losses through the stage equal the papers'
formulas on log-probs / scores computed independently, one sequence at a time; LoRA DPO's reference is the base
with adapters off and no second copy; resume = uninterrupted; a reward checkpoint loads in transformers with the
same scores; bad data exits 2 naming FILE:LINE."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_llama

from llmctl import examples, hf
from llmctl.stages import dpo as dpo_stage
from llmctl.stages import reward
from llmctl.config import RlhfRecipe, load_recipe
from llmctl.dist import Dist
from llmctl.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]

ROWS = [
    {"prompt": "What is 12 + 30?", "chosen": "42", "rejected": "43"},
    {"prompt": "Is 7 even or odd?", "chosen": "odd", "rejected": "even"},
    {"prompt": "Reverse the word abc.", "chosen": "cba", "rejected": "bca"},
    {"prompt": "What comes after 99?", "chosen": "100", "rejected": "98"},
    {"prompt": "Sort the digits 3 1 2.", "chosen": "1 2 3", "rejected": "1 3 2"},
    {"prompt": "Uppercase the word hat.", "chosen": "HAT", "rejected": "HAY"},
]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tok_dir):
    d = tmp_path_factory.mktemp("pref")
    base = save_tiny_llama(d / "base", tok_dir, block_size=64)
    train = write_rows(d / "train.jsonl", ROWS * 2)
    val = write_rows(d / "val.jsonl", ROWS[:4])
    recipe = d / "r.yaml"
    recipe.write_text(f"init_from: {base}\ndata:\n  train: {train}\n  val: {val}\n"
                      "train:\n  micro_batch_size: 3\n  grad_accum: 2\n  log_every: 1\n  eval_every: 2\n"
                      "  save_every: 2\noptim:\n  lr: 1.0e-3\n  warmup_steps: 0\n  schedule: constant\n"
                      "lora:\n  r: 4\n  dropout: 0.0\n")
    return d, recipe, base


def recipe_of(setup, *overrides):
    d, recipe, _ = setup
    return load_recipe(recipe, [f"out_dir={d / 'unused'}", *overrides], RlhfRecipe)


def seq_logp(model, ex) -> float:
    """Summed log p of the supervised tokens of one example, the sequence alone in its batch."""
    ids = torch.from_numpy(ex.ids)
    with torch.no_grad():
        logp = model(ids[None, :-1])[0].double().log_softmax(-1)  # [n-1, V]
    tgt = ids[1:]
    keep = torch.from_numpy(ex.mask[1:])
    return float(logp[torch.arange(len(tgt)), tgt][keep].sum())


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def perturb(model, seed=1, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def test_pairs_encode_like_sft_with_the_response_supervised(setup, tok_dir):
    tok = load_tokenizer(tok_dir)
    for chat in (True, False):
        (c_ids, c_mask), (r_ids, r_mask) = examples.encode_preference(tok, ROWS[0], chat)
        sup = lambda ids, mask: tok.decode([t for t, m in zip(ids, mask) if m])  # noqa: E731
        end = "<|im_end|>" if chat else "<|eos|>"
        assert sup(c_ids, c_mask) == "42" + end and sup(r_ids, r_mask) == "43" + end
        n = c_mask.index(1)  # the prompt is shared
        assert c_ids[:n] == r_ids[:n] and "What is 12 + 30?" in tok.decode(c_ids[:n])
    # chosen rows first, then rejected; targets only on response tokens
    pairs = examples.load_pairs(setup[1].parent / "train.jsonl", tok, True, 64)
    b = examples.collate_pairs(pairs[:2])
    assert b["idx"].shape[0] == 4 and torch.equal(b["idx"][0, :5], torch.from_numpy(pairs[0].chosen.ids[:5]))
    assert int((b["targets"] != -100).sum()) == sum(int(p.chosen.mask[1:].sum() + p.rejected.mask[1:].sum())
                                                    for p in pairs[:2])


@pytest.mark.parametrize("dpo", [["dpo.beta=0.5"], ["dpo.beta=0.2", "dpo.label_smoothing=0.2"],
                                 ["dpo.beta=0.5", "dpo.loss_type=ipo"]], ids=["sigmoid", "cdpo", "ipo"])
def test_dpo_loss_through_the_stage_equals_the_formula(setup, dpo):
    _, _, base = setup
    rc = recipe_of(setup, "method=dpo", *dpo)
    built = dpo_stage.build(rc, Dist("fp32"))
    model, task = built.task.model, built.task
    perturb(model)  # the policy moves away from its reference (whose log-probs are already computed)
    ref = hf.load_model(base)
    batch = task.batches(1)[1]
    ix = [task.batches.order[i] for i in range(9, 12)]  # step 1, micro-step 1 of 3-pair micro-batches
    assert task.count(batch) == 3 and torch.equal(batch["idx"][0, :4], torch.from_numpy(built.train[ix[0]].chosen.ids[:4]))
    with torch.no_grad():
        got = task.loss(model, batch).item()
    beta, ls, kind = rc.dpo.beta, rc.dpo.label_smoothing, rc.dpo.loss_type
    want, right = 0.0, 0
    for i in ix:
        p = built.train[i]
        pc, pr, rfc, rfr = seq_logp(model, p.chosen), seq_logp(model, p.rejected), seq_logp(ref, p.chosen), \
            seq_logp(ref, p.rejected)  # fmt: skip
        assert abs(built.ref[i, 0].item() - rfc) < 1e-3 and abs(built.ref[i, 1].item() - rfr) < 1e-3
        h = (pc - rfc) - (pr - rfr)
        if kind == "ipo":
            want += (h - 1 / (2 * beta)) ** 2
        else:
            want += -(1 - ls) * log_sigmoid(beta * h) - ls * log_sigmoid(-beta * h)
        right += h > 0
    assert abs(got - want) <= 1e-4 * max(1.0, abs(want)), (got, want)
    assert task.stats()["accuracy"] == right / 3


def test_reward_loss_through_the_stage_equals_the_formula(setup):
    rc = recipe_of(setup, "method=reward", "data.chat=false")
    built = reward.build(rc, Dist("fp32"))
    model, task = built.task.model, built.task
    batch = task.batches(0)[0]
    ix = [task.batches.order[i] for i in range(3)]
    with torch.no_grad():
        got = task.loss(model, batch).item()

        def score(ex):  # the head on the hidden state of the last token, the sequence alone
            h = model.backbone(torch.from_numpy(ex.ids)[None], return_hidden=True)[0, -1]
            return float(h.double() @ model.score.weight[0].double())

        margins = [score(built.train[i].chosen) - score(built.train[i].rejected) for i in ix]
    assert (batch["idx"] == built.tok.pad_id).any()  # really padded (right), with the pad id
    want = sum(-log_sigmoid(m) for m in margins)
    assert abs(got - want) <= 1e-4 * max(1.0, want), (got, want)
    st = task.stats()
    assert st["accuracy"] == sum(m > 0 for m in margins) / 3 and abs(st["margin"] - sum(margins) / 3) < 1e-4


def test_lora_dpo_reference_is_the_base_with_no_second_copy(setup, monkeypatch):
    _, _, base = setup
    ref = hf.load_model(base)
    loads = []
    real = hf.load_model
    monkeypatch.setattr(hf, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    built = dpo_stage.build(recipe_of(setup, "method=dpo", "lora.enabled=true"), Dist("fp32"))
    assert len(loads) == 1 and built.policy._ref is None  # the base, once: no reference copy
    assert all("lora_" in n for n, p in built.task.model.named_parameters() if p.requires_grad)
    for i, p in enumerate(built.train):
        assert abs(built.ref[i, 0].item() - seq_logp(ref, p.chosen)) < 1e-3
        assert abs(built.ref[i, 1].item() - seq_logp(ref, p.rejected)) < 1e-3
    perturb(built.task.model, scale=0.2)  # the adapters now change the policy; the reference stays the base
    ex = built.train[0].chosen
    with built.policy.reference() as r:
        assert r is built.task.model and abs(seq_logp(r, ex) - seq_logp(ref, ex)) < 1e-4
    assert abs(seq_logp(built.task.model, ex) - seq_logp(ref, ex)) > 1e-2
    assert len(loads) == 1


def events(run):
    ev = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(e["step"], e["loss"], e["accuracy"]) for e in ev if "loss" in e], \
        [(e["step"], e["val_loss"], e["val_acc"]) for e in ev if "val_loss" in e]  # fmt: skip


def train(setup, out, *overrides):
    recipe = recipe_of(setup, f"out_dir={out}", *overrides)
    return {"reward": reward, "dpo": dpo_stage}[recipe.method].run(recipe)


@pytest.mark.parametrize("method", [["method=reward"], ["method=dpo"], ["method=dpo", "lora.enabled=true"]],
                         ids=["reward", "dpo", "dpo-lora"])
def test_resume_equals_uninterrupted(setup, method, capsys):
    d = setup[0]
    name = "-".join(m.split("=")[1] for m in method)
    straight, split = d / f"{name}-straight", d / f"{name}-split"
    train(setup, straight, *method, "train.max_steps=4")
    train(setup, split, *method, "train.max_steps=2")
    capsys.readouterr()
    train(setup, split, *method, "train.max_steps=4")
    assert "resuming from" in capsys.readouterr().err
    a, b = events(straight), events(split)
    assert a == b and len(a[0]) == 4 and [s for s, *_ in a[1]] == [0, 2, 4]
    ck = split / "checkpoints/step-0000004"
    assert (ck / ("adapter_config.json" if "lora.enabled=true" in method else "config.json")).is_file()


def test_reward_checkpoint_loads_in_transformers_with_the_same_scores(setup):
    from transformers import AutoModelForSequenceClassification

    from llmctl.reward import load_reward_model

    d = setup[0]
    run = d / "reward-straight"
    if not run.exists():
        train(setup, run, "method=reward", "train.max_steps=4")
    ck = run / "checkpoints/step-0000004"
    assert json.loads((ck / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    tok = load_tokenizer(ck)
    pairs = examples.load_pairs(d / "train.jsonl", tok, True, 64)[:4]
    b = examples.pad_right([p.chosen.ids for p in pairs] + [p.rejected.ids for p in pairs], tok.pad_id)  # right-padded with the pad id
    with torch.no_grad():
        ours = load_reward_model(run)(b["idx"], b["attention_mask"])
        theirs = AutoModelForSequenceClassification.from_pretrained(str(ck)).eval()(
            input_ids=b["idx"], attention_mask=b["attention_mask"]).logits[:, 0]
    assert (ours - theirs).abs().max() <= 1e-4 and ours.std() > 0


def llmctl(*args):
    return subprocess.run([sys.executable, "-m", "llmctl", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("case", ["bad-row", "lora-reward"])
def test_cli_errors_exit_2(setup, tmp_path, case):
    _, recipe, _ = setup
    args = [f"out_dir={tmp_path / 'run'}"]
    if case == "bad-row":
        bad = write_rows(tmp_path / "bad.jsonl", [ROWS[0], {"prompt": "p", "chosen": 3, "rejected": "x"}])
        args += ["method=dpo", f"data.train={bad}"]
        message = f'{bad}:2: field "chosen" must be a string'
    else:
        args += ["method=reward", "lora.enabled=true"]
        message = "lora.enabled is for dpo"
    r = llmctl("rlhf", recipe, *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
