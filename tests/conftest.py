"""Shared fixtures: a small text corpus and a tokenizer trained on it once per session (vocab 512)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TRICKY = [
    "Hello, world!  Two spaces, a\ttab and a trailing space ",
    "naïve café — “quotes” ‘single’ … ½ ∑ ∫ √ ≠ ≤",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 🙂 👩‍👩‍👧‍👦 🇫🇷 skin 👍🏽 and keycap 1️⃣",
    "combining: e\u0301 a\u0308 and zero width\u200bjoiner\u200d, bidi \u202eabc\u202c, עברית العربية",
    "control \x00 \x01 \x7f bell\x07 and \r\n windows line",
    "literal specials <|eos|> <|im_start|>user and <|pad|>",
    "\n\n  leading newlines and trailing whitespace \n\t",
    "def f(x):\n    return x ** 2  # code\n",
    "",
]


def _corpus_text() -> str:
    from llmctl.builtin import builtin_corpus

    return "\n\n".join(builtin_corpus()[:120])


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    """A .txt corpus (~0.4 MB of builtin text plus tricky unicode), paragraphs separated by blank lines."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    extra = "\n\n".join(t.strip() for t in TRICKY if t.strip())
    path.write_text(_corpus_text() + "\n\n" + extra + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory, corpus_file):
    """A directory with a vocab-512 tokenizer trained on corpus_file."""
    from llmctl.data import read_corpus
    from llmctl.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    ds = read_corpus([str(corpus_file)])
    train_tokenizer(list(ds["text"]), vocab_size=512).save(out)
    return out


@pytest.fixture(scope="session")
def tok(tok_dir):
    from llmctl.tokenizer import load_tokenizer

    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a test module: tiny models decode fastest so, and a shared, busy machine can
    stall multi-threaded ops. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sigterm_after_losses(cmd, out_dir, n: int, env=None, timeout: float = 120.0) -> tuple[int, str]:
    """Run cmd (a training command writing out_dir/metrics.jsonl) from the repository root, send it SIGTERM once
    n training events ("loss" lines) are logged; return (exit code, stderr)."""
    import signal
    import subprocess
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    p = subprocess.Popen([str(c) for c in cmd], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env)  # fmt: skip
    metrics, deadline = Path(out_dir) / "metrics.jsonl", time.time() + timeout
    while time.time() < deadline:
        if metrics.exists() and sum('"loss"' in line for line in metrics.read_text().splitlines()) >= n:
            break
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=timeout)
    return p.returncode, err


def save_tiny_llama(out_dir, tok_dir, block_size: int):
    """A 2-layer, 64-wide llama (GQA 4/2 heads) with the conftest tokenizer's vocabulary and special ids, seeded
    and initialised, saved with the tokenizer as a model directory; returns the directory."""
    import torch

    from llmctl import hf
    from llmctl.model import ModelConfig, Transformer
    from llmctl.tokenizer import load_tokenizer

    torch.manual_seed(0)
    tok = load_tokenizer(tok_dir)
    model = Transformer(ModelConfig(arch="llama", vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2,
                                    n_embd=64, block_size=block_size, bos_token_id=tok.bos_id,
                                    eos_token_id=tok.eos_id, pad_token_id=tok.pad_id))  # fmt: skip
    model.init_weights()
    return hf.save_model(model, out_dir, tokenizer_dir=tok_dir)
