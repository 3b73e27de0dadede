"""The losses of the training stages: next-token cross-entropy (`lm_loss`, pretrain and sft), and the preference
and RL losses of `llmctl rlhf` as pure torch functions, computed in fp32 whatever the input dtype.

Shapes: B pairs / sequences, T token positions. Token-level tensors are right-padded [B, T] with a `mask` (1 on
the tokens that count, e.g. response tokens; 0 on prompt and padding). Per-token losses come back unreduced and
already zero where mask is 0, so the caller can SUM them and normalise by the token count in one place.

    lm_loss              summed token cross-entropy   (the model's chunked linear cross-entropy)
    bradley_terry_loss   reward modelling            Ouyang et al. 2022 (InstructGPT), eq. 1
    dpo_loss             DPO / conservative DPO / IPO Rafailov et al. 2023; Mitchell 2023; Azar et al. 2023
    gae                  advantages and returns       Schulman et al. 2016 (GAE)
    ppo_policy_loss      clipped surrogate            Schulman et al. 2017 (PPO), eq. 7
    value_loss           clipped value loss           as in OpenAI baselines' ppo2
    group_advantages     GRPO outcome advantages      Shao et al. 2024 (DeepSeekMath), section 4.1.2
    kl_estimate          per-token KL estimators      Schulman 2020, "Approximating KL divergence"
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "ipo")
KL_KINDS = ("k1", "k2", "k3")


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum of x where mask is 1 (fp32), over `dim` or everything."""
    x = x.float() * mask
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """mean of x over the entries where mask is 1 (fp32); 0 where the mask is all zeros."""
    n = mask.float().sum() if dim is None else mask.float().sum(dim)
    return masked_sum(x, mask, dim) / n.clamp_min(1)


def lm_loss(model, batch: dict) -> torch.Tensor:
    """fp32 sum of the cross-entropy over a micro-batch's targets (-100: ignored); packed rows bring their
    position_ids and attention mask."""
    return model(batch["idx"], batch["targets"], position_ids=batch.get("position_ids"),
                 attn_mask=batch.get("attn_mask"))  # fmt: skip


# ------------------------------------------------------------------------------------------------- preferences


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair reward-model loss [B] of the Bradley-Terry model, P(chosen > rejected) = sigmoid(r_c - r_r):

        loss = -log sigmoid(r_c - r_r)                              (Ouyang et al. 2022, eq. 1)
    """
    return -F.logsigmoid(r_chosen.float() - r_rejected.float())


def pair_accuracy(margin: torch.Tensor) -> torch.Tensor:
    """Per pair [B]: 1 where the chosen side scores higher (margin > 0), 1/2 on a tie, 0 otherwise."""
    return (margin > 0).float() + 0.5 * (margin == 0).float()


def dpo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0,
             loss_type: str = "sigmoid") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Direct preference optimisation from summed sequence log-probs [B] of the policy (pi_*) and the frozen
    reference (ref_*). With the log-ratio margin h = (pi_c - ref_c) - (pi_r - ref_r):

        sigmoid: loss = -(1 - ls) log sigmoid(beta h) - ls log sigmoid(-beta h)
                 (Rafailov et al. 2023, eq. 7; ls > 0 is conservative DPO, labels flipped with probability ls)
        ipo:     loss = (h - 1 / (2 beta))^2                        (Azar et al. 2023, the empirical IPO loss)

    IPO here takes the same summed log-probs as DPO (TRL's "ipo" averages them over tokens first).
    Returns (per-pair losses [B], chosen_rewards = beta (pi_c - ref_c), rejected_rewards = beta (pi_r - ref_r));
    the implicit rewards are detached: they are for logging (reward accuracy = chosen > rejected).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(DPO_LOSS_TYPES)}, got {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen = pi_chosen.float() - ref_chosen.float()
    rejected = pi_rejected.float() - ref_rejected.float()
    h = chosen - rejected
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    return losses, (beta * chosen).detach(), (beta * rejected).detach()


# ---------------------------------------------------------------------------------------------------------- PPO


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Generalised advantage estimation over the masked tokens of each row (Schulman et al. 2016, eq. 16):

        delta_t = r_t + gamma V_{t+1} - V_t,    A_t = delta_t + gamma lam A_{t+1},    returns_t = A_t + V_t

    where V_{t+1} and A_{t+1} are 0 past the row's last masked token (episodes end there: no bootstrap).
    rewards, values, mask: [B, T], right-padded. Returns (advantages, returns) [B, T] fp32, zero where mask is 0,
    without gradient (targets, not functions of the parameters).
    """
    rewards, values, mask = rewards.float(), values.float(), mask.float()
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    next_value = next_adv = torch.zeros(B, dtype=torch.float32, device=rewards.device)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        next_value = values[:, t] * mask[:, t]
        adv[:, t] = next_adv
    return adv, (adv + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries (population variance), zero where mask is 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x.float() - mean) ** 2, mask)
    return (x.float() - mean) * torch.rsqrt(var + eps) * mask


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """Clipped surrogate objective, negated to a loss, per token (Schulman et al. 2017, eq. 7):

        ratio = exp(logp - old_logp),   loss_t = max(-A_t ratio, -A_t clip(ratio, 1 - clip, 1 + clip))

    logp: the current policy's token log-probs [B, T] (with grad); old_logp: the sampling policy's; advantages
    [B, T]. Returns (per-token losses [B, T], zero where mask is 0; stats): `clipfrac`, the fraction of masked
    tokens where the clipped term is taken, and `approx_kl`, the mean k3 estimate of KL(old || new),
    (ratio - 1) - log ratio. Stats are detached 0-dim tensors (no host sync).
    """
    log_ratio = logp.float() - old_logp.float()
    ratio = log_ratio.exp()
    adv = advantages.float()
    unclipped, clipped = -adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)
    losses = torch.maximum(unclipped, clipped) * mask
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask),
                 "approx_kl": masked_mean(ratio - 1 - log_ratio, mask)}  # fmt: skip
    return losses, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> torch.Tensor:  # fmt: skip
    """Clipped value loss per token [B, T], zero where mask is 0 (OpenAI baselines' ppo2):

        V_clip = old_V + clip(V - old_V, -clip, clip),   loss_t = 1/2 max((V - R)^2, (V_clip - R)^2)
    """
    values, old_values, returns = values.float(), old_values.float(), returns.float()
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2) * mask


# --------------------------------------------------------------------------------------------------------- GRPO


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO outcome advantages (Shao et al. 2024, section 4.1.2): rewards [N] hold N / group_size consecutive
    groups of completions of the same prompt; each gets

        A_i = (r_i - mean(group)) / (std(group) + eps)      (scale=False: r_i - mean(group), as Dr. GRPO does)

    std is the population standard deviation (unbiased=False: defined for groups of one; TRL's GRPO uses the
    unbiased one, larger by sqrt(G / (G - 1))). A group whose rewards are all equal gets exactly 0.
    Returns [N] fp32.
    """
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)  # [groups, G]
    adv = r - r.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (r.std(dim=1, keepdim=True, unbiased=False) + eps)
    same = (r == r[:, :1]).all(dim=1, keepdim=True)  # no signal: exactly 0, not rounding noise
    return adv.masked_fill(same, 0.0).view(-1)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi (Schulman 2020), with log r = ref_logp - logp:

        k1 = -log r                 unbiased, high variance, can be negative
        k2 = (log r)^2 / 2          biased, low variance, >= 0
        k3 = (r - 1) - log r        unbiased, low variance, >= 0  (GRPO's KL term, Shao et al. 2024 eq. 4)
    """
    log_r = ref_logp.float() - logp.float()
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r**2
    if kind == "k3":
        return log_r.exp() - log_r - 1
    raise ValueError(f"kind must be one of {', '.join(KL_KINDS)}, got {kind!r}")
