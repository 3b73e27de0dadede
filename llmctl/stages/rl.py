"""`llmctl rlhf` with `method: grpo` or `method: ppo`: on-policy RL of a MODEL through the one training loop.

Rollouts
    Rollout batch r holds `rl.prompts_per_step` prompts per process: the rows of step r of examples.EpochBatches
    over data.train (epochs shuffled with numpy.random.default_rng([seed, epoch]); process `rank` takes its P).
    GRPO samples each prompt `rl.group_size` times, PPO once. Prompts go through chat.encode_prompt as exact-match
    evaluation encodes them (the chat template as user messages when data.chat, generation stopping at
    <|im_end|>; else after the tokenizer's prefix, bos for llmctl's); generation also stops at every EOS id of
    the model and at a newline, so a rollout's reward is what evaluation would score. Sampling goes through the
    generate engine with `rl.temperature` / `rl.top_p` and one seed per sample, derived from (seed, r, rank,
    sample): a run is reproducible, whatever the batch. The batch is
    then scored without gradient, train.micro_batch_size sequences at a time: the log-probs of the sampled tokens
    under the policy (old_logp, the clipped objective's denominator), under the frozen reference
    (policy.reference(): init_from / ref_from, or with LoRA the base with adapters disabled), and PPO's values.
    Every log-prob, here and in the loss, is evaluate.token_logprobs of logits / rl.temperature, the distribution
    the tokens were drawn from (as TRL does), so the first pass over a batch has ratio 1 whatever the temperature.

Rewards: rl.reward, one number per completion (reward.Rewards: exact-match, a reward model, a Python function).
    `accuracy` in the logs is the exact-match rate of the rollouts whenever rows carry an answer.

Steps
    A rollout batch feeds `rl.epochs` passes of `rl.minibatches` optimizer steps each: step s uses rollout
    r = s // (epochs * minibatches); every pass reshuffles the batch (rng [seed, r, pass, rank]) and cuts it into
    `minibatches` parts, each cut into micro-batches of train.micro_batch_size sequences (train.grad_accum is not
    used). The loop's `batches(step)` generates rollout r when its buffer holds another one. Losses are sums over
    response tokens and the loop divides by the step's response-token count (token-level normalisation).

GRPO (Shao et al. 2024)
    advantage of every token of completion i = losses.group_advantages (reward minus its group's mean, over the
    group's std); loss = clipped surrogate (losses.ppo_policy_loss, against old_logp) + rl.kl_coef x
    kl_estimate(policy, reference) (rl.kl_estimator, k3 by default) as a loss term.

PPO (Ouyang et al. 2022, as TRL's PPOTrainer)
    Value head: policy.ActorCritic, one scalar nn.Linear (zero-initialised) on the policy's final hidden states,
    trained jointly with the policy through the shared trunk (loss weight rl.vf_coef): no second model, one forward
    gives both. It is saved in every checkpoint as `value_head.safetensors` next to the model files (the folder
    stays a model directory transformers loads) and read back on resume (and from init_from when it has one).
    Per-token rewards: -rl.kl_coef x kl_estimate(old_logp, ref_logp) at every response token, plus the completion's
    reward at its last token; advantages by GAE (rl.gamma, rl.lam) over the response tokens, whitened over the
    rollout batch; loss = clipped surrogate + rl.vf_coef x clipped value loss (rl.value_clip) against the returns.

Resume
    The rollout buffer (token ids, old / reference log-probs, advantages, returns), its index r and the running
    sums behind the logged figures are the task state of each process (task_state-RANK.pt in each checkpoint),
    so a run stopped anywhere inside a buffer resumes with the same batches; a new rollout depends only on the
    weights (restored exactly) and its seeds. Dropout, if the model has any, stays as configured (old_logp is
    computed in eval mode, so a model with dropout starts its ratios away from 1).

Metrics in training events: reward, accuracy, kl (the mean over the rollouts' tokens of log pi - log ref, the
k1 estimate of the per-token KL to the reference: unbiased, and free of k3's heavy tail when pi is far below the
reference on a sampled token), response_len (tokens), clipfrac, and value_loss (PPO). Evaluation: held-out
exact_match of greedy completions of eval.exact_match (or data.val) rows, as `llmctl sft` reports it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from llmctl import evaluate, examples, loop, losses
from llmctl.chat import encode_prompt, fit_prompt
from llmctl.dist import Dist, Tally, setup
from llmctl.errors import UserError
from llmctl.model import unwrap
from llmctl.policy import VALUE_HEAD_FILE, ActorCritic, Policy, context
from llmctl.reward import Rewards

STOP = ("\n",)  # completions end at a newline, as exact-match evaluation cuts them
FIGURES = ("n_seq", "reward", "resp_tokens", "kl", "answered", "correct", "loss_tokens", "clipfrac", "value_loss")


def run(recipe) -> dict:
    dist, resume = setup(recipe)
    torch.manual_seed(recipe.seed)  # the LoRA initialisation
    task = build(recipe, dist, resume)
    last = loop.train(recipe, task, dist, resume=resume)
    dist.end()
    return last


def build(recipe, dist: Dist, resume: Path | None) -> loop.Task:
    rl = recipe.rl
    policy = Policy(recipe.init_from, recipe.lora if recipe.lora.enabled else None, resume, recipe.ref_from)
    model = policy.model
    T = context(recipe, model.config)
    if rl.max_new_tokens >= T - 1:
        raise UserError(f"rl.max_new_tokens {rl.max_new_tokens} leaves no room for a prompt in {T} positions")
    rewards = Rewards(rl.reward, policy.tok, model.config.vocab_size)
    need = "rl.reward exact-match" if rewards.kind == "exact-match" else None
    rows = examples.load_prompts(recipe.data.train, recipe.data.limit, need_answer=need)  # data
    ac = ActorCritic(model, value_head=recipe.method == "ppo", temperature=rl.temperature)  # model (+ value head)
    if ac.value_head is not None:
        src = (resume / VALUE_HEAD_FILE) if resume is not None else (policy.base_dir / VALUE_HEAD_FILE)
        if src.is_file():
            ac.load_head(src)
        elif resume is not None:
            raise UserError(f"incompatible checkpoint: {resume} has no {VALUE_HEAD_FILE} (not a ppo run?)")
    rt = RlTask(recipe, dist, policy, ac, rows, rewards, T)
    if dist.is_main:
        n_seq = rl.prompts_per_step * rt.G * dist.world
        print(f"{recipe.method}: {policy.describe()}; {len(rows):,} prompts, {n_seq} sequences a rollout, "
              f"{rt.per_rollout} optimizer step(s) each, reward {rewards.kind}", file=sys.stderr)
    em = evaluate.held_out_exact_match(recipe.eval.exact_match or recipe.data.val, recipe.eval, policy.tok, dist)
    return loop.Task(model=ac, batches=rt.batches, loss=rt.loss, count=rt.count, save_model=rt.save_model,
                     evaluate=(lambda m: em(unwrap(m, ActorCritic).policy)) if em else None,
                     flops_per_token=model.flops_per_token(T), stats=rt.stats, state_dict=rt.state_dict,
                     load_state_dict=rt.load_state_dict)  # fmt: skip


def _sample_seed(seed: int, r: int, rank: int, k: int) -> int:
    return int(np.random.SeedSequence([seed, r, rank, k]).generate_state(2, np.uint64)[0] >> 1)


class RlTask:
    """batches / loss / count / stats / state for loop.Task (see the module doc)."""

    def __init__(self, recipe, dist: Dist, policy: Policy, ac: ActorCritic, rows: list[dict], rewards: Rewards,
                 T: int):  # fmt: skip
        self.recipe, self.rl, self.dist, self.policy, self.ac = recipe, recipe.rl, dist, policy, ac
        self.tok, self.rows, self.rewards, self.T = policy.tok, rows, rewards, T
        self.ppo = recipe.method == "ppo"
        self.G = 1 if self.ppo else self.rl.group_size
        self.chat = recipe.data.chat
        self.stop_ids = (self.tok.im_end_id,) if self.chat and self.tok.im_end_id is not None else ()
        self.per_rollout = self.rl.epochs * self.rl.minibatches
        self.prompts = examples.EpochBatches(len(rows), recipe.seed, list, self.rl.prompts_per_step, 1, dist.rank,
                                             dist.world)  # rollout r -> this process's row indices  # fmt: skip
        self.buffer: dict | None = None
        self.buffer_index = -1
        self.tally = Tally(dist)
        self.timings = {"generate_s": 0.0, "score_s": 0.0, "rollouts": 0}
        self._encoded: dict[int, list[int]] = {}
        self._engine = None

    # ------------------------------------------------------------------ rollouts

    def prompt_ids(self, i: int) -> list[int]:
        """Row i's prompt, its end kept (next to the generation prompt) when it is too long."""
        if i not in self._encoded:
            ids = encode_prompt(self.tok, self.rows[i]["prompt"], chat=self.chat)
            self._encoded[i] = fit_prompt(self.tok, ids, self.T, self.rl.max_new_tokens)[0]
        return self._encoded[i]

    def engine(self):
        """The rollout Engine, made once: its FastDecode weight copies follow the optimizer's updates (refresh)."""
        if self._engine is None:
            from llmctl.engine import Engine

            self._engine = Engine(self.policy.model, self.tok)
        return self._engine

    @torch.no_grad()
    def _score(self, model, b: dict, value: bool = False):
        """(logp [B, L], values [B, L] or None) at b's kept positions, zero elsewhere, micro-batch by micro-batch."""
        logp = torch.zeros(b["idx"].shape, dtype=torch.float32)
        values = torch.zeros_like(logp) if value else None
        micro, dev = self.recipe.train.micro_batch_size, self.dist.device
        for s in range(0, len(logp), micro):
            rows = slice(s, s + micro)
            keep = b["keep"][rows]
            L = int(keep.nonzero()[:, 1].max()) + 1
            keep = keep[:, :L]
            idx, targets = b["idx"][rows, :L].to(dev), b["targets"][rows, :L][keep].to(dev)
            with self.dist.autocast():
                if value:
                    lp, v = self.ac(idx, keep.to(dev), targets)
                    values[rows, :L][keep] = v.float().cpu()
                else:
                    h = model(idx, return_hidden=True)[keep.to(dev)]
                    lp = evaluate.token_logprobs(model, h, targets, temperature=self.rl.temperature)[0]
            logp[rows, :L][keep] = lp.float().cpu()
        return logp, values

    def rollout(self, r: int) -> dict:
        rl, t0 = self.rl, time.perf_counter()
        rows_i = [i for i in self.prompts(r)[0] for _ in range(self.G)]
        prompts = [self.prompt_ids(i) for i in rows_i]
        from llmctl.engine import SamplingParams

        params = [SamplingParams(max_new_tokens=rl.max_new_tokens, temperature=rl.temperature, top_p=rl.top_p,
                                 stop=STOP, stop_token_ids=self.stop_ids,
                                 seed=_sample_seed(self.recipe.seed, r, self.dist.rank, k))
                  for k in range(len(prompts))]  # fmt: skip
        was_training = self.ac.training
        self.ac.eval()
        try:
            results = self.engine().generate(prompts, params)
            t1 = time.perf_counter()
            seqs = [p + res.tokens for p, res in zip(prompts, results)]
            b = examples.collate_completions(prompts, seqs, self.tok.pad_id or 0)
            b["old_logp"], values = self._score(self.policy.model, b, value=self.ppo)
            with self.policy.reference() as ref:
                b["ref_logp"], _ = self._score(ref, b)
        finally:
            self.ac.train(was_training)
        rows = [self.rows[i] for i in rows_i]
        texts = [res.text for res in results]
        reward = torch.tensor(self.rewards(rows, texts, seqs, self.dist.device), dtype=torch.float32)  # [N]
        keep, (N, L) = b["keep"].float(), b["keep"].shape
        kl = losses.kl_estimate(b["old_logp"], b["ref_logp"], rl.kl_estimator) * keep  # [N, L]
        if self.ppo:
            last = L - 1 - b["keep"].flip(1).float().argmax(1)  # each row's last response position
            tok_reward = -rl.kl_coef * kl
            tok_reward[torch.arange(N), last] += reward
            adv, b["returns"] = losses.gae(tok_reward, values, keep, rl.gamma, rl.lam)
            b["adv"], b["old_values"] = losses.whiten(adv, keep), values
        else:
            b["adv"] = losses.group_advantages(reward, self.G)[:, None] * keep
        b["reward"] = reward
        # figures for the logs
        answered = [(t, row["answer"]) for t, row in zip(texts, rows) if row["answer"] is not None]
        log_ratio = (b["old_logp"] - b["ref_logp"]) * keep  # k1: its mean estimates KL(policy || reference)
        self.tally.add(n_seq=N, reward=float(reward.sum()), resp_tokens=float(keep.sum()), kl=float(log_ratio.sum()),
                       answered=len(answered), correct=sum(evaluate.matches(t, a) for t, a in answered))  # fmt: skip
        self.timings["generate_s"] += t1 - t0
        self.timings["score_s"] += time.perf_counter() - t1
        self.timings["rollouts"] += 1
        return b

    # ------------------------------------------------------------------ loop.Task hooks

    def batches(self, step: int) -> list[dict]:
        r, within = divmod(step, self.per_rollout)
        if self.buffer_index != r:
            self.buffer, self.buffer_index = self.rollout(r), r
        b = self.buffer
        epoch, part = divmod(within, self.rl.minibatches)
        N = len(b["idx"])
        order = np.random.default_rng([self.recipe.seed, r, epoch, self.dist.rank]).permutation(N)
        lo, hi = part * N // self.rl.minibatches, (part + 1) * N // self.rl.minibatches
        chosen, micro, out = order[lo:hi], self.recipe.train.micro_batch_size, []
        keys = ["idx", "targets", "keep", "old_logp", "ref_logp", "adv"]
        keys += ["old_values", "returns"] if self.ppo else []
        for s in range(0, len(chosen), micro):
            ix = torch.as_tensor(np.sort(chosen[s : s + micro]))
            keep = b["keep"][ix]
            if not keep.any():
                continue
            L = int(keep.nonzero()[:, 1].max()) + 1
            mb = {k: b[k][ix, :L] for k in keys}
            # per-token figures as flat [n] tensors in the order of the model's kept positions
            for k in keys[3:] + ["targets"]:
                mb[k] = mb[k][mb["keep"]]
            out.append(mb)
        return out

    def count(self, b: dict) -> int:
        return int(b["keep"].sum())

    def loss(self, model, b: dict) -> torch.Tensor:
        rl = self.rl
        logp, values = model(b["idx"], b["keep"], b["targets"])
        ones = torch.ones_like(logp)
        pl, st = losses.ppo_policy_loss(logp, b["old_logp"], b["adv"], ones, rl.clip)
        total = pl.sum()
        n = float(logp.numel())
        figures = {"loss_tokens": n, "clipfrac": st["clipfrac"] * n}  # tensors: no host sync per micro-batch
        if not self.ppo and rl.kl_coef > 0:
            total = total + rl.kl_coef * losses.kl_estimate(logp, b["ref_logp"], rl.kl_estimator).sum()
        if self.ppo:
            vl = losses.value_loss(values, b["old_values"], b["returns"], ones, rl.value_clip).sum()
            total = total + rl.vf_coef * vl
            figures["value_loss"] = vl
        self.tally.add(**figures)
        return total

    def stats(self) -> dict:
        s, out = self.tally.take(FIGURES), {}
        if s["n_seq"]:
            out.update(reward=s["reward"] / s["n_seq"], response_len=s["resp_tokens"] / s["n_seq"],
                       kl=s["kl"] / max(s["resp_tokens"], 1.0))  # fmt: skip
        if s["answered"]:
            out["accuracy"] = s["correct"] / s["answered"]
        if s["loss_tokens"]:
            out["clipfrac"] = s["clipfrac"] / s["loss_tokens"]
            if self.ppo:
                out["value_loss"] = s["value_loss"] / s["loss_tokens"]
        return out

    def state_dict(self) -> dict:
        return {"buffer_index": self.buffer_index, "buffer": self.buffer or {}, "sums": self.tally.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        self.buffer_index = int(d["buffer_index"])
        self.buffer = d["buffer"] or None
        self.tally.load_state_dict(d["sums"])

    def save_model(self, model, out_dir) -> None:
        model = unwrap(model, ActorCritic)
        self.policy.save(model.policy, out_dir)
        if model.value_head is not None:
            model.save_head(out_dir)
