"""llmctl: train a tokenizer, pretrain, fine-tune, align, generate and evaluate one decoder-only transformer."""

__version__ = "0.1.0"
