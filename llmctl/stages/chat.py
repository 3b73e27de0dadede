"""`llmctl chat`: a multi-turn conversation with a MODEL, in the terminal or in a pipeline.

Documented behaviours (README, `llmctl chat --help`, `/help`):
- each turn the whole conversation is rendered again through the model's chat template (chat.encode_prompt, the
  one prompt encoder) with the assistant prompt; the reply stops at EOS or the template's end of turn;
- when the conversation no longer fits the context (block_size - max_new_tokens tokens), the model sees the
  system message and the newest whole turns that fit, and a notice on stderr says so each time it sees fewer
  turns than before; /save still writes every turn; a message too long for the context alone keeps its last
  tokens, with a warning;
- stdin a terminal: a REPL (readline editing); replies stream to stdout; Ctrl-C during a reply stops it (what was
  printed stays on the screen, the turn is not kept: /retry asks again), Ctrl-C at the prompt gives a new prompt,
  Ctrl-D or /exit ends (exit 0); a command's mistake is one `error:` line and the REPL goes on;
- stdin not a terminal: each line is a user turn and gets one stdout line, its reply escaped as generate escapes
  it (`\\n`, `\\\\` ...); lines starting with / are commands and write nothing to stdout; a bad command stops
  with `error: stdin:LINE: ...` (exit 2); stdout carries replies only;
- sampling settings: generate's flags on the command line (`--temperature 0`, `--top-p 0.9`, `--stop S` ...) and
  `/set KEY VALUE` later, validated as generate validates them; with a seed S, the N-th reply of the session
  (from 0, retries included) samples with seed S + N.
"""

from __future__ import annotations

import json
import os
import sys
from typing import TextIO

from llmctl.data import check_unicode, text_lines
from llmctl.errors import UserError
from llmctl.generation import DEFAULT_MAX_NEW_TOKENS, SETTINGS, end_of_turn, escape, load_engine, make_params
from llmctl.generation import unescape

HELP = """\
Type a message and press Enter; the reply streams in. Ctrl-C stops a reply (what was printed stays on the
screen, but the turn is not kept in the conversation: /retry asks again); Ctrl-C at the prompt gives a new
prompt; Ctrl-D or /exit ends. A message that starts with / is sent with //: `//etc` sends `/etc`.
  /system [TEXT]   set the system message (without TEXT: remove it); the conversation goes on
  /reset           start a new conversation (the system message stays)
  /retry           a new reply to the last message, in place of the last reply
  /set KEY VALUE   a sampling setting, as generate's flag: temperature, top_p, top_k, min_p, repetition_penalty,
                   frequency_penalty, presence_penalty, max_new_tokens, num_beams, length_penalty, ignore_eos,
                   stop (`/set stop` alone: none), seed (`none`: a new sample each run); /set alone shows them
  /save FILE       write the conversation as JSON: {"messages": [{"role": ..., "content": ...}, ...]}
  /help            this text
  /exit            end the conversation (as Ctrl-D does)
Long conversations: the model sees the system message and the newest turns that fit its context."""

_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


class Exit(Exception):
    """/exit"""


def setting(key: str, value: str | None, where: str | None) -> tuple[str, object]:
    """(name, value) of one sampling setting given as text (`top-p` / `top_p`, `0.9`); UserError when the name is
    unknown or the value is not of its type (the range is SamplingParams' to check). where: the error's prefix
    (`/set: `), None for a command-line flag (the error names `--top-p`)."""
    name = key.lstrip("-").replace("-", "_").lower()
    if name not in SETTINGS:
        raise UserError(f"{where}unknown setting {key!r}; settings: {', '.join(SETTINGS)}")
    label = f"--{name.replace('_', '-')}" if where is None else f"{where}{name}"
    types, v = SETTINGS[name], (value or "").strip()
    if name == "stop":
        return name, (unescape(check_unicode(v, label)),) if v else ()
    if name == "seed" and v.lower() in ("none", "off", ""):
        return name, None
    if name == "ignore_eos" and value is None:
        return name, True  # a bare --ignore-eos
    try:
        if bool in types:
            return name, _WORDS[v.lower()]
        if float in types:
            return name, float(v)
        return name, int(v)
    except (KeyError, ValueError):
        want = "true or false" if bool in types else "a number" if float in types else "an integer"
        raise UserError(f"{label} must be {want}, got {v!r}") from None


def parse_flags(args: list[str]) -> dict:
    """generate's sampling flags (`--temperature 0`, `--top-p=0.9`, `--stop S` repeatable, `--ignore-eos`) from
    the arguments typer leaves to the command."""
    flags: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        key, eq, value = arg.partition("=")
        name = key.lstrip("-").replace("-", "_")
        if not arg.startswith("-"):
            raise UserError(f"unexpected argument {arg!r}: chat takes no PROMPT (type the messages, or pipe them "
                            "into stdin)")
        if not key.startswith("--") or name not in SETTINGS:
            raise UserError(f"unknown option {arg!r} (chat takes --model, --adapter, --system, --device and "
                            f"generate's sampling flags: --temperature, --top-p, --max-new-tokens, --seed ...)")
        if not eq and name != "ignore_eos":
            if i + 1 >= len(args):
                raise UserError(f"{key} needs a value")
            i, value = i + 1, args[i + 1]
        name, v = setting(key, value if eq or name != "ignore_eos" else None, None)
        if name == "stop":
            v = flags.get("stop", ()) + v
        flags[name] = v
        i += 1
    return flags


class Chat:
    """The conversation (every turn, for /save), how many of its oldest messages the model no longer sees, the
    sampling settings, and the replies."""

    def __init__(self, engine, settings: dict, system: str | None, stderr: TextIO):
        self.engine, self.tok, self.stderr = engine, engine.tokenizer, stderr
        self.tok.chat_template  # noqa: B018  (a UserError when the tokenizer has none)
        self.settings = dict(settings)
        self.settings.setdefault("max_new_tokens", min(DEFAULT_MAX_NEW_TOKENS, engine.block_size // 2))
        self.params()  # checks max_new_tokens against the context
        self.system = system
        self.turns: list[dict] = []  # user / assistant messages, alternating, complete turns only
        self.hidden = 0  # how many of the oldest turns' messages the model did not see at the last reply
        self.pending: str | None = None  # the question of a stopped reply (/retry asks it again)
        self.replies = 0  # replies started: the N-th samples with seed + N
        self.console = None  # the REPL's rich Console on stderr

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        return head + self.turns

    def params(self, where: str = "", n: int | None = None):
        s = dict(self.settings)
        if s["max_new_tokens"] >= self.engine.block_size:
            name = "max_new_tokens" if where else "--max-new-tokens"
            raise UserError(f"{where}{name} ({s['max_new_tokens']}) must be below the model's context of "
                            f"{self.engine.block_size} tokens")  # fmt: skip
        s.update(end_of_turn(self.tok))
        if n is not None and s.get("seed") is not None:
            s["seed"] += n
        return make_params(s, where.rstrip(": ") or None)

    def prompt(self, question: str, params) -> list[int]:
        """The ids of the conversation + `question` with the assistant prompt, without the oldest turns that do not
        fit (the most that fit, whole turns; a notice when fewer are seen than at the last reply)."""
        from llmctl.chat import encode_prompt, fit_prompt

        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        turns = self.turns + [{"role": "user", "content": question}]
        room, hidden = self.engine.block_size - params.max_new_tokens, min(self.hidden, len(self.turns))
        ids = encode_prompt(self.tok, messages=head + turns[hidden:])
        while len(ids) > room and hidden < len(turns) - 1:  # drop a user message and its reply
            hidden += 2
            ids = encode_prompt(self.tok, messages=head + turns[hidden:])
        while hidden >= 2 and len(ids) <= room:  # more context fits again (a smaller max_new_tokens, /system)
            more = encode_prompt(self.tok, messages=head + turns[hidden - 2 :])
            if len(more) > room:
                break
            hidden, ids = hidden - 2, more
        if hidden > self.hidden:
            seen = len(turns) - hidden
            self.note(f"note: the conversation is longer than the context allows ({self.engine.block_size} - "
                      f"{params.max_new_tokens} new tokens): the model now sees "
                      f"{'the system message and ' if head else ''}its last {seen} message{'s' * (seen > 1)}")
        self.hidden = hidden
        if len(ids) > room:
            ids, _ = fit_prompt(self.tok, ids, self.engine.block_size, params.max_new_tokens)
            self.note(f"warning: this message is longer than the context allows; the model sees its last {len(ids)} "
                      "tokens")  # fmt: skip
        return ids

    def note(self, text: str) -> None:
        """A line on stderr (in the REPL through rich: errors red, notes and warnings yellow, the rest dim)."""
        if self.console is None:
            print(text, file=self.stderr, flush=True)
        else:
            style = "red" if text.startswith("error") else "yellow" if text.startswith(("note", "warn")) else "dim"
            self.console.print(text, style=style, markup=False, highlight=False)

    def start(self, question: str):
        """(ids, params) of the reply to `question`, which becomes pending until `done`."""
        params = self.params(n=self.replies)
        self.replies += 1
        self.pending = question
        return self.prompt(question, params), params

    def done(self, reply: str) -> None:
        self.turns += [{"role": "user", "content": self.pending}, {"role": "assistant", "content": reply}]
        self.pending = None

    def retry_question(self) -> str:
        """The question /retry answers again: a stopped reply's, else the last turn's (which is taken back)."""
        if self.pending is not None:
            return self.pending
        if not self.turns:
            raise UserError("/retry: nothing to retry yet")
        question = self.turns[-2]["content"]
        del self.turns[-2:]
        self.hidden = min(self.hidden, len(self.turns))
        return question

    def command(self, line: str) -> str | None:
        """Run a /command; the question to answer for /retry, else None. Raises Exit, or UserError for a mistake."""
        cmd, _, arg = line.partition(" ")
        cmd, arg = cmd.lower(), arg.strip()
        if cmd in ("/exit", "/quit"):
            raise Exit
        if cmd == "/help":
            self.note(HELP)
        elif cmd == "/system":
            self.system = arg or None
            self.note("system message set" if arg else "no system message")
        elif cmd == "/reset":
            self.turns, self.hidden, self.pending = [], 0, None
            self.note("new conversation" + (" (the system message stays)" if self.system is not None else ""))
        elif cmd == "/retry":
            return self.retry_question()
        elif cmd == "/set":
            self.set(arg)
        elif cmd == "/save":
            self.save(arg)
        else:
            raise UserError(f"unknown command {cmd!r} (/help lists them; //{line[1:]} sends the text)")
        return None

    def set(self, arg: str) -> None:
        if not arg:
            p = self.params()
            self.note("  ".join(f"{k}={getattr(p, k)!r}" for k in SETTINGS))
            return
        key, _, value = arg.partition(" ")
        name, v = setting(key, value, "/set: ")
        old = dict(self.settings)
        self.settings[name] = v
        try:
            self.params("/set: ")
        except UserError:
            self.settings = old
            raise
        self.note(f"{name} = {v}")

    def save(self, path: str) -> None:
        from llmctl.checkpoint import atomic_write

        if not path:
            raise UserError("/save needs a FILE")
        messages = self.messages()
        atomic_write(os.path.expanduser(path), json.dumps({"messages": messages}, ensure_ascii=False, indent=1) + "\n")
        self.note(f"saved {len(messages)} messages to {path}")


def run(model, args: list[str], *, system: str | None = None, adapter=None, device: str | None = None,
        dtype: str | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None,
        stderr: TextIO | None = None) -> None:  # fmt: skip
    """The command: check the flags, load the MODEL, then converse (a REPL on a terminal, else line by line)."""
    import torch

    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    flags = parse_flags(args)
    make_params(flags)  # flag errors before the model loads
    if system is not None:
        check_unicode(system, "--system")
    engine = load_engine(model, device, adapter=adapter, dtype=dtype)
    chat = Chat(engine, flags, system, stderr)
    if flags.get("seed") is None:
        torch.seed()  # no seed: a different sample every run
    if stdin.isatty():
        repl(chat, stdin, stdout)
    else:
        pipe(chat, stdin, stdout)


def _question(chat: Chat, text: str) -> str | None:
    """What a line asks the model: `//text` asks `/text`; a /command runs (its question, e.g. /retry's, or None;
    Exit ends the chat); any other line is the question."""
    if text.startswith("//"):
        return text[1:]
    return chat.command(text) if text.startswith("/") else text


def pipe(chat: Chat, stdin: TextIO, stdout: TextIO) -> None:
    """One user turn per line, one reply per stdout line (escaped); /commands write nothing to stdout."""
    for lineno, line in text_lines(stdin):
        text = line.rstrip("\n")
        text = text[:-1] if text.endswith("\r") else text
        try:
            question = _question(chat, text)
        except Exit:
            return
        except UserError as e:
            raise UserError(f"stdin:{lineno}: {e}") from None
        if question is None:
            continue
        ids, params = chat.start(question)
        reply = chat.engine.generate([ids], params)[0].text
        chat.done(reply)
        stdout.write(escape(reply) + "\n")
        stdout.flush()


def repl(chat: Chat, stdin: TextIO, stdout: TextIO) -> None:
    """The terminal conversation: a prompt, streamed replies, /commands; Ctrl-C stops a reply, Ctrl-D ends."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    from rich.console import Console

    chat.console = Console(file=chat.stderr, soft_wrap=True)
    color = stdout.isatty() and os.environ.get("TERM") != "dumb" and not os.environ.get("NO_COLOR")
    prompt = "\001\033[1;32m\002>>> \001\033[0m\002" if color else ">>> "  # \001 \002: readline's zero-width marks
    chat.note("chatting with the model: /help lists the commands, Ctrl-D ends")
    while True:
        try:
            line = input(prompt) if stdin is sys.stdin else _read(stdin, stdout, prompt)
        except EOFError:
            stdout.write("\n")
            return
        except KeyboardInterrupt:
            stdout.write("\n")
            continue
        except UnicodeDecodeError:
            chat.note("error: that line is not UTF-8")
            continue
        text = line.strip()
        if not text:
            continue
        try:
            question = _question(chat, text)
        except Exit:
            return
        except (UserError, OSError) as e:
            chat.note(f"error: {e}")
            continue
        if question is None:
            continue
        _stream_reply(chat, question, stdout)


def _read(stdin: TextIO, stdout: TextIO, prompt: str) -> str:
    stdout.write(prompt.replace("\001", "").replace("\002", ""))
    stdout.flush()
    line = stdin.readline()
    if not line:
        raise EOFError
    return line


def _stream_reply(chat: Chat, question: str, stdout: TextIO) -> None:
    """Stream the reply to `question`; Ctrl-C stops it (the turn is then not kept; /retry asks again)."""
    stream = None
    try:
        ids, params = chat.start(question)
        stream = chat.engine.stream(ids, params)
        for delta in stream:
            stdout.write(delta)
            stdout.flush()
    except KeyboardInterrupt:
        stdout.write("\n")
        chat.note("(stopped; the turn is not kept: /retry asks again)")
        return
    except UserError as e:
        stdout.write("\n")
        chat.note(f"error: {e}")
        return
    stdout.write("\n")
    stdout.flush()
    chat.done(stream.result.text)
