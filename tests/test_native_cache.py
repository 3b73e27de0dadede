"""The native library's cache (llmctl/native/) is verified before anything in it is loaded: a truncated library, one
lacking a symbol, one owned by another user or writable by others, one whose bytes don't hash to the record, one
without a record, a symlink -- each is rebuilt (one `warning:` line) and never loaded, or, where the rebuild fails,
PyTorch's path runs; never a crash (a truncated library used to kill every generate with SIGBUS, rc 135). Each case
runs in its own process, on its own copy of a cache built once for the module."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmctl import hf, native
from llmctl.model import ModelConfig, Transformer

ROOT = Path(__file__).resolve().parents[1]
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
ROOT_ONLY = pytest.mark.skipif(os.getuid() != 0, reason="needs root (chown to another user)")

# loads the library, then checks the attention op (native where loaded) against PyTorch's attention
SCRIPT = r"""
import torch
from llmctl import attention, native
torch.set_num_threads(1)
lib = native.load()
print("native", lib is not None, native.reason)
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 2, 24, 16, generator=g) for _ in range(3))
out, _ = attention.causal_attention(q, k, v)
ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(1, 24, 32)
torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
print("attention ok")
"""

# a stand-in library: every symbol llmctl binds (or all but llmctl_attn_bwd), and a constructor that tells when it
# is loaded
FAKE = r"""
#include <stdio.h>
__attribute__((constructor)) static void loaded(void) { fputs("FAKE LIBRARY LOADED\n", stderr); }
int llmctl_decode(void) { return 0; }
long llmctl_struct_sizes(void) { return 0; }
long llmctl_work_floats(void) { return 0; }
int llmctl_step(void) { return 0; }
long llmctl_step_floats(void) { return 0; }
int llmctl_attn_fwd(void) { return 0; }
#ifdef ALL
int llmctl_attn_bwd(void) { return 0; }
#endif
"""


def run(cache: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONPATH": str(ROOT), "LLMCTL_CACHE": str(cache), "OMP_NUM_THREADS": "1", **(env or {})}
    e.pop("LLMCTL_NATIVE", None)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=e, cwd=ROOT, timeout=600)


def warnings(r: subprocess.CompletedProcess) -> list[str]:
    return [line for line in r.stderr.splitlines() if line.startswith("warning:")]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A cache directory holding a verified build (made once: a few seconds)."""
    if CXX is None:
        pytest.skip("no C++ compiler")
    cache = tmp_path_factory.mktemp("native-cache")
    r = run(cache, "-c", SCRIPT)
    assert r.returncode == 0, r.stderr
    if "native True" not in r.stdout:
        pytest.skip(f"no native library here: {r.stdout}")
    assert not warnings(r), r.stderr
    return cache


@pytest.fixture(scope="module")
def fakes(tmp_path_factory) -> dict[str, bytes]:
    """Stand-in libraries' bytes: "all" symbols, or "missing" llmctl_attn_bwd."""
    d = tmp_path_factory.mktemp("fake")
    (d / "fake.c").write_text(FAKE)
    out = {}
    for kind, defs in (("all", ["-DALL"]), ("missing", [])):
        subprocess.run([CXX, "-x", "c", "-shared", "-fPIC", *defs, str(d / "fake.c"), "-o", str(d / kind)], check=True)
        out[kind] = (d / kind).read_bytes()
    return out


@pytest.fixture
def cache(built, tmp_path) -> Path:
    """This test's own copy of the built cache."""
    return Path(shutil.copytree(built, tmp_path / "cache", symlinks=True))


def library(cache: Path) -> Path:
    [so] = (cache / "native").glob("llmctl-*.so")
    return so


def replace(so: Path, data: bytes) -> None:
    """Put `data` in place of the library, with a matching hash record: only the other checks can refuse it."""
    so.write_bytes(data)
    so.with_name(so.name + ".sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  {so.name}\n")


def assert_verified(cache: Path) -> None:
    """The cache holds exactly a library and its hash record, which a load would accept."""
    so = library(cache)
    assert sorted(p.name for p in so.parent.iterdir()) == [so.name, so.name + ".sha256"]  # no temporary files left
    for p in (so.parent, so, so.with_name(so.name + ".sha256")):
        st = p.lstat()
        assert st.st_uid == os.getuid() and not st.st_mode & 0o022 and not stat.S_ISLNK(st.st_mode)
    data = so.read_bytes()
    assert so.with_name(so.name + ".sha256").read_text().split() == [hashlib.sha256(data).hexdigest(), so.name]
    assert set(native.SYMBOLS) <= native._exported(data)


def truncate(so: Path, fakes) -> None:
    so.write_bytes(so.read_bytes()[: so.stat().st_size // 2])


def flip_byte(so: Path, fakes) -> None:
    data = bytearray(so.read_bytes())
    data[len(data) // 2] ^= 0x40
    so.write_bytes(data)


def missing_symbol(so: Path, fakes) -> None:
    replace(so, fakes["missing"])


def foreign(so: Path, fakes) -> None:
    replace(so, fakes["all"])
    os.chown(so, 65534, 65534)


def world_writable(so: Path, fakes) -> None:
    replace(so, fakes["all"])
    so.chmod(0o666)


def no_record(so: Path, fakes) -> None:
    so.with_name(so.name + ".sha256").unlink()


def symlink(so: Path, fakes) -> None:
    elsewhere = so.parent.parent / "elsewhere.so"
    so.rename(elsewhere)
    so.symlink_to(elsewhere)


@pytest.mark.parametrize("damage, says", [
    (truncate, "does not hash to the sha256 recorded"),
    (flip_byte, "does not hash to the sha256 recorded"),
    (missing_symbol, "lacks symbol(s) llmctl_attn_bwd"),
    pytest.param(foreign, "is owned by uid 65534", marks=ROOT_ONLY),
    (world_writable, "is writable by others (mode 666)"),
    (no_record, "has no hash record"),
    (symlink, "can't be opened safely"),
])  # fmt: skip
def test_a_bad_cached_library_is_rebuilt_never_loaded(cache, fakes, damage, says):
    so = library(cache)
    damage(so, fakes)
    r = run(cache, "-c", SCRIPT)
    assert r.returncode == 0, r.stderr
    assert "native True" in r.stdout and "attention ok" in r.stdout, r.stdout + r.stderr
    assert "FAKE LIBRARY LOADED" not in r.stderr
    [w] = warnings(r)
    assert w.startswith(f"warning: native library {so} {says}") and w.endswith("; rebuilt"), r.stderr
    assert_verified(cache)


def test_a_library_whose_structs_differ_from_abi_is_rebuilt(cache, fakes):
    """A library that passes every file check but reports other struct sizes than llmctl/native/abi.py's
    Structures (its C structs and the ctypes mirror disagree) is never used: rebuilt."""
    so = library(cache)
    replace(so, fakes["all"])  # its llmctl_struct_sizes reports none
    r = run(cache, "-c", SCRIPT)
    assert r.returncode == 0 and "native True" in r.stdout and "attention ok" in r.stdout, r.stdout + r.stderr
    [w] = warnings(r)
    assert w.startswith(f"warning: native library {so} has struct sizes [], not this llmctl's [") and w.endswith(
        "; rebuilt"), r.stderr  # fmt: skip
    assert_verified(cache)


def test_a_good_cache_loads_quietly_and_its_directory_is_made_private(cache):
    """No rebuild, no warning; a directory of this user's that others could write is made private first."""
    so = library(cache)
    (cache / "native").chmod(0o777)
    before = so.stat()
    r = run(cache, "-c", SCRIPT)
    assert r.returncode == 0 and "native True" in r.stdout and not warnings(r), r.stdout + r.stderr
    assert (so.stat().st_ino, so.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert_verified(cache)


def test_a_bad_library_that_cant_be_rebuilt_leaves_pytorchs_path(cache, tmp_path):
    """A compiler that reports the same version but can't build: the truncated library is not loaded, load() gives
    None with the reason, and attention runs PyTorch's path."""
    cxx = tmp_path / "cxx"
    cxx.write_text(f'#!/bin/sh\nif [ "$1" = --version ]; then exec {CXX} --version; fi\necho cannot >&2\nexit 1\n')
    cxx.chmod(0o755)
    so = library(cache)
    truncate(so, None)
    r = run(cache, "-c", SCRIPT, env={"CXX": str(cxx)})
    assert r.returncode == 0, r.stderr
    assert "native False" in r.stdout and "attention ok" in r.stdout, r.stdout + r.stderr
    assert "does not hash" in r.stdout and "rebuilding it failed" in r.stdout and "cannot" in r.stdout
    [w] = warnings(r)
    assert w.startswith(f"warning: native library {so} does not hash") and w.endswith("PyTorch's path runs"), w


@ROOT_ONLY
def test_a_cache_directory_of_another_user_gives_a_private_build(cache, tmp_path):
    """native/ is another user's and native-UID/ is a symlink: nothing there is used or written; a private build
    loads (one warning)."""
    d = cache / "native"
    os.chown(d, 65534, 65534)
    (tmp_path / "target").mkdir()
    (cache / f"native-{os.getuid()}").symlink_to(tmp_path / "target")
    before = sorted(p.name for p in d.iterdir())
    r = run(cache, "-c", SCRIPT)
    assert r.returncode == 0 and "native True" in r.stdout and "attention ok" in r.stdout, r.stdout + r.stderr
    [w] = warnings(r)
    assert w.startswith(f"warning: native library cache {d} is owned by uid 65534") and w.endswith("not cached"), w
    assert sorted(p.name for p in d.iterdir()) == before and not list((tmp_path / "target").iterdir())


def test_generate_with_a_truncated_cached_library(cache, tok_dir, tmp_path):
    """The issue's case: a truncated cached library made every generate die with SIGBUS (rc 135)."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch="llama", vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=96,
                      init_std=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    m = Transformer(cfg)
    model = hf.save_model(m, tmp_path / "model", tokenizer_dir=tok_dir)
    so = library(cache)
    truncate(so, None)
    args = ["-m", "llmctl", "generate", "--model", str(model), "--max-new-tokens", "4", "--temperature", "0", "hi"]
    r = run(cache, *args)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert warnings(r) == [f"warning: native library {so} does not hash to the sha256 recorded when it was built "
                           "(truncated, damaged or replaced); rebuilt"], r.stderr  # fmt: skip
    assert_verified(cache)
