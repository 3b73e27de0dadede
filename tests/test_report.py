"""The report card: lineage across stages (a real pretrain run, then a stage that starts from its checkpoint),
the markdown lists every stage with its metrics and evaluations, and curves.png is a valid PNG with labelled axes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from llmctl.cli import app

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.n_layer=2", "model.n_head=4", "model.n_kv_head=2", "model.n_embd=64", "model.block_size=32",
        "train.micro_batch_size=4", "train.log_every=1", "train.eval_every=4", "train.eval_batches=1",
        "train.max_steps=8", "train.save_every=4", "train.keep_last=0", "optim.warmup_steps=2", "optim.lr=1e-2"]


def llmctl(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.stderr
    return r.stdout, r.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus_file, tok_dir):
    """A pretrain run (8 steps) and an `sft`-shaped run whose recipe starts from the pretrain's step-4 checkpoint
    (sft itself is another issue: its run directory is written here the way the loop writes one)."""
    from llmctl.shards import encode_corpus
    from llmctl.hf import load_model, save_model
    from llmctl.tokenizer import load_tokenizer

    d = tmp_path_factory.mktemp("runs")
    encode_corpus([str(corpus_file)], load_tokenizer(tok_dir), d / "shards", val_fraction=0.05)
    llmctl("pretrain", ROOT / "recipes/tiny/pretrain.yaml", f"out_dir={d / 'pre'}", f"tokenizer={tok_dir}",
           f"data.train={d / 'shards'}", *TINY)  # fmt: skip
    sft = d / "sft"
    base = d / "pre" / "checkpoints" / "step-0000004"
    ck = sft / "checkpoints" / "step-0000003"
    save_model(load_model(base), ck, tokenizer_dir=base)
    (ck / "trainer_state.json").write_text(json.dumps({"step": 3, "tokens": 300, "skipped": 0}))
    (sft / "config.yaml").write_text(yaml.safe_dump({"out_dir": str(sft), "seed": 1, "init_from": str(base),
                                                     "data": {"train": "chat.jsonl"}}))  # fmt: skip
    events = [{"step": s, "loss": 3.0 - 0.1 * s, "lr": 1e-4, "tokens": 100 * s, "tok_per_s": 1000.0} for s in (1, 2, 3)]
    events += [{"step": 3, "val_loss": 2.5}, {"step": 9, "loss": 9.9, "tokens": 900}]  # step 9: after the checkpoint
    (sft / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return d


def test_report_lists_every_stage_with_metrics_and_curves(runs, corpus_file, tmp_path):
    from PIL import Image

    rep = tmp_path / "report"
    out, err = llmctl("eval", "--model", runs / "sft", "--task", "bpb", "--data", corpus_file, "--limit", 20,
                      "--context", 32, "--report", rep, "--lineage", "--json")  # fmt: skip
    doc = json.loads(out)
    assert [Path(s["model"]).name for s in doc["stages"]] == ["step-0000004", "step-0000003"]
    assert doc["report"] == str(rep / "report.md") and "report:" in err

    md = (rep / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(rows) == 2
    assert "| pre | pretrain |" in rows[0] and "step-0000004" in rows[0]
    assert "| sft | sft |" in rows[1] and "step-0000003" in rows[1] and "| 2.5000 |" in rows[1]
    assert "| bpb (corpus.txt) |" in md
    for row, stage in zip(rows, doc["stages"]):  # each stage's evaluation in its row
        assert f"{stage['metrics']['bpb']:.4f}" in row
    pre_tokens = json.loads((runs / "pre/checkpoints/step-0000004/trainer_state.json").read_text())["tokens"]
    assert f"| {pre_tokens:,} |" in rows[0] and "| 300 |" in rows[1]
    assert "tokens seen" in md and "parameters" in md and "## Recipes" in md and "init_from" in md
    assert "9.9" not in md  # metrics after the evaluated checkpoint are not the stage's

    png = rep / "curves.png"
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
        axes = json.loads(im.text["Axes"])
    assert len(axes) == 2 and all(x and y for x, y in axes)
    assert axes[0][1].startswith("training loss") and axes[1][1].startswith("validation bits per byte")
    assert "](curves.png)" in md

    # a second evaluation into the same report adds to it
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"question": "1 + 1 =", "choices": ["2", "3"], "answer": 0}) + "\n")
    llmctl("eval", "--model", runs / "sft", "--task", "mc", "--data", mc, "--report", rep)
    md = (rep / "report.md").read_text()
    assert "| mc acc (mc.jsonl) | mc acc_norm (mc.jsonl) |" in md
    assert len((rep / "evals.jsonl").read_text().splitlines()) == 3
    # another file of the same name (e.g. tasks-alt/rl_test.jsonl next to tasks/rl_test.jsonl): its own columns
    (tmp_path / "other").mkdir()
    mc2 = tmp_path / "other" / "mc.jsonl"
    mc2.write_text(json.dumps({"question": "2 + 2 =", "choices": ["5", "4"], "answer": 1}) + "\n")
    llmctl("eval", "--model", runs / "sft", "--task", "mc", "--data", mc2, "--report", rep)
    md = (rep / "report.md").read_text()
    assert f"mc acc ({tmp_path.name}/mc.jsonl)" in md and "mc acc (other/mc.jsonl)" in md


def test_report_without_a_task_and_for_a_plain_model_dir(runs, tmp_path):
    from llmctl.report import lineage, write_report

    assert [s.kind for s in lineage(runs / "sft")] == ["pretrain", "sft"]
    assert [s.step for s in lineage(runs / "pre")] == [8]  # a run directory means its newest checkpoint
    out, _ = llmctl("eval", "--model", runs / "pre", "--report", tmp_path / "r1")
    assert out == "" and "| 1 | pre | pretrain |" in (tmp_path / "r1/report.md").read_text()

    plain = tmp_path / "plain"
    shutil.copytree(runs / "pre/checkpoints/step-0000008", plain)
    w = write_report(plain, tmp_path / "r2")
    md = Path(w["report"]).read_text()
    assert w["stages"] == ["plain"] and w["png"] is None and "| 1 | plain | model |" in md and "No curves" in md
