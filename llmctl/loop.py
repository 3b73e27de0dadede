"""The one training loop, shared by every training stage.

A stage hands over a `Task`: the model, a function giving this process's micro-batches for an optimizer step,
a loss function returning a loss SUM, a function counting the supervised units of a micro-batch, an optional
evaluation, and a function that writes the model directory. Losses are normalised once, here: each
micro-step's sum is divided by the token count of the whole global batch (all micro-steps, all processes), so
gradient accumulation and data parallelism give the gradient of the large batch.

Checkpoints are written atomically (see checkpoint.py) and hold everything needed to resume exactly: the model,
the optimizer, the RNG state and the step (data order and learning rate are pure functions of the step).
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from llmctl import optim as optim_lib
from llmctl import threads as threads_lib
from llmctl.checkpoint import atomic_write, clean_stale, list_checkpoints, publish_dir, remove_dir, step_dir_name, \
    writing
from llmctl.config import dump_recipe, to_dict
from llmctl.dist import Dist
from llmctl.errors import UserError
from llmctl.model import unwrap
from llmctl.progress import Progress

# Peak dense bf16 FLOP/s of known accelerators, for the MFU estimate.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


@dataclass
class Task:
    model: torch.nn.Module
    batches: Callable[[int], list]  # step -> this process's micro-batches (dicts of CPU tensors)
    loss: Callable[[torch.nn.Module, dict], torch.Tensor]  # -> fp32 loss summed over the micro-batch
    count: Callable[[dict], int]  # supervised units (tokens) in a micro-batch
    save_model: Callable[[torch.nn.Module, Path], None]  # writes a model directory (HF format)
    evaluate: Optional[Callable[[torch.nn.Module], dict]] = None  # -> {"val_loss": ..., ...} (all processes)
    flops_per_token: float = 0.0
    # -> extra training figures (e.g. reward, kl) since the last call, merged into each logged training event
    stats: Optional[Callable[[], dict]] = None
    # extra resume state (e.g. an RL rollout buffer), saved in each checkpoint as task_state.pt
    state_dict: Optional[Callable[[], dict]] = None
    load_state_dict: Optional[Callable[[dict], None]] = None


class _StopFlag:
    """SIGTERM / SIGINT ask the loop to save at the next step boundary and stop."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _prepare_run_dir(recipe, out: Path, resume: Optional[Path], start_step: int):
    """Write config.yaml; on resume, check the recipe and drop metrics logged after the checkpoint."""
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    clean_stale(out / "checkpoints")  # left by a crash or a kill mid-save or mid-prune
    cfg_path = out / "config.yaml"
    if resume is not None and cfg_path.exists():
        import yaml

        old = yaml.safe_load(cfg_path.read_text()) or {}
        new = to_dict(recipe)
        for key in ("model", "tokenizer", "init_from"):
            if key in new and key in old and old[key] != new[key]:
                raise UserError(f"incompatible checkpoint: {out} was trained with a different '{key}' "
                                f"({old[key]!r}); use a new out_dir or the original recipe")
    atomic_write(cfg_path, dump_recipe(recipe))
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        kept = []
        for line in metrics.read_text().splitlines():
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if resume is not None and ev.get("step", 0) <= start_step:
                kept.append(line)
        atomic_write(metrics, "".join(k + "\n" for k in kept))


def _peak_flops(train_cfg, device: torch.device) -> Optional[float]:
    if train_cfg.peak_tflops:
        return train_cfg.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in PEAK_FLOPS.items():
            if key in name:
                return flops
    return None


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(recipe, task: Task, dist: Dist, resume: Optional[Path] = None) -> dict:
    """Run optimizer steps up to recipe.train.max_steps; returns the last training and eval figures."""
    tc, oc = recipe.train, recipe.optim
    out = Path(recipe.out_dir)
    state = {"step": 0, "tokens": 0, "skipped": 0}
    if resume is not None:
        state.update(json.loads((resume / "trainer_state.json").read_text()))
    start = state["step"]
    if dist.is_main:
        _prepare_run_dir(recipe, out, resume, start)
    dist.barrier()

    model = task.model.to(dist.device)
    model.gradient_checkpointing = tc.gradient_checkpointing
    optimizer = optim_lib.make_optimizer(model, oc, dist.device)
    if resume is not None:
        try:
            optimizer.load_state_dict(torch.load(resume / "optimizer.pt", map_location="cpu", weights_only=True))
        except (ValueError, KeyError, RuntimeError) as e:
            raise UserError(f"incompatible checkpoint: the optimizer state in {resume} does not fit this run's "
                            f"trainable parameters ({str(e).splitlines()[0]}); use a new out_dir") from None
        _set_rng_state(torch.load(resume / "rng.pt", weights_only=True))
        task_state = resume / f"task_state-{dist.rank}.pt"
        if task.load_state_dict is not None and task_state.is_file():
            task.load_state_dict(torch.load(task_state, map_location="cpu", weights_only=True))
    if tc.compile:
        model = torch.compile(model)
    model, optimizer = dist.prepare(model, optimizer)

    metrics_f = open(out / "metrics.jsonl", "a") if dist.is_main else None
    peak = _peak_flops(tc, dist.device)
    progress = Progress(tc.max_steps, start, enabled=dist.is_main)
    last: dict[str, Any] = {}
    threads = threads_lib.training_controller(tc.threads, dist.device, dist.world)  # None: a fixed thread count

    def log(event: dict):
        last.update(event)
        if metrics_f is not None:
            metrics_f.write(json.dumps(event) + "\n")
            metrics_f.flush()

    def evaluate(step: int):
        if task.evaluate is None:
            return
        model.eval()
        with torch.no_grad(), dist.autocast():
            ev = task.evaluate(model)
        model.train()
        log({"step": step, **ev})
        progress.message(f"step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in ev.items()))

    def save(step: int):
        ck = out / "checkpoints"
        tmp = ck / f".tmp-{step_dir_name(step)}"
        if dist.is_main:
            with writing(tmp, cleanup=tmp):
                ck.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
        if task.state_dict is not None:  # every process's own state (e.g. its rollout buffer)
            dist.barrier()
            with writing(tmp / f"task_state-{dist.rank}.pt", cleanup=tmp):
                torch.save(task.state_dict(), tmp / f"task_state-{dist.rank}.pt")
            dist.barrier()
        if dist.is_main:
            with writing(tmp / "model.safetensors", cleanup=tmp):
                task.save_model(unwrap(model), tmp)
            for name, obj in (("optimizer.pt", optimizer.state_dict()), ("rng.pt", _rng_state())):
                with writing(tmp / name, cleanup=tmp):
                    torch.save(obj, tmp / name)
            with writing(tmp / "trainer_state.json", cleanup=tmp):
                (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step}))
            publish_dir(tmp, ck / step_dir_name(step))  # fsync, rename: visible only once complete
            if tc.keep_last > 0:
                for _, old in list_checkpoints(out)[:-tc.keep_last]:
                    remove_dir(old)
        dist.barrier()

    model.train()
    if start == 0:
        evaluate(0)
    step = start
    t_last, tokens_last = time.perf_counter(), state["tokens"]
    stop = None
    bad_run = 0  # non-finite steps in a row
    with _StopFlag() as flag:
        while step < tc.max_steps:
            if dist.any(flag.signum is not None):
                stop = flag.signum or signal.SIGTERM
                break
            if threads is not None:
                threads.begin()
            lr = optim_lib.lr_at(step, oc, tc.max_steps)
            optim_lib.set_lr(optimizer, lr)
            micro = task.batches(step)
            n_local = sum(int(task.count(b)) for b in micro)
            n_global = int(dist.all_sum(torch.tensor([float(n_local)])).item())
            if n_global == 0:
                raise UserError(f"step {step + 1}: the batch holds no supervised tokens")
            scale = dist.world / n_global  # DDP averages gradients over processes; undo that, divide by tokens
            loss_sum = torch.zeros((), device=dist.device)
            for i, b in enumerate(micro):
                b = {k: v.to(dist.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()}
                with dist.no_sync(model, skip=i < len(micro) - 1):
                    with dist.autocast():
                        loss = task.loss(model, b)
                    dist.backward(loss * scale)
                loss_sum += loss.detach().float()
            loss_val = float(dist.all_sum(loss_sum.reshape(1)).item()) / n_global
            gnorm = dist.clip_grad_norm(model.parameters(), tc.grad_clip)
            gnorm = float(gnorm) if gnorm is not None else float("nan")
            step += 1
            state["tokens"] += n_global
            if math.isfinite(loss_val) and (math.isfinite(gnorm) or tc.grad_clip <= 0):
                optimizer.step()
                bad_run = 0
            else:  # a non-finite loss or gradient never reaches the weights
                state["skipped"] += 1
                bad_run += 1
                progress.message(f"step {step}: non-finite loss/gradient ({loss_val}, {gnorm}); update skipped")
                if tc.max_bad_steps and bad_run >= tc.max_bad_steps:
                    progress.close()
                    kept = list_checkpoints(out)
                    where = f"the last checkpoint, {kept[-1][1]}, is intact" if kept else "no checkpoint was written"
                    raise UserError(f"step {step}: {bad_run} steps in a row had a non-finite loss or gradient "
                                    f"({loss_val}); stopping ({where}). Lower optim.lr, check the data, or raise "
                                    "train.max_bad_steps")
            optimizer.zero_grad(set_to_none=True)
            if threads is not None and (msg := threads.end(n_global)):
                progress.message(f"step {step}: {msg}")
            state["step"] = step
            log_now = step % max(1, tc.log_every) == 0 or step == tc.max_steps
            if log_now:
                now = time.perf_counter()
                tps = (state["tokens"] - tokens_last) / max(now - t_last, 1e-9)
                t_last, tokens_last = now, state["tokens"]
                mfu = tps * task.flops_per_token / peak if peak and task.flops_per_token else None
                ev = {"step": step, "loss": loss_val, "lr": lr, "tokens": state["tokens"], "tok_per_s": tps,
                      "grad_norm": gnorm}
                if mfu is not None:
                    ev["mfu"] = mfu
                if dist.device.type == "cpu":
                    ev["threads"] = threads.n if threads is not None else torch.get_num_threads()
                if task.stats is not None:
                    ev.update(task.stats())
                log(ev)
                progress.update(step, loss_val, tps, mfu, log=True)
            else:
                progress.update(step, loss_val, 0.0, None, log=False)
            if tc.eval_every and step % tc.eval_every == 0 and step < tc.max_steps:
                evaluate(step)
            if tc.save_every and step % tc.save_every == 0 and step < tc.max_steps:
                save(step)
        if stop is None and step > start:
            evaluate(step)
        if step > start:
            save(step)
    progress.close()
    if threads is not None:
        threads.close()
    if metrics_f is not None:
        metrics_f.close()
    if stop is not None:
        name = signal.Signals(stop).name
        progress.message(f"{name}: stopped at step {step}; checkpoint saved, run the same command to resume")
        last["stopped_by"] = name
    return last
