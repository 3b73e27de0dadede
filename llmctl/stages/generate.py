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
- --ignore-eos: exactly --max-new-tokens tokens (benchmarks, load tests), unless a --stop string or the
  context ends the text first; the model's EOS (and --chat's <|im_end|>) are generated as plain tokens;
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
from llmctl.generation import DEFAULT_MAX_NEW_TOKENS, SETTINGS, end_of_turn, escape, load_engine, make_params
from llmctl.generation import unescape  # noqa: F401  (the CLI's --stop)

OVERRIDES = SETTINGS  # per-item overrides accepted in --json mode and their JSON types
KNOWN = set(OVERRIDES) | {"prompt", "messages", "id"}


@dataclass
class Item:
    where: str  # "stdin:3", "PROMPT"
    ids: list[int]
    params: Any  # SamplingParams
    id: Any = None
    has_id: bool = False


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
            if isinstance(v, bool) != (bool in types) or not isinstance(v, types):
                want = " or ".join({int: "integer", float: "number", str: "string", list: "list", bool: "boolean"}[t]
                                   for t in types)  # fmt: skip
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
        device: str | None = None, compile: bool = False, adapter=None, prompt_lookup: int = 8, dtype=None,
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
    engine = load_engine(model, device, compile, adapter, prompt_lookup, dtype)
    base = dict(flags)
    if base.get("max_new_tokens") is None:
        base["max_new_tokens"] = min(DEFAULT_MAX_NEW_TOKENS, engine.block_size // 2)
    elif base["max_new_tokens"] >= engine.block_size:
        raise UserError(f"--max-new-tokens ({base['max_new_tokens']}) must be below the model's context of "
                        f"{engine.block_size} tokens")  # fmt: skip
    if chat:
        base.update(end_of_turn(engine.tokenizer))
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
