"""A GGUF file checked in llama.cpp (llama-cpp-python) against llmctl's own tokenizer and engine:

1. tokenization: llama.cpp's ids of probe texts (ASCII, Unicode, digits, code, whitespace runs; then the special
   tokens parsed as such) equal llmctl's, with BOS added by the file's own `add_bos_token` as llmctl's prefix rule
   adds it, and its detokenization gives the text back;
2. generation: from a prompt, llmctl's engine decodes greedily (fp32, prompt lookup off, EOS ignored); llama.cpp
   runs the same tokens one at a time (its KV cache, its kernels) and at every step its top token must be
   llmctl's (so its greedy text is llmctl's) and its logits within a tolerance of llmctl's full forward.

Tolerances: an f32 file, 1e-3 (max abs logit difference) and every token equal. f16 / bf16 / q8_0 round the
weights, so near-ties may flip and logits move by about the rounding of the weights: there the top token must
agree on at least 90% of the steps and the logits within TOLERANCE[dtype] * (1 + max |logit|)."""

from __future__ import annotations

from llmctl.errors import UserError

PROBES = (
    "Hello, world! It's a test: don't, we'll, they're.",
    "naïve café — “quotes” ‘single’ … ½ ∑ ∫ √ ≠ ≤ 日本語のテキスト、中文文本，한국어 텍스트 🙂 👩‍👩‍👧‍👦 🇫🇷 👍🏽 עברית العربية",
    "digits 0 12 345 6789 1234567890 3.14159 -42 1,000,000 2024-06-01 0x1F",
    "def f(x):\n    return x ** 2  # code\n\n\tif a != b and c <= d: print(f'{a!r}')\n",
    "   leading spaces, runs    of  spaces\t\ttabs\n\n\nnewlines \r\n windows and trailing  ",
    "combining e\u0301 a\u0308, zero width\u200bspace, bidi \u202eabc\u202c",
)
PROMPT = "Once upon a time, in a land far away,"
N_TOKENS = 32
TOLERANCE = {"f32": 1e-3, "f16": 2e-2, "bf16": 1e-1, "q8_0": 1e-1}
MIN_TOP1 = 0.9  # f16 / bf16 / q8_0: steps whose top token agrees


class Mismatch(Exception):
    """llama.cpp disagrees with llmctl (the message names the first difference)."""


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def _llama(path, **kw):
    import llama_cpp

    try:
        return llama_cpp.Llama(model_path=str(path), verbose=False, n_threads=2, seed=0, **kw)
    except (ValueError, RuntimeError) as e:
        raise Mismatch(f"llama.cpp cannot load the file ({e})") from None


def _close(llm) -> None:
    close = getattr(llm, "close", None)
    if close is not None:
        close()


def special_probe(tok) -> str | None:
    """A text with the tokenizer's special tokens (BOS, EOS, chat markers) written out."""
    from llmctl.export.vocab import EOT_TOKENS

    texts = [tok.id_to_token(i) for i in (tok.bos_id, tok.eos_id) if i is not None]
    texts += [t for t in ("<|im_start|>", *EOT_TOKENS) if tok.hf.token_to_id(t) is not None]
    return "".join(f"{t}user says hi\n" for t in texts) or None


def tokenization(path, tok) -> int:
    """Check llama.cpp's ids on the probe texts; returns how many texts were compared."""
    from llmctl.chat import encode_prompt

    llm = _llama(path, vocab_only=True)
    try:
        n = 0
        for text in PROBES:
            ours, theirs = tok.encode(text), llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
            _same_ids(ours, theirs, text, "")
            back = llm.detokenize(theirs).decode("utf-8", errors="replace")
            if back != text:
                raise Mismatch(f"llama.cpp decodes the ids of {text[:40]!r} as {back[:40]!r}")
            ours = encode_prompt(tok, text)
            _same_ids(ours, llm.tokenize(text.encode("utf-8"), add_bos=True, special=False), text, " with BOS")
            n += 1
        text = special_probe(tok)
        if text:
            ours = tok.encode(text, allow_special=True)
            _same_ids(ours, llm.tokenize(text.encode("utf-8"), add_bos=False, special=True), text, " (specials)")
            n += 1
        return n
    finally:
        _close(llm)


def _same_ids(ours, theirs, text, what) -> None:
    ours, theirs = list(ours), list(theirs)
    if ours != theirs:
        k = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        raise Mismatch(f"token ids of {text[:40]!r}{what} differ at position {k}: llama.cpp "
                       f"{theirs[k : k + 4]}, llmctl {ours[k : k + 4]}")  # fmt: skip


def generation(path, engine, dtype: str) -> dict:
    """Greedy tokens and logits of llama.cpp against llmctl's engine; returns the figures measured."""
    import numpy as np
    import torch

    from llmctl.chat import encode_prompt
    from llmctl.engine import SamplingParams

    model, tok = engine.model, engine.tokenizer
    prompt = encode_prompt(tok, PROMPT)[: model.config.block_size // 2]
    n = min(N_TOKENS, model.config.block_size - len(prompt))
    ours = engine.generate([prompt], SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True))[0].tokens
    seq = prompt + list(ours)
    with torch.no_grad():
        ref = model(torch.tensor([seq[:-1]], device=engine.device))[0].float().cpu().numpy()
    llm = _llama(path, n_ctx=len(seq), n_batch=max(len(prompt), 8), logits_all=True)
    try:
        llm.eval(prompt)
        for t in ours[:-1]:
            llm.eval([t])
        got = np.asarray(llm.scores[: len(seq) - 1], dtype=np.float32)
    finally:
        _close(llm)
    steps = range(len(prompt) - 1, len(seq) - 1)  # the positions whose next token was generated
    top = [int(np.argmax(got[p])) for p in steps]
    diff = float(np.abs(got - ref).max())
    agree = sum(a == b for a, b in zip(top, ours)) / max(len(ours), 1)
    scale = 1.0 if dtype == "f32" else 1.0 + float(np.abs(ref).max())
    if dtype == "f32" and agree < 1:
        k = next(i for i, (a, b) in enumerate(zip(top, ours)) if a != b)
        raise Mismatch(f"greedy token {k} differs: llama.cpp {top[k]}, llmctl {ours[k]} (logits differ by up to "
                       f"{diff:.2e})")  # fmt: skip
    if agree < MIN_TOP1:
        raise Mismatch(f"llama.cpp's top token agrees with llmctl's on {agree:.0%} of {len(ours)} steps "
                       f"(needs {MIN_TOP1:.0%} at {dtype})")  # fmt: skip
    if not diff <= TOLERANCE[dtype] * scale:
        raise Mismatch(f"logits differ by up to {diff:.3g} (tolerance {TOLERANCE[dtype] * scale:.3g} at {dtype})")
    return {"tokens": len(ours), "top1_agreement": agree, "max_logit_diff": diff}


def verify(path, engine, dtype: str) -> dict:
    """Both checks; raises Mismatch on the first difference, UserError when llama-cpp-python is missing."""
    if not available():
        raise UserError("verifying needs llama-cpp-python (pip install 'llmctl[gguf]'), or pass --no-verify")
    return {"probes": tokenization(path, engine.tokenizer), **generation(path, engine, dtype)}
