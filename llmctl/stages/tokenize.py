"""`llmctl tokenize`: train a tokenizer, encode a corpus into token shards, encode / decode stdin.

stdout carries only the stream results (ids or text lines); summaries go to stderr.

Streams: `encode_stream` turns each stdin line (without its newline) into one line of space-separated ids, an
empty line into an empty line; special-token strings in the text are encoded as plain text. `decode_stream`
turns each line of space-separated ids back into one line of text, with any newline inside the decoded text
written as the two characters `\\n` (and carriage return as `\\r`), so one line in is one line out. A line
that is not UTF-8, a word that is not a decimal id, or an id outside the vocabulary stops with
`error: stdin:LINE: ...`.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

from llmctl.errors import UserError

MAX_VOCAB_SIZE = 2**32
_ID = re.compile(r"-?[0-9]+")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train(corpus: list[str], vocab_size: int, out: Path, num_proc: int | None = None) -> None:
    """Train a byte-level BPE on `corpus` and write the tokenizer files into `out` (other files are left alone)."""
    from llmctl.data import read_corpus
    from llmctl.tokenizer import MIN_VOCAB_SIZE, train_tokenizer

    if not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise UserError(f"--vocab-size must be between {MIN_VOCAB_SIZE} (256 bytes + 5 special tokens + 1) and "
                        f"{MAX_VOCAB_SIZE}, got {vocab_size}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    t0 = time.time()
    ds = read_corpus(corpus, num_proc=num_proc)
    seen = {"bytes": 0}

    def batches():
        for batch in ds.iter(batch_size=1000):
            seen["bytes"] += sum(len(t.encode("utf-8")) for t in batch["text"])
            yield batch["text"]

    tok = train_tokenizer(batches(), vocab_size=vocab_size, length=len(ds))
    tok.save(out)
    note = f" (corpus too small for {vocab_size})" if tok.vocab_size < vocab_size else ""
    _log(f"trained tokenizer: vocab {tok.vocab_size}{note} on {len(ds):,} documents, "
         f"{seen['bytes'] / 1e6:.1f} MB, in {time.time() - t0:.1f}s -> {out / 'tokenizer.json'}")


def encode(corpus: list[str], tokenizer: Path, out: Path, val_fraction: float = 0.01,
           num_proc: int | None = None) -> None:
    """Encode `corpus` into token shards in `out` (see llmctl.shards)."""
    from llmctl.shards import encode_corpus
    from llmctl.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    t0 = time.time()
    meta = encode_corpus(corpus, tok, out, val_fraction=val_fraction, num_proc=num_proc)
    train_s, val_s = meta["splits"]["train"], meta["splits"]["val"]
    tokens = train_s["tokens"] + val_s["tokens"]
    text_bytes = train_s["text_bytes"] + val_s["text_bytes"]
    _log(f"encoded {meta['documents']:,} documents: {train_s['tokens']:,} train + {val_s['tokens']:,} val tokens "
         f"({val_s['documents']:,} val documents), {text_bytes / max(tokens, 1):.2f} bytes/token, "
         f"in {time.time() - t0:.1f}s -> {out}")


def encode_stream(tokenizer: Path, stdin, stdout) -> None:
    """Each stdin line -> one stdout line of space-separated ids."""
    from llmctl.data import text_lines
    from llmctl.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    for _, line in text_lines(stdin):
        stdout.write(" ".join(map(str, tok.encode(line.rstrip("\n")))) + "\n")
    stdout.flush()


def decode_stream(tokenizer: Path, stdin, stdout) -> None:
    """Each stdin line of space-separated ids -> one stdout line of text (newlines escaped as \\n)."""
    from llmctl.data import text_lines
    from llmctl.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    for lineno, line in text_lines(stdin):
        ids = []
        for x in line.split():
            if not _ID.fullmatch(x):  # int() would also take "1_000", "+3" and non-ASCII digits
                raise UserError(f"stdin:{lineno}: not a token id: {x[:40]!r}")
            ids.append(int(x))
            if not 0 <= ids[-1] < tok.vocab_size:
                raise UserError(f"stdin:{lineno}: token id {x} out of range [0, {tok.vocab_size})")
        text = tok.decode(ids)
        stdout.write(text.replace("\n", "\\n").replace("\r", "\\r") + "\n")
    stdout.flush()
