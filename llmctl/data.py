"""Corpus reading (through `datasets`) and token shards (memory-mapped).

Corpus specs (`read_corpus`), each giving documents in order:
- `file.txt`: one document per paragraph (blocks of lines separated by blank lines; the newlines inside a
  paragraph are kept, the blank lines between paragraphs are not);
- `file.jsonl`, `file.jsonl.gz`: one document per line, field `text` (blank lines are skipped);
- `file.parquet`: one document per row, column `text`;
- a directory: every file with one of those extensions below it, recursively, in sorted path order;
- a glob (`data/*.jsonl`, `**` allowed): its matches, sorted;
- `-`: stdin, read as a .txt file;  `builtin`: the built-in corpus (`llmctl.builtin`).
Empty documents are dropped. Problems are UserErrors naming the file (and the line, for JSONL and for text that
is not UTF-8: `FILE:LINE: not UTF-8`).

Token shards (`encode_corpus` writes them, `TokenShards` reads them): a directory with
- `train_00000.bin`, `train_00001.bin`, ... and `val_00000.bin`, ...: raw little-endian token ids (uint16 when the
  vocabulary fits, else uint32), every document as `[bos] + ids + [eos]`, concatenated; a shard holds at most
  `max_shard_tokens` ids and a document may continue into the next shard;
- `meta.json`: `format`, `version`, `dtype`, `vocab_size`, `tokenizer_hash`, `bos_id`, `eos_id`, `token_bytes`,
  `documents`, `val_fraction`, `seed`, `max_shard_tokens`, `corpus`, and `splits` = {"train": S, "val": S} with
  S = {`shards`: [file names], `shard_tokens`: [ids per shard], `tokens`, `documents`, `text_bytes`}.
`TokenShards` checks what it reads -- meta.json's keys and types, the shard names and sizes, and every token id
against `vocab_size` -- so damaged or mismatched shards are one UserError before any training starts.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import gzip
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from llmctl.errors import UserError

FORMAT, VERSION = "llmctl-token-shards", 1
MAX_SHARD_TOKENS = 100_000_000
EXTENSIONS = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
_SHARD_RE = re.compile(r"^(train|val)_(\d{5,})\.bin$")
_tmp_root: str | None = None


def _datasets():
    """Import `datasets` offline, quiet, and without progress bars unless stderr is a terminal."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    datasets.utils.logging.set_verbosity_error()
    if not sys.stderr.isatty():
        datasets.disable_progress_bars()
    return datasets


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's process
    return True


def remove_stale(directory, prefix: str) -> None:
    """Remove `prefix<pid>-*` entries of `directory` whose process is gone: what a killed run left behind."""
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return
    for p in entries:
        if not p.name.startswith(prefix):
            continue
        pid = p.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _scratch_dir() -> str:
    """A per-process temporary directory for datasets' Arrow files, removed at exit; those of killed runs (named
    by their process id) are removed by the next run."""
    global _tmp_root
    if _tmp_root is None:
        remove_stale(tempfile.gettempdir(), "llmctl-datasets-")
        _tmp_root = tempfile.mkdtemp(prefix=f"llmctl-datasets-{os.getpid()}-")
        atexit.register(shutil.rmtree, _tmp_root, True)
    return _tmp_root


# ----------------------------------------------------------------------------------------------- reading


def _supported(path: Path) -> bool:
    return path.name.endswith(EXTENSIONS)


def expand_specs(specs: list[str]) -> list[str]:
    """Specs -> an ordered list of sources: file paths, 'builtin' and '-'."""
    if not specs:
        raise UserError("no corpus given")
    sources: list[str] = []
    for spec in specs:
        spec = str(spec)
        if spec in ("builtin", "-"):
            sources.append(spec)
        elif any(c in spec for c in "*?["):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise UserError(f"no files match {spec}")
            files = [m for m in matches if Path(m).is_dir() or _supported(Path(m))]
            for m in files:
                sources.extend(_expand_path(Path(m)) if Path(m).is_dir() else [m])
            if not files:
                raise UserError(f"no {'/'.join(EXTENSIONS)} files match {spec}")
        else:
            sources.extend(_expand_path(Path(spec)))
    return sources


def _expand_path(p: Path) -> list[str]:
    if not p.exists():
        raise UserError(f"no such file or directory: {p}")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and _supported(f)
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if not files:
            raise UserError(f"no {', '.join(EXTENSIONS)} files in directory {p}")
        return [str(f) for f in files]
    if not _supported(p):
        raise UserError(f"unsupported corpus file {p}: expected {', '.join(EXTENSIONS)}, a directory, a glob, "
                        "'-' or 'builtin'")
    return [str(p)]


def _iter_txt(path: str, name: str):
    para: list[str] = []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            for line in f:
                if line.strip():
                    para.append(line)
                elif para:
                    yield "".join(para).rstrip("\r\n")
                    para = []
    except UnicodeDecodeError:
        raise not_utf8(path, name) from None
    if para:
        yield "".join(para).rstrip("\r\n")


def not_utf8(path: str, name: str) -> UserError:
    """`NAME:LINE: not UTF-8` for a file that failed to decode (the line found by decoding it again, line by line)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                decode_line(raw, f"{name}:{lineno}")
    except UserError as e:
        return e
    except (OSError, EOFError):
        pass
    return UserError(f"{name}: not UTF-8")


def decode_line(raw: bytes, where: str) -> str:
    """A line of bytes as UTF-8 text; anything else is a UserError `WHERE: not UTF-8 (...)`."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)") from None


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def check_unicode(value, where: str, escapes: bool = False):
    """`value` (a string, or JSON made of them), unless it holds a lone surrogate: text that is not Unicode, as
    Python decodes undecodable command-line bytes (U+DC80..U+DCFF) or JSON (`escapes`) an unpaired \\udXXX."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            c = ord(value[e.start])
            if escapes:
                what = f"an unpaired surrogate escape \\u{c:04x}"
            else:
                what = f"byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"unpaired surrogate U+{c:04X}"
            raise UserError(f"{where}: not UTF-8 ({what})") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            check_unicode(k, where, escapes)
            check_unicode(v, where, escapes)
    elif isinstance(value, list):
        for v in value:
            check_unicode(v, where, escapes)
    return value


def parse_json_line(line: str, where: str):
    """One JSON value from a line of JSONL; invalid JSON and lone-surrogate escapes are UserErrors at `where`."""
    try:
        value = json.loads(line)
    except ValueError as e:
        raise UserError(f"{where}: invalid JSON ({e})") from None
    if _SURROGATE_ESCAPE.search(line):  # cheap: only lines with such an escape are walked
        check_unicode(value, where, escapes=True)
    return value


def text_lines(stream, name: str = "stdin") -> Iterator[tuple[int, str]]:
    """(line number, line with its newline) of a text stream such as sys.stdin, strictly UTF-8: the bytes are
    decoded here (sys.stdin would turn bad ones into lone surrogates, or fail without a line number), so a bad
    line is `NAME:LINE: not UTF-8`."""
    raw = getattr(stream, "buffer", None)
    if raw is not None:
        for lineno, line in enumerate(raw, 1):
            yield lineno, decode_line(line, f"{name}:{lineno}")
    else:
        for lineno, line in enumerate(stream, 1):
            yield lineno, check_unicode(line, f"{name}:{lineno}")


def iter_jsonl(path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for every non-blank line of a .jsonl / .jsonl.gz file. Invalid JSON,
    undecodable text and unreadable files raise UserError naming the file (and line)."""
    path = str(path)
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                yield lineno, parse_json_line(line, f"{path}:{lineno}")
    except UnicodeDecodeError:
        raise not_utf8(path, path) from None
    except (OSError, EOFError) as e:  # e.g. a corrupt .gz
        raise UserError(f"{path}: cannot read ({e})") from None


def _iter_jsonl(path: str):
    for lineno, row in iter_jsonl(path):
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise UserError(f"{path}:{lineno}: expected an object with a string field \"text\"")
        yield text


def _iter_parquet(path: str):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types on a broken file
        raise UserError(f"{path}: not a valid parquet file ({e})") from None
    if "text" not in pf.schema_arrow.names:
        raise UserError(f"{path}: no column \"text\" (columns: {', '.join(pf.schema_arrow.names)})")
    row = 0
    for batch in pf.iter_batches(columns=["text"], batch_size=4096):
        for text in batch.column(0).to_pylist():
            row += 1
            if not isinstance(text, str):
                raise UserError(f"{path}: row {row}: column \"text\" is not a string")
            yield text


def _generate(sources: list[list[str]]):
    """datasets generator: sources are [path, display name] pairs (or ['builtin', ...])."""
    for path, name in sources:
        if path == "builtin":
            from llmctl.builtin import builtin_corpus

            docs = builtin_corpus()
        elif path.endswith(".parquet"):
            docs = _iter_parquet(path)
        elif path.endswith((".jsonl", ".jsonl.gz")):
            docs = _iter_jsonl(path)
        else:
            docs = _iter_txt(path, name)
        for text in docs:
            if text:
                yield {"text": text}


def read_corpus(specs: list[str], num_proc: int | None = None):
    """Read corpus specs (see the module doc) into a `datasets.Dataset` with one column `text`."""
    datasets = _datasets()
    sources = []
    for src in expand_specs(specs):
        if src == "-":
            tmp = tempfile.NamedTemporaryFile("wb", suffix=".txt", dir=_scratch_dir(), delete=False)
            with tmp:
                shutil.copyfileobj(sys.stdin.buffer, tmp)
            sources.append([tmp.name, "<stdin>"])
        else:
            sources.append([src, src])
    key = hashlib.sha256()
    for path, _ in sources:
        st = os.stat(path) if path != "builtin" else None
        key.update(f"{path}|{st and st.st_size}|{st and st.st_mtime_ns}\n".encode())
    procs = min(num_proc or 1, len(sources))
    try:
        ds = datasets.Dataset.from_generator(
            _generate, gen_kwargs={"sources": sources}, num_proc=procs if procs > 1 else None,
            features=datasets.Features({"text": datasets.Value("string")}),
            cache_dir=_scratch_dir(), fingerprint=key.hexdigest()[:32])
    except Exception as e:
        raise _explain(e, sources, specs) from None
    if len(ds) == 0:
        raise UserError(f"corpus {' '.join(map(str, specs))} has no text")
    return ds


def _explain(error: Exception, sources: list[list[str]], specs: list[str]) -> Exception:
    """The UserError behind a failed `from_generator` (found again in this process if a worker raised it)."""
    cause = error
    while cause is not None and not isinstance(cause, UserError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        return cause
    try:
        if sum(1 for _ in _generate(sources)) == 0:  # datasets fails on an empty generator
            return UserError(f"corpus {' '.join(map(str, specs))} has no text")
    except UserError as user_error:
        return user_error
    return error


# ----------------------------------------------------------------------------------------------- writing


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


def _with_bos_eos(values: np.ndarray, offsets: np.ndarray, bos: int, eos: int) -> np.ndarray:
    """Flat ids of n documents (arrow list layout) -> the flat `[bos] + ids + [eos]` sequence."""
    n = offsets.size - 1
    out = np.empty(values.size + 2 * n, dtype=np.int64)
    shift = 2 * np.arange(n)
    starts, ends = offsets[:-1] + shift, offsets[1:] + shift + 1
    keep = np.ones(out.size, dtype=bool)
    keep[starts] = keep[ends] = False
    out[starts], out[ends], out[keep] = bos, eos, values
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


def _write_splits(encoded, is_val: np.ndarray, out_dir: Path, dtype, bos: int, eos: int, max_tokens: int) -> dict:
    writers = {s: _ShardWriter(out_dir, s, dtype, max_tokens) for s in ("train", "val")}
    first = 0
    with _progress(len(encoded)) as advance:
        for table in encoded.with_format("arrow").iter(batch_size=1000):
            val = is_val[first:first + table.num_rows]
            first += table.num_rows
            for split, mask in (("train", ~val), ("val", val)):
                if mask.any():
                    part = table.filter(mask)
                    ids = part.column("ids").combine_chunks()
                    offsets = ids.offsets.to_numpy().astype(np.int64)
                    values = ids.flatten().to_numpy(zero_copy_only=False)
                    writers[split].write(_with_bos_eos(values, offsets - offsets[0], bos, eos))
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
    if tokenizer.bos_id is None or tokenizer.eos_id is None:
        raise UserError(f"tokenizer {tokenizer.path} has no bos / eos token")
    out = Path(out_dir)
    _check_out_dir(out)
    ds = read_corpus(specs, num_proc=num_proc)
    encoded = _tokenize(ds, tokenizer, num_proc)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out.parent, f".{out.name}.tmp-")  # a killed earlier run's half-written shards
    from llmctl.checkpoint import writing

    with writing(out):
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should be an ordinary directory
        splits = _write_splits(encoded, assign_val(len(ds), val_fraction, seed), tmp, dtype,
                               tokenizer.bos_id, tokenizer.eos_id, max_shard_tokens)
        meta = {
            "format": FORMAT, "version": VERSION, "dtype": np.dtype(dtype).name,
            "vocab_size": tokenizer.vocab_size, "tokenizer_hash": tokenizer.hash(),
            "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "documents": len(ds),
            "val_fraction": val_fraction, "seed": seed, "max_shard_tokens": max_shard_tokens,
            "corpus": [str(s) for s in specs], "splits": splits, "token_bytes": tokenizer.token_bytes().tolist(),
        }
        text = json.dumps({**meta, "token_bytes": None}, indent=1)  # token_bytes on one line, not one per line
        text = text.replace('"token_bytes": null', f'"token_bytes": {json.dumps(meta["token_bytes"])}')
        (tmp / "meta.json").write_text(text + "\n", encoding="utf-8")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` to `out` (fsynced first); an earlier shard directory at `out` is moved aside first,
    then removed."""
    from llmctl.checkpoint import publish_dir

    publish_dir(tmp, out)


@contextlib.contextmanager
def _progress(total: int):
    """Yields advance(n): a rich progress bar over documents on stderr, only when stderr is a terminal."""
    if not sys.stderr.isatty():
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("Writing shards", total=total)
        yield lambda n: bar.advance(task, n)


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
