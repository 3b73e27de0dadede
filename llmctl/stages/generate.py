"""`llmctl generate`: a PROMPT, stdin lines or JSONL in; completions out (stdout: results only).

Documented behaviours (README and `llmctl generate --help`):
- a prompt is its text after what the tokenizer's own rule puts before a text (Tokenizer.prefix: BOS for
  llmctl's and Llama's tokenizers, nothing for Qwen's and GPT-2's), the ids `AutoTokenizer(text)` gives;
- an empty line / prompt is an empty prompt: the model continues from that prefix (or EOS) alone, an
  unconditional sample;
- a prompt longer than the context allows (block_size - max_new_tokens tokens) keeps that prefix and its last
  tokens, with a warning on stderr; --max-new-tokens must be below the context;
- generation stops at any of the model's EOS ids (the tokenizer's, and config.json's / generation_config.json's
  `eos_token_id`, which may be a list);
- plain output is one completion per input line with `\\` -> `\\\\`, newline -> `\\n`, CR -> `\\r` (other
  line-breaking characters -> `\\xHH` / `\\uHHHH`);
- --json writes JSONL; an input line starting with `{` is a JSON object (`prompt` or chat `messages`, optional
  `id` and sampling overrides), any other line a plain prompt; blank lines are skipped; a malformed object stops
  with `error: stdin:LINE: ...` (the batches before it are already out);
- text that is not UTF-8 (a stdin line, the PROMPT argument, a --stop value) stops with
  `error: stdin:LINE: not UTF-8` / `error: PROMPT: not UTF-8`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any, TextIO

from llmctl.data import check_unicode, text_lines
from llmctl.errors import UserError

# per-item overrides accepted in --json mode and their JSON types
OVERRIDES: dict[str, tuple] = {
    "max_new_tokens": (int,), "temperature": (int, float), "top_k": (int,), "top_p": (int, float),
    "min_p": (int, float), "repetition_penalty": (int, float), "frequency_penalty": (int, float),
    "presence_penalty": (int, float), "num_beams": (int,), "length_penalty": (int, float), "stop": (str, list),
    "seed": (int,),
}  # fmt: skip
KNOWN = set(OVERRIDES) | {"prompt", "messages", "id"}
DEFAULT_MAX_NEW_TOKENS = 128


@dataclass
class Item:
    where: str  # "stdin:3", "PROMPT"
    ids: list[int]
    params: Any  # SamplingParams
    id: Any = None
    has_id: bool = False


def make_params(flags: dict, where: str | None = None):
    """SamplingParams from CLI flags (or a JSON item's merged fields); a bad value is a UserError that names
    the flag (`--top-p`) or the item (`stdin:3: top_p`)."""
    from llmctl.engine import SamplingParams

    try:
        return SamplingParams(**flags)
    except ValueError as e:
        msg = str(e)
        if where is not None:
            raise UserError(f"{where}: {msg}") from None
        name = msg.split()[0]
        raise UserError("--" + name.replace("_", "-") + msg[len(name) :]) from None


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


def load_engine(model_path, device: str | None = None, compile: bool = False, adapter=None, prompt_lookup: int = 8):
    """Engine for a MODEL (model dir, checkpoint or run dir), with a LoRA adapter merged in when one is given:
    fp32 on CPU, bf16 on a GPU that has it."""
    import torch

    from llmctl import hf
    from llmctl.checkpoint import resolve_model_dir
    from llmctl.dist import resolve_device
    from llmctl.engine import Engine

    d = resolve_model_dir(model_path)
    dev = resolve_device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    model, tok = hf.load(d, device=dev, dtype=dtype)
    if adapter is not None:
        from llmctl import lora

        model = lora.merged(model, adapter)
    # stops on every EOS: the tokenizer's eos_ids (its eos, config.json's and generation_config.json's
    # eos_token_id, a list for Llama 3 instruct) and the model config's
    return Engine(model, tok, share_weights=True, compile=compile, prompt_lookup=prompt_lookup)


def fit(engine, text: str | None, chat: bool, params, where: str, stderr: TextIO, messages=None) -> list[int]:
    """The prompt's ids (chat.encode_prompt), cut to the context with a warning."""
    from llmctl.chat import encode_prompt, fit_prompt

    tok = engine.tokenizer
    ids = encode_prompt(tok, text, messages=messages, chat=chat)
    try:
        out, cut = fit_prompt(tok, ids, engine.block_size, params.max_new_tokens)
    except ValueError:
        raise UserError(f"{where}: max_new_tokens ({params.max_new_tokens}) must be below the model's context "
                        f"of {engine.block_size} tokens") from None  # fmt: skip
    if cut:
        print(f"warning: {where}: prompt of {len(ids)} tokens is longer than the context allows "
              f"({engine.block_size} - {params.max_new_tokens} new tokens); keeping its last {len(out)}",
              file=stderr, flush=True)  # fmt: skip
    return out


def parse_json_item(engine, line: str, where: str, base: dict, chat: bool, warned: set, stderr: TextIO) -> Item:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    check_unicode(obj, where, escapes=True)  # an unpaired \udXXX escape
    fields = dict(base)
    for k, v in obj.items():
        if k in OVERRIDES:
            types = OVERRIDES[k]
            if isinstance(v, bool) or not isinstance(v, types):
                want = " or ".join({int: "integer", float: "number", str: "string", list: "list"}[t] for t in types)
                raise UserError(f"{where}: field {k!r} must be a {want}, got {json.dumps(v)}")
            if k == "stop":
                v = [v] if isinstance(v, str) else v
                if not all(isinstance(s, str) for s in v):
                    raise UserError(f"{where}: field 'stop' must be a string or a list of strings")
                v = tuple(v)
            fields[k] = v
        elif k not in KNOWN and k not in warned:
            warned.add(k)
            print(f"warning: {where}: ignoring unknown field {k!r}", file=stderr, flush=True)
    messages = obj.get("messages")
    if messages is not None:
        ok = isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages)  # fmt: skip
        if not ok:
            raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}} strings")
    elif not isinstance(obj.get("prompt"), str):
        raise UserError(f"{where}: expected a string field 'prompt' (or chat 'messages')")
    params = make_params(fields, where)
    ids = fit(engine, obj.get("prompt"), chat, params, where, stderr, messages)
    return Item(where, ids, params, obj.get("id"), "id" in obj)


def run(model, prompt: str | None, flags: dict, *, json_mode: bool, chat: bool, batch_size: int,
        device: str | None = None, compile: bool = False, adapter=None, prompt_lookup: int = 8,
        stdin: TextIO | None = None,
        stdout: TextIO | None = None, stderr: TextIO | None = None) -> None:  # fmt: skip
    """The command: validate the flags, load the MODEL, then answer the PROMPT or every stdin line."""
    import torch

    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    if prompt is not None:
        check_unicode(prompt, "PROMPT")  # Python keeps undecodable argument bytes as lone surrogates
    check_unicode(list(flags.get("stop") or ()), "--stop")
    make_params({k: v for k, v in flags.items() if v is not None})  # flag errors before the model loads
    if prompt_lookup < 0:
        raise UserError(f"--prompt-lookup must be 0 (off) or more, got {prompt_lookup}")
    engine = load_engine(model, device, compile, adapter, prompt_lookup)
    base = dict(flags)
    if base.get("max_new_tokens") is None:
        base["max_new_tokens"] = min(DEFAULT_MAX_NEW_TOKENS, engine.block_size // 2)
    elif base["max_new_tokens"] >= engine.block_size:
        raise UserError(f"--max-new-tokens ({base['max_new_tokens']}) must be below the model's context of "
                        f"{engine.block_size} tokens")  # fmt: skip
    if chat and engine.tokenizer.im_end_id is not None:
        base["stop_token_ids"] = (engine.tokenizer.im_end_id,)
    seed = base.pop("seed", None)
    if seed is None:
        torch.seed()  # no --seed: a different sample every run
    base = {k: v for k, v in base.items() if v is not None}
    make_params(base)

    def item_fields(n: int) -> dict:  # item n (0-based) samples with seed --seed + n
        return base if seed is None else {**base, "seed": seed + n}

    if prompt is not None:
        params = make_params(item_fields(0))
        ids = fit(engine, prompt, chat, params, "PROMPT", stderr)
        if json_mode:
            r = engine.generate([ids], params)[0]
            stdout.write(_json_line(Item("PROMPT", ids, params), r))
        elif stdout.isatty() and params.num_beams == 1:
            for delta in engine.stream(ids, params):
                stdout.write(delta)
                stdout.flush()
            stdout.write("\n")
        else:
            stdout.write(engine.generate([ids], params)[0].text + "\n")
        stdout.flush()
        return

    if stdin.isatty():
        print("reading prompts from stdin, one per line (Ctrl-D ends)", file=stderr, flush=True)
        batch_size = 1
    warned: set = set()
    batch: list[Item] = []
    n = 0
    for lineno, line in text_lines(stdin):
        where = f"stdin:{lineno}"
        text = line[:-1] if line.endswith("\n") else line
        if json_mode and not text.strip():
            continue
        if json_mode and text.lstrip().startswith("{"):
            item = parse_json_item(engine, text, where, item_fields(n), chat, warned, stderr)
        else:
            text = text[:-1] if text.endswith("\r") else text
            params = make_params(item_fields(n))
            item = Item(where, fit(engine, text, chat, params, where, stderr), params)
        n += 1
        batch.append(item)
        if len(batch) >= batch_size:
            _answer(engine, batch, json_mode, stdout)
            batch = []
    if batch:
        _answer(engine, batch, json_mode, stdout)


def _answer(engine, items: list[Item], json_mode: bool, stdout: TextIO) -> None:
    results = engine.generate([it.ids for it in items], [it.params for it in items])
    for it, r in zip(items, results):
        stdout.write(_json_line(it, r) if json_mode else escape(r.text) + "\n")
    stdout.flush()


def _json_line(it: Item, r) -> str:
    d = {"id": it.id} if it.has_id else {}
    d.update(completion=r.text, finish_reason=r.finish_reason, prompt_tokens=r.prompt_tokens,
             completion_tokens=r.completion_tokens)  # fmt: skip
    return json.dumps(d, ensure_ascii=False) + "\n"
