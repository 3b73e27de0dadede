"""The `builtin` corpus: several MB of English text that every CPython installation already has.

Documents, in this fixed order:
1. the pydoc help topics (`pydoc_data.topics.topics`), one document per topic, sorted by name;
2. the docstrings of a fixed list of compiled modules (`builtins`, `sys`, `math`, ...), one document per module;
3. for every pure-Python standard-library source file (walked in sorted order; tests, site-packages and the
   generated `encodings` tables excluded): its docstrings (module, classes, functions)
   and its comment blocks, in source order, one document per file.

Sources are *parsed* with `ast`, never imported, so nothing runs and nothing is printed. Chunks are deduplicated
across the whole corpus (first occurrence wins). The result is identical across runs on the same Python; it is
cached in memory and on disk under `~/.cache/llmctl/` (or `$LLMCTL_CACHE`), keyed by the Python version and a
fingerprint of the source files, so an edited standard library is re-read.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import importlib
import inspect
import json
import os
import re
import sys
import sysconfig
import warnings
from pathlib import Path

from llmctl import cache_dir

# Directories of the standard library that are not read: tests, third-party packages, generated codec tables.
_SKIP_DIRS = frozenset({
    "site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "encodings", "pydoc_data",
    "lib-dynload",
})
_SKIP_FILES = frozenset({"antigravity.py", "this.py"})

# Compiled modules whose docstrings are read through import: all are side-effect free to import (unlike, say,
# readline, which may write to the terminal); one missing on this platform is skipped.
_COMPILED_MODULES = (
    "builtins", "sys", "posix", "_io", "itertools", "gc", "time", "math", "cmath", "array", "binascii",
    "errno", "marshal", "select", "unicodedata", "zlib", "mmap", "fcntl", "resource", "termios", "pwd", "grp",
    "_socket", "_signal", "_thread", "_datetime", "_decimal", "_pickle", "_struct", "_csv", "_sqlite3",
    "_hashlib", "_lsprof", "_curses", "_operator", "_functools", "_collections", "_heapq", "_lzma", "_stat",
)

_FORMAT = 3  # bump when the assembly changes, to invalidate disk caches
_memory: list[str] | None = None


def builtin_corpus() -> list[str]:
    """The builtin corpus as a list of documents (cached in memory and on disk)."""
    global _memory
    if _memory is None:
        _memory = _load_or_build()
    return list(_memory)


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(("config-", ".")))
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py") and f not in _SKIP_FILES)
    return files


def _cache_path(files: list[Path]) -> Path:
    h = hashlib.sha256(f"{_FORMAT}|{sys.version}|{sys.prefix}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    v = sys.version_info
    return cache_dir() / f"builtin-py{v.major}.{v.minor}.{v.micro}-{h.hexdigest()[:16]}.json.gz"


def _load_or_build() -> list[str]:
    files = _stdlib_files()
    try:
        path = _cache_path(files)
        with gzip.open(path, "rt", encoding="utf-8") as f:
            docs = json.load(f)
        if isinstance(docs, list) and all(isinstance(d, str) for d in docs):
            return docs
    except (OSError, ValueError):
        pass
    docs = _build(files)
    try:  # best effort: an unwritable cache directory only costs the rebuild next time
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=1) as f:
            json.dump(docs, f)
        os.replace(tmp, path)
    except OSError:
        pass
    return docs


def _build(files: list[Path]) -> list[str]:
    seen: set[str] = set()
    docs: list[str] = []

    def add_document(chunks) -> None:
        fresh = []
        for c in chunks:
            c = c.strip()
            if len(c) >= 20 and c not in seen:
                seen.add(c)
                fresh.append(c)
        if fresh:
            docs.append("\n\n".join(fresh))

    from pydoc_data.topics import topics

    for name in sorted(topics):
        add_document([topics[name]])
    for name in _COMPILED_MODULES:
        add_document(_compiled_module_docs(name))
    for f in files:
        add_document(_source_chunks(f))
    return docs


def _compiled_module_docs(name: str) -> list[str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = importlib.import_module(name)
    except Exception:  # not built on this platform
        return []
    chunks = [mod.__doc__ or ""]
    for key, obj in sorted(vars(mod).items()):
        obj = getattr(mod, f"__{key}__", obj)  # sys.excepthook may be replaced; sys.__excepthook__ is not
        if key.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if getattr(obj, "__module__", None) not in (name, name.lstrip("_")):
            continue  # not the module's own text
        chunks.append(_clean_doc(obj))
        if inspect.isclass(obj):
            for k, member in sorted(vars(obj).items()):
                if not k.startswith("_"):
                    chunks.append(_clean_doc(member))
    return chunks


def _clean_doc(obj) -> str:
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


def _source_chunks(path: Path) -> list[str]:
    """Docstrings and comment blocks of one source file, in line order."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return []
    found: list[tuple[int, str]] = []
    in_string: set[int] = set()  # lines inside string literals, where '#' is not a comment
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                found.append((node.body[0].lineno, doc))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.end_lineno > node.lineno:
            in_string.update(range(node.lineno, node.end_lineno + 1))
    block: list[str] = []
    start = 0
    for i, line in enumerate(source.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("#") and i not in in_string:
            if not block:
                start = i
            block.append(stripped.lstrip("#!:").removeprefix(" ").rstrip())
            continue
        if block:
            found.append((start, _comment_text(block)))
            block = []
    if block:
        found.append((start, _comment_text(block)))
    found.sort(key=lambda t: t[0])
    return [text for _, text in found if text]


def _comment_text(lines: list[str]) -> str:
    """A comment block as prose, or '' for rulers, pragmas, commented-out code and tables."""
    lines = [ln for ln in lines if not ln or (any(c.isalnum() for c in ln) and not ln.startswith("-*-"))]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    words = [w for w in text.split() if w.isalpha()]
    if len(words) < 4 or sum(c.isalpha() or c.isspace() for c in text) < 0.75 * len(text):
        return ""
    return text
