"""`llmctl generate` end to end: lines in / lines out, JSONL, seeds, empty and over-long prompts, chat, stop strings,
beams, --ignore-eos, MODEL kinds (model dir, run dir, transformers' GPT-2 folder), user errors and a closed pipe."""

from __future__ import annotations

import json
import os
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
from llmctl.stages.generate import escape, unescape

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok_dir):
    """A tiny llama (context 96) with the conftest tokenizer (vocab 512, ChatML)."""
    torch.manual_seed(0)
    m = Transformer(ModelConfig(arch="llama", vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                                block_size=96, init_std=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0))  # fmt: skip
    return hf.save_model(m, tmp_path_factory.mktemp("model"), tokenizer_dir=tok_dir)


def gen(*args, input=None):
    """(exit code, stdout, stderr) of `llmctl generate ...` run in this process."""
    r = runner.invoke(app, ["generate", *map(str, args)], input=input)
    return r.exit_code, r.stdout, r.stderr


def gen_proc(args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LLMCTL_DEBUG": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", "-c", args], input=stdin, capture_output=True, text=True, env=env, cwd=ROOT)


def test_lines_in_lines_out_and_json(model_dir):
    """The acceptance commands, as a user types them."""
    py = f"{sys.executable} -m llmctl"
    r = gen_proc(f"printf 'a\\nb\\nc\\n' | {py} generate --model {model_dir} --max-new-tokens 8 --top-p 0.9")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 3 and r.stdout.endswith("\n")
    r = gen_proc(f"printf 'a\\nb\\nc\\n' | {py} generate --model {model_dir} --max-new-tokens 8 --top-p 0.9 --json")
    assert r.returncode == 0, r.stderr
    objs = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(objs) == 3
    for o in objs:
        assert set(o) == {"completion", "finish_reason", "prompt_tokens", "completion_tokens"}
        assert o["finish_reason"] in ("stop", "length", "eos") and o["completion_tokens"] <= 8


def test_json_ids_overrides_and_seeds(model_dir):
    items = [{"prompt": "The Python", "id": "a", "temperature": 0},
             {"prompt": "import os", "id": 7, "seed": 3, "top_k": 20, "max_new_tokens": 5},
             {"prompt": "Hello", "stop": "x", "extra": "ignored"}]  # fmt: skip
    stdin = "\n".join(json.dumps(i) for i in items) + "\n\n"  # a blank line is skipped
    code, out, err = gen("--model", model_dir, "--json", "--seed", 1, "--max-new-tokens", 12, input=stdin)
    assert code == 0, err
    objs = [json.loads(x) for x in out.splitlines()]
    assert [o.get("id") for o in objs] == ["a", 7, None] and "id" not in objs[2]
    assert objs[1]["completion_tokens"] <= 5 and "ignoring unknown field 'extra'" in err
    greedy = gen("--model", model_dir, "--temperature", 0, "--max-new-tokens", 12, "The Python")[1]
    assert greedy == objs[0]["completion"] + "\n"
    again = gen("--model", model_dir, "--json", "--seed", 1, "--max-new-tokens", 12, input=stdin)[1]
    assert again == out  # same seed, same text
    other = gen("--model", model_dir, "--json", "--seed", 2, "--max-new-tokens", 12, input=stdin)[1]
    assert [json.loads(x)["completion"] for x in other.splitlines()][1] == objs[1]["completion"]  # its own seed
    assert [json.loads(x)["completion"] for x in other.splitlines()][2] != objs[2]["completion"]
    # plain mode with the same seeds: the same completions, escaped one per line
    plain = gen("--model", model_dir, "--seed", 1, "--max-new-tokens", 12, "--top-p", 0.9, input="a\nb\n")[1]
    js = gen("--model", model_dir, "--seed", 1, "--max-new-tokens", 12, "--top-p", 0.9, "--json",
             input='{"prompt": "a"}\n{"prompt": "b"}\n')[1]  # fmt: skip
    assert plain.splitlines() == [escape(json.loads(x)["completion"]) for x in js.splitlines()]
    # --batch-size does not change seeded results
    assert gen("--model", model_dir, "--seed", 1, "--max-new-tokens", 12, "--top-p", 0.9, "--batch-size", 1,
               input="a\nb\n")[1] == plain  # fmt: skip


def test_empty_lines_and_prompts_longer_than_the_context(model_dir):
    long = " ".join(["word"] * 400)
    code, out, err = gen("--model", model_dir, "--max-new-tokens", 16, "--temperature", 0, input=f"\nhi\n{long}\n")
    assert code == 0, err
    assert len(out.splitlines()) == 3  # an empty line is a prompt too (BOS alone)
    assert "warning: stdin:3: prompt of" in err and "keeping its last 80" in err and "stdin:2" not in err
    code, out, err = gen("--model", model_dir, "--max-new-tokens", 16, "--json", input=json.dumps({"prompt": long}))
    assert code == 0 and json.loads(out)["prompt_tokens"] == 96 - 16 and "warning: stdin:1" in err
    code, out, err = gen("--model", model_dir, "--max-new-tokens", 96, input="hi\n")
    assert code == 2 and out == "" and err.startswith("error: --max-new-tokens (96) must be below the model's context")
    code, out, err = gen("--model", model_dir, "--json", input='{"prompt": "hi", "max_new_tokens": 100}\n')
    assert code == 2 and out == "" and err.startswith("error: stdin:1: max_new_tokens (100) must be below")
    # the default max_new_tokens is half the context for a small model
    code, out, err = gen("--model", model_dir, "--json", input='{"prompt": "", "temperature": 0}\n')
    assert code == 0 and json.loads(out)["completion_tokens"] in range(1, 49) and json.loads(out)["prompt_tokens"] == 1
    # --json: lines that are not JSON objects are plain prompts
    code, out, err = gen("--model", model_dir, "--json", "--temperature", 0, "--max-new-tokens", 5,
                         input='hi\n{"prompt": "hi"}\n')  # fmt: skip
    a, b = map(json.loads, out.splitlines())
    assert code == 0 and a == b


def test_prompt_argument_chat_stop_and_beams(model_dir):
    code, out, err = gen("--model", model_dir, "--temperature", 0, "--max-new-tokens", 20, "The Python")
    assert code == 0 and out.endswith("\n") and err == ""
    text = out[:-1]
    stop = text[4:7]
    code, out2, _ = gen("--model", model_dir, "--temperature", 0, "--max-new-tokens", 20, "--stop", stop, "The Python")
    assert out2 == text[: text.index(stop)] + "\n"
    assert unescape("a\\nb\\\\n\\t") == "a\nb\\n\t" and escape("a\nb\\n\r") == "a\\nb\\\\n\\r"
    code, out3, err = gen("--model", model_dir, "--chat", "--temperature", 0, "--max-new-tokens", 20, "The Python")
    assert code == 0, err
    code, out4, err = gen("--model", model_dir, "--json", "--temperature", 0, "--max-new-tokens", 20,
                          input=json.dumps({"messages": [{"role": "user", "content": "The Python"}]}))  # fmt: skip
    assert code == 0 and json.loads(out4)["completion"] + "\n" == out3
    code, out5, err = gen("--model", model_dir, "--num-beams", 3, "--max-new-tokens", 10, "--json", "The Python")
    assert code == 0 and json.loads(out5)["completion_tokens"] <= 10
    for flags in (["--temperature", 0], ["--top-p", 0.9, "--seed", 3]):  # speculation changes no token
        runs = [gen("--model", model_dir, *flags, "--max-new-tokens", 40, "--prompt-lookup", n, "The Python")
                for n in (0, 8)]
        assert runs[0][0] == 0 and runs[0] == runs[1]


def test_model_kinds(model_dir, tmp_path, tok_dir):
    """A run directory (its newest checkpoint) and a folder written by transformers (GPT-2)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    run = tmp_path / "run"
    shutil.copytree(model_dir, run / "checkpoints/step-0000004")
    want = gen("--model", model_dir, "--temperature", 0, "--max-new-tokens", 8, "hi")[1]
    assert gen("--model", run, "--temperature", 0, "--max-new-tokens", 8, "hi")[1] == want
    torch.manual_seed(0)
    g = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                   bos_token_id=1, eos_token_id=2))  # fmt: skip
    g.save_pretrained(tmp_path / "gpt2")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / f, tmp_path / "gpt2" / f)
    code, out, err = gen("--model", tmp_path / "gpt2", "--max-new-tokens", 6, "--json", input='{"prompt": "x"}\n')
    assert code == 0, err
    assert json.loads(out)["completion_tokens"] <= 6


@pytest.mark.parametrize("args, stdin, match", [
    (["--top-p", "1.5"], "a\n", "--top-p must be in (0, 1], got 1.5"),
    (["--max-new-tokens", "-3"], "a\n", "--max-new-tokens must be an integer >= 0"),
    (["--temperature", "-1"], "a\n", "--temperature must be >= 0"),
    (["--batch-size", "0"], "a\n", "--batch-size must be at least 1"),
    (["--json"], '{"prompt": "a"}\n{"prompt": "b",\n', "stdin:2: invalid JSON"),
    (["--json"], '{"prompt": 3}\n', "stdin:1: expected a string field 'prompt'"),
    (["--json"], '{"prompt": "a"} x\n', "stdin:1: invalid JSON"),
    (["--json"], '{"prompt": "a", "top_p": "x"}\n', "stdin:1: field 'top_p' must be a integer or number"),
    (["--json"], '{"prompt": "a", "top_p": 2}\n', "stdin:1: top_p must be in (0, 1]"),
    (["--json"], '{"messages": [{"role": "user"}]}\n', "stdin:1: 'messages' must be"),
])  # fmt: skip
def test_user_errors(model_dir, args, stdin, match):
    code, out, err = gen("--model", model_dir, *args, input=stdin)
    assert code == 2 and out == "", (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err


def test_missing_model(tmp_path):
    code, out, err = gen("--model", tmp_path / "nope", "hi")
    assert code == 2 and err.startswith("error: no such file or directory")


def test_closed_pipe_ends_quietly(model_dir):
    py = f"{sys.executable} -m llmctl"
    r = gen_proc(f"seq 1 40 | {py} generate --model {model_dir} --max-new-tokens 4 --batch-size 2 | head -1; "
                 "echo \"rc=${PIPESTATUS[1]}\" >&2")  # fmt: skip
    assert len(r.stdout.splitlines()) == 1
    assert "rc=0" in r.stderr and "Traceback" not in r.stderr and "error" not in r.stderr, r.stderr


def test_prompt_streams_to_a_terminal(model_dir):
    """stdout a terminal: the completion is written piece by piece as tokens arrive, then a newline."""
    import io

    from llmctl.stages import generate as stage

    class Tty(io.StringIO):
        writes: list = []

        def isatty(self):
            return True

        def write(self, s):
            self.writes.append(s)
            return super().write(s)

    out = Tty()
    flags = dict(max_new_tokens=20, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                 frequency_penalty=0.0, presence_penalty=0.0, num_beams=1, length_penalty=1.0, stop=(), seed=None)
    stage.run(model_dir, "The Python", flags, json_mode=False, chat=False, batch_size=8, stdout=out,
              stderr=io.StringIO())  # fmt: skip
    want = gen("--model", model_dir, "--temperature", 0, "--max-new-tokens", 20, "The Python")[1]
    assert out.getvalue() == want and len(out.writes) > 3


def test_ignore_eos(model_dir, tmp_path):
    """--ignore-eos: exactly --max-new-tokens tokens from a model that ends its text earlier (the token it picks
    greedily at step 3 made an EOS id of the model folder); also per JSONL line, and with --chat."""
    from llmctl.chat import encode_prompt
    from llmctl.engine import SamplingParams
    from llmctl.generation import load_engine

    engine = load_engine(model_dir)
    ids = encode_prompt(engine.tokenizer, "hi")
    toks = engine.generate([ids], SamplingParams(max_new_tokens=16, temperature=0))[0].tokens
    m = tmp_path / "m"
    shutil.copytree(model_dir, m)
    gc = json.loads((m / "generation_config.json").read_text())
    gc["eos_token_id"] = [2, toks[3]]
    (m / "generation_config.json").write_text(json.dumps(gc))

    def run(*flags, input=None):
        r = runner.invoke(app, ["generate", "--model", str(m), "--temperature", "0", "--max-new-tokens", "16",
                                "--json", *flags], input=input)  # fmt: skip
        assert r.exit_code == 0, r.stderr
        return [json.loads(x) for x in r.stdout.splitlines()]

    (early,) = run("hi")
    assert early["finish_reason"] == "eos" and early["completion_tokens"] <= 4
    (full,) = run("--ignore-eos", "hi")
    assert full["finish_reason"] == "length" and full["completion_tokens"] == 16
    assert full["completion"].startswith(early["completion"])
    lines = [{"prompt": "hi"}, {"prompt": "hi", "ignore_eos": True}, {"prompt": "hi", "ignore_eos": True,
                                                                      "max_new_tokens": 7}]  # fmt: skip
    got = run(input="".join(json.dumps(x) + "\n" for x in lines))
    assert [g["completion_tokens"] for g in got] == [early["completion_tokens"], 16, 7]
    (chat,) = run("--chat", "--ignore-eos", "hi")  # the end of turn is a plain token too
    assert chat["completion_tokens"] == 16
    r = runner.invoke(app, ["generate", "--model", str(m), "--json"], input='{"prompt": "a", "ignore_eos": 1}\n')
    assert r.exit_code == 2 and "field 'ignore_eos' must be a boolean" in r.stderr


def test_chat_template_renders_in_generate_as_in_sft(tmp_path, tok_dir):
    """One prompt encoder: a foreign template (no <|im_start|> token) that needs Jinja's loop controls and a
    non-escaping tojson renders for `generate --chat` exactly as for sft (it used to fail in generate only)."""
    from llmctl.tokenizer import load_tokenizer

    d = tmp_path / "tok"
    d.mkdir()
    text = (Path(tok_dir) / "tokenizer.json").read_text().replace("<|im_start|>", "<|start|>")
    (d / "tokenizer.json").write_text(text.replace("<|im_end|>", "<|end|>"))
    cfg = json.loads((Path(tok_dir) / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'stop' %}{% break %}{% endif %}"
                            "<|start|>{{ m['role'] }} {{ m['content'] | tojson }}<|end|>\n{% endfor %}"
                            "{% if add_generation_prompt %}<|start|>assistant {% endif %}")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(d)
    assert tok.im_start_id is None
    msgs = [{"role": "user", "content": "Say \"hi\" — ½"}, {"role": "stop", "content": ""},
            {"role": "user", "content": "never rendered"}]
    ids, mask = tok.encode_chat(msgs[:1] + [{"role": "assistant", "content": "hi"}])  # sft renders it
    assert sum(mask) > 0
    want = tok.encode_chat(msgs, add_generation_prompt=True)[0]
    assert "never rendered" not in tok.decode(want) and '"Say \\"hi\\" — ½"' in tok.decode(want)
    torch.manual_seed(0)
    m = Transformer(ModelConfig(arch="llama", vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32,
                                block_size=96, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id))  # fmt: skip
    model = hf.save_model(m, tmp_path / "model", tokenizer_dir=d)
    code, out, err = gen("--model", model, "--chat", "--json", "--temperature", 0, "--max-new-tokens", 3,
                         input=json.dumps({"messages": msgs}) + "\n")  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["prompt_tokens"] == len(want)
    code, out, err = gen("--model", model, "--chat", "--json", "--temperature", 0, "--max-new-tokens", 3, msgs[0]["content"])
    assert code == 0, err
    assert json.loads(out)["prompt_tokens"] == len(tok.encode_chat(msgs[:1], add_generation_prompt=True)[0])
