"""`llmctl rlhf` with `method: reward` or `method: dpo`: training on preference pairs {"prompt", "chosen", "rejected"}.

Both build a `loop.Task` for the one training loop; the loop's unit (`count`, its `tokens` and `tok_per_s`) is
the preference PAIR, and `loss` returns the sum of the per-pair losses, so every figure is a mean over pairs.

Encoding (`encode_pair`). With `data.chat` the prompt is a user message and the response the assistant turn,
through the tokenizer's chat template (`tok.encode_chat`); else bos + prompt + response + eos, prompt and response
encoded apart (as SFT's prompt-completion rows). The response tokens (the assistant turn and its end-of-turn
token) are what DPO sums log-probs over. A sequence longer than the model's context is cut at the right, and a
pair that loses every response token of one side is dropped (both counted on stderr).

Reward model (`method: reward`): `reward.RewardModel`, the init_from transformer with a scalar head read at each
sequence's last token, all weights trained with the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected)
(`losses.bradley_terry_loss`). Rows are right-padded with the tokenizer's pad id; checkpoints are
sequence-classification folders (`AutoModelForSequenceClassification` loads them, `reward.load_reward_model`
too). Training figures: accuracy (r_c > r_r), margin (r_c - r_r), reward_chosen, reward_rejected, and the
token lengths len_chosen, len_rejected.

DPO (`method: dpo`): `losses.dpo_loss` on summed response log-probs, with beta, label smoothing (conservative DPO)
and the IPO variant (`dpo.loss_type: ipo`). The reference log-probs are computed once at start-up, over the whole
training (and validation) set, from `Policy.reference()`: `ref_from`, else init_from, or with LoRA the policy
itself with its adapters disabled (no second copy). They are a pure function of the reference, computed in fixed
chunks of the data order, so a resumed run gets the very same numbers; data-parallel processes compute a share
each and add them up. A full fine-tuning reference is freed once they are computed. Training figures: accuracy
(implicit reward of chosen > rejected), margin, reward_chosen / reward_rejected (beta (log p - log p_ref)),
logp_chosen / logp_rejected, len_chosen / len_rejected.

Evaluation on data.val (at most eval.limit pairs), on every process, summed across them: val_loss (mean pair
loss), val_acc (held-out pairwise accuracy: r_c > r_r for a reward model; log p(chosen) > log p(rejected) for DPO,
ties counting one half) and val_margin; DPO adds val_reward_acc (implicit reward accuracy) and, when
eval.exact_match names a {"prompt", "answer"} file, exact_match of greedy completions.

Batches are a pure function of (seed, step): epochs of pairs shuffled by `numpy.random.default_rng([seed, epoch])`,
so resuming needs no data state.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from llmctl import evaluate, hf, loop, losses
from llmctl.data import iter_jsonl
from llmctl.errors import UserError
from llmctl.sftdata import IGNORE, Example, collate, encode_row

PAIR_SHAPE = '{"prompt": ..., "chosen": ..., "rejected": ...}'


# ------------------------------------------------------------------------------------------------------------ data


@dataclass
class Pair:
    chosen: Example
    rejected: Example


def encode_pair(tok, row: dict, chat: bool) -> tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]:
    """((ids, mask) of chosen, (ids, mask) of rejected); the mask is 1 on the response tokens."""
    def one(response):
        if chat:
            return tok.encode_chat([{"role": "user", "content": row["prompt"]},
                                    {"role": "assistant", "content": response}])
        return encode_row(tok, {"prompt": row["prompt"], "completion": response})

    return one(row["chosen"]), one(row["rejected"])


def load_pairs(path, tok, chat: bool, max_tokens: int, limit: Optional[int] = None, quiet: bool = False) -> list[Pair]:
    """Encode a preference JSONL file; sequences are cut to max_tokens; a bad row is a UserError naming file:line."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"no such file: {p}" if not p.exists() else f"expected a JSONL file, got a directory: {p}")
    check = evaluate.SCHEMAS["preference"][1]
    out, cut, dropped = [], 0, 0
    for lineno, row in iter_jsonl(p):
        if limit is not None and len(out) >= limit:
            break
        problem = check(row) if isinstance(row, dict) else f"expected an object {PAIR_SHAPE}"
        if problem:
            raise UserError(f"{p}:{lineno}: {problem} (preference rows are {PAIR_SHAPE})")
        try:
            sides = encode_pair(tok, row, chat)
        except UserError as e:
            raise UserError(f"{p}:{lineno}: {e}") from None
        ex = []
        for ids, mask in sides:
            if len(ids) > max_tokens:
                ids, mask, cut = ids[:max_tokens], mask[:max_tokens], cut + 1
            ex.append(Example(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)))
        if any(len(e.ids) < 2 or not e.mask[1:].any() for e in ex):
            dropped += 1
            continue
        out.append(Pair(*ex))
    if not quiet and (cut or dropped):
        print(f"warning: {p}: {cut} sequence(s) cut to {max_tokens} tokens, {dropped} pair(s) without response "
              "tokens left dropped", file=sys.stderr)
    if not out:
        raise UserError(f"{p} holds no usable preference pairs")
    return out


def collate_lm(pairs: list[Pair]) -> dict:
    """Causal-LM rows, the chosen sequences first, then the rejected: idx, targets (response tokens only)."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs])


def collate_reward(pairs: list[Pair], pad_id: int) -> dict:
    """Whole sequences, chosen rows first, right-padded with pad_id: idx, attention_mask."""
    rows = [p.chosen.ids for p in pairs] + [p.rejected.ids for p in pairs]
    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    att = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, : len(r)] = torch.from_numpy(r)
        att[i, : len(r)] = 1
    return {"idx": idx, "attention_mask": att}


class PairBatches:
    """step -> this process's micro-batches of pairs. Pair i of the run is pair order_e[i mod N] of epoch
    e = i // N (order_e a permutation seeded by (seed, e)); the global batch of a step is micro * accum * world
    consecutive pairs, process r taking pairs [(m * world + r) * micro, ...) of micro-step m (as sft does)."""

    def __init__(self, n: int, make, micro: int, accum: int, rank: int, world: int, seed: int):
        self.n, self.make = n, make
        self.micro, self.accum, self.rank, self.world, self.seed = micro, accum, rank, world, seed
        self._orders: dict[int, np.ndarray] = {}

    def pair(self, i: int) -> int:
        e, k = divmod(i, self.n)
        if e not in self._orders:
            if len(self._orders) > 4:
                self._orders.clear()
            self._orders[e] = np.random.default_rng([self.seed, e]).permutation(self.n)
        return int(self._orders[e][k])

    def epoch_of_step(self, step: int) -> float:
        return step * self.micro * self.accum * self.world / self.n

    def __call__(self, step: int) -> list[dict]:
        base = step * self.micro * self.accum * self.world
        out = []
        for m in range(self.accum):
            lo = base + (m * self.world + self.rank) * self.micro
            out.append(self.make([self.pair(i) for i in range(lo, lo + self.micro)]))
        return out


# ---------------------------------------------------------------------------------------------------- scoring


def sequence_logps(model, batch: dict, lm=None) -> torch.Tensor:
    """Summed log p of each row's supervised tokens [R] (fp32, with gradient when enabled). `model` may be
    wrapped (DDP); `lm` is the unwrapped Transformer whose lm_head projects only the supervised positions."""
    lm = model if lm is None else lm
    idx, targets = batch["idx"], batch["targets"]
    h = model(idx, return_hidden=True)  # [R, T, C]
    keep = targets != IGNORE  # [R, T]
    rows = keep.nonzero()[:, 0]  # [N]
    logits = lm.lm_head(h[keep]).float()  # [N, V]: response positions only
    lp = -F.cross_entropy(logits, targets[keep], reduction="none")  # [N]
    return torch.zeros(idx.size(0), dtype=torch.float32, device=idx.device).index_add(0, rows, lp)


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def reference_logps(ref, pairs: list[Pair], indices, micro: int, device, autocast) -> torch.Tensor:
    """[len(pairs), 2] summed response log-probs (chosen, rejected) under `ref`, for the pairs in `indices` (the
    others stay 0), computed `micro` pairs at a time in the order of `indices`."""
    out = torch.zeros(len(pairs), 2, dtype=torch.float32)
    indices = list(indices)
    was_training = ref.training
    ref.eval()
    try:
        for s in range(0, len(indices), micro):
            chunk = indices[s : s + micro]
            with autocast():
                lp = sequence_logps(ref, _to(collate_lm([pairs[i] for i in chunk]), device)).float().cpu()
            out[chunk, 0], out[chunk, 1] = lp[: len(chunk)], lp[len(chunk) :]
    finally:
        ref.train(was_training)
    return out


# -------------------------------------------------------------------------------------------------- figures


@dataclass
class Stats:
    """Training figures summed on the device over the micro-batches since the last `__call__` (no host sync),
    then summed across processes and divided by the number of pairs."""

    dist: object
    names: tuple
    sums: Optional[torch.Tensor] = None
    n: Optional[torch.Tensor] = field(default=None)

    def add(self, values: list[torch.Tensor]) -> None:
        v = torch.stack([x.detach().float().sum() for x in values])
        n = torch.tensor(float(values[0].numel()), device=v.device)
        self.sums = v if self.sums is None else self.sums + v
        self.n = n if self.n is None else self.n + n

    def __call__(self) -> dict:
        if self.sums is None:
            return {}
        t = self.dist.all_sum(torch.cat([self.sums, self.n.reshape(1)]).double().cpu())
        self.sums = self.n = None
        return {k: float(v / t[-1]) for k, v in zip(self.names, t[:-1])}


def _acc(margin: torch.Tensor) -> torch.Tensor:
    """1 where margin > 0, 1/2 on ties, 0 otherwise."""
    return (margin > 0).float() + 0.5 * (margin == 0).float()


def _lengths(batch: dict, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Response tokens (DPO) or whole-sequence tokens (reward) of the chosen and the rejected rows."""
    n = (batch["targets"] != IGNORE).sum(1) if "targets" in batch else batch["attention_mask"].sum(1)
    return n[:m].float(), n[m:].float()


# ------------------------------------------------------------------------------------------------------ tasks


@dataclass
class Built:
    """What make_task builds, for tests and the Python API: the task and its parts."""

    task: loop.Task
    tok: object
    train: list
    val: list
    policy: object = None  # dpo: the llmctl.policy.Policy
    ref: Optional[torch.Tensor] = None  # dpo: [N, 2] reference log-probs of the training pairs
    val_ref: Optional[torch.Tensor] = None


def make_task(recipe, dist, resume: Optional[Path]) -> loop.Task:
    return build(recipe, dist, resume).task


def build(recipe, dist, resume: Optional[Path] = None) -> Built:
    if recipe.method not in ("reward", "dpo"):
        raise ValueError(f"preference.build handles reward and dpo, not {recipe.method}")
    if resume is not None and dist.is_main:
        print(f"resuming from {resume}", file=sys.stderr)
    return (_build_reward if recipe.method == "reward" else _build_dpo)(recipe, dist, resume)


def _block_size(recipe, model) -> int:
    T = recipe.data.block_size or model.config.block_size
    if T > model.config.block_size:
        raise UserError(f"data.block_size {T} exceeds the model's block_size {model.config.block_size}")
    return T


def _val_pairs(recipe, tok, max_tokens, dist) -> list:
    if not recipe.data.val:
        return []
    return load_pairs(recipe.data.val, tok, recipe.data.chat, max_tokens, recipe.eval.limit, quiet=not dist.is_main)


def _describe(model, what: str) -> str:
    n = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{what} ({model.config.arch}, {n / 1e6:.2f}M parameters, {n_train / n:.2%} trained)"


def _mean_pair_tokens(pairs: list[Pair]) -> float:
    return float(np.mean([len(p.chosen.ids) + len(p.rejected.ids) for p in pairs]))


def _build_reward(recipe, dist, resume) -> Built:
    from llmctl import reward as reward_lib
    from llmctl.checkpoint import resolve_model_dir
    from llmctl.tokenizer import load_tokenizer

    base_dir = resolve_model_dir(recipe.init_from)
    tok = load_tokenizer(base_dir)
    if tok.pad_id is None:
        raise UserError(f"a reward model needs a pad token (transformers pools the last non-pad token); the "
                        f"tokenizer of {base_dir} has none")  # fmt: skip
    if resume is not None:
        model = reward_lib.load_reward_model(resume, device=dist.device)
    else:
        model = reward_lib.RewardModel.from_causal_lm(hf.load_model(base_dir, device=dist.device))
    if tok.vocab_size > model.config.vocab_size:
        raise UserError(f"tokenizer / model vocab mismatch: the tokenizer of {base_dir} has {tok.vocab_size} "
                        f"tokens, the model {model.config.vocab_size}")  # fmt: skip
    model.backbone.gradient_checkpointing = recipe.train.gradient_checkpointing
    T = _block_size(recipe, model)
    tc, pad = recipe.train, tok.pad_id
    train = load_pairs(recipe.data.train, tok, recipe.data.chat, T, recipe.data.limit, quiet=not dist.is_main)
    val = _val_pairs(recipe, tok, T, dist)
    batches = PairBatches(len(train), lambda ix: collate_reward([train[i] for i in ix], pad), tc.micro_batch_size,
                          tc.grad_accum, dist.rank, dist.world, recipe.seed)  # fmt: skip
    stats = Stats(dist, ("accuracy", "margin", "reward_chosen", "reward_rejected", "len_chosen", "len_rejected"))

    def loss(model, batch):
        m = batch["idx"].size(0) // 2
        r = model(batch["idx"], attention_mask=batch["attention_mask"])  # [2m]
        rc, rr = r[:m], r[m:]
        stats.add([_acc(rc - rr), rc - rr, rc, rr, *_lengths(batch, m)])
        return losses.bradley_terry_loss(rc, rr).sum()

    val_local = val[dist.rank :: dist.world]

    def run_eval(model) -> dict:
        model = dist.unwrap(model)
        sums = torch.zeros(4, dtype=torch.float64)  # correct, loss, margin, pairs
        for s in range(0, len(val_local), tc.micro_batch_size):
            chunk = val_local[s : s + tc.micro_batch_size]
            b = _to(collate_reward(chunk, pad), dist.device)
            r = model(b["idx"], attention_mask=b["attention_mask"]).float().cpu()
            rc, rr = r[: len(chunk)], r[len(chunk) :]
            sums += torch.stack([_acc(rc - rr).sum(), losses.bradley_terry_loss(rc, rr).sum(), (rc - rr).sum(),
                                 torch.tensor(float(len(chunk)))]).double()  # fmt: skip
        sums = dist.all_sum(sums).cpu()
        n = sums[3].clamp_min(1)
        return {"val_loss": float(sums[1] / n), "val_acc": float(sums[0] / n), "val_margin": float(sums[2] / n)}

    def save(model, out_dir):
        reward_lib.save_reward_model(model, out_dir, pad_token_id=pad, tokenizer_dir=tok.path)

    task = loop.Task(model=model, batches=batches, loss=loss, count=lambda b: b["idx"].size(0) // 2,
                     save_model=save, evaluate=run_eval if val else None,
                     flops_per_token=model.backbone.flops_per_token(T) * _mean_pair_tokens(train), stats=stats)
    if dist.is_main:
        print(f"reward: {_describe(model, str(base_dir))}; {len(train):,} pairs, {tc.max_steps} steps = "
              f"{batches.epoch_of_step(tc.max_steps):.2f} epochs", file=sys.stderr)
    return Built(task=task, tok=tok, train=train, val=val)


def _build_dpo(recipe, dist, resume) -> Built:
    from llmctl.policy import Policy

    lora = recipe.lora if recipe.lora.enabled else None
    policy = Policy(recipe.init_from, lora, resume, ref_from=recipe.ref_from)
    model, tok = policy.model.to(dist.device), policy.tok
    T = _block_size(recipe, model)
    tc, dc = recipe.train, recipe.dpo
    train = load_pairs(recipe.data.train, tok, recipe.data.chat, T + 1, recipe.data.limit, quiet=not dist.is_main)
    val = _val_pairs(recipe, tok, T + 1, dist)
    val_local = val[dist.rank :: dist.world]
    # The reference log-probs, once: each process a share of the training pairs (summed), its own val pairs.
    with policy.reference() as ref:
        ref_train = dist.all_sum(reference_logps(ref, train, range(dist.rank, len(train), dist.world),
                                                 tc.micro_batch_size, dist.device, dist.autocast)).cpu()
        ref_val = reference_logps(ref, val_local, range(len(val_local)), tc.micro_batch_size, dist.device,
                                  dist.autocast)  # fmt: skip
    policy._ref = None  # a full fine-tuning reference is no longer needed: free its copy

    def make(ix):
        b = collate_lm([train[i] for i in ix])
        b["ref"] = torch.cat([ref_train[ix, 0], ref_train[ix, 1]])
        return b

    batches = PairBatches(len(train), make, tc.micro_batch_size, tc.grad_accum, dist.rank, dist.world, recipe.seed)
    stats = Stats(dist, ("accuracy", "margin", "reward_chosen", "reward_rejected", "logp_chosen", "logp_rejected",
                         "len_chosen", "len_rejected"))  # fmt: skip

    def pair_losses(lp, ref_lp):
        m = lp.size(0) // 2
        return losses.dpo_loss(lp[:m], lp[m:], ref_lp[:m], ref_lp[m:], dc.beta, dc.label_smoothing, dc.loss_type)

    def loss(model_, batch):
        lp = sequence_logps(model_, batch, lm=dist.unwrap(model_))
        m = lp.size(0) // 2
        per_pair, rc, rr = pair_losses(lp, batch["ref"])
        stats.add([_acc(rc - rr), rc - rr, rc, rr, lp[:m], lp[m:], *_lengths(batch, m)])
        return per_pair.sum()

    em = evaluate.read_jsonl(recipe.eval.exact_match, "exact-match", recipe.eval.limit) if recipe.eval.exact_match \
        else []  # fmt: skip
    em_local = em[dist.rank :: dist.world]

    def run_eval(model_) -> dict:
        lm = dist.unwrap(model_)
        out = {}
        if val:
            sums = torch.zeros(5, dtype=torch.float64)  # logp acc, loss, implicit-reward acc, margin, pairs
            for s in range(0, len(val_local), tc.micro_batch_size):
                chunk = val_local[s : s + tc.micro_batch_size]
                lp = sequence_logps(lm, _to(collate_lm(chunk), dist.device)).float().cpu()
                r = ref_val[s : s + len(chunk)]
                per_pair, rc, rr = pair_losses(lp, torch.cat([r[:, 0], r[:, 1]]))
                m = len(chunk)
                sums += torch.stack([_acc(lp[:m] - lp[m:]).sum(), per_pair.sum(), _acc(rc - rr).sum(),
                                     (rc - rr).sum(), torch.tensor(float(m))]).double()  # fmt: skip
            sums = dist.all_sum(sums).cpu()
            n = sums[4].clamp_min(1)
            out.update(val_loss=float(sums[1] / n), val_acc=float(sums[0] / n), val_reward_acc=float(sums[2] / n),
                       val_margin=float(sums[3] / n))  # fmt: skip
        if em:
            done = evaluate.exact_match(evaluate.generate_completions(
                lm, tok, [r["prompt"] for r in em_local], recipe.eval.max_new_tokens, chat=recipe.eval.chat),
                em_local) if em_local else {"items": []}  # fmt: skip
            right = dist.all_sum(torch.tensor([float(sum(i["correct"] for i in done["items"])),
                                               float(len(done["items"]))])).cpu()  # fmt: skip
            out["exact_match"] = float(right[0] / right[1])
        return out

    task = loop.Task(model=model, batches=batches, loss=loss, count=lambda b: b["idx"].size(0) // 2,
                     save_model=policy.save, evaluate=run_eval if (val or em) else None,
                     flops_per_token=model.flops_per_token(T) * _mean_pair_tokens(train), stats=stats)
    if dist.is_main:
        print(f"dpo: {policy.describe()}; {len(train):,} pairs, {tc.max_steps} steps = "
              f"{batches.epoch_of_step(tc.max_steps):.2f} epochs; beta {dc.beta}, {dc.loss_type}"
              + (f", label smoothing {dc.label_smoothing}" if dc.label_smoothing else ""), file=sys.stderr)
    return Built(task=task, tok=tok, train=train, val=val, policy=policy, ref=ref_train, val_ref=ref_val)
