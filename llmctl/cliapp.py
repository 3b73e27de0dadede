"""The `llmctl` Typer app and what every command runs in: `_guard` turns a UserError (and the usual user-caused OS /
parse errors) into one `error: ...` line on stderr and exit code 2. The commands are in cli.py (tokenize, training,
eval, download) and cli_run.py (generate, chat, serve, export): commands that run a model."""

from __future__ import annotations

import functools
import os
import sys
from typing import Optional

import typer

from llmctl.errors import UserError

app = typer.Typer(
    name="llmctl",
    help="Train a tokenizer, pretrain, fine-tune, align, generate, evaluate, serve and export a language model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
tokenize_app = typer.Typer(help="Train a BPE tokenizer; encode corpora into token shards; encode/decode stdin.",
                           no_args_is_help=True, rich_markup_mode=None)
app.add_typer(tokenize_app, name="tokenize")
export_app = typer.Typer(help="Export a MODEL for other runtimes.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(export_app, name="export")


def _fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    raise typer.Exit(2)


# Exit codes: 0 done; 2 a user mistake or a fault of the machine (missing file, bad recipe or data, disk full,
# read-only file system, permission denied), one `error:` line; 130 / 143 a training run stopped by Ctrl-C /
# SIGTERM after saving its checkpoint (so `llmctl pretrain ... && llmctl sft ...` does not go on); 1 a bug.
EXIT_USER, EXIT_SIGINT, EXIT_SIGTERM = 2, 130, 143


def _guard(fn):
    """Run a command body; user mistakes and OS-level faults end in one `error:` line and exit 2 (LLMCTL_DEBUG=1
    re-raises); a training run stopped by a signal exits 130 (SIGINT) or 143 (SIGTERM)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = os.environ.get("LLMCTL_DEBUG", "") not in ("", "0")
        try:
            result = fn(*args, **kwargs)
        except typer.Exit:
            raise
        except BrokenPipeError:
            # `llmctl ... | head -1`: the reader of stdout went away; end quietly. (stderr can't raise this: see
            # streams.QuietStderr.)
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            except OSError:
                pass
            raise typer.Exit(0)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise typer.Exit(EXIT_SIGINT)
        except UserError as e:
            if debug:
                raise
            _fail(str(e))
        except OSError as e:
            if debug:
                raise
            from llmctl.checkpoint import describe_os_error

            _fail(describe_os_error(e))
        stopped = result.get("stopped_by") if isinstance(result, dict) else None
        if stopped:
            raise typer.Exit(EXIT_SIGINT if stopped == "SIGINT" else EXIT_SIGTERM)
        return result

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
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads (PyTorch and native "
                                          "kernels); default: llmctl's policy (see README, Training details)."),
):
    """llmctl: the whole life of a language model from one command line."""
    from llmctl import threads as threads_lib  # before torch is imported: OpenMP reads its settings once

    threads_lib.setup(threads)
