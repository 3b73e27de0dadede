"""Learning-rate schedules and parameter groups."""

import math

import pytest
import torch

from llmctl.config import OptimSection
from llmctl.model import ModelConfig, Transformer
from llmctl.optim import lr_at, make_optimizer, param_groups


def test_warmup_then_cosine_to_floor():
    c = OptimSection(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule="cosine")
    assert [lr_at(s, c, 110) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_at(10, c, 110) == pytest.approx(1.0)
    assert lr_at(60, c, 110) == pytest.approx(0.55)  # half-way: the mean of lr and floor
    assert lr_at(110, c, 110) == pytest.approx(0.1)
    lrs = [lr_at(s, c, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_wsd_is_flat_then_decays_linearly():
    c = OptimSection(lr=2.0, min_lr_ratio=0.0, warmup_steps=5, schedule="wsd", decay_fraction=0.2)
    assert lr_at(5, c, 100) == lr_at(79, c, 100) == 2.0
    assert lr_at(80, c, 100) == pytest.approx(2.0 * (1 - 1 / 20))
    assert lr_at(99, c, 100) == pytest.approx(0.0)


def test_constant_and_no_warmup():
    c = OptimSection(lr=0.3, warmup_steps=0, schedule="constant")
    assert {lr_at(s, c, 50) for s in range(50)} == {0.3}


def test_decay_groups_and_fused_adamw():
    for arch in ("llama", "gpt2"):
        m = Transformer(ModelConfig(arch=arch, vocab_size=64, n_layer=2, n_head=2, n_embd=32, block_size=16))
        decay, no_decay = param_groups(m, 0.1)
        assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
        ids = lambda g: {id(p) for p in g["params"]}
        assert all(p.dim() == 2 for p in decay["params"])
        assert id(m.get_input_embeddings().weight) in ids(no_decay)
        n_unique = len({id(p) for p in m.parameters()})
        assert len(ids(decay)) + len(ids(no_decay)) == n_unique  # tied weights counted once
        opt = make_optimizer(m, OptimSection(), torch.device("cpu"))
        assert opt.defaults.get("fused") is True
        assert not math.isnan(opt.param_groups[0]["lr"])


@pytest.mark.parametrize("max_norm", [1e-3, 1.0, 1e6, 0.0])
def test_clip_grad_norm_matches_torch(max_norm):
    """The training loop's clipping: the same norm and the same gradients as torch's clip_grad_norm_; gradients
    change only when their norm is above max_norm; max_norm <= 0: norm only."""
    from llmctl.dist import Dist

    torch.manual_seed(0)
    m = Transformer(ModelConfig(arch="llama", vocab_size=64, n_layer=2, n_head=2, n_embd=32, block_size=16))
    idx = torch.randint(0, 64, (2, 16))
    m(idx, idx).backward()
    m.lm_head.weight.grad = None  # a parameter without a gradient is skipped
    ref = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    params = {n: torch.nn.Parameter(torch.zeros_like(g)) for n, g in ref.items()}
    for n, p in params.items():
        p.grad = ref[n].clone()
    ref_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), max_norm if max_norm > 0 else float("inf"))
    norm = Dist().clip_grad_norm(m.parameters(), max_norm)
    assert torch.equal(norm, ref_norm)
    clipped = max_norm > 0 and ref_norm > max_norm
    for n, p in m.named_parameters():
        if n in ref:
            assert torch.equal(p.grad, params[n].grad)
            assert torch.equal(p.grad, ref[n]) != clipped
