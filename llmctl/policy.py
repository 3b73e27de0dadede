"""The model a fine-tuning stage trains (sft, lora, rlhf): every weight of a MODEL, or LoRA adapters on it, plus
its frozen reference (for DPO, PPO and GRPO's KL) and the function that writes its checkpoint directory."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from llmctl import hf
from llmctl.checkpoint import resolve_model_dir
from llmctl.errors import UserError
from llmctl.model import unwrap
from llmctl.tokenizer import load_tokenizer


class Policy:
    """model: the Transformer to train (with LoRA layers inside when `lora`; only they require grad);
    save(model, dir): a model directory (full) or a peft adapter folder (LoRA); reference(): the frozen reference
    model, as a context manager (with LoRA: the same model with its adapters disabled, no second copy)."""

    def __init__(self, init_from, lora_section=None, resume: Path | None = None, ref_from=None):
        self.base_dir = resolve_model_dir(init_from)
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
        if self.tok.vocab_size > self.model.config.vocab_size:
            raise UserError(f"tokenizer / model vocab mismatch: the tokenizer of {self.base_dir} has "
                            f"{self.tok.vocab_size} tokens, the model {self.model.config.vocab_size}")

    def save(self, model, out_dir) -> None:
        if self.lora:
            from llmctl import lora as lora_lib

            lora_lib.save_adapter(self.peft, out_dir, base=str(self.base_dir.resolve()), tokenizer_dir=self.tok.path)
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
        n_all = sum(p.numel() for p in self.model.parameters())
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return (f"{self.base_dir} ({self.model.config.arch}, {n_all / 1e6:.2f}M parameters, "
                f"{n_train / 1e6:.3f}M = {n_train / n_all:.2%} trained{', LoRA' if self.lora else ''})")
