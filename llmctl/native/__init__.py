"""Native CPU kernels: the decode step (csrc/decode.cpp, used through llmctl/engine/step.py) and causal attention's
forward and backward for training (csrc/attention.cpp, used through llmctl/attention.py), one library built on first
use with the system's C++ compiler, cached. Its C interface is mirrored in `abi` (ctypes Structures for the C
structs, the functions' signatures).

`load()` returns the ctypes library, or None when it can't be had: no compiler (`$CXX`, g++ or c++), a failed
build, or `LLMCTL_NATIVE=0` in the environment. Callers then keep PyTorch's path; `reason` says why. The build
takes a few seconds and lands in `llmctl.cache_dir()` (`$LLMCTL_CACHE`, or `~/.cache/llmctl`) under a name that
hashes the sources, the compiler, its flags and this CPU's feature flags (-march=native), so a cache shared between
machines never runs code built for another CPU. The library links OpenMP by its soname and is loaded after PyTorch,
so it shares PyTorch's OpenMP runtime (and `torch.set_num_threads`).

A cached library is verified before it is loaded, never trusted for its name. Beside `llmctl-KEY.so` the build
records its sha256 in `llmctl-KEY.so.sha256` (`sha256sum -c` format); both are written to a temporary file,
fsynced and renamed into place (then the directory is fsynced), under an exclusive lock on the directory that
readers share. Before loading, the directory (`native/`, else `native-UID/`) must be this user's and writable by
no one else, and both files regular (no symlinks), this user's, writable by no one else; the library's bytes are
read through that one descriptor, must hash to the record, and their ELF dynamic symbol table must define every
function `abi` declares. The loader then maps those verified bytes, copied to an anonymous memory file
(memfd; elsewhere a private temporary file), not the cache file: no later change to the cache (a truncation, a
concurrent rebuild) can change or fault (SIGBUS) the code this process runs; and the loaded library's structs must
have the sizes of `abi`'s Structures. A library that fails a check is never used: it is rebuilt and replaced (one
`warning:` line on stderr), or, where the rebuild fails, PyTorch's path runs. Where no cache directory is safe,
the library is built privately for the process (a warning), not cached.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import secrets
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import torch  # noqa: F401  (loaded first: its OpenMP runtime is the one the library binds to)

from llmctl import cache_dir
from llmctl.native import abi
from llmctl.native.abi import SYMBOLS

SOURCES = [Path(__file__).with_name("csrc") / name for name in ("decode.cpp", "attention.cpp")]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
MAX_BYTES = 64 << 20  # a larger "library" is not one of ours
_lib: ctypes.CDLL | None = None
_tried = False
_fds: list[int] = []  # the memory files behind loaded libraries: kept open, so no later load reuses their name
reason = ""  # why load() returned None


class _Bad(RuntimeError):
    """A cached file that must not be loaded; the message says what is wrong with it."""


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def _compile(cxx: str) -> bytes:
    """The library's bytes, built in a private temporary directory."""
    with tempfile.TemporaryDirectory(prefix="llmctl-build-") as d:
        out = Path(d) / "llmctl.so"
        r = subprocess.run([cxx, *FLAGS, *map(str, SOURCES), "-o", str(out)], capture_output=True, text=True,
                           timeout=300)  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {(r.stderr or r.stdout).strip()[-500:]}")
        return out.read_bytes()


def _open_dir(path: Path) -> int:
    """A descriptor of directory `path` (made if missing): this user's, not a symlink, and writable by no one else
    (where one of this user's is group- or other-writable, that write permission is removed first); else _Bad or
    OSError."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid():
            raise _Bad(f"is owned by uid {st.st_uid}, not this user (uid {os.getuid()})")
        if st.st_mode & 0o022:
            os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~0o022)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read(dfd: int, name: str) -> bytes | None:
    """The bytes of file `name` in directory dfd, None if there is none; _Bad unless it is a regular file (no
    symlink), this user's and writable by no one else. Read through the descriptor that was checked (read, never
    mapped: a truncated file is a short read, not a SIGBUS)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise _Bad(f"can't be opened safely ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Bad("is not a regular file")
        if st.st_uid != os.getuid():
            raise _Bad(f"is owned by uid {st.st_uid}, not this user (uid {os.getuid()})")
        if st.st_mode & 0o022:
            raise _Bad(f"is writable by others (mode {stat.S_IMODE(st.st_mode):o})")
        if st.st_size > MAX_BYTES:
            raise _Bad(f"is too large ({st.st_size} bytes)")
        chunks, n = [], 0
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            n += len(chunk)
            if n > MAX_BYTES:
                raise _Bad("is too large")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _exported(data: bytes) -> set[str]:
    """The functions and objects an ELF shared library's dynamic symbol table defines (parsed, not loaded)."""
    try:
        if data[:4] != b"\x7fELF" or data[4] not in (1, 2) or data[5] not in (1, 2):
            raise ValueError
        is64, e = data[4] == 2, "<" if data[5] == 1 else ">"
        if struct.unpack_from(e + "H", data, 16)[0] != 3:  # ET_DYN
            raise ValueError
        shoff, shentsize, shnum = (
            struct.unpack_from(e + "Q", data, 0x28)[0], *struct.unpack_from(e + "HH", data, 0x3A)
        ) if is64 else (struct.unpack_from(e + "I", data, 0x20)[0], *struct.unpack_from(e + "HH", data, 0x2E))

        def section(i):  # (type, offset, size, link, entsize)
            at = shoff + i * shentsize
            if is64:
                _, typ, _, _, off, size, link, _, _, ent = struct.unpack_from(e + "IIQQQQIIQQ", data, at)
            else:
                _, typ, _, _, off, size, link, _, _, ent = struct.unpack_from(e + "IIIIIIIIII", data, at)
            return typ, off, size, link, ent

        names = set()
        for i in range(shnum):
            typ, off, size, link, ent = section(i)
            if typ != 11 or not ent:  # SHT_DYNSYM
                continue
            _, stroff, strsize, _, _ = section(link)
            strtab = data[stroff : stroff + strsize]
            for at in range(off, off + size - ent + 1, ent):
                if is64:
                    name, info, _, shndx = struct.unpack_from(e + "IBBH", data, at)
                else:
                    name, _, _, info, _, shndx = struct.unpack_from(e + "IIIBBH", data, at)
                # defined; global or weak; an object, a function or an indirect function
                if shndx != 0 and info >> 4 in (1, 2) and (info & 0xF) in (1, 2, 10):
                    names.add(strtab[name : strtab.index(b"\0", name)].decode("utf-8", "replace"))
        return names
    except (ValueError, IndexError, struct.error):
        raise _Bad("is not a valid ELF shared library") from None


def _verified(dfd: int, name: str) -> bytes | None:
    """The cached library `name`'s bytes, None if there is none; _Bad if they must not be loaded."""
    data = _read(dfd, name)
    if data is None:
        return None
    try:
        record = _read(dfd, name + ".sha256")
    except _Bad as e:
        raise _Bad(f"has an unusable hash record ({name}.sha256 {e})") from None
    if record is None:
        raise _Bad(f"has no hash record ({name}.sha256)")
    if record.decode("ascii", "replace").split() != [hashlib.sha256(data).hexdigest(), name]:
        raise _Bad("does not hash to the sha256 recorded when it was built (truncated, damaged or replaced)")
    _check_symbols(data)
    return data


def _check_symbols(data: bytes) -> None:
    missing = [s for s in SYMBOLS if s not in _exported(data)]
    if missing:
        raise _Bad(f"lacks symbol(s) {', '.join(missing)}")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _put(dfd: int, name: str, data: bytes) -> None:
    """Write `name` in directory dfd atomically: a temporary file, fsynced, renamed into place (mode 644)."""
    tmp = f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
    try:
        try:
            _write_all(fd, data)
            os.fchmod(fd, 0o644)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dfd)
        except OSError:
            pass
        raise


def _lock(dfd: int, op: int) -> None:
    """flock on the cache directory, where the file system has it (a lock that can't be had is no error)."""
    try:
        fcntl.flock(dfd, op)
    except OSError:
        pass


def _store(dfd: int, name: str, data: bytes) -> None:
    """Cache a verified build: the library, then its hash record, then the directory, fsynced, under an exclusive
    lock on the directory (readers take it shared: they never see a library without its record)."""
    _lock(dfd, fcntl.LOCK_EX)
    try:
        _put(dfd, name, data)
        _put(dfd, name + ".sha256", f"{hashlib.sha256(data).hexdigest()}  {name}\n".encode())
        os.fsync(dfd)
    finally:
        _lock(dfd, fcntl.LOCK_UN)


def _dlopen(data: bytes) -> ctypes.CDLL:
    """Load a verified copy of `data`: from an anonymous memory file (Linux), else a private temporary file; never
    from the cache, whose file could change under the mapping (a truncation faults the process: SIGBUS)."""
    try:
        fd = os.memfd_create("llmctl-native", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        fd = -1
    if fd >= 0:
        try:
            _write_all(fd, data)
            lib = ctypes.CDLL(f"/proc/self/fd/{fd}")
            _fds.append(fd)  # glibc knows the library by this name: the number must not be reused
            return lib
        except OSError:  # no /proc, or memory files may not be executed here (vm.memfd_noexec)
            os.close(fd)
    with tempfile.TemporaryDirectory(prefix="llmctl-native-") as d:
        path = Path(d) / f"llmctl-{secrets.token_hex(8)}.so"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o700)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        return ctypes.CDLL(str(path))


def _bind(data: bytes) -> ctypes.CDLL:
    """Load verified library bytes and declare its functions' signatures."""
    lib = _dlopen(data)
    for s in SYMBOLS:
        if not hasattr(lib, s):  # parsed as present: a loader disagreeing is a bad library all the same
            raise _Bad(f"lacks symbol {s} once loaded")
    wrong = abi.bind(lib)
    if wrong:
        raise _Bad(wrong)
    return lib


def _fresh(cxx: str) -> tuple[bytes, ctypes.CDLL]:
    """A new build, checked as a cached one is, and loaded."""
    data = _compile(cxx)
    try:
        _check_symbols(data)
        return data, _bind(data)
    except _Bad as e:
        raise RuntimeError(f"the library {cxx} built {e}") from None


def _library_name(cxx: str) -> str:
    """The cached library's file name for compiler `cxx` (in `cache_dir() / "native"`)."""
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    parts = [*(src.read_bytes() for src in SOURCES), version.encode(), " ".join(FLAGS).encode(), _cpu_flags().encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    return f"llmctl-{key}.so"


def _build() -> ctypes.CDLL:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise RuntimeError("no C++ compiler (set CXX, or install g++)")
    name = _library_name(cxx)
    base, dfd, unsafe = cache_dir(), -1, ""
    for where in (base / "native", base / f"native-{os.getuid()}"):  # the second where the first is another's
        try:
            dfd = _open_dir(where)
            break
        except (OSError, _Bad) as e:
            unsafe = unsafe or f"{where} {(e.strerror or e) if isinstance(e, OSError) else e}"
    if dfd < 0:  # no directory of ours to cache in
        try:
            _, lib = _fresh(cxx)
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            _warn(f"native library cache {unsafe}; a private build failed ({e}): PyTorch's path runs")
            raise
        _warn(f"native library cache {unsafe}; using a private build, not cached")
        return lib
    path = f"{where}/{name}"
    try:
        bad = ""
        try:
            _lock(dfd, fcntl.LOCK_SH)  # no writer between a library and its record
            try:
                data = _verified(dfd, name)
            finally:
                _lock(dfd, fcntl.LOCK_UN)
            if data is not None:
                return _bind(data)
        except (_Bad, OSError) as e:
            bad = str(e) if isinstance(e, _Bad) else f"can't be loaded ({e})"
        try:
            data, lib = _fresh(cxx)
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            if bad:
                _warn(f"native library {path} {bad}; rebuilding it failed ({e}): PyTorch's path runs")
                raise RuntimeError(f"{path} {bad}; rebuilding it failed: {e}") from None
            raise
        try:
            _store(dfd, name, data)
        except OSError as e:
            _warn(f"native library {path}{' ' + bad if bad else ''}: rebuilt, but can't be cached ({e})")
            return lib
        if bad:
            _warn(f"native library {path} {bad}; rebuilt")
        return lib
    finally:
        os.close(dfd)


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
