"""Chat templates: the Jinja template of `tokenizer_config.json`, rendered the way transformers renders it, and
turned into (ids, loss mask) with the loss on assistant turns only.

Rendering follows `transformers.apply_chat_template`: a sandboxed Jinja environment with `trim_blocks` and
`lstrip_blocks`, the `loopcontrols` extension, `raise_exception`, `strftime_now` and a non-escaping `tojson`,
the special tokens of `tokenizer_config.json` (`bos_token`, `eos_token`, ...) as variables, and the rendered
text encoded with special tokens recognised and none added. So `encode_chat(...)[0]` equals
`AutoTokenizer.from_pretrained(DIR).apply_chat_template(messages, tokenize=True)`.

The loss mask comes from the template itself, for any template that renders conversations prefix-stably
(ChatML, Llama 2/3, Mistral, Qwen2, Gemma ... do): assistant turn i spans the characters between
`render(messages[:i], add_generation_prompt=True)` and `render(messages[:i+1])`, without trailing whitespace;
a token is trained when it starts inside such a span. That covers the reply and its end-of-turn token
(`<|im_end|>`, `<|eot_id|>`, `</s>`), never the role header or the user's text.

Prompts (`encode_prompt`, `fit_prompt`): the one prompt encoder of `llmctl generate`, exact-match evaluation and
RL rollouts, so a template that renders for `sft` renders for `generate --chat` too. `prefix_ids`: what goes
before every plain text (the tokenizer's own rule, `Tokenizer.prefix`), so a prompt is what
`AutoTokenizer(text).input_ids` gives.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Sequence

from llmctl.errors import UserError

ROLES = ("system", "user", "assistant", "tool")


@lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask tag): rendered as its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise UserError(f"chat template: Jinja syntax error on line {e.lineno}: {e.message}") from None


def special_tokens(config: dict) -> dict:
    """The special-token variables a template sees (`bos_token`, `eos_token`, ...), from tokenizer_config.json."""
    out = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token"):
        v = config.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        if isinstance(v, str):
            out[key] = v
    return out


def check_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise UserError('"messages" must be a non-empty list of {"role": ..., "content": ...} objects')
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError(f'message {i + 1}: expected {{"role": STRING, "content": STRING}}')
    return messages


def render(template: str, variables: dict, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """The template rendered for `messages`; `variables` holds the special tokens (`bos_token`, ...)."""
    import jinja2

    try:
        return _compile(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         **variables)
    except jinja2.exceptions.TemplateError as e:
        raise UserError(f"chat template: {e}") from None


def assistant_spans(template: str, variables: dict, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans [start, end) of its assistant turns."""
    text = render(template, variables, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = render(template, variables, messages[:i], add_generation_prompt=True)
        upto = render(template, variables, messages[: i + 1])
        if not (text.startswith(upto) and upto.startswith(head)):
            raise UserError("the chat template does not render conversations prefix by prefix, so the assistant "
                            "turns cannot be located for the loss mask; use a template that does (e.g. ChatML)")
        end = len(upto.rstrip())
        if end > len(head):
            spans.append((len(head), end))
    return text, spans


def encode(tok, messages: Sequence[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of a conversation under `tok`'s chat template; mask 1 = an assistant token."""
    check_messages(messages)
    template, variables = tok.chat_template, tok.special_tokens_map
    text, spans = assistant_spans(template, variables, messages)
    if add_generation_prompt:
        text = render(template, variables, messages, add_generation_prompt=True)
    tok.hf.encode_special_tokens = False
    enc = tok.hf.encode(text, add_special_tokens=False)
    mask = [0] * len(enc.ids)
    if spans:
        k = 0
        for t, (s, e) in enumerate(enc.offsets):
            while k < len(spans) and spans[k][1] <= s:
                k += 1
            if k == len(spans):
                break
            if spans[k][0] <= s < spans[k][1] and e > s:
                mask[t] = 1
    return list(enc.ids), mask


# ------------------------------------------------------------------------------------------------ prompts


def prefix_ids(tok) -> list[int]:
    """What goes before every text llmctl feeds a model -- prompts, shard documents, SFT / preference rows,
    evaluation contexts: the tokenizer's own rule (`Tokenizer.prefix`, as `AutoTokenizer(text)` applies it: [bos]
    for llmctl's and Llama's tokenizers, [] for Qwen's and GPT-2's); an object without that rule: [bos] if any."""
    p = getattr(tok, "prefix", None)
    if p is not None:
        return list(p)
    return [] if tok.bos_id is None else [tok.bos_id]


def start_ids(tok) -> list[int]:
    """What a context that must not be empty starts from: `prefix_ids`, else [eos] (lm-eval's prefix token)."""
    return prefix_ids(tok) or ([] if tok.eos_id is None else [tok.eos_id])


def encode_prompt(tok, text: str | None = None, *, messages=None, chat: bool = False) -> list[int]:
    """The ids a generation starts from (`llmctl generate`, exact-match evaluation, RL rollouts). With `chat` or
    `messages`: the chat template with the generation prompt (`text` as a user message), rendered as `encode`
    renders it. Else `prefix_ids` + the text: what `AutoTokenizer(text).input_ids` gives; an empty prompt with
    nothing before it is [eos] alone."""
    if messages is not None or chat:
        msgs = check_messages(list(messages) if messages is not None else [{"role": "user", "content": text}])
        return tok.encode(render(tok.chat_template, tok.special_tokens_map, msgs, True), allow_special=True)
    ids = prefix_ids(tok) + tok.encode(text)
    if not ids:
        ids = start_ids(tok)
        if not ids:
            raise UserError("an empty prompt needs a BOS or EOS token, and this tokenizer has neither")
    return ids


def fit_prompt(tok, ids: list[int], context: int, max_new_tokens: int) -> tuple[list[int], bool]:
    """(ids, cut): a prompt longer than context - max_new_tokens keeps its start (`prefix_ids`, or BOS that a
    chat template put first) and its last tokens. ValueError when max_new_tokens leaves no room."""
    p = prefix_ids(tok)
    keep = len(p) if p and list(ids[: len(p)]) == p else int(bool(ids) and ids[0] == tok.bos_id)
    room = context - max_new_tokens
    if room < 1 + keep:
        raise ValueError(f"max_new_tokens must be below the model's context of {context} tokens, got {max_new_tokens}")
    if len(ids) <= room:
        return list(ids), False
    return list(ids[:keep]) + list(ids[len(ids) - (room - keep) :]), True
