"""The model a fine-tuning stage trains (sft, lora, dpo, ppo, grpo): every weight of a MODEL, or LoRA adapters on
it, plus its frozen reference (for DPO, PPO and GRPO's KL) and the function that writes its checkpoint directory;
for RL, the policy with a value head (`ActorCritic`)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from llmctl import hf, hub
from llmctl.checkpoint import resolve_model_dir
from llmctl.errors import UserError
from llmctl.evaluate import token_logprobs
from llmctl.model import unwrap
from llmctl.tokenizer import load_tokenizer


class Policy:
    """model: the Transformer to train (with LoRA layers inside when `lora`; only they require grad);
    save(model, dir): a model directory (full) or a peft adapter folder (LoRA); reference(): the frozen reference
    model, as a context manager (with LoRA: the same model with its adapters disabled, no second copy)."""

    def __init__(self, init_from, lora_section=None, resume: Path | None = None, ref_from=None):
        self.base_dir = resolve_model_dir(init_from)
        self.hub_base = hub.hub_id(init_from)  # (repo id, revision): adapters name the hub id, not the cache path
        self.tok = load_tokenizer(self.base_dir)
        self.lora = lora_section is not None
        self._ref_from, self._ref = ref_from, None
        if self.lora:
            from llmctl import lora as lora_lib

            base = hf.load_model(self.base_dir)
            self.peft = lora_lib.load(base, resume, trainable=True) if resume else lora_lib.apply(base, lora_section)
            self.model = unwrap(self.peft)
        else:
            self.peft = None
            self.model = hf.load_model(resume or self.base_dir)
        hf.check_vocab(self.tok, self.model.config, self.base_dir)

    def save(self, model, out_dir) -> None:
        if self.lora:
            from llmctl import lora as lora_lib

            base = self.hub_base or (str(self.base_dir.resolve()), None)
            lora_lib.save_adapter(self.peft, out_dir, base=base[0], revision=base[1], tokenizer_dir=self.tok.path)
        else:
            hf.save_model(model, out_dir, tokenizer_dir=self.tok.path)

    @contextmanager
    def reference(self):
        """The frozen reference: ref_from if given; else init_from (LoRA: this model, adapters disabled)."""
        if self.lora and self._ref_from is None:
            with self.peft.disable_adapter(), torch.no_grad():
                yield self.model
            return
        if self._ref is None:
            w = self.model.get_input_embeddings().weight
            src = self._ref_from or self.base_dir
            self._ref = hf.load_model(src, device=w.device).eval().requires_grad_(False)
            if self._ref.config.vocab_size != self.model.config.vocab_size:
                raise UserError(f"ref_from {src}: vocab size {self._ref.config.vocab_size} differs from the "
                                f"policy's {self.model.config.vocab_size}")
        with torch.no_grad():
            yield self._ref

    def describe(self) -> str:
        return describe(self.model, self.base_dir, self.lora)


def describe(model, what, lora: bool = False) -> str:
    """`what (arch, N parameters, M = x% trained[, LoRA])` for a stage's first line on stderr."""
    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (f"{what} ({model.config.arch}, {n_all / 1e6:.2f}M parameters, {n_train / 1e6:.3f}M = "
            f"{n_train / n_all:.2%} trained{', LoRA' if lora else ''})")


def context(recipe, config) -> int:
    """The sequence length a fine-tuning stage trains on: data.block_size, at most the model's (None: the model's)."""
    T = recipe.data.block_size or config.block_size
    if T > config.block_size:
        raise UserError(f"data.block_size {T} exceeds the model's block_size {config.block_size}")
    return T


# ------------------------------------------------------------------------------------------------ RL

VALUE_HEAD_FILE = "value_head.safetensors"


class ActorCritic(nn.Module):
    """The module RL trains: the policy Transformer and, for PPO, a scalar value head (nn.Linear, zero-initialised)
    on its final hidden states. forward(idx [B, T], keep [B, T] bool, targets [N]) -> (log p(targets) of logits /
    temperature [N], values [N] or None), fp32, at the N kept positions in row-major order: one call, so DDP sees
    every parameter used in forward."""

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
        logp = token_logprobs(self.policy, h, targets, temperature=self.temperature)[0]  # [N]
        values = self.value_head(h).squeeze(-1).float() if self.value_head is not None else None
        return logp, values

    def save_head(self, out_dir: Path) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()}
        save_file(tensors, str(Path(out_dir) / VALUE_HEAD_FILE))

    def load_head(self, path: Path) -> None:
        from safetensors.torch import load_file

        try:
            self.value_head.load_state_dict({k: v.to(self.value_head.weight) for k, v in load_file(str(path)).items()})
        except Exception as e:  # noqa: BLE001 - a damaged or foreign file
            raise UserError(f"incompatible checkpoint: cannot read the value head {path} ({e})") from None
