"""`llmctl serve` through the official `openai` client: one live server on a tiny llama for the module (port 0,
an API key), its texts held to `llmctl generate` with the same seed, streamed and not, `n` > 1, stop strings,
logprobs against the model's own log-softmax, 16 concurrent requests against the same requests sent alone, OpenAI
error bodies, a client leaving mid-stream, a load of 200 requests with the server's memory flat, and SIGTERM
draining the request in flight (the module's last test: it stops the server)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
try:
    import httpx2 as httpx  # the HTTP client of openai >= 3
except ImportError:
    httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from typer.testing import CliRunner  # noqa: E402

from llmctl.cli import app  # noqa: E402

from conftest import save_tiny_llama  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEY, NAME, CONTEXT = "sk-test", "tiny", 128
EOS = {"ignore_eos": True}  # vLLM's extra parameter, sent in the body
runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok_dir):
    return save_tiny_llama(tmp_path_factory.mktemp("serve-model"), tok_dir, CONTEXT)


class Server:
    """A `llmctl serve` subprocess: its URL, and its stderr lines as they come."""

    def __init__(self, model_dir, *args):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "LLMCTL_DEBUG": "", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "llmctl", "serve", "--model", str(model_dir), "--port",
                                      "0", "--served-model-name", NAME, "--api-key", KEY, *args],
                                     cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)  # fmt: skip
        self.lines: list[str] = []
        self.url = None
        ready = threading.Event()

        def read():
            for line in self.proc.stderr:
                self.lines.append(line.rstrip("\n"))
                m = re.search(r"serving on (http://\S+)", line)
                if m:
                    self.url = m.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        ready.wait(120)
        assert self.url, "server did not start:\n" + "\n".join(self.lines)

    def client(self, **kw):
        return openai.OpenAI(**{"base_url": self.url + "/v1", "api_key": KEY, "max_retries": 0, "timeout": 60, **kw})

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def rss_kb(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(model_dir)
    yield s
    s.stop()


def generated(model_dir, prompts, *flags, chat=False) -> list[dict]:
    """`llmctl generate --json` (in this process) on stdin prompts: its JSON lines."""
    lines = "".join(json.dumps({"prompt": p}) + "\n" for p in prompts)
    r = runner.invoke(app, ["generate", "--model", str(model_dir), "--json", *(["--chat"] if chat else []),
                            *map(str, flags)], input=lines)  # fmt: skip
    assert r.exit_code == 0, r.stderr
    return [json.loads(x) for x in r.stdout.splitlines()]


def test_models_health_key_and_unknown_model(server):
    c = server.client()
    assert [m.id for m in c.models.list().data] == [NAME]
    assert c.models.retrieve(NAME).id == NAME
    assert server.health()["status"] == "ok"
    with pytest.raises(openai.AuthenticationError) as e:
        server.client(api_key="wrong").models.list()
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert e.value.code == "model_not_found" and e.value.body["param"] == "model"


def test_completions_match_generate_seed_for_seed(server, model_dir):
    """n=3 with seed 11: choice i is `generate --seed 11`'s prompt i (seed 11 + i); streamed the same text."""
    c = server.client()
    prompt, kw = "Once upon a time", dict(max_tokens=24, top_p=0.9, seed=11)
    r = c.completions.create(model=NAME, prompt=prompt, n=3, **kw)
    want = generated(model_dir, [prompt] * 3, "--max-new-tokens", 24, "--top-p", 0.9, "--seed", 11)
    assert [ch.text for ch in r.choices] == [w["completion"] for w in want]
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == sum(w["completion_tokens"] for w in want)
    assert r.usage.prompt_tokens == want[0]["prompt_tokens"]  # once per prompt, as OpenAI counts it
    assert [ch.finish_reason for ch in r.choices] == [{"eos": "stop"}.get(w["finish_reason"], w["finish_reason"])
                                                      for w in want]  # fmt: skip
    texts, finish, usage = ["", "", ""], [None] * 3, None
    for chunk in c.completions.create(model=NAME, prompt=prompt, n=3, stream=True,
                                      stream_options={"include_usage": True}, **kw):  # fmt: skip
        for ch in chunk.choices:
            texts[ch.index] += ch.text
            finish[ch.index] = ch.finish_reason or finish[ch.index]
        usage = chunk.usage or usage
        if chunk.usage:
            assert chunk.choices == []
    assert texts == [ch.text for ch in r.choices] and finish == [ch.finish_reason for ch in r.choices]
    assert usage.completion_tokens == r.usage.completion_tokens


def test_chat_matches_generate_chat(server, model_dir):
    c = server.client()
    msgs = [{"role": "user", "content": "What is a list?"}]
    r = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=20, seed=3, temperature=0.8)
    want = generated(model_dir, ["What is a list?"], "--max-new-tokens", 20, "--seed", 3, "--temperature", 0.8,
                     chat=True)[0]  # fmt: skip
    assert r.choices[0].message.content == want["completion"] and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == want["prompt_tokens"] and r.usage.completion_tokens == want["completion_tokens"]
    stream = c.chat.completions.create(model=NAME, messages=msgs, max_completion_tokens=20, seed=3,
                                       temperature=0.8, stream=True)  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want["completion"]
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_stop_strings_and_lengths(server):
    c = server.client()
    full = c.completions.create(model=NAME, prompt="The cat", max_tokens=40, temperature=0, extra_body=EOS)
    text = full.choices[0].text
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 40
    stop = text[len(text) // 2 :][:3]
    assert stop.strip(), text
    r = c.completions.create(model=NAME, prompt="The cat", max_tokens=40, temperature=0, stop=["\x00zz", stop],
                             extra_body=EOS)
    assert r.choices[0].text == text[: text.index(stop)] and r.choices[0].finish_reason == "stop"
    chunks = c.completions.create(model=NAME, prompt="The cat", max_tokens=40, temperature=0, stop=stop,
                                  extra_body=EOS, stream=True)  # fmt: skip
    streamed = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert streamed == r.choices[0].text  # a stop string's start is held back, never sent


def test_logprobs_are_the_models(server, model_dir):
    import torch

    from llmctl import hf

    c = server.client()
    r = c.completions.create(model=NAME, prompt="Hello", max_tokens=6, temperature=0, logprobs=3, extra_body=EOS)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6 == r.usage.completion_tokens
    assert all(len(t) <= 3 for t in lp.top_logprobs)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    model, tok = hf.load(model_dir)
    ids = tok.prefix + tok.encode("Hello")
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([ids]))[0, -1].float(), -1)
    assert abs(lp.token_logprobs[0] - float(want.max())) < 1e-4  # greedy: the first token is the top one
    assert abs(max(lp.top_logprobs[0].values()) - float(want.max())) < 1e-4
    ch = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                   temperature=0, logprobs=True, top_logprobs=2)  # fmt: skip
    content = ch.choices[0].logprobs.content
    assert len(content) == ch.usage.completion_tokens
    assert all(len(x.top_logprobs) == 2 and x.logprob >= x.top_logprobs[1].logprob - 1e-6 for x in content)
    assert all(isinstance(x.bytes, list) for x in content)


def test_16_concurrent_requests_answer_as_alone(server):
    c = server.client()
    jobs = [dict(prompt=f"Story {i}:", max_tokens=16, seed=100 + i, temperature=0.9) for i in range(16)]
    alone = [c.completions.create(model=NAME, **j).choices[0].text for j in jobs]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda j: c.completions.create(model=NAME, **j).choices[0].text, jobs))
    assert together == alone
    assert len(set(alone)) > 8  # the check can see a mix-up


@pytest.mark.parametrize("kind, kw, param", [
    ("completions", dict(temperature=5), "temperature"),
    ("completions", dict(top_p=0), "top_p"),
    ("completions", dict(n=0), "n"),
    ("completions", dict(stop=["a", "b", "c", "d", "e"]), "stop"),
    ("completions", dict(echo=True), "echo"),
    ("completions", dict(logprobs=99), "logprobs"),
    ("completions", dict(max_tokens=CONTEXT), "max_tokens"),
    ("completions", dict(extra_body={"beam_width": 2}), "beam_width"),
    ("completions", dict(best_of=3), "best_of"),
    ("chat", dict(messages=[]), "messages"),
    ("chat", dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools"),
    ("chat", dict(response_format={"type": "json_object"}), "response_format"),
    ("chat", dict(top_logprobs=2), "top_logprobs"),
    ("chat", dict(stream_options={"include_usage": True}), "stream_options"),
])  # fmt: skip
def test_bad_parameters_are_400_with_an_openai_error(server, kind, kw, param):
    c = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        if kind == "chat":
            c.chat.completions.create(**{"model": NAME, "messages": [{"role": "user", "content": "hi"}], **kw})
        else:
            c.completions.create(**{"model": NAME, "prompt": "hi", "max_tokens": 4, **kw})
    assert e.value.status_code == 400
    assert set(e.value.body) == {"message", "type", "param", "code"} and e.value.body["param"] == param
    assert e.value.body["message"]


def test_malformed_body_and_long_prompt_are_400(server):
    h = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers=h)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": "word " * 400}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert httpx.get(server.url + "/nowhere", headers=h).json()["error"]["code"] == "not_found"


def _idle(server, timeout=10.0) -> dict:
    deadline = time.time() + timeout
    while True:
        h = server.health()
        if (h["live"] == 0 and h["waiting"] == 0) or time.time() > deadline:
            return h
        time.sleep(0.05)


def test_a_client_leaving_mid_stream_frees_its_row(server):
    body = {"model": NAME, "prompt": "Far away", "max_tokens": 100, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as r:  # fmt: skip
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(x.startswith("data: {") for x in got)
    h = _idle(server)
    assert h["live"] == 0 and h["waiting"] == 0, h
    steps = h["steps"]
    c = server.client()
    with ThreadPoolExecutor(16) as pool:  # 16 rows free again: they decode together
        rs = list(pool.map(lambda i: c.completions.create(model=NAME, prompt=f"Again {i}", max_tokens=48,
                                                          extra_body=EOS, seed=i), range(16)))  # fmt: skip
    assert all(r.usage.completion_tokens == 48 for r in rs)
    assert server.health()["steps"] - steps < 2 * 48  # a row still taken would make the 16th wait for a whole run
    assert any("(client gone)" in line for line in server.lines)


def test_load_200_requests_16_clients_memory_flat(server):
    c = server.client()
    prompts = [f"Item {i} of the list:" for i in range(10)]
    want = {p: c.completions.create(model=NAME, prompt=p, max_tokens=8, seed=k) for k, p in enumerate(prompts)}
    assert len({w.choices[0].text for w in want.values()}) > 5

    def one(i):
        k = i % len(prompts)
        return prompts[k], c.completions.create(model=NAME, prompt=prompts[k], max_tokens=8, seed=k)

    with ThreadPoolExecutor(16) as pool:
        first = list(pool.map(one, range(50)))
        rss_50 = server.rss_kb()
        rest = list(pool.map(one, range(50, 200)))
        rss_200 = server.rss_kb()
    for p, r in first + rest:
        assert r.choices[0].text == want[p].choices[0].text and r.usage == want[p].usage
    assert abs(rss_200 - rss_50) < 8 * 1024, (rss_50, rss_200)  # kB
    assert _idle(server)["live"] == 0
    logged = [x for x in server.lines if x.startswith("POST /v1/completions 200 ")]
    assert len(logged) >= 210 and re.search(r" prompt=\d+ completion=8 \d+\.\d\ds$", logged[-1])


def test_cli_errors(model_dir, tmp_path):
    r = runner.invoke(app, ["serve", "--model", str(tmp_path / "missing"), "--port", "0"])
    assert r.exit_code == 2 and r.stderr.startswith("error: ")
    r = runner.invoke(app, ["serve", "--model", str(model_dir), "--max-rows", "0"])
    assert r.exit_code == 2 and "--max-rows" in r.stderr


def test_sigterm_drains_the_request_in_flight_then_exits_0(server):
    """The module's last test: it stops the server."""
    body = {"model": NAME, "prompt": "Long ago", "max_tokens": 100, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:  # fmt: skip
        lines = r.iter_lines()
        first = next(lines)
        server.proc.send_signal(signal.SIGTERM)
        rest = [x for x in lines if x]
    chunks = [json.loads(x[6:]) for x in [first, *rest] if x.startswith("data: {")]
    assert rest[-1] == "data: [DONE]" and chunks[-1]["usage"]["completion_tokens"] == 100
    assert server.proc.wait(30) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health")
