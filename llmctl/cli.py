"""The `llmctl` command line.

Heavy packages (torch, datasets, tokenizers, peft, accelerate) are imported inside the command bodies, so that
`llmctl --help` answers at once. Every command runs inside `_guard`, which turns a UserError (and the usual
user-caused OS / parse errors) into one `error: ...` line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from llmctl.errors import UserError

app = typer.Typer(
    name="llmctl",
    help="Train a tokenizer, pretrain, fine-tune, align, generate and evaluate a language model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
tokenize_app = typer.Typer(help="Train a BPE tokenizer; encode corpora into token shards; encode/decode stdin.",
                           no_args_is_help=True, rich_markup_mode=None)
app.add_typer(tokenize_app, name="tokenize")


def _fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    raise typer.Exit(2)


def _guard(fn):
    """Run a command body; user mistakes end in one `error:` line and exit 2 (LLMCTL_DEBUG=1 re-raises)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = os.environ.get("LLMCTL_DEBUG", "") not in ("", "0")
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except BrokenPipeError:
            # `llmctl ... | head -1`: the reader went away; end quietly.
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            except OSError:
                pass
            raise typer.Exit(0)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise typer.Exit(130)
        except UserError as e:
            if debug:
                raise
            _fail(str(e))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
            if debug:
                raise
            name = getattr(e, "filename", None)
            _fail(f"{e.strerror or e}: {name}" if name else str(e))

    return wrapper


def _version_callback(value: bool):
    if value:
        from llmctl import __version__

        print(f"llmctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                 help="Print the version and exit."),
):
    """llmctl: the whole life of a language model from one command line."""


# --------------------------------------------------------------------------------------------- tokenize


@tokenize_app.command("train")
@_guard
def tokenize_train(
    corpus: List[str] = typer.Argument(..., help="Text sources: .txt, .jsonl[.gz] (field text), .parquet, a "
                                       "directory, a glob, '-' for stdin, or 'builtin'."),
    vocab_size: int = typer.Option(8192, "--vocab-size", help="Vocabulary size, special tokens included."),
    out: Path = typer.Option(..., "--out", help="Directory for tokenizer.json and tokenizer_config.json."),
    num_proc: Optional[int] = typer.Option(None, "--num-proc", help="Worker processes for reading the corpus."),
):
    """Train a byte-level BPE tokenizer with special tokens and a chat template."""
    from llmctl.stages import tokenize as stage

    stage.train(corpus, vocab_size=vocab_size, out=out, num_proc=num_proc)


@tokenize_app.command("encode")
@_guard
def tokenize_encode(
    corpus: Optional[List[str]] = typer.Argument(None, help="Text sources (see `tokenize train`). None: read "
                                                 "text lines from stdin, print space-separated ids."),
    tokenizer: Path = typer.Option(..., "--tokenizer", help="A tokenizer directory or tokenizer.json, or a MODEL."),
    out: Optional[Path] = typer.Option(None, "--out", help="Directory for the token shards and meta.json."),
    val_fraction: float = typer.Option(0.01, "--val-fraction", help="Fraction of documents kept for validation."),
    num_proc: Optional[int] = typer.Option(None, "--num-proc", help="Worker processes for tokenization."),
):
    """Encode a corpus into memory-mappable token shards, or stdin lines into ids."""
    from llmctl.stages import tokenize as stage

    if not corpus:
        if out is not None:
            _fail("--out needs a CORPUS; without one, encode reads stdin and writes ids to stdout")
        stage.encode_stream(tokenizer, sys.stdin, sys.stdout)
        return
    if out is None:
        _fail("--out is required when a CORPUS is given")
    if not 0.0 <= val_fraction < 1.0:
        _fail(f"--val-fraction must be in [0, 1), got {val_fraction}")
    stage.encode(corpus, tokenizer=tokenizer, out=out, val_fraction=val_fraction, num_proc=num_proc)


@tokenize_app.command("decode")
@_guard
def tokenize_decode(
    tokenizer: Path = typer.Option(..., "--tokenizer", help="A tokenizer directory or tokenizer.json, or a MODEL."),
):
    """Decode stdin lines of space-separated ids into text lines on stdout."""
    from llmctl.stages import tokenize as stage

    stage.decode_stream(tokenizer, sys.stdin, sys.stdout)


# --------------------------------------------------------------------------------------------- training


@app.command("pretrain")
@_guard
def pretrain(
    recipe: Path = typer.Argument(..., help="A recipe YAML (see recipes/)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key.path=value overrides (values parsed as YAML)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved recipe and exit."),
):
    """Train a decoder-only transformer from scratch."""
    from llmctl.config import PretrainRecipe, dump_recipe, load_recipe

    cfg = load_recipe(recipe, overrides or [], PretrainRecipe)
    if dry_run:
        sys.stdout.write(dump_recipe(cfg))
        return
    from llmctl.stages import pretrain as stage

    stage.run(cfg)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
