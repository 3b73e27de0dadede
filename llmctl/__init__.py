"""llmctl: train a tokenizer, pretrain, fine-tune, align, generate and evaluate one decoder-only transformer."""

__version__ = "0.1.0"


def cache_dir():
    """Where llmctl caches on disk (the builtin corpus, the native decode step): `$LLMCTL_CACHE`, or
    `~/.cache/llmctl`."""
    import os
    from pathlib import Path

    return Path(os.environ.get("LLMCTL_CACHE") or Path.home() / ".cache" / "llmctl")
