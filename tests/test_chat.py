"""`llmctl chat`: a REPL on a pseudo-terminal (pexpect), one turn per line in a pipeline, user errors. Replies are
checked against `llmctl generate --chat --json` on the same conversation at temperature 0: one prompt encoder, so
equal text means the history reached the model."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llmctl import hf
from llmctl.cli import app
from llmctl.model import ModelConfig, Transformer
from llmctl.stages.generate import escape

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "LLMCTL_DEBUG": "", "OMP_NUM_THREADS": "1", "TERM": "dumb"}
runner = CliRunner()

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(path, tok_dir, block_size: int):
    torch.manual_seed(0)
    m = Transformer(ModelConfig(arch="llama", vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                                block_size=block_size, init_std=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0))  # fmt: skip
    return hf.save_model(m, path, tokenizer_dir=tok_dir)


@pytest.fixture(scope="module")
def small(tmp_path_factory, tok_dir):
    """A tiny llama with a context of 96 tokens and the conftest tokenizer (vocab 512, ChatML)."""
    return _model(tmp_path_factory.mktemp("small"), tok_dir, 96)


@pytest.fixture(scope="module")
def long(tmp_path_factory, tok_dir):
    """The same with a context of 4096 tokens: room for a reply long enough to interrupt."""
    return _model(tmp_path_factory.mktemp("long"), tok_dir, 4096)


def generated(model, messages, *flags) -> dict:
    """`llmctl generate --chat --json --temperature 0` on one conversation: its JSON result."""
    r = runner.invoke(app, ["generate", "--model", str(model), "--chat", "--json", "--temperature", "0",
                            *map(str, flags)], input=json.dumps({"messages": messages}) + "\n")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def chat_pipe(model, *args, stdin: str):
    """(exit code, stdout, stderr) of `llmctl chat` with stdin a pipe, in this process."""
    r = runner.invoke(app, ["chat", "--model", str(model), *map(str, args)], input=stdin)
    return r.exit_code, r.stdout, r.stderr


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_repl_on_a_terminal(long, tmp_path):
    """The acceptance run: /set temperature 0, two turns that use the history, /retry, Ctrl-C during a reply,
    Ctrl-C at the prompt, /save, a bad command, /exit; replies stream to the terminal."""
    pexpect = pytest.importorskip("pexpect")
    c = pexpect.spawn(sys.executable, ["-m", "llmctl", "chat", "--model", str(long), "--max-new-tokens", "24",
                                       "--system", "Be brief."],
                      env=ENV, cwd=str(ROOT), encoding="utf-8", codec_errors="replace", timeout=60)  # fmt: skip
    seen = []

    def turn(line: str) -> str:
        """Send a line, wait for the next prompt; the terminal's text in between (\\r\\n as \\n)."""
        c.sendline(line)
        c.expect_exact("\r\n>>> ")
        seen.append(c.before.replace("\r\n", "\n"))
        return seen[-1]

    try:
        c.expect_exact(">>> ")
        assert "temperature = 0.0" in turn("/set temperature 0")
        first, second = "What is a list?", "And a tuple?"
        turn(first)
        turn(second)
        save = tmp_path / "conv.json"
        assert "saved 5 messages" in turn(f"/save {save}")
        msgs = json.loads(save.read_text())["messages"]
        system = {"role": "system", "content": "Be brief."}
        assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
        a1, a2 = msgs[2]["content"], msgs[4]["content"]
        assert a1 in seen[1] and a2 in seen[2]  # streamed to the terminal
        assert generated(long, [system, user(first)], "--max-new-tokens", 24)["completion"] == a1
        assert generated(long, msgs[:4], "--max-new-tokens", 24)["completion"] == a2  # the history reached it
        assert generated(long, [system, user(second)], "--max-new-tokens", 24)["completion"] != a2
        # /retry at temperature 0: the same reply again, in place of the last one
        assert a2 in turn("/retry")
        turn(f"/save {save}")
        assert json.loads(save.read_text())["messages"] == msgs
        # Ctrl-C during a long reply stops it: back to the prompt, the turn not kept
        turn("/set max_new_tokens 3000")  # room for the whole conversation: the reply is what streams first
        turn("/set ignore_eos true")
        turn("/set temperature 0.8")
        c.sendline("Tell me everything.")
        c.expect(r"Tell me everything\.\r\n[\s\S]{20}", timeout=60)  # the reply has started
        c.send("\x03")
        c.expect_exact("(stopped", timeout=20)
        c.expect_exact(">>> ")
        c.send("\x03")  # Ctrl-C at the prompt: a new prompt
        c.expect_exact(">>> ")
        assert "unknown command '/nope'" in turn("/nope")  # a mistake: one error line, the REPL goes on
        assert "top_p must be in (0, 1]" in turn("/set top_p 2")
        turn("/set max_new_tokens 24")
        turn("/set ignore_eos false")
        turn("/set temperature 0")
        third = "One more?"
        turn(third)
        turn(f"/save {save}")
        after = json.loads(save.read_text())["messages"]
        assert after[:5] == msgs and [m["content"] for m in after[5::2]] == [third]  # no stopped turn
        assert generated(long, msgs + [user(third)], "--max-new-tokens", 24)["completion"] == after[6]["content"]
        assert after[6]["content"] in seen[-2]
        c.sendline("/exit")
        c.expect(pexpect.EOF)
    finally:
        c.close(force=True)
    assert c.exitstatus == 0, c.before


def test_repl_ends_at_eof(small):
    pexpect = pytest.importorskip("pexpect")
    c = pexpect.spawn(sys.executable, ["-m", "llmctl", "chat", "--model", str(small)], env=ENV, cwd=str(ROOT),
                      encoding="utf-8", codec_errors="replace", timeout=60)  # fmt: skip
    try:
        c.expect_exact(">>> ")
        c.sendline("/help")
        c.expect_exact("/retry")
        c.expect_exact(">>> ")
        c.sendeof()
        c.expect(pexpect.EOF)
    finally:
        c.close(force=True)
    assert c.exitstatus == 0


def test_pipeline_one_reply_line_per_line(small, tmp_path):
    """stdin not a terminal: a line per turn, a reply line per turn (escaped), commands write nothing to stdout."""
    save = tmp_path / "c.json"
    stdin = "Hi there\n/set max_new_tokens 12\n//slash at the start\n/retry\n\n" + f"/save {save}\n"
    code, out, err = chat_pipe(small, "--temperature", "0", "--max-new-tokens", "16", stdin=stdin)
    assert code == 0, err
    lines = out.split("\n")
    assert len(lines) == 5 and lines[-1] == ""  # 4 replies: Hi there, //..., /retry, the empty line
    msgs = json.loads(save.read_text())["messages"]
    assert [m["content"] for m in msgs[0::2]] == ["Hi there", "/slash at the start", ""]
    assert escape(generated(small, [user("Hi there")], "--max-new-tokens", 16)["completion"]) == lines[0]
    assert [escape(m["content"]) for m in msgs[1::2]] == [lines[0], lines[2], lines[3]]
    assert lines[1] == lines[2]  # /retry at temperature 0
    assert generated(small, msgs[:3], "--max-new-tokens", 12)["completion"] == msgs[3]["content"]
    assert "max_new_tokens = 12" in err and "saved 6 messages" in err
    # a subprocess, as a user runs it: exit 0 at the end of input, only replies on stdout
    r = subprocess.run([sys.executable, "-m", "llmctl", "chat", "--model", str(small), "--max-new-tokens", "8",
                        "--seed", "3"], input="a\nb\n/exit\nc\n", capture_output=True, text=True, env=ENV, cwd=ROOT)  # fmt: skip
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 2, r.stderr


def test_history_cut_to_the_context(small, tmp_path):
    """The oldest turns leave the model's view when the conversation outgrows the context (the system message
    stays), with a notice on stderr; /save keeps every turn; the reply is generate's on what the model sees."""
    save = tmp_path / "c.json"
    words = ["first question about lists", "second question about tuples", "third question about sets",
             "fourth question about dicts", "fifth question about strings"]  # fmt: skip
    stdin = "\n".join(words) + f"\n/save {save}\n"
    code, out, err = chat_pipe(small, "--temperature", "0", "--max-new-tokens", "16", "--system", "Hi.",
                               stdin=stdin)  # fmt: skip
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert notes and all("longer than the context allows (96 - 16 new tokens)" in n for n in notes)
    msgs = json.loads(save.read_text())["messages"]
    assert len(msgs) == 11 and msgs[0] == {"role": "system", "content": "Hi."}  # every turn saved
    seen = int(re.search(r"its last (\d+) message", notes[-1]).group(1))
    window = [msgs[0]] + msgs[-1 - seen : -1]
    r = generated(small, window, "--max-new-tokens", 16)
    assert r["completion"] == msgs[-1]["content"] and r["prompt_tokens"] <= 96 - 16
    assert len(notes) < len(words)  # a notice when more turns leave the view, not every turn


@pytest.mark.parametrize("args, stdin, match", [
    (["--top-p", "1.5"], "a\n", "--top-p must be in (0, 1], got 1.5"),
    (["--temperature", "x"], "a\n", "--temperature must be a number, got 'x'"),
    (["--max-new-tokens", "96"], "a\n", "--max-new-tokens (96) must be below the model's context of 96"),
    (["--bogus", "1"], "a\n", "unknown option '--bogus'"),
    (["--seed"], "a\n", "--seed needs a value"),
    (["hello"], "a\n", "unexpected argument 'hello': chat takes no PROMPT"),
    ([], "a\n/set top_p 2\n", "stdin:2: /set: top_p must be in (0, 1], got 2.0"),
    ([], "/set colour blue\n", "stdin:1: /set: unknown setting 'colour'"),
    ([], "/frobnicate\n", "stdin:1: unknown command '/frobnicate'"),
    ([], "/save\n", "stdin:1: /save needs a FILE"),
])  # fmt: skip
def test_user_errors(small, args, stdin, match):
    code, out, err = chat_pipe(small, "--max-new-tokens", "4", *args, stdin=stdin)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and match in lines[-1] and "Traceback" not in err, err
    assert len(out.splitlines()) <= 1


def test_missing_model_and_no_chat_template(tmp_path, small):
    code, out, err = chat_pipe(tmp_path / "nope", stdin="hi\n")
    assert code == 2 and err.startswith("error: no such file or directory")
    plain = tmp_path / "plain"
    shutil.copytree(small, plain)
    cfg = json.loads((plain / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(cfg))
    tj = (plain / "tokenizer.json").read_text().replace("<|im_start|>", "<|start|>").replace("<|im_end|>", "<|end|>")
    (plain / "tokenizer.json").write_text(tj)
    code, out, err = chat_pipe(plain, stdin="hi\n")
    assert code == 2 and out == "" and "has no chat template" in err and len(err.splitlines()) == 1, err
