"""Distribution and mixed precision: the only module that imports accelerate.

One process, `torchrun --nproc-per-node N -m llmctl ...` and `accelerate launch -m llmctl ...` all come through
`Dist`: DDP (gloo on CPU, nccl on GPU), FSDP when the accelerate config asks for it, and autocast for bf16/fp16.
`setup` is the first step of every training stage; `Tally` sums a stage's training figures across processes.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch

from llmctl.errors import UserError


def resolve_device(name: str | None) -> torch.device:
    """--device: None picks cuda when there is one, else cpu; a device this machine lacks is a UserError."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device: unknown device {name!r} (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: this machine has no CUDA device (or this torch build has no CUDA "
                            "support); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UserError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: not supported (use cpu or cuda)")
    return dev


class Dist:
    def __init__(self, precision: str = "fp32", seed: int | None = None):
        if precision == "fp16" and not torch.cuda.is_available():
            raise UserError("train.precision fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
        if precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            raise UserError("train.precision bf16 is not supported by this GPU; use fp16 or fp32")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not torch.cuda.is_available():
            # accelerate takes a CPU multi-process run from this variable (as `accelerate launch --cpu` sets it).
            os.environ.setdefault("ACCELERATE_USE_CPU", "true")
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        # One process may train several times (tests, benchmarks, the Python API) with other precisions: start
        # accelerate's mixed-precision state afresh (the process group, in PartialState, is kept).
        AcceleratorState._reset_state(reset_partial_state=False)
        mp = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
        self.accelerator = Accelerator(mixed_precision=mp)
        self.precision = precision
        self.device = self.accelerator.device
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        if seed is not None:
            torch.manual_seed(seed)

    # ------------------------------------------------------------------ wrapping
    def prepare(self, model, optimizer):
        return self.accelerator.prepare(model, optimizer)

    # ------------------------------------------------------------------ steps
    def backward(self, loss):
        self.accelerator.backward(loss)

    def no_sync(self, model, skip: bool):
        """Skip the gradient all-reduce on all but the last micro-step of an accumulation."""
        return self.accelerator.no_sync(model) if skip and self.world > 1 else contextlib.nullcontext()

    def clip_grad_norm(self, parameters, max_norm: float) -> torch.Tensor:
        return self.accelerator.clip_grad_norm_(parameters, max_norm if max_norm > 0 else float("inf"))

    def autocast(self):
        return self.accelerator.autocast()

    # ------------------------------------------------------------------ collectives
    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over processes (returns it unchanged in a single process)."""
        if self.world == 1:
            return t
        t = t.to(self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t

    def any(self, flag: bool) -> bool:
        """True on every process if `flag` is true on any of them."""
        if self.world == 1:
            return flag
        return bool(self.all_sum(torch.tensor([1.0 if flag else 0.0])).item() > 0)

    def barrier(self):
        if self.world > 1:
            self.accelerator.wait_for_everyone()

    def end(self):
        self.accelerator.end_training()


def setup(recipe) -> tuple[Dist, Path | None]:
    """A training stage's setup: processes, precision and seed, and the newest resumable checkpoint of out_dir
    (announced on stderr), or None."""
    from llmctl.checkpoint import find_resume

    dist = Dist(recipe.train.precision, seed=recipe.seed)
    resume = find_resume(recipe.out_dir)
    if resume is not None and dist.is_main:
        print(f"resuming from {resume}", file=sys.stderr)
    return dist, resume


class Tally:
    """Named training figures summed over micro-batches (tensors stay on the device: no host sync per micro-batch),
    then across processes by `take(names)` -- the same names on every process -- which starts afresh."""

    def __init__(self, dist: Dist):
        self.dist, self.sums = dist, {}

    def add(self, **figures) -> None:
        for k, v in figures.items():
            self.sums[k] = self.sums.get(k, 0.0) + (v.detach().float().sum() if torch.is_tensor(v) else float(v))

    def take(self, names) -> dict[str, float]:
        t = self.dist.all_sum(torch.tensor([float(self.sums.get(k, 0.0)) for k in names], dtype=torch.float64))
        self.sums = {}
        return dict(zip(names, t.cpu().tolist()))

    def means(self, names, per: str = "n") -> dict[str, float]:
        """take(), each figure divided by the `per` count (e.g. pairs); {} when there is none."""
        t = self.take((per, *names))
        return {k: t[k] / t[per] for k in names} if t[per] else {}

    def state_dict(self) -> dict:
        return {k: float(v) for k, v in self.sums.items()}

    def load_state_dict(self, d: dict) -> None:
        self.sums = {k: float(v) for k, v in d.items()}

