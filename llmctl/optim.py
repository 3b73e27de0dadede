"""Parameter groups, AdamW and learning-rate schedules (a pure function of the step, so resume needs no state)."""

from __future__ import annotations

import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrix weights; no decay on norms, biases and embeddings (whose weight may be tied to lm_head)."""
    decay, no_decay, seen = [], [], set()
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(model: torch.nn.Module, cfg, device: torch.device) -> torch.optim.Optimizer:
    """AdamW from an OptimSection; fused where the device supports it (CUDA, and CPU since torch 2.4)."""
    fused = cfg.fused
    if fused is None:
        fused = device.type in ("cuda", "cpu")
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    groups = param_groups(model, cfg.weight_decay)
    if fused:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError):
            pass
    return torch.optim.AdamW(groups, **kwargs)


def lr_at(step: int, cfg, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine / WSD / constant."""
    lr, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    warm = max(0, min(cfg.warmup_steps, max_steps))
    if step < warm:
        return lr * (step + 1) / warm
    if cfg.schedule == "constant":
        return lr
    if cfg.schedule == "cosine":
        span = max(1, max_steps - warm)
        frac = min(1.0, (step - warm) / span)
        return floor + 0.5 * (lr - floor) * (1 + math.cos(math.pi * frac))
    # wsd: warmup, stable at lr, then a linear decay to the floor over the last decay_fraction of steps
    decay_steps = max(1, int(round(cfg.decay_fraction * max_steps)))
    start = max_steps - decay_steps
    if step < start:
        return lr
    frac = min(1.0, (step - start + 1) / decay_steps)
    return lr + (floor - lr) * frac


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
