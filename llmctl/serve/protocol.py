"""The OpenAI API's completions and chat completions, as `llmctl serve` speaks them: a request body validated into
prompts (token ids, through the one prompt encoder, llmctl/chat.py) and one SamplingParams per choice; the response,
chunk and error objects. Where OpenAI leaves a choice open, vLLM's is taken.

- `max_tokens` (chat: `max_completion_tokens`, or its older name `max_tokens`): completions default to 16 (as
  OpenAI and vLLM) or the room left in the context if less; chat defaults to the room left in the context. A prompt
  that leaves no room, or prompt + max_tokens past the context, is a 400 (`context_length_exceeded`).
- `n` choices per prompt; with `seed` S, choice i (its index in `choices`) samples with seed S + i, as
  `llmctl generate --seed S` samples its i-th prompt, so choice 0 is what `generate --seed S` gives.
- `finish_reason`: "stop" for EOS, the chat template's end of turn or a stop string; "length" for max_tokens or the
  end of the context.
- Logprobs are the model's log-softmax (before temperature and penalties, as vLLM's default), one entry per
  generated token (the final EOS / end-of-turn token included; a token's text is its decoded text, special
  tokens as written); -inf is sent as -9999.0.
- Unsupported parameters are refused (400), never ignored: echo, suffix, best_of > 1, logit_bias, tools /
  functions, response_format other than text; so is a field the API does not have.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from functools import lru_cache

from llmctl.errors import UserError

MAX_CHOICES = 128  # prompts x n in one request
MAX_LOGPROBS = 20
COMPLETION_MAX_TOKENS = 16
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "abort"}

_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "seed", "n", "presence_penalty",
           "frequency_penalty", "repetition_penalty", "stream", "stream_options", "ignore_eos", "user", "logit_bias",
           "logprobs"}  # fmt: skip
FIELDS = {
    "completions": _COMMON | {"prompt", "echo", "suffix", "best_of"},
    "chat": _COMMON | {"messages", "top_logprobs", "max_completion_tokens", "tools", "tool_choice", "functions",
                       "function_call", "parallel_tool_calls", "response_format"},
}  # fmt: skip


class ApiError(Exception):
    """A request the server refuses: an HTTP status and an OpenAI error object."""

    def __init__(self, message: str, param: str | None = None, *, status: int = 400, code: str | None = None,
                 type: str = "invalid_request_error"):  # fmt: skip
        super().__init__(message)
        self.status, self.param, self.code, self.type = status, param, code, type

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Plan:
    """A validated request: the prompts, one SamplingParams per choice (choice i answers prompts[i // n])."""

    kind: str  # "completions" | "chat"
    prompts: list[list[int]]
    params: list
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None  # top alternatives per token (0: the chosen token's only); None: no logprobs
    model: str = ""
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))


def _number(body: dict, key: str, default, lo=None, hi=None, *, integer: bool = False, open_lo: bool = False):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
        raise ApiError(f"{key} must be {'an integer' if integer else 'a number'}, got {json.dumps(v)}", key)
    if (lo is not None and (v <= lo if open_lo else v < lo)) or (hi is not None and v > hi):
        if hi is None:
            what = f"{'>' if open_lo else '>='} {lo}"
        else:
            what = f"in {'(' if open_lo else '['}{lo}, {hi}]"
        raise ApiError(f"{key} must be {what}, got {v}", key)
    return v


def _flag(body: dict, key: str) -> bool:
    v = body.get(key)
    if v is not None and not isinstance(v, bool):
        raise ApiError(f"{key} must be true or false, got {json.dumps(v)}", key)
    return bool(v)


def _refuse_unsupported(kind: str, body: dict) -> None:
    unknown = sorted(set(body) - FIELDS[kind])
    if unknown:
        raise ApiError(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
    fmt = body.get("response_format")
    refused = [
        ("echo", bool(body.get("echo")), "echo is not supported"),
        ("suffix", body.get("suffix") not in (None, ""), "suffix (fill in the middle) is not supported"),
        ("best_of", body.get("best_of") not in (None, 1), "best_of > 1 is not supported (use n)"),
        ("logit_bias", bool(body.get("logit_bias")), "logit_bias is not supported"),
        ("tools", bool(body.get("tools")) or bool(body.get("functions")), "tools and functions are not supported"),
        ("tool_choice", body.get("tool_choice") not in (None, "none", "auto"), "tool_choice is not supported"),
        ("function_call", body.get("function_call") not in (None, "none", "auto"), "function_call is not supported"),
        ("response_format", fmt is not None and fmt != {"type": "text"},
         "response_format other than {\"type\": \"text\"} is not supported"),
    ]  # fmt: skip
    for param, bad, message in refused:
        if bad:
            raise ApiError(message, param)


def _stop(body: dict) -> tuple[str, ...]:
    s = body.get("stop")
    if s is None:
        return ()
    s = [s] if isinstance(s, str) else s
    if not isinstance(s, list) or len(s) > 4 or not all(isinstance(x, str) and x for x in s):
        raise ApiError("stop must be a non-empty string or a list of up to 4 of them", "stop")
    return tuple(s)


def _completion_prompts(tok, body: dict) -> list[list[int]]:
    from llmctl.chat import encode_prompt

    p = body.get("prompt")
    def ints(x) -> bool:
        return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(p, str):
        return [encode_prompt(tok, p)]
    if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        return [encode_prompt(tok, x) for x in p]
    if ints(p):
        prompts = [p]
    elif isinstance(p, list) and p and all(ints(x) for x in p):
        prompts = p
    else:
        raise ApiError("prompt must be a string, a list of strings, a list of token ids or a list of such lists",
                       "prompt")  # fmt: skip
    if any(not 0 <= t < tok.vocab_size for x in prompts for t in x):
        raise ApiError(f"prompt: token ids must be in [0, {tok.vocab_size})", "prompt")
    return [list(x) for x in prompts]


def _chat_prompt(tok, body: dict) -> list[int]:
    from llmctl.chat import encode_prompt

    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):  # fmt: skip
                raise ApiError(f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(c["text"] for c in content)
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
            raise ApiError(f"messages[{i}] must be an object with a string role and content", "messages")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    try:
        return encode_prompt(tok, messages=out)
    except UserError as e:
        raise ApiError(str(e), "messages") from None


def parse(kind: str, body, engine, model_name: str) -> Plan:
    """A request body -> Plan; ApiError (400, or 404 for another model) when it cannot be served as asked."""
    from llmctl.generation import end_of_turn, make_params

    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError("model must be a string", "model")
    if model not in (None, model_name):
        raise ApiError(f"The model `{model}` does not exist (this server serves `{model_name}`)", "model",
                       status=404, code="model_not_found")  # fmt: skip
    _refuse_unsupported(kind, body)
    stream = _flag(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and (not stream or not isinstance(opts, dict) or set(opts) - {"include_usage"}):
        raise ApiError("stream_options must be {\"include_usage\": BOOL}, with stream true", "stream_options")
    include_usage = _flag(opts or {}, "include_usage")
    if kind == "chat":
        logprobs = _number(body, "top_logprobs", 0, 0, MAX_LOGPROBS, integer=True) if _flag(body, "logprobs") else None
        if logprobs is None and body.get("top_logprobs") is not None:
            raise ApiError("top_logprobs needs logprobs: true", "top_logprobs")
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        prompts, where = [_chat_prompt(engine.tokenizer, body)], "messages"
    else:
        logprobs = _number(body, "logprobs", None, 0, MAX_LOGPROBS, integer=True)
        key, prompts, where = "max_tokens", _completion_prompts(engine.tokenizer, body), "prompt"
    max_tokens = _number(body, key, None, 1, integer=True)
    n = _number(body, "n", 1, 1, MAX_CHOICES, integer=True)
    if n * len(prompts) > MAX_CHOICES:
        raise ApiError(f"at most {MAX_CHOICES} choices (prompts x n) per request", "n")
    top_k = _number(body, "top_k", 0, -1, integer=True)
    flags = dict(
        temperature=_number(body, "temperature", 1.0, 0, 2), top_p=_number(body, "top_p", 1.0, 0, 1, open_lo=True),
        top_k=max(top_k, 0), min_p=_number(body, "min_p", 0.0, 0, 1),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2, 2),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2, 2),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0, open_lo=True),
        stop=_stop(body), ignore_eos=_flag(body, "ignore_eos"))  # fmt: skip
    seed = _number(body, "seed", None, -(2**63), 2**64 - 1, integer=True)
    if kind == "chat":
        flags.update(end_of_turn(engine.tokenizer))
    context, params = engine.block_size, []
    for ids in prompts:
        room = context - len(ids)
        if room < 1:
            raise ApiError(f"This model's maximum context length is {context} tokens, and the {where} has "
                           f"{len(ids)} tokens: no room left for the completion", where,
                           code="context_length_exceeded")  # fmt: skip
        if max_tokens is not None and max_tokens > room:
            raise ApiError(f"This model's maximum context length is {context} tokens. However, you requested "
                           f"{len(ids) + max_tokens} tokens ({len(ids)} in the {where}, {max_tokens} for the "
                           f"completion). Please reduce the length of the {where} or the completion.", key,
                           code="context_length_exceeded")  # fmt: skip
        new = max_tokens or (min(COMPLETION_MAX_TOKENS, room) if kind == "completions" else room)
        for _ in range(n):
            i = len(params)
            try:
                params.append(make_params({**flags, "max_new_tokens": new,
                                           "seed": None if seed is None else seed + i}, "request"))  # fmt: skip
            except UserError as e:
                raise ApiError(str(e).removeprefix("request: ")) from None
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    return Plan(kind, prompts, params, n, stream, include_usage, logprobs, model_name, f"{prefix}-{uuid.uuid4().hex}")


# ------------------------------------------------------------------------------------------------ responses


@lru_cache(maxsize=4)
def _unbyte(tok) -> dict | None:
    """GPT-2's printable character -> byte table when `tok` is byte-level BPE, else None."""
    from llmctl.tokenizer import bytes_to_unicode

    decoder = json.loads(tok.hf.to_str()).get("decoder")
    return {c: b for b, c in bytes_to_unicode().items()} if "ByteLevel" in json.dumps(decoder) else None


def _token(tok, i: int, lp: float, chat: bool) -> dict:
    text = tok.decode([i])
    piece, unbyte = tok.id_to_token(i) or "", _unbyte(tok)
    raw = bytes(unbyte[c] for c in piece) if unbyte and piece and all(c in unbyte for c in piece) else text.encode()
    d = {"token": text, "logprob": max(float(lp), -9999.0)}
    return {**d, "bytes": list(raw)} if chat else d


class Reply:
    """The response of one Plan: choices built from the batcher's events, as one body or as chunks."""

    def __init__(self, plan: Plan, tok):
        self.plan, self.tok, self.chat = plan, tok, plan.kind == "chat"
        self.texts = [""] * len(plan.params)
        self.lps: list[list] = [[] for _ in plan.params]
        self.offset = [0] * len(plan.params)  # completions' text_offset, per choice
        self.started = [False] * len(plan.params)
        self.finish: list[str | None] = [None] * len(plan.params)
        self.completion_tokens = 0
        self.error: str | None = None  # a row the engine failed: its message

    def _head(self, obj: str) -> dict:
        return {"id": self.plan.id, "object": obj, "created": self.plan.created, "model": self.plan.model}

    def _logprobs(self, i: int, lps) -> dict | None:
        if self.plan.logprobs is None:
            return None
        if self.chat:
            tops = [[_token(self.tok, t, v, True) for t, v in x.top] for x in lps]
            return {"content": [{**_token(self.tok, x.token, x.logprob, True), "top_logprobs": top}
                                for x, top in zip(lps, tops)]}  # fmt: skip
        toks = [_token(self.tok, x.token, x.logprob, False) for x in lps]
        offsets = []
        for t in toks:
            offsets.append(self.offset[i])
            self.offset[i] += len(t["token"])
        return {"tokens": [t["token"] for t in toks], "token_logprobs": [t["logprob"] for t in toks],
                "top_logprobs": [{(d := _token(self.tok, t, v, False))["token"]: d["logprob"] for t, v in x.top}
                                 for x in lps], "text_offset": offsets}  # fmt: skip

    def add(self, i: int, ev) -> dict | None:
        """Record choice i's event; the chunk to stream for it (None: nothing new to say)."""
        self.texts[i] += ev.text
        if ev.logprobs:
            self.lps[i] += ev.logprobs
        if ev.result is not None:
            self.finish[i] = FINISH.get(ev.result.finish_reason, ev.result.finish_reason)
            self.completion_tokens += ev.result.completion_tokens
            if ev.result.finish_reason == "error":
                self.error = ev.result.text
        if not self.plan.stream or not (ev.text or ev.logprobs or ev.result is not None or not self.started[i]):
            return None
        lp = self._logprobs(i, ev.logprobs or []) if ev.logprobs else None
        if self.chat:
            delta = {} if self.started[i] else {"role": "assistant", "content": ""}
            if ev.text:
                delta["content"] = ev.text
            choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": self.finish[i]}
        else:
            choice = {"index": i, "text": ev.text, "logprobs": lp, "finish_reason": self.finish[i]}
        self.started[i] = True
        out = {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}
        return {**out, "usage": None} if self.plan.include_usage else out

    def usage(self) -> dict:
        p = sum(len(ids) for ids in self.plan.prompts)
        return {"prompt_tokens": p, "completion_tokens": self.completion_tokens,
                "total_tokens": p + self.completion_tokens}  # fmt: skip

    def usage_chunk(self) -> dict:
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                "usage": self.usage()}  # fmt: skip

    def body(self) -> dict:
        """The whole response, once every choice is done."""
        choices = []
        for i, text in enumerate(self.texts):
            lp = self._logprobs(i, self.lps[i])
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                                "finish_reason": self.finish[i]})  # fmt: skip
            else:
                choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": self.finish[i]})
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": choices,
                "usage": self.usage()}  # fmt: skip
