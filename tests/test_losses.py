"""llmctl.losses against numbers worked out by hand (the arithmetic is written out with math.log / math.exp on small
explicit values), plus invariants: DPO at policy == reference, GAE with gamma = lam = 1, zero-mean groups, KL
estimators against the exact KL, gradients of the clipped PPO objective."""

from __future__ import annotations

import math

import pytest
import torch

from llmctl.losses import (bradley_terry_loss, dpo_loss, gae, group_advantages, kl_estimate, masked_mean,
                           masked_sum, ppo_policy_loss, value_loss, whiten)  # fmt: skip


def t(*xs):
    return torch.tensor(xs, dtype=torch.float32)


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=torch.float32), atol=atol, rtol=0)


def test_masked_sum_and_mean():
    x, m = t(1.0, 2.0, 3.0, 100.0), t(1, 1, 1, 0)
    close(masked_sum(x, m), 6.0)
    close(masked_mean(x, m), 2.0)
    close(masked_mean(torch.ones(2, 3), t(1, 0, 0).expand(2, 3), dim=1), [1.0, 1.0])
    close(masked_mean(x, torch.zeros(4)), 0.0)  # an empty mask is 0, not NaN


def test_bradley_terry():
    # -log sigmoid(2 - 0.5) = log(1 + e^-1.5); equal rewards: log 2
    close(bradley_terry_loss(t(2.0, 1.0), t(0.5, 1.0)), [math.log(1 + math.exp(-1.5)), math.log(2)])
    assert bradley_terry_loss(t(2.0).bfloat16(), t(0.5).bfloat16()).dtype == torch.float32


def test_dpo_sigmoid_by_hand():
    # pi_c - ref_c = -1 - (-1.5) = 0.5, pi_r - ref_r = -2 - (-1) = -1, h = 1.5, beta h = 0.75
    pi_c, pi_r, ref_c, ref_r = t(-1.0), t(-2.0), t(-1.5), t(-1.0)
    losses, rc, rr = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.5)
    close(losses, [math.log(1 + math.exp(-0.75))])  # -log sigmoid(0.75)
    close(rc, [0.5 * 0.5])
    close(rr, [0.5 * -1.0])
    losses, _, _ = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.5, label_smoothing=0.1)
    close(losses, [0.9 * math.log(1 + math.exp(-0.75)) + 0.1 * math.log(1 + math.exp(0.75))])


def test_dpo_ipo_by_hand():
    # h = 1.5, 1 / (2 beta) = 1: (1.5 - 1)^2 = 0.25
    losses, _, _ = dpo_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.0), beta=0.5, loss_type="ipo")
    close(losses, [0.25])


def test_dpo_invariants():
    pi_c = torch.randn(5, generator=torch.Generator().manual_seed(0)) - 10
    pi_r = pi_c - 3
    for ls in (0.0, 0.2):  # policy == reference: h = 0, loss = log 2 whatever the smoothing
        losses, rc, rr = dpo_loss(pi_c, pi_r, pi_c, pi_r, beta=0.1, label_smoothing=ls)
        close(losses, torch.full((5,), math.log(2)))
        close(rc, torch.zeros(5))
        close(rr, torch.zeros(5))
    close(dpo_loss(pi_c, pi_r, pi_c, pi_r, beta=0.1, loss_type="ipo")[0], torch.full((5,), (1 / 0.2) ** 2), atol=1e-4)
    # raising the chosen log-prob lowers the loss; the implicit rewards carry no gradient
    pi = pi_c.clone().requires_grad_()
    losses, rc, _ = dpo_loss(pi, pi_r, pi_c, pi_r, beta=0.1)
    losses.sum().backward()
    assert (pi.grad < 0).all() and not rc.requires_grad
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(pi_c, pi_r, pi_c, pi_r, beta=0.1, loss_type="hinge")


def test_gae_by_hand():
    # one response of 3 tokens, then padding (whose reward and value must not count); gamma 0.9, lam 0.8
    rewards, values, mask = t(0.0, 0.0, 1.0, 5.0)[None], t(0.5, 0.4, 0.3, 9.0)[None], t(1, 1, 1, 0)[None]
    a2 = 1.0 + 0.9 * 0.0 - 0.3  # last token: bootstraps with 0
    a1 = (0.0 + 0.9 * 0.3 - 0.4) + 0.9 * 0.8 * a2
    a0 = (0.0 + 0.9 * 0.4 - 0.5) + 0.9 * 0.8 * a1
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    close(adv, [[a0, a1, a2, 0.0]])
    close(ret, [[a0 + 0.5, a1 + 0.4, a2 + 0.3, 0.0]])


def test_gae_reward_to_go_and_prompt_offset():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    mask = torch.zeros(3, 6)
    mask[0, :6], mask[1, :4], mask[2, 2:5] = 1, 1, 1  # full row, right padding, prompt tokens + padding
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # gamma = lam = 1: A_t = sum_{k >= t} r_k - V_t over the row's masked tokens; returns = reward-to-go
    to_go = (rewards * mask).flip(1).cumsum(1).flip(1) * mask
    close(adv, to_go - values * mask, atol=1e-5)
    close(ret, to_go, atol=1e-5)
    # a response after prompt tokens gets the same advantages as the response alone
    alone, _ = gae(rewards[2:, 2:5], values[2:, 2:5], torch.ones(1, 3), gamma=0.9, lam=0.7)
    shifted, _ = gae(rewards[2:], values[2:], mask[2:], gamma=0.9, lam=0.7)
    close(shifted[:, 2:5], alone)


def test_whiten():
    out = whiten(t(1.0, 2.0, 3.0, 100.0), t(1, 1, 1, 0))
    s = math.sqrt((1 + 0 + 1) / 3 + 1e-8)  # population variance of 1, 2, 3 is 2/3
    close(out, [-1 / s, 0.0, 1 / s, 0.0])


def test_ppo_policy_loss_by_hand():
    logp, old, mask = t(0.1, 0.5, -0.5, 0.5, 3.0), t(0.0, 0.0, 0.0, 0.0, 0.0), t(1, 1, 1, 1, 0)
    adv = t(1.0, 2.0, -1.0, -1.0, 7.0)
    logp.requires_grad_()
    losses, stats = ppo_policy_loss(logp, old, adv, mask, clip=0.2)
    expected = [
        -1.0 * math.exp(0.1),  # ratio 1.105 inside [0.8, 1.2]
        -2.0 * 1.2,  # ratio 1.649, A > 0: clipped at 1.2
        1.0 * 0.8,  # ratio 0.607, A < 0: clipped at 0.8
        1.0 * math.exp(0.5),  # ratio 1.649, A < 0: the unclipped term is the larger loss (pessimistic bound)
        0.0,  # masked
    ]
    close(losses, expected, atol=1e-6)
    close(stats["clipfrac"], 2 / 4)
    kl = [math.exp(x) - 1 - x for x in (0.1, 0.5, -0.5, 0.5)]  # k3 of KL(old || new): (r - 1) - log r
    close(stats["approx_kl"], sum(kl) / 4)
    losses.sum().backward()
    # d/dlogp of -A r is -A r; clipped tokens and masked ones get no gradient
    close(logp.grad, [-math.exp(0.1), 0.0, 0.0, math.exp(0.5), 0.0])


def test_value_loss_by_hand():
    values, old, returns, mask = t(1.5, 1.5, 1.1, 4.0), t(1.0, 1.0, 1.0, 0.0), t(2.0, 1.0, 1.0, 0.0), t(1, 1, 1, 0)
    expected = [
        0.5 * max((1.5 - 2.0) ** 2, (1.2 - 2.0) ** 2),  # clipped value 1.2 is further from the return: 0.32
        0.5 * max((1.5 - 1.0) ** 2, (1.2 - 1.0) ** 2),  # 0.125
        0.5 * (1.1 - 1.0) ** 2,  # inside the clip range: plain squared error
        0.0,
    ]
    close(value_loss(values, old, returns, mask, clip=0.2), expected)


def test_group_advantages_by_hand():
    r = t(1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.1, 0.1, 0.1, 0.1)
    # group 1: mean 0.5, population std 0.5; groups 2 and 3 are all equal: exactly 0
    s = 0.5 / (0.5 + 1e-6)
    close(group_advantages(r, 4), [s, -s, -s, s] + [0.0] * 8)
    close(group_advantages(r, 4, scale=False), [0.5, -0.5, -0.5, 0.5] + [0.0] * 8)
    assert (group_advantages(r, 4)[4:] == 0).all()
    with pytest.raises(ValueError, match="groups of 5"):
        group_advantages(r, 5)


def test_group_advantages_zero_mean_unit_std():
    r = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    adv = group_advantages(r.view(-1), 8, eps=0.0).view(6, 8)
    close(adv.mean(1), torch.zeros(6), atol=1e-6)
    close(adv.std(1, unbiased=False), torch.ones(6), atol=1e-5)
    close(group_advantages(t(3.0), 1), [0.0])  # a group of one: no signal


def test_kl_estimators():
    logp, ref = t(-1.0, -2.0), t(-2.0, -2.0)  # log r = ref - logp = -1, 0
    close(kl_estimate(logp, ref, "k1"), [1.0, 0.0])
    close(kl_estimate(logp, ref, "k2"), [0.5, 0.0])
    close(kl_estimate(logp, ref, "k3"), [math.exp(-1) + 1 - 1, 0.0])  # e^{log r} - log r - 1
    with pytest.raises(ValueError, match="kind"):
        kl_estimate(logp, ref, "k4")


def test_kl_estimators_are_unbiased():
    """k1 and k3 average to KL(p || q) over samples from p; k3 is never negative."""
    p, q = t(0.5, 0.3, 0.2), t(0.2, 0.3, 0.5)
    exact = float((p * (p / q).log()).sum())
    x = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    logp, ref = p.log()[x], q.log()[x]
    for kind in ("k1", "k3"):
        assert abs(kl_estimate(logp, ref, kind).mean().item() - exact) < 0.01
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
