"""Run directories, checkpoints, durable writes, and reading safetensors files.

A run directory holds `config.yaml`, `metrics.jsonl` and `checkpoints/step-NNNNNNN/`. A step directory is first
written as `checkpoints/.tmp-step-NNNNNNN/`, its files and itself fsynced, and renamed into place once complete,
so a crash, a kill, a power cut or a full disk never leaves a half-written `step-*` directory: every `step-*`
directory is complete. Old checkpoints are pruned by renaming them to `.del-*` first (one atomic step) and then
deleting, so a kill mid-prune never leaves a partial `step-*` behind.

The helpers below are the one way llmctl publishes anything (checkpoints, shard sets, tokenizers, merged models,
small files): write under a temporary name, fsync, rename, fsync the directory. `writing(path)` turns any
failure while writing (a full disk, a read-only file system, a permission) into one UserError naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import sys
from pathlib import Path

from llmctl.errors import UserError

STEP_RE = re.compile(r"^step-(\d{7,})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run directory, oldest first, as (step, path)."""
    ck = Path(run_dir) / "checkpoints"
    if not ck.is_dir():
        return []
    out = []
    for p in ck.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(run_dir: Path) -> Path | None:
    cks = list_checkpoints(run_dir)
    return cks[-1][1] if cks else None


def resolve_model_dir(path: str | Path, need: str = "config.json") -> Path:
    """MODEL -> a directory holding `need`: the directory itself, a run directory's newest complete checkpoint, or
    the cached snapshot of a Hugging Face hub id (`org/name[@revision]`, see hub.py; a local path wins)."""
    from llmctl import hub

    snapshot = hub.resolve(path)
    if snapshot is not None:
        if not (snapshot / need).is_file():
            raise UserError(f"{path} in the local Hugging Face cache ({snapshot}) has no {need} (an interrupted "
                            f"download? fetch it again with: llmctl download {path})")
        return snapshot
    p = Path(path)
    if not p.exists():
        raise UserError(f"no such file or directory: {p}")
    if p.is_file():
        raise UserError(f"expected a model directory or a run directory, got a file: {p}")
    if (p / need).is_file():
        return p
    latest = latest_checkpoint(p)
    if latest is not None and (latest / need).is_file():
        return latest
    if (p / "checkpoints").is_dir():
        raise UserError(f"run directory {p} has no complete checkpoint yet")
    raise UserError(f"{p} is neither a model directory (no {need}) nor a run directory (no checkpoints/)")


# ------------------------------------------------------------------------------------------- durable writes

_HINTS = {
    errno.ENOSPC: "free some space or choose another directory",
    errno.EDQUOT: "free some space or choose another directory",
    errno.EROFS: "choose a directory on a writable file system",
    errno.EACCES: "check the permissions, or choose another directory",
    errno.EPERM: "check the permissions, or choose another directory",
    errno.EEXIST: "it is in the way; remove it or choose another path",
    errno.ENOTDIR: "a file is in the way where a directory is needed; choose another path",
    errno.EISDIR: "a directory is in the way where a file is needed; choose another path",
}


def _diagnose(exc: BaseException, path: Path) -> int | None:
    """The errno behind a failed write: the exception's own, or (libraries that hide it: torch.save raises a
    RuntimeError, safetensors its own error) what the file system says now."""
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    text = str(exc)
    for code in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT):
        if os.strerror(code) in text:
            return code
    d = Path(path)
    while not d.exists() and d != d.parent:
        d = d.parent
    try:
        st = os.statvfs(d)
        if st.f_flag & os.ST_RDONLY:
            return errno.EROFS
        if st.f_bavail * st.f_frsize < (1 << 20):
            return errno.ENOSPC
    except OSError:
        pass
    return None


def os_error_message(exc: BaseException, path) -> str:
    code = _diagnose(exc, Path(path))
    if code is None:
        return f"cannot write {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    hint = _HINTS.get(code)
    return f"cannot write {path}: {os.strerror(code)}" + (f" ({hint})" if hint else "")


def describe_os_error(e: OSError) -> str:
    """One line for an OSError reaching the command line: what, where, and what to do."""
    name = e.filename
    what = e.strerror or str(e)
    hint = _HINTS.get(e.errno) if e.errno not in (errno.ENOENT,) else None
    return (f"{what}: {name}" if name else what) + (f" ({hint})" if hint else "")


@contextlib.contextmanager
def writing(path, cleanup=None):
    """Run a block that writes `path`; any failure (OSError, or a library's error over one: torch.save raises
    RuntimeError, safetensors SafetensorError) becomes one UserError naming the path and what to do. `cleanup` (a
    temporary file or directory) is removed on any failure."""
    try:
        yield
    except BaseException as e:
        _remove(cleanup)
        if isinstance(e, UserError) or not isinstance(e, Exception):
            raise
        if isinstance(e, (OSError, RuntimeError)) or type(e).__name__ == "SafetensorError":
            raise UserError(os_error_message(e, path)) from e
        raise


def _remove(path) -> None:
    if path is None:
        return
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


def fsync_dir(path) -> None:
    """fsync a directory: its entries (a rename into it) survive a power cut."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not sync directories
    finally:
        os.close(fd)


def fsync_tree(root) -> None:
    """fsync every file under `root`, then every directory, deepest first."""
    root = Path(root)
    dirs = [root]
    for p in root.rglob("*"):
        if p.is_symlink():
            continue
        if p.is_dir():
            dirs.append(p)
        elif p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
        fsync_dir(d)


def atomic_write(path, data: str | bytes) -> None:
    """Write a small file whole or not at all: a temporary file in the same directory, fsync, rename, fsync the
    directory. A failure leaves the old file (if any) as it was and raises UserError naming the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with writing(path, cleanup=tmp):
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)


def publish_dir(tmp, final) -> None:
    """Make the finished directory `tmp` appear as `final` in one rename, after fsyncing its contents. An existing
    `final` is first moved aside (`.old-NAME-PID`) and removed after the rename, so `final` is never partial."""
    tmp, final = Path(tmp), Path(final)
    with writing(final, cleanup=tmp):
        fsync_tree(tmp)
        old = None
        if final.exists() or final.is_symlink():
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            _remove(old)
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    _remove(old)


def remove_dir(path) -> None:
    """Delete a published directory so that a kill midway leaves nothing that looks like it: rename it to
    `.del-NAME` (atomic), fsync the parent, then delete. `clean_stale` removes leftovers."""
    p = Path(path)
    gone = p.with_name(f".del-{p.name}")
    _remove(gone)
    os.replace(p, gone)
    fsync_dir(p.parent)
    shutil.rmtree(gone, ignore_errors=True)


def clean_stale(directory) -> None:
    """Remove what an interrupted write or prune left in `directory`: `.tmp-*`, `.del-*` and `.old-*` entries."""
    d = Path(directory)
    if not d.is_dir():
        return
    for p in d.iterdir():
        if p.name.startswith((".tmp-", ".del-", ".old-")):
            _remove(p)


# ------------------------------------------------------------------------------------------- reading

_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def read_safetensors(path: Path, data: bool = True):
    """(name, tensor) for every tensor of a .safetensors file, read one at a time with plain reads: unlike a
    memory map, the file's pages never count against the process, so loading needs the model's memory plus
    one tensor, not twice the model. A malformed file is a UserError. data=False checks the layout only."""
    import torch

    bad = lambda why: UserError(f"cannot read {path}: {why}")  # noqa: E731
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(0)
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise bad("not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise bad(f"invalid header ({e})") from None
        if not isinstance(header, dict):
            raise bad("invalid header")
        base = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape = getattr(torch, _ST_DTYPES[info["dtype"]]), list(info["shape"])
                start, end = info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise bad(f"unsupported or malformed entry for {name!r}") from None
            numel = 1
            for d in shape:
                numel *= d
            if end - start != numel * dtype.itemsize or start < 0 or base + end > size:
                raise bad(f"entry {name!r} does not fit the file")
            if not data:
                continue
            buf = bytearray(end - start)
            f.seek(base + start)
            f.readinto(buf)
            yield name, (torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)).reshape(shape)


def check_safetensors(path: Path) -> None:
    """Raise UserError unless `path` is a whole safetensors file (its header parses and every tensor fits)."""
    for _ in read_safetensors(path, data=False):
        pass


# ------------------------------------------------------------------------------------------- resuming


def check_resumable(ck: Path) -> str | None:
    """What is wrong with checkpoint `ck` for resuming (None: nothing): its trainer state, optimizer, RNG state
    and model weights must be readable. Loads each file once (weights only; nothing is unpickled)."""
    import torch

    try:
        state = json.loads((ck / "trainer_state.json").read_text())
    except (OSError, ValueError) as e:
        return f"trainer_state.json unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    m = STEP_RE.match(ck.name)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or (m and state["step"] != int(m[1])):
        return "trainer_state.json does not hold this step"
    for name in ("optimizer.pt", "rng.pt", *sorted(p.name for p in ck.glob("task_state-*.pt"))):
        try:
            obj = torch.load(ck / name, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises RuntimeError, pickle / EOF / unpickling errors on a damaged file
            return f"{name} unreadable ({type(e).__name__})"
        if not isinstance(obj, dict):
            return f"{name} does not hold a state dict"
    weights = ck / "model.safetensors" if (ck / "model.safetensors").exists() else ck / "adapter_model.safetensors"
    try:
        check_safetensors(weights)
    except (UserError, OSError) as e:
        return f"{weights.name}: {e}"
    return None


def _warn(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def find_resume(out_dir, warn=_warn) -> Path | None:
    """The newest complete checkpoint of a run directory that can be resumed from; a damaged newer one is skipped
    with a warning naming what is wrong. None when the run has none; UserError when it has some, all damaged."""
    cks = list_checkpoints(Path(out_dir))
    problems = []
    for _, ck in reversed(cks):
        why = check_resumable(ck)
        if why is None:
            for bad, what in problems:
                warn(f"warning: checkpoint {bad} is damaged ({what}); resuming from {ck.name} instead")
            return ck
        problems.append((ck, why))
    if problems:
        raise UserError(f"no checkpoint of {out_dir} can be resumed from (newest: {problems[0][0].name}: "
                        f"{problems[0][1]}); use a new out_dir")
    return None
