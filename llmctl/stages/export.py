"""`llmctl export gguf MODEL --out FILE`: the model (with a LoRA adapter merged) and its tokenizer as a GGUF file
for llama.cpp / ollama, verified in llama.cpp, plus an ollama Modelfile beside it.

The file is written under a temporary name next to FILE; once llama.cpp's token ids, greedy tokens and logits
agree with llmctl's (export/verify.py) it is renamed into place. On a disagreement it is kept as
FILE.unverified (for inspection, not under a name a runtime would pick up) and the command fails with the first
difference. Without llama-cpp-python installed the file is written unverified, with a warning; --no-verify skips
the check. An existing FILE is replaced only with --force."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from llmctl.errors import UserError


def run(model, out, *, adapter=None, dtype: str = "f32", verify: bool = True, force: bool = False) -> dict:
    """Export; returns {"path", "family", "verified": the figures measured in llama.cpp, or None}."""
    from llmctl.checkpoint import atomic_write
    from llmctl.export import layout, modelfile
    from llmctl.export import verify as check
    from llmctl.generation import load_engine

    if dtype not in layout.DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(layout.DTYPES)}, got {dtype!r}")
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give the .gguf file to write")
    mf = out.with_suffix(".Modelfile")
    for f in (out, mf):
        if f.exists() and not force:
            raise UserError(f"{f} already exists (pass --force to replace it)")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: no directory {out.parent}")
    engine = load_engine(model, device="cpu", adapter=adapter, prompt_lookup=0)  # fp32, as verified
    fam = layout.check(engine.model.config)
    tmp, f = out.with_name(f".{out.name}.{os.getpid()}.tmp"), None
    try:
        ids = layout.write(engine.model, engine.tokenizer, tmp, dtype)
        if verify and check.available():
            try:
                f = check.verify(tmp, engine, dtype)
            except check.Mismatch as e:
                bad = out.with_name(out.name + ".unverified")
                os.replace(tmp, bad)
                raise UserError(f"llama.cpp disagrees with llmctl: {e} (the file is kept as {bad})") from None
            print(f"verified in llama.cpp: token ids of {f['probes']} probe texts equal; {f['tokens']} greedy tokens, "
                  f"top token agreeing {f['top1_agreement']:.0%}; logits within {f['max_logit_diff']:.2e}",
                  file=sys.stderr)  # fmt: skip
        elif verify:
            print("warning: not verified: llama-cpp-python is not installed (pip install 'llmctl[gguf]')",
                  file=sys.stderr)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    atomic_write(mf, modelfile.modelfile(out.name, engine.tokenizer, ids))
    print(f"{fam} model written as {dtype} to {out}; ollama Modelfile: {mf}", file=sys.stderr)
    print(out)
    return {"path": out, "family": fam, "verified": f}
