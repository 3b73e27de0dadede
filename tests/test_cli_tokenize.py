"""`llmctl tokenize` end to end: train, encode to shards, stdin encode / decode, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmctl.cli import app
from llmctl.shards import TokenShards

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def llmctl(*args, input=None):
    """Run the CLI in this process; returns (exit_code, stdout, stderr)."""
    r = runner.invoke(app, [str(a) for a in args], input=input)
    return r.exit_code, r.stdout, r.stderr


def llmctl_proc(*args, input=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LLMCTL_DEBUG": ""}
    r = subprocess.run([sys.executable, "-m", "llmctl", *map(str, args)], input=input, capture_output=True,
                       text=True, env=env, cwd=ROOT)
    return r.returncode, r.stdout, r.stderr


def assert_user_error(code, out, err, match, streamed=False):
    assert code == 2, (out, err)
    assert streamed or out == ""  # a stream has written the lines before the bad one
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], err
    assert "Traceback" not in err


def test_train_encode_and_stream_round_trip(corpus_file, tmp_path):
    tok_dir, shards = tmp_path / "tok", tmp_path / "shards"
    code, out, err = llmctl_proc("tokenize", "train", corpus_file, "--vocab-size", 512, "--out", tok_dir)
    assert code == 0, err
    assert out == "" and "trained tokenizer: vocab 512" in err
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in tok_dir.iterdir()}
    assert "chat_template" in json.loads((tok_dir / "tokenizer_config.json").read_text())

    code, out, err = llmctl_proc("tokenize", "encode", corpus_file, "--tokenizer", tok_dir, "--out", shards,
                                 "--val-fraction", 0.05, "--num-proc", 2)
    assert code == 0, err
    assert out == "" and "bytes/token" in err and len(err.strip().splitlines()) == 1
    meta = json.loads((shards / "meta.json").read_text())
    assert meta["splits"]["val"]["tokens"] > 0 and meta["dtype"] == "uint16"
    assert len(TokenShards(shards)) == meta["splits"]["train"]["tokens"]

    lines = ["Hello world", "", "naïve café 🙂 日本語", "  indented\ttab  ", "<|eos|> is text here"]
    code, ids, err = llmctl("tokenize", "encode", "--tokenizer", tok_dir, input="\n".join(lines) + "\n")
    assert code == 0, err
    id_lines = ids.splitlines()
    assert len(id_lines) == len(lines) and id_lines[1] == ""
    assert all(x.isdigit() for x in id_lines[0].split())
    code, text, err = llmctl("tokenize", "decode", "--tokenizer", tok_dir / "tokenizer.json", input=ids)
    assert code == 0, err
    assert text.splitlines() == lines


def test_decode_escapes_newlines(tok, tok_dir):
    ids = " ".join(map(str, tok.encode("two\nlines\r")))
    code, out, err = llmctl("tokenize", "decode", "--tokenizer", tok_dir, input=ids + "\n")
    assert code == 0, err
    assert out == "two\\nlines\\r\n"


def test_stream_into_closed_pipe_is_quiet(tok_dir):
    cmd = (f"yes 'some text to encode' | head -n 20000 | {sys.executable} -m llmctl tokenize encode "
           f"--tokenizer {tok_dir} | head -n 1")
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 1
    assert "Traceback" not in r.stderr and "Error" not in r.stderr


@pytest.mark.parametrize("args, stdin, match", [
    (["tokenize", "train", "{tmp}/missing.txt", "--vocab-size", "512", "--out", "{tmp}/t"], None, "missing.txt"),
    (["tokenize", "train", "{tmp}/bad.jsonl", "--vocab-size", "512", "--out", "{tmp}/t"], None, "bad.jsonl:2:"),
    (["tokenize", "train", "{tmp}/ok.txt", "--vocab-size", "100", "--out", "{tmp}/t"], None, "--vocab-size"),
    (["tokenize", "train", "{tmp}/ok.csv", "--vocab-size", "512", "--out", "{tmp}/t"], None, "unsupported"),
    (["tokenize", "encode", "{tmp}/ok.txt", "--tokenizer", "{tmp}/nowhere", "--out", "{tmp}/s"], None, "nowhere"),
    (["tokenize", "encode", "{tmp}/ok.txt", "--tokenizer", "{tok}", "--out", "{tmp}"], None, "not empty"),
    (["tokenize", "decode", "--tokenizer", "{tok}"], "10 11\n4 five\n", "stdin:2: not a token id"),
    (["tokenize", "decode", "--tokenizer", "{tok}"], "1 99999\n", "stdin:1: token id 99999 out of range"),
])
def test_user_errors_exit_2_with_one_line(tmp_path, tok_dir, args, stdin, match):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken}\n')
    (tmp_path / "ok.txt").write_text("some text\n")
    (tmp_path / "ok.csv").write_text("a,b\n")
    args = [a.format(tmp=tmp_path, tok=tok_dir) for a in args]
    assert_user_error(*llmctl(*args, input=stdin), match, streamed=stdin is not None)


def test_user_error_in_a_real_process(tmp_path):
    (tmp_path / "data.jsonl").write_text('{"text": "a"}\n{"text": "b"}\nnot json\n')
    code, out, err = llmctl_proc("tokenize", "train", tmp_path / "data.jsonl", "--vocab-size", 512,
                                 "--out", tmp_path / "t")
    assert_user_error(code, out, err, "data.jsonl:3: invalid JSON")
