"""Tokenizer: round trip, determinism, specials, hash, token bytes, transformers interop, chat template."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TRICKY
from llmctl import tokenizer as T
from llmctl.errors import UserError

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4, of course."},
]


def test_special_tokens_at_fixed_ids(tok):
    assert T.SPECIAL_TOKENS == ("<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>")
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.im_start_id, tok.im_end_id) == (0, 1, 2, 3, 4)
    assert [tok.id_to_token(i) for i in range(5)] == list(T.SPECIAL_TOKENS)
    assert tok.vocab_size == 512


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_tricky_unicode(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_every_byte_encodes(tok):
    text = "".join(chr(c) for c in range(1, 0x800)) + "\U0001f600\U000e0001\uffff"
    assert tok.decode(tok.encode(text)) == text
    vocab = tok.hf.get_vocab()
    assert all(ch in vocab for ch in T.bytes_to_unicode().values())


def test_specials_in_text_are_plain_unless_allowed(tok):
    text = "a <|eos|> b"
    assert T.EOS_ID not in tok.encode(text)
    assert T.EOS_ID in tok.encode(text, allow_special=True)
    assert tok.decode(tok.encode(text)) == text == tok.decode(tok.encode(text, allow_special=True))


def test_encode_batch_matches_encode(tok):
    assert tok.encode_batch(TRICKY) == [tok.encode(t) for t in TRICKY]


def test_token_bytes_sum_to_utf8_length(tok):
    tb = tok.token_bytes()
    assert tb.shape == (tok.vocab_size,) and tb.dtype.kind == "i"
    assert (tb[:5] == 0).all() and (tb[5:] >= 1).all()
    for text in TRICKY:
        assert tb[tok.encode(text)].sum() == len(text.encode("utf-8"))


def test_training_is_deterministic(corpus_file, tok_dir, tmp_path):
    """Same corpus and vocab -> the same tokenizer.json, also in a fresh process (other hash seed)."""
    code = (
        "import sys; from llmctl.data import read_corpus; from llmctl.tokenizer import train_tokenizer\n"
        "ds = read_corpus([sys.argv[1]]); train_tokenizer(list(ds['text']), 512).save(sys.argv[2])\n"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code, str(corpus_file), str(tmp_path)], check=True, cwd=root,
                   env={**__import__("os").environ, "PYTHONHASHSEED": "123"})
    assert (tmp_path / "tokenizer.json").read_text() == (tok_dir / "tokenizer.json").read_text()


def test_hash_is_stable_across_save_load(tok, tok_dir, tmp_path):
    h = tok.hash()
    assert len(h) == 64
    again = T.load_tokenizer(tok_dir / "tokenizer.json")
    assert again.hash() == h
    again.save(tmp_path / "copy")
    assert T.load_tokenizer(tmp_path / "copy").hash() == h
    # Pretty vs compact JSON and transformers' save_pretrained do not change the hash either.
    obj = json.loads((tok_dir / "tokenizer.json").read_text())
    assert T.tokenizer_json_hash(json.loads(json.dumps(obj))) == h
    obj["model"]["merges"] = [" ".join(m) for m in obj["model"]["merges"]]  # older merges format
    assert T.tokenizer_json_hash(obj) == h


def test_small_vocab_is_a_user_error():
    with pytest.raises(UserError, match="vocab size"):
        T.train_tokenizer(["abc"], vocab_size=100)


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        T.load_tokenizer(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        T.load_tokenizer(tmp_path / "bad")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError):
        T.load_tokenizer(tmp_path / "empty")


def test_load_from_run_directory(tok_dir, tmp_path):
    step = tmp_path / "run" / "checkpoints" / "step-0000010"
    step.mkdir(parents=True)
    for f in tok_dir.iterdir():
        (step / f.name).write_bytes(f.read_bytes())
    loaded = T.load_tokenizer(tmp_path / "run")
    assert loaded.path == step / "tokenizer.json"
    assert loaded.bos_id == T.BOS_ID


def test_transformers_loads_it_and_encodes_identically(tok, tok_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == (T.BOS, T.EOS, T.PAD)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (T.BOS_ID, T.EOS_ID, T.PAD_ID)
    assert hf.model_max_length == T.DEFAULT_MODEL_MAX_LENGTH
    for text in TRICKY:
        if "<|" in text:
            continue  # transformers maps special-token strings to their ids, like allow_special=True
        ids = hf(text, add_special_tokens=True)["input_ids"]
        assert ids == [T.BOS_ID] + tok.encode(text)  # BOS by the post-processor, as llmctl feeds its models
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
        assert hf.decode(ids[1:]) == text == hf.decode(ids, skip_special_tokens=True)
    # A transformers round trip (save_pretrained) keeps the same tokenizer.
    hf.save_pretrained(str(tmp_path / "hf"))
    assert T.load_tokenizer(tmp_path / "hf").hash() == tok.hash()
    assert T.load_tokenizer(tmp_path / "hf").prefix == [T.BOS_ID]


def test_chat_template_through_transformers(tok, tok_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    text = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|bos|><|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4, of course.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert text == tok.render_chat(MESSAGES, add_generation_prompt=True)
    out = hf.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
    assert ids == tok.encode(text, allow_special=True)
    assert hf.apply_chat_template(MESSAGES[:2], tokenize=False).endswith("<|im_end|>\n")


def test_encode_chat_mask(tok):
    ids, mask = tok.encode_chat(MESSAGES, add_generation_prompt=False)
    assert ids == tok.encode(tok.render_chat(MESSAGES), allow_special=True)
    assert len(mask) == len(ids)
    trained = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(trained) == "4, of course.<|im_end|>"
    ids2, mask2 = tok.encode_chat(MESSAGES[:2], add_generation_prompt=True)
    assert tok.decode(ids2).endswith("<|im_start|>assistant\n") and not any(mask2)
