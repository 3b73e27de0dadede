"""Native CPU kernels: the decode step (llmctl/csrc/decode.cpp) and causal attention's forward and backward for
training (llmctl/csrc/attention.cpp, used through llmctl/attention.py), one library built on first use with the
system's C++ compiler, cached.

`load()` returns the ctypes library, or None when it can't be had: no compiler (`$CXX`, g++ or c++), a failed
build, or `LLMCTL_NATIVE=0` in the environment. Callers then keep PyTorch's path; `reason` says why. The build
takes a few seconds and lands in `llmctl.cache_dir()` (`$LLMCTL_CACHE`, or `~/.cache/llmctl`) under a name that
hashes the sources, the compiler, its flags and this CPU's feature flags (-march=native), so a cache shared between
machines never runs code built for another CPU. The library links OpenMP by its soname and is loaded after PyTorch,
so it shares PyTorch's OpenMP runtime (and `torch.set_num_threads`).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch  # noqa: F401  (loaded first: its OpenMP runtime is the one the library binds to)

from llmctl import cache_dir

SOURCES = [Path(__file__).with_name("csrc") / name for name in ("decode.cpp", "attention.cpp")]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
_lib: ctypes.CDLL | None = None
_tried = False
reason = ""  # why load() returned None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _build() -> ctypes.CDLL:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise RuntimeError("no C++ compiler (set CXX, or install g++)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    parts = [*(src.read_bytes() for src in SOURCES), version.encode(), " ".join(FLAGS).encode(), _cpu_flags().encode()]
    key = hashlib.sha256(b"\0".join(parts))
    out = cache_dir() / "native" / f"llmctl-{key.hexdigest()[:16]}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            cmd = [cxx, *FLAGS, *map(str, SOURCES), "-o", tmp]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if r.returncode != 0:
                raise RuntimeError(f"{cxx} failed: {(r.stderr or r.stdout).strip()[-500:]}")
            os.replace(tmp, out)  # atomic: concurrent builders each write their own file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(out))
    lib.llmctl_decode.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_float,
                                  ctypes.c_void_p, ctypes.c_void_p]  # fmt: skip
    lib.llmctl_decode.restype = ctypes.c_int
    lib.llmctl_work_floats.argtypes = [ctypes.c_void_p]
    lib.llmctl_work_floats.restype = ctypes.c_int64
    ptr, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    lib.llmctl_step.argtypes = [ptr, ptr, f32, f32, *[ptr] * 6, i64, ptr, i64, ptr, ptr, ptr]
    lib.llmctl_step.restype = ctypes.c_int
    lib.llmctl_step_floats.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.llmctl_step_floats.restype = ctypes.c_int64
    lib.llmctl_attn_fwd.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, f32]
    lib.llmctl_attn_fwd.restype = ctypes.c_int
    lib.llmctl_attn_bwd.argtypes = [*[ptr] * 10, f32]
    lib.llmctl_attn_bwd.restype = ctypes.c_int
    return lib


def sgemm() -> int | None:
    """The address of the Fortran `sgemm` that PyTorch's CPU library exports (its MKL or OpenBLAS), for the
    native batched step's matmuls; None when it exports none (that step then stays with PyTorch)."""
    path = Path(torch.__file__).with_name("lib") / "libtorch_cpu.so"
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
        return None
    for name in ("sgemm_", "SGEMM"):
        try:
            return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
        except AttributeError:
            continue
    return None


def load() -> ctypes.CDLL | None:
    """The native library, built if needed; None (and `reason`) when it can't be had. Tried once a process."""
    global _lib, _tried, reason
    if os.environ.get("LLMCTL_NATIVE", "1") in ("0", "false", "no", "off"):
        reason = "LLMCTL_NATIVE=0"
        return None
    if not _tried:
        _tried = True
        try:
            _lib = _build()
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            reason = str(e)
    return _lib
