"""What the commands that generate share (`llmctl generate`, `llmctl chat`): a MODEL loaded into an Engine,
sampling settings validated into SamplingParams (a bad value names its flag or where it came from), and a
completion escaped onto one line. Light at import: torch and the engine load inside the functions."""

from __future__ import annotations


from llmctl.errors import UserError

# the sampling settings a user may set per item (generate --json) or per conversation (chat's /set), by JSON type
SETTINGS: dict[str, tuple] = {
    "max_new_tokens": (int,), "temperature": (int, float), "top_k": (int,), "top_p": (int, float),
    "min_p": (int, float), "repetition_penalty": (int, float), "frequency_penalty": (int, float),
    "presence_penalty": (int, float), "num_beams": (int,), "length_penalty": (int, float), "stop": (str, list),
    "seed": (int,), "ignore_eos": (bool,),
}  # fmt: skip
DEFAULT_MAX_NEW_TOKENS = 128


def make_params(flags: dict, where: str | None = None):
    """SamplingParams from CLI flags (or a JSON item's merged fields); a bad value is a UserError that names
    the flag (`--top-p`) or the item (`stdin:3: top_p`). With ignore_eos the chat's end-of-turn token
    (stop_token_ids) is a plain token too: exactly max_new_tokens tokens, unless a stop string or the context ends
    the text first."""
    from llmctl.engine import SamplingParams

    if flags.get("ignore_eos") and flags.get("stop_token_ids"):
        flags = {**flags, "stop_token_ids": ()}
    try:
        return SamplingParams(**flags)
    except ValueError as e:
        msg = str(e)
        if where is not None:
            raise UserError(f"{where}: {msg}") from None
        name = msg.split()[0]
        raise UserError("--" + name.replace("_", "-") + msg[len(name) :]) from None


def end_of_turn(tok) -> dict:
    """The sampling settings a chat reply adds: its template's end-of-turn token (e.g. <|im_end|>) ends it too."""
    return {"stop_token_ids": (tok.im_end_id,)} if tok.im_end_id is not None else {}


def unescape(s: str) -> str:
    """`\\n`, `\\t`, `\\r` and `\\\\` in a --stop value."""
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 1 < len(s) and s[i + 1] in "ntr\\":
            out.append({"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[s[i + 1]])
            i += 2
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


# every character str.splitlines() breaks on: \n, \r, then \x0b \x0c \x1c \x1d \x1e \x85 \u2028 \u2029
_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r"}
_ESCAPES.update({c: f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}"
                 for c in "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"})  # fmt: skip
_ESCAPE_TABLE = str.maketrans(_ESCAPES)


def escape(s: str) -> str:
    """One completion on one line: backslash -> `\\\\`, newline -> `\\n`, CR -> `\\r`, and the other characters
    that split lines (vertical tab, form feed, U+2028 ...) -> `\\xHH` / `\\uHHHH`."""
    return s.translate(_ESCAPE_TABLE)


DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16",
          "float16": "float16"}  # --dtype's names -> torch's


def load_engine(model_path, device: str | None = None, compile: bool = False, adapter=None, prompt_lookup: int = 8,
                dtype=None):
    """Engine for a MODEL (model dir, checkpoint or run dir), with a LoRA adapter merged in when one is given.
    dtype (fp32 | bf16 | fp16, or torch's names): the weights' dtype; None: fp32 on CPU, bf16 on a GPU that has
    it. 16-bit weights on CPU stay 16-bit while the decode step computes in fp32 (llmctl/engine/step.py): half
    the memory, and faster where decoding is memory-bound; fp16 needs weights within its range (|w| <= 65504)."""
    import torch

    from llmctl import hf
    from llmctl.checkpoint import resolve_model_dir
    from llmctl.dist import resolve_device
    from llmctl.engine import Engine

    if dtype is not None and str(dtype).removeprefix("torch.") not in DTYPES:
        raise UserError(f"--dtype must be fp32, bf16 or fp16, got {dtype!r}")
    d = resolve_model_dir(model_path)
    dev = resolve_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    dtype = getattr(torch, DTYPES[str(dtype).removeprefix("torch.")])
    if dtype == torch.bfloat16 and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"--dtype bf16: {dev} has no bf16 support (use fp16 or fp32)")
    model, tok = hf.load(d, device=dev, dtype=dtype)
    if dtype == torch.float16 and not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise UserError(f"--dtype fp16: weights of {d} exceed fp16's range (|w| > 65504); use bf16 or fp32")
    if adapter is not None:
        from llmctl import lora

        model = lora.merged(model, adapter)
    # stops on every EOS: the tokenizer's eos_ids (its eos, config.json's and generation_config.json's
    # eos_token_id, a list for Llama 3 instruct) and the model config's
    return Engine(model, tok, share_weights=True, compile=compile, prompt_lookup=prompt_lookup)
