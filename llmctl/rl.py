"""`llmctl rlhf` with `method: grpo` or `method: ppo`: on-policy RL of a MODEL through the one training loop.

Rollouts
    Rollout batch r holds `rl.prompts_per_step` prompts per process: global prompt positions
    [r P W, (r + 1) P W) of an endless stream of epochs over data.train, each epoch shuffled with
    numpy.random.default_rng([seed, epoch]); process `rank` takes its P of them. GRPO samples each prompt
    `rl.group_size` times, PPO once. Prompts go through the chat template as user messages when data.chat
    (generation stops at <|im_end|>), else after bos; generation also stops at EOS and at a newline, as
    exact-match evaluation does, so a rollout's reward is what evaluation would score. Sampling goes through the
    generate engine (llmctl.engine) with `rl.temperature` / `rl.top_p` and one seed per sample, derived from
    (seed, r, rank, sample): a run is reproducible, whatever the batch. The batch is then scored without
    gradient, in micro-batches of train.micro_batch_size sequences: the log-probs of the sampled tokens under the
    policy (old_logp, the clipped objective's denominator), under the frozen reference (policy.reference(): the
    init_from / ref_from model, or with LoRA the base with adapters disabled), and PPO's values. Every log-prob,
    here and in the loss, is taken from logits / rl.temperature, the distribution the tokens were drawn from
    (as TRL does), so the first pass over a batch has ratio 1 whatever the temperature.

Rewards (rl.reward), one number per completion
    exact-match                 1 when the completion equals the row's "answer" after evaluate.normalize_answer
                                (a list of answers: any of them), else 0;
    a reward MODEL directory    the score of a `llmctl rlhf method=reward` model (or any sequence-classification
                                folder load_reward_model reads) on prompt + response tokens, as the policy saw them;
    path/to/file.py:function    function(completion: str, answer, prompt: str) -> float, called once per
                                completion (answer: the row's "answer", None when the row has none).
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
    Value head: one scalar nn.Linear (zero-initialised) on the policy's final hidden states, trained jointly with
    the policy through the shared trunk (loss weight rl.vf_coef): no second model, one forward pass gives both.
    It is saved in every checkpoint as `value_head.safetensors` next to the model files (the folder stays a model
    directory transformers loads) and read back on resume (and from init_from when it has one). Per-token
    rewards: -rl.kl_coef x kl_estimate(old_logp, ref_logp) at every response token, plus the completion's reward
    at its last token; advantages by GAE (rl.gamma, rl.lam) over the response tokens, whitened over the rollout
    batch; loss = clipped surrogate + rl.vf_coef x clipped value loss (rl.value_clip) against the GAE returns.

Resume
    The rollout buffer (token ids, old / reference log-probs, advantages, returns), its index r and the running
    sums behind the logged figures are the task state of each process (task_state-RANK.pt in each checkpoint),
    so a run stopped anywhere inside a buffer resumes with the same batches; a new rollout depends only on the
    weights (restored exactly) and its seeds. Dropout, if the model has any, stays as configured (old_logp is
    computed in eval mode, so a model with dropout starts its ratios away from 1).

Metrics in training events: reward, accuracy, kl (the mean over the rollouts' tokens of log pi - log ref, the
k1 estimate of the per-token KL to the reference: unbiased, and free of k3's heavy tail when pi is far below the
reference on a sampled token), response_len (tokens), clipfrac, and value_loss (PPO). evaluate(): held-out
exact_match of greedy completions of eval.exact_match (or data.val) rows, as `llmctl sft` reports it.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llmctl import evaluate, loop, losses
from llmctl.data import iter_jsonl
from llmctl.dist import Dist
from llmctl.errors import UserError
from llmctl.policy import Policy

VALUE_HEAD_FILE = "value_head.safetensors"
STOP = ("\n",)  # completions end at a newline, as exact-match evaluation cuts them


# --------------------------------------------------------------------------------------------------- model


class ActorCritic(nn.Module):
    """The trained module: the policy Transformer and, for PPO, a scalar value head on its final hidden states.
    forward(idx [B, T], keep [B, T] bool, targets [N]) -> (log p(targets) [N], values [N] or None), fp32, at the
    N kept positions in row-major order: one call, so DDP sees every parameter used in forward."""

    def __init__(self, policy_model: nn.Module, value_head: bool, temperature: float = 1.0):
        super().__init__()
        self.policy, self.temperature = policy_model, temperature
        self.value_head = None
        if value_head:
            w = policy_model.get_input_embeddings().weight
            self.value_head = nn.Linear(policy_model.config.n_embd, 1, device=w.device, dtype=w.dtype)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    @property
    def gradient_checkpointing(self) -> bool:
        return self.policy.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        self.policy.gradient_checkpointing = on

    def forward(self, idx, keep, targets):
        h = self.policy(idx, return_hidden=True)[keep]  # [N, C]
        logp = -F.cross_entropy(self.policy.lm_head(h).float() / self.temperature, targets, reduction="none")  # [N]
        values = self.value_head(h).squeeze(-1).float() if self.value_head is not None else None
        return logp, values


def _save_head(head: nn.Linear, out_dir: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(out_dir / VALUE_HEAD_FILE))


def _load_head(head: nn.Linear, path: Path) -> None:
    from safetensors.torch import load_file

    try:
        head.load_state_dict({k: v.to(head.weight) for k, v in load_file(str(path)).items()})
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file
        raise UserError(f"incompatible checkpoint: cannot read the value head {path} ({e})") from None


# --------------------------------------------------------------------------------------------------- data


def load_prompts(path, limit: int | None) -> list[dict]:
    """{"prompt": str, "answer": optional} rows of an RL prompt file (a bad row is an error naming file:line)."""
    if not Path(path).is_file():
        raise UserError(f"data.train: no such file: {path}")
    rows = []
    for lineno, row in iter_jsonl(path):
        if limit is not None and len(rows) >= limit:
            break
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise UserError(f'{path}:{lineno}: expected an object {{"prompt": STRING, "answer": ...}}')
        rows.append({"prompt": row["prompt"], "answer": row.get("answer"), "line": lineno})
    if not rows:
        raise UserError(f"{path} holds no prompts")
    return rows


# --------------------------------------------------------------------------------------------------- rewards


def load_reward_function(spec: str) -> Callable:
    """path/to/file.py:function -> the function (imported from the file, not from sys.path)."""
    path, _, name = spec.rpartition(":")
    p = Path(path)
    if not p.is_file():
        raise UserError(f"rl.reward: no such file: {path} (expected path/to/file.py:function)")
    mod_spec = importlib.util.spec_from_file_location(f"llmctl_reward_{abs(hash(str(p.resolve())))}", p)
    if mod_spec is None or mod_spec.loader is None:
        raise UserError(f"rl.reward: cannot import {path} (expected a .py file)")
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's code
        raise UserError(f"rl.reward: importing {path} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        have = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise UserError(f"rl.reward: {path} has no function {name!r} (functions there: {', '.join(have) or 'none'})")
    return fn


class Rewards:
    """One reward per completion from rl.reward (see the module doc)."""

    def __init__(self, spec: str, rows: list[dict], data_path, tok, vocab_size: int):
        self.spec, self.kind, self.fn, self.model = spec, None, None, None
        if spec == "exact-match":
            missing = next((r for r in rows if r["answer"] is None), None)
            if missing is not None:
                raise UserError(f'{data_path}:{missing["line"]}: rl.reward exact-match needs an "answer" in every row')
            self.kind = "exact-match"
        elif ".py:" in spec or spec.endswith(".py"):
            if ".py:" not in spec or not spec.rpartition(":")[2]:
                raise UserError(f"rl.reward: {spec!r} names no function (expected path/to/file.py:function)")
            self.kind, self.fn = "function", load_reward_function(spec)
        elif Path(spec).is_dir():
            from llmctl.checkpoint import resolve_model_dir
            from llmctl.hf import load_config

            d = resolve_model_dir(spec)
            cfg = load_config(d)
            if cfg.vocab_size != vocab_size:
                raise UserError(f"rl.reward: the reward model {d} has a vocabulary of {cfg.vocab_size} tokens, the "
                                f"policy {vocab_size}: it must share the policy's tokenizer")
            self.kind, self.dir = "model", d
            self.pad = tok.pad_id if tok.pad_id is not None else 0
        else:
            raise UserError(f"rl.reward: expected exact-match, a reward model directory or path/to/file.py:function; "
                            f"got {spec!r} (no such directory)")

    def __call__(self, rows, completions, seqs, device) -> list[float]:
        if self.kind == "exact-match":
            return [float(evaluate.matches(c, r["answer"])) for r, c in zip(rows, completions)]
        if self.kind == "function":
            out = []
            for r, c in zip(rows, completions):
                try:
                    v = float(self.fn(c, r["answer"], r["prompt"]))
                except Exception as e:  # noqa: BLE001 - the user's code
                    raise UserError(f"rl.reward: {self.spec} raised {type(e).__name__}: {e}") from None
                if not math.isfinite(v):
                    raise UserError(f"rl.reward: {self.spec} returned {v} for completion {c!r}")
                out.append(v)
            return out
        if self.model is None:
            from llmctl.reward import load_reward_model

            self.model = load_reward_model(self.dir, device=device).requires_grad_(False)
        L = max(len(s) for s in seqs)
        idx = torch.full((len(seqs), L), self.pad, dtype=torch.long)
        mask = torch.zeros(len(seqs), L, dtype=torch.long)
        for i, s in enumerate(seqs):
            idx[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        with torch.no_grad():
            return self.model(idx.to(device), mask.to(device)).cpu().tolist()


# --------------------------------------------------------------------------------------------------- the task


def _sample_seed(seed: int, r: int, rank: int, k: int) -> int:
    return int(np.random.SeedSequence([seed, r, rank, k]).generate_state(2, np.uint64)[0] >> 1)


class RlTask:
    """batches / loss / count / stats / state for loop.Task (see the module doc)."""

    def __init__(self, recipe, dist: Dist, policy: Policy, ac: ActorCritic, rows: list[dict], rewards: Rewards):
        self.recipe, self.rl, self.dist, self.policy, self.ac = recipe, recipe.rl, dist, policy, ac
        self.tok, self.rows, self.rewards = policy.tok, rows, rewards
        self.ppo = recipe.method == "ppo"
        self.G = 1 if self.ppo else self.rl.group_size
        self.T = recipe.data.block_size or policy.model.config.block_size
        self.chat = recipe.data.chat
        self.stop_ids = (self.tok.im_end_id,) if self.chat and self.tok.im_end_id is not None else ()
        self.per_rollout = self.rl.epochs * self.rl.minibatches
        self.buffer: dict | None = None
        self.buffer_index = -1
        self.sums: dict[str, float] = {}
        self.timings = {"generate_s": 0.0, "score_s": 0.0, "rollouts": 0}
        self._encoded: dict[int, list[int]] = {}
        self._perm: dict[int, np.ndarray] = {}
        self._engine = None

    # ------------------------------------------------------------------ rollouts

    def prompt_ids(self, i: int) -> list[int]:
        if i not in self._encoded:
            p = self.rows[i]["prompt"]
            if self.chat:
                ids = self.tok.encode_chat([{"role": "user", "content": p}], add_generation_prompt=True)[0]
            else:
                ids = evaluate.prefix_ids(self.tok) + self.tok.encode(p)
            room, first = self.T - self.rl.max_new_tokens, int(bool(ids) and ids[0] == self.tok.bos_id)
            if len(ids) > room:  # keep bos (if any) and the prompt's end, next to the generation prompt
                ids = ids[:first] + ids[len(ids) - (room - first):]
            self._encoded[i] = ids
        return self._encoded[i]

    def prompts_of(self, r: int) -> list[int]:
        """Row indices of rollout r's prompts on this process (a pure function of seed, r, rank, world)."""
        n, P, W = len(self.rows), self.rl.prompts_per_step, self.dist.world
        out = []
        for g in range((r * W + self.dist.rank) * P, (r * W + self.dist.rank + 1) * P):
            e = g // n
            if e not in self._perm:
                self._perm = {e: np.random.default_rng([self.recipe.seed, e]).permutation(n)}
            out.append(int(self._perm[e][g % n]))
        return out

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
        micro = self.recipe.train.micro_batch_size
        dev = self.dist.device
        for s in range(0, len(logp), micro):
            rows = slice(s, s + micro)
            keep = b["keep"][rows]
            L = int(keep.nonzero()[:, 1].max()) + 1
            keep = keep[:, :L]
            with self.dist.autocast():
                if value:
                    lp, v = self.ac(b["idx"][rows, :L].to(dev), keep.to(dev), b["targets"][rows, :L][keep].to(dev))
                    values[rows, :L][keep] = v.float().cpu()
                else:
                    h = model(b["idx"][rows, :L].to(dev), return_hidden=True)[keep.to(dev)]
                    lp = -F.cross_entropy(model.lm_head(h).float() / self.rl.temperature,
                                          b["targets"][rows, :L][keep].to(dev), reduction="none")  # fmt: skip
            logp[rows, :L][keep] = lp.float().cpu()
        return logp, values

    def rollout(self, r: int) -> dict:
        rl, t0 = self.rl, time.perf_counter()
        rows_i = [i for i in self.prompts_of(r) for _ in range(self.G)]
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
            N, L = len(seqs), max(len(s) for s in seqs) - 1
            b = {"idx": torch.full((N, L), self.tok.pad_id or 0, dtype=torch.long),
                 "targets": torch.zeros(N, L, dtype=torch.long), "keep": torch.zeros(N, L, dtype=torch.bool)}
            for i, (s, p) in enumerate(zip(seqs, prompts)):
                b["idx"][i, : len(s) - 1] = torch.tensor(s[:-1])
                b["targets"][i, : len(s) - 1] = torch.tensor(s[1:])
                b["keep"][i, len(p) - 1 : len(s) - 1] = True
            b["old_logp"], values = self._score(self.policy.model, b, value=self.ppo)
            with self.policy.reference() as ref:
                b["ref_logp"], _ = self._score(ref, b)
        finally:
            self.ac.train(was_training)
        rows = [self.rows[i] for i in rows_i]
        texts = [res.text for res in results]
        reward = torch.tensor(self.rewards(rows, texts, seqs, self.dist.device), dtype=torch.float32)  # [N]
        keep = b["keep"].float()
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
        self._add(n_seq=N, reward=float(reward.sum()), resp_tokens=float(keep.sum()), kl=float(log_ratio.sum()),
                  answered=len(answered), correct=float(sum(evaluate.matches(t, a) for t, a in answered)))
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
        acc = {"loss_tokens": n, "clipfrac": st["clipfrac"] * n}  # tensors: no host sync per micro-batch
        if not self.ppo and rl.kl_coef > 0:
            total = total + rl.kl_coef * losses.kl_estimate(logp, b["ref_logp"], rl.kl_estimator).sum()
        if self.ppo:
            vl = losses.value_loss(values, b["old_values"], b["returns"], ones, rl.value_clip).sum()
            total = total + rl.vf_coef * vl
            acc["value_loss"] = vl.detach()
        self._add(**acc)
        return total

    def _add(self, **kw) -> None:
        for k, v in kw.items():
            self.sums[k] = self.sums.get(k, 0.0) + (v.detach().float() if torch.is_tensor(v) else float(v))

    def stats(self) -> dict:
        names = ["n_seq", "reward", "resp_tokens", "kl", "answered", "correct", "loss_tokens", "clipfrac", "value_loss"]
        t = self.dist.all_sum(torch.tensor([float(self.sums.get(k, 0.0)) for k in names], dtype=torch.float64)).cpu()
        s = dict(zip(names, t.tolist()))
        self.sums = {}
        out = {}
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
        return {"buffer_index": self.buffer_index, "buffer": self.buffer or {},
                "sums": {k: float(v) for k, v in self.sums.items()}}

    def load_state_dict(self, d: dict) -> None:
        self.buffer_index = int(d["buffer_index"])
        self.buffer = d["buffer"] or None
        self.sums = {k: float(v) for k, v in d["sums"].items()}

    def save_model(self, model, out_dir) -> None:
        while not isinstance(model, ActorCritic):
            model = getattr(model, "_orig_mod", None) or model.module
        self.policy.save(model.policy, out_dir)
        if model.value_head is not None:
            _save_head(model.value_head, Path(out_dir))


def make_evaluate(recipe, tok, dist: Dist):
    """exact_match of greedy completions on eval.exact_match (else data.val), split over processes."""
    path = recipe.eval.exact_match or recipe.data.val
    if not path:
        return None
    items = evaluate.read_jsonl(path, "exact-match", recipe.eval.limit)
    local = items[dist.rank :: dist.world]

    def run(model) -> dict:
        while not isinstance(model, ActorCritic):
            model = getattr(model, "_orig_mod", None) or model.module
        right = torch.zeros(2, dtype=torch.float64)
        if local:
            done = evaluate.exact_match(evaluate.generate_completions(
                model.policy, tok, [r["prompt"] for r in local], recipe.eval.max_new_tokens, chat=recipe.eval.chat),
                local)  # fmt: skip
            right += torch.tensor([float(sum(i["correct"] for i in done["items"])), float(len(local))],
                                  dtype=torch.float64)  # fmt: skip
        right = dist.all_sum(right)
        return {"exact_match": float(right[0] / right[1])}

    return run


def make_task(recipe, dist: Dist, resume: Path | None) -> loop.Task:
    rl = recipe.rl
    policy = Policy(recipe.init_from, recipe.lora if recipe.lora.enabled else None, resume, recipe.ref_from)
    model = policy.model
    T = recipe.data.block_size or model.config.block_size
    if T > model.config.block_size:
        raise UserError(f"data.block_size {T} exceeds the model's block_size {model.config.block_size}")
    if rl.max_new_tokens >= T - 1:
        raise UserError(f"rl.max_new_tokens {rl.max_new_tokens} leaves no room for a prompt in {T} positions")
    rows = load_prompts(recipe.data.train, recipe.data.limit)
    rewards = Rewards(rl.reward, rows, recipe.data.train, policy.tok, model.config.vocab_size)
    ac = ActorCritic(model, value_head=recipe.method == "ppo", temperature=rl.temperature)
    if ac.value_head is not None:
        src = (resume / VALUE_HEAD_FILE) if resume is not None else (policy.base_dir / VALUE_HEAD_FILE)
        if src.is_file():
            _load_head(ac.value_head, src)
        elif resume is not None:
            raise UserError(f"incompatible checkpoint: {resume} has no {VALUE_HEAD_FILE} (not a ppo run?)")
    rt = RlTask(recipe, dist, policy, ac, rows, rewards)
    if dist.is_main:
        if resume is not None:
            print(f"resuming from {resume}", file=sys.stderr)
        n_seq = rl.prompts_per_step * rt.G * dist.world
        print(f"{recipe.method}: {policy.describe()}; {len(rows):,} prompts, {n_seq} sequences a rollout, "
              f"{rt.per_rollout} optimizer step(s) each, reward {rewards.kind}", file=sys.stderr)
    return loop.Task(model=ac, batches=rt.batches, loss=rt.loss, count=rt.count, save_model=rt.save_model,
                     evaluate=make_evaluate(recipe, policy.tok, dist), flops_per_token=model.flops_per_token(T),
                     stats=rt.stats, state_dict=rt.state_dict, load_state_dict=rt.load_state_dict)
