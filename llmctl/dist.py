"""Distribution and mixed precision: the only module that imports accelerate.

One process, `torchrun --nproc-per-node N -m llmctl ...` and `accelerate launch -m llmctl ...` all come through
`Dist`: DDP (gloo on CPU, nccl on GPU), FSDP when the accelerate config asks for it, and autocast for bf16/fp16.
"""

from __future__ import annotations

import contextlib
import os

import torch

from llmctl.errors import UserError


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

    def unwrap(self, model):
        return self.accelerator.unwrap_model(model, keep_torch_compile=False)

    # ------------------------------------------------------------------ steps
    def backward(self, loss):
        self.accelerator.backward(loss)

    def no_sync(self, model, skip: bool):
        """Skip the gradient all-reduce on all but the last micro-step of an accumulation."""
        return self.accelerator.no_sync(model) if skip and self.world > 1 else contextlib.nullcontext()

    def clip_grad_norm(self, parameters, max_norm: float) -> torch.Tensor:
        """The gradients' total L2 norm, after scaling them down to max_norm if above it (<= 0: no clipping)."""
        from accelerate.utils import DistributedType

        acc = self.accelerator
        plain = acc.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
        has_parts = hasattr(torch.nn.utils, "get_total_norm")  # torch >= 2.6
        if not plain or acc.scaler is not None or not has_parts:  # sharded gradients, fp16 loss scaling, old torch
            return acc.clip_grad_norm_(parameters, max_norm if max_norm > 0 else float("inf"))
        # torch's clip_grad_norm_ (every process holds the whole, all-reduced gradient), except that torch always
        # multiplies by the clamped coefficient: skipping the multiply by 1.0 changes no value and saves a pass over
        # all gradients on the steps that need no clipping.
        params = [p for p in parameters if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if max_norm > 0 and bool(max_norm / (norm + 1e-6) < 1):
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm

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
