"""Token shards: corpora encoded into memory-mappable token ids (`encode_corpus` writes them, `TokenShards` reads
them). A shard directory holds
- `train_00000.bin`, `train_00001.bin`, ... and `val_00000.bin`, ...: raw little-endian token ids (uint16 when the
  vocabulary fits, else uint32), every document as `prefix + ids + [eos]`, concatenated, where prefix is what the
  tokenizer's own rule puts before a text (chat.prefix_ids: `[bos]` for llmctl's and Llama's tokenizers, nothing
  for Qwen's or GPT-2's, whose documents are then separated by eos alone); a shard holds at most
  `max_shard_tokens` ids and a document may continue into the next shard;
- `meta.json`: `format`, `version`, `dtype`, `vocab_size`, `tokenizer_hash`, `prefix` (the ids before every
  document), `bos_id` (null when documents start without BOS), `eos_id`, `token_bytes`, `documents`,
  `val_fraction`, `seed`, `max_shard_tokens`, `corpus`, and `splits` = {"train": S, "val": S} with
  S = {`shards`: [file names], `shard_tokens`: [ids per shard], `tokens`, `documents`, `text_bytes`}.
  (Shards written before `prefix` was recorded start every document with `bos_id`.)
`TokenShards` checks what it reads -- meta.json's keys and types, the shard names and sizes, and every token id
against `vocab_size` -- so damaged or mismatched shards are one UserError before any training starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from llmctl.chat import prefix_ids
from llmctl.checkpoint import publish_dir, writing
from llmctl.data import _datasets, read_corpus, remove_stale
from llmctl.errors import UserError
from llmctl.progress import progress_bar

FORMAT, VERSION = "llmctl-token-shards", 1
MAX_SHARD_TOKENS = 100_000_000
_SHARD_RE = re.compile(r"^(train|val)_(\d{5,})\.bin$")


# ----------------------------------------------------------------------------------------------- writing shards


def assign_val(n_docs: int, val_fraction: float, seed: int = 0) -> np.ndarray:
    """Bool [n_docs]: document i is validation when a hash of (seed, i) in [0, 1) is below val_fraction; at
    least one val document when val_fraction > 0 and there are two or more, and never all of them."""
    u = np.array([int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "little")
                  for i in range(n_docs)], dtype=np.float64) / 2.0**64
    is_val = u < val_fraction
    if val_fraction > 0 and n_docs >= 2 and not is_val.any():
        is_val[np.argmin(u)] = True
    if n_docs and is_val.all():
        is_val[np.argmax(u)] = False
    return is_val


class _ShardWriter:
    """Appends ids to `{split}_00000.bin`, `{split}_00001.bin`, ... of at most `max_tokens` ids each."""

    def __init__(self, out_dir: Path, split: str, dtype, max_tokens: int):
        self.dir, self.split, self.dtype, self.max = out_dir, split, np.dtype(dtype).newbyteorder("<"), max_tokens
        self.names: list[str] = []
        self.counts: list[int] = []
        self.file = None
        self.documents = self.text_bytes = 0

    def write(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        while tokens.size:
            if self.file is None or self.counts[-1] >= self.max:
                if self.file is not None:
                    self.file.close()
                self.names.append(f"{self.split}_{len(self.names):05d}.bin")
                self.counts.append(0)
                self.file = open(self.dir / self.names[-1], "wb")
            take = min(tokens.size, self.max - self.counts[-1])
            self.file.write(tokens[:take].tobytes())
            self.counts[-1] += take
            tokens = tokens[take:]

    def close(self) -> dict:
        if self.file is not None:
            self.file.close()
        return {"shards": self.names, "shard_tokens": self.counts, "tokens": int(sum(self.counts)),
                "documents": self.documents, "text_bytes": self.text_bytes}


def _with_prefix_eos(values: np.ndarray, offsets: np.ndarray, prefix: list[int], eos: int) -> np.ndarray:
    """Flat ids of n documents (arrow list layout) -> the flat `prefix + ids + [eos]` sequence."""
    n, p = offsets.size - 1, len(prefix)
    out = np.empty(values.size + (p + 1) * n, dtype=np.int64)
    starts = offsets[:-1] + (p + 1) * np.arange(n)  # where document i's prefix begins
    ends = offsets[1:] + (p + 1) * np.arange(n) + p  # where its eos goes
    keep = np.ones(out.size, dtype=bool)
    for j, t in enumerate(prefix):
        out[starts + j], keep[starts + j] = t, False
    keep[ends] = False
    out[ends], out[keep] = eos, values
    return out


def _check_out_dir(out: Path) -> None:
    """Refuse to replace anything but an empty directory or an earlier shard directory."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    names = [p.name for p in out.iterdir()]
    if names and not ("meta.json" in names and all(n == "meta.json" or _SHARD_RE.match(n) for n in names)):
        raise UserError(f"--out {out} exists and is not empty (only an empty directory or earlier token shards "
                        "are replaced); choose another directory")


def _tokenize(ds, tokenizer, num_proc: int | None):
    """Dataset `text` -> Dataset `ids` (int32 lists, no specials) and `nbytes` (UTF-8 length of the text)."""
    datasets = _datasets()
    hf = tokenizer.hf

    def encode_batch(batch):
        hf.encode_special_tokens = True  # a literal "<|eos|>" in a document is text, not the special token
        enc = hf.encode_batch(batch["text"], add_special_tokens=False)
        return {"ids": [e.ids for e in enc], "nbytes": [len(t.encode("utf-8")) for t in batch["text"]]}

    procs = num_proc if num_proc and num_proc > 1 else None
    if procs:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers: one thread each
    features = datasets.Features({"ids": datasets.List(datasets.Value("int32")), "nbytes": datasets.Value("int64")})
    fingerprint = hashlib.sha256(f"{ds._fingerprint}|{tokenizer.hash()}".encode()).hexdigest()[:32]
    return ds.map(encode_batch, batched=True, batch_size=256, num_proc=procs, remove_columns=["text"],
                  features=features, desc="Tokenizing", new_fingerprint=fingerprint)


def _write_splits(encoded, is_val: np.ndarray, out_dir: Path, dtype, prefix: list[int], eos: int,
                  max_tokens: int) -> dict:  # fmt: skip
    writers = {s: _ShardWriter(out_dir, s, dtype, max_tokens) for s in ("train", "val")}
    first = 0
    with progress_bar(len(encoded), "Writing shards") as advance:
        for table in encoded.with_format("arrow").iter(batch_size=1000):
            val = is_val[first:first + table.num_rows]
            first += table.num_rows
            for split, mask in (("train", ~val), ("val", val)):
                if mask.any():
                    part = table.filter(mask)
                    ids = part.column("ids").combine_chunks()
                    offsets = ids.offsets.to_numpy().astype(np.int64)
                    values = ids.flatten().to_numpy(zero_copy_only=False)
                    writers[split].write(_with_prefix_eos(values, offsets - offsets[0], prefix, eos))
                    writers[split].documents += part.num_rows
                    writers[split].text_bytes += int(np.sum(part.column("nbytes").to_numpy()))
            advance(table.num_rows)
    return {s: w.close() for s, w in writers.items()}


def encode_corpus(specs: list[str], tokenizer, out_dir, val_fraction: float = 0.01, num_proc: int | None = None,
                  seed: int = 0, max_shard_tokens: int = MAX_SHARD_TOKENS) -> dict:
    """Encode corpus specs into token shards in `out_dir` (see the module doc); returns the meta dict.

    Written into a temporary directory next to `out_dir` and renamed into place when complete. `out_dir` may be
    missing, empty, or an earlier shard directory (which is then replaced); anything else is refused."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val fraction must be in [0, 1), got {val_fraction}")
    if tokenizer.eos_id is None:
        raise UserError(f"tokenizer {tokenizer.path} has no eos token (it ends every document in the shards)")
    prefix = prefix_ids(tokenizer)
    out = Path(out_dir)
    _check_out_dir(out)
    ds = read_corpus(specs, num_proc=num_proc)
    encoded = _tokenize(ds, tokenizer, num_proc)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out.parent, f".{out.name}.tmp-")  # a killed earlier run's half-written shards
    with writing(out):
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should be an ordinary directory
        splits = _write_splits(encoded, assign_val(len(ds), val_fraction, seed), tmp, dtype,
                               prefix, tokenizer.eos_id, max_shard_tokens)
        meta = {
            "format": FORMAT, "version": VERSION, "dtype": np.dtype(dtype).name,
            "vocab_size": tokenizer.vocab_size, "tokenizer_hash": tokenizer.hash(),
            "prefix": prefix, "bos_id": tokenizer.bos_id if tokenizer.bos_id in prefix else None,
            "eos_id": tokenizer.eos_id, "documents": len(ds),
            "val_fraction": val_fraction, "seed": seed, "max_shard_tokens": max_shard_tokens,
            "corpus": [str(s) for s in specs], "splits": splits, "token_bytes": tokenizer.token_bytes().tolist(),
        }
        text = json.dumps({**meta, "token_bytes": None}, indent=1)  # token_bytes on one line, not one per line
        text = text.replace('"token_bytes": null', f'"token_bytes": {json.dumps(meta["token_bytes"])}')
        (tmp / "meta.json").write_text(text + "\n", encoding="utf-8")
        publish_dir(tmp, out)  # fsynced; an earlier shard directory at `out` is moved aside, then removed
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


# ----------------------------------------------------------------------------------------------- reading shards


class NoSplit(UserError):
    """A token-shard directory without the split asked for."""


def _check_meta(meta: dict, meta_file: Path) -> dict:
    """The `splits` of a token-shard meta.json after checking every key a reader relies on (types included):
    a damaged or hand-made meta.json is one clear error, not a crash later."""

    def bad(key: str, want: str):
        value = meta
        for part in key.split("."):
            value = value.get(part, "<missing>") if isinstance(value, dict) else "<missing>"
        shown = value if value == "<missing>" else json.dumps(value)[:60]
        return UserError(f"{meta_file}: invalid token-shard meta: '{key}' must be {want}, got {shown}")

    def is_int(v, lo=0):
        return isinstance(v, int) and not isinstance(v, bool) and v >= lo

    if meta.get("dtype") not in ("uint16", "uint32"):
        raise bad("dtype", '"uint16" or "uint32"')
    if not is_int(meta.get("vocab_size"), 1):
        raise bad("vocab_size", "a positive integer")
    if meta["dtype"] == "uint16" and meta["vocab_size"] > 2**16:
        raise bad("dtype", f"uint32 for a vocabulary of {meta['vocab_size']}")
    tb = meta.get("token_bytes")
    if not isinstance(tb, list) or not all(is_int(b) for b in tb):
        raise bad("token_bytes", "a list of non-negative integers (UTF-8 bytes per token)")
    for key in ("bos_id", "eos_id"):
        if key in meta and meta[key] is not None and not is_int(meta[key]):
            raise bad(key, "a token id")
    if "prefix" in meta and not (isinstance(meta["prefix"], list) and all(is_int(i) for i in meta["prefix"])):
        raise bad("prefix", "a list of token ids")
    if "tokenizer_hash" in meta and not isinstance(meta["tokenizer_hash"], str):
        raise bad("tokenizer_hash", "a string")
    splits = meta.get("splits")
    if not isinstance(splits, dict):
        raise bad("splits", 'an object {"train": ..., "val": ...}')
    for name, split in splits.items():
        if not isinstance(split, dict):
            raise bad(f"splits.{name}", "an object")
        shards, counts = split.get("shards"), split.get("shard_tokens")
        if not isinstance(shards, list) or not all(isinstance(n, str) and _SHARD_RE.match(n)
                                                   and n.startswith(name + "_") for n in shards):  # fmt: skip
            raise bad(f"splits.{name}.shards", f"a list of shard file names ({name}_NNNNN.bin)")
        if not isinstance(counts, list) or len(counts) != len(shards) or not all(is_int(c) for c in counts):
            raise bad(f"splits.{name}.shard_tokens", "a token count for each shard")
        if split.get("tokens") != sum(counts) or not is_int(split.get("tokens")):
            raise bad(f"splits.{name}.tokens", f"the sum of its shard_tokens ({sum(counts)})")
    return splits


class TokenShards:
    """One split of a token-shard directory as a flat, memory-mapped sequence of token ids.

    `path` is the shard directory or one of its `.bin` files (which selects that file's split; the whole split
    is read)."""

    def __init__(self, path, split: str = "train", fallback: str | None = None):
        """`fallback`: the split to read when the directory has no `split` (self.split tells which was read)."""
        p = Path(path)
        if p.suffix == ".bin":
            m = _SHARD_RE.match(p.name)
            if not m:
                raise UserError(f"{p}: not a token shard (expected train_NNNNN.bin or val_NNNNN.bin)")
            if not p.is_file():
                raise UserError(f"no such file: {p}")
            p, split, fallback = p.parent, m.group(1), None
        if not p.is_dir():
            raise UserError(f"no such token-shard directory: {p}")
        meta_file = p / "meta.json"
        if not meta_file.is_file():
            raise UserError(f"{p} has no meta.json: not a token-shard directory (see `llmctl tokenize encode`)")
        try:
            self.meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"{meta_file}: invalid token-shard meta ({e})") from None
        meta = self.meta
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
            got = "(not a JSON object)" if not isinstance(meta, dict) else \
                f"{str(meta.get('format'))[:40]!r} version {str(meta.get('version'))[:20]!r}"
            raise UserError(f"{meta_file}: unsupported token-shard format {got}")
        info = _check_meta(meta, meta_file)
        has = lambda s: bool(s in info and info[s]["tokens"])  # noqa: E731
        if not has(split) and fallback is not None and has(fallback):
            split = fallback
        if not has(split):
            raise NoSplit(f"{p} has no {split} split (val_fraction was {meta.get('val_fraction')})")
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        self.path, self.split, self.dtype = p, split, dtype
        self.vocab_size: int = meta["vocab_size"]
        self.token_bytes = np.asarray(meta["token_bytes"], dtype=np.int64)
        self.shards = []
        for name, count in zip(info[split]["shards"], info[split]["shard_tokens"]):
            f = p / name
            if not f.is_file() or f.stat().st_size != count * dtype.itemsize:
                raise UserError(f"{f}: missing or truncated shard (expected {count} tokens)")
            self.shards.append(np.memmap(f, dtype=dtype, mode="r") if count else np.zeros(0, dtype=dtype))
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])  # global offset of each shard
        self._len = int(self.starts[-1])
        self.max_id = -1  # the largest token id of the split: every id is checked against the vocabulary once
        for name, shard in zip(info[split]["shards"], self.shards):
            for i in range(0, len(shard), 1 << 24):
                top = int(shard[i:i + (1 << 24)].max())
                if top >= self.vocab_size:
                    raise UserError(f"{p / name}: token id {top} is outside the vocabulary of {self.vocab_size} "
                                    f"tokens that {meta_file} declares (corrupt shard, or meta.json of other data)")
                self.max_id = max(self.max_id, top)

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"TokenShards({str(self.path)!r}, split={self.split!r}, tokens={self._len})"

    def num_windows(self, length: int) -> int:
        """How many start offsets o have [o, o + length) inside the split."""
        return max(0, self._len - length + 1)

    def read(self, offset: int, length: int) -> np.ndarray:
        """Tokens [offset, offset + length) as int64 numpy, across shard boundaries."""
        if offset < 0 or length < 0 or offset + length > self._len:
            raise IndexError(f"window [{offset}, {offset + length}) outside {self._len} tokens")
        out = np.empty(length, dtype=np.int64)
        k = int(np.searchsorted(self.starts, offset, side="right")) - 1
        done = 0
        while done < length:
            local = offset + done - int(self.starts[k])
            take = min(length - done, len(self.shards[k]) - local)
            out[done:done + take] = self.shards[k][local:local + take]
            done += take
            k += 1
        return out

    def get(self, offsets, length: int):
        """torch.LongTensor [len(offsets), length]: the tokens at global offsets [o, o + length)."""
        import torch

        offsets = np.asarray(offsets, dtype=np.int64).reshape(-1)
        rows = np.empty((offsets.size, length), dtype=np.int64)
        for r, o in enumerate(offsets.tolist()):
            rows[r] = self.read(o, length)
        return torch.from_numpy(rows)
