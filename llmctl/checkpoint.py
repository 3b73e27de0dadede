"""Run directories and checkpoints.

A run directory holds `config.yaml`, `metrics.jsonl` and `checkpoints/step-NNNNNNN/`. A step directory is first
written as `checkpoints/.tmp-step-NNNNNNN/` and renamed into place once complete, so a crash, a kill or a
full disk never leaves a half-written `step-*` directory: every `step-*` directory is complete.
"""

from __future__ import annotations

import re
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
    """MODEL -> a directory holding `need`: the directory itself, or a run directory's newest complete checkpoint."""
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
