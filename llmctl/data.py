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

Token shards (`llmctl tokenize encode`, `TokenShards`) are in llmctl/shards.py.
"""

from __future__ import annotations

import atexit
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

from llmctl.errors import UserError

EXTENSIONS = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
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
