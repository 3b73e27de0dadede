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

    return stage.run(cfg)


@app.command("sft")
@_guard
def sft(
    recipe: Path = typer.Argument(..., help="A recipe YAML (see recipes/)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key.path=value overrides (values parsed as YAML)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved recipe and exit."),
    show_mask: bool = typer.Option(False, "--show-mask", help="Print the first training examples with the "
                                   "supervised tokens highlighted (on a terminal; [[...]] otherwise) and exit."),
):
    """Supervised fine-tuning of every weight of init_from (a MODEL) on chat / prompt-completion JSONL."""
    return _train("sft", recipe, overrides, dry_run, show_mask)


@app.command("lora")
@_guard
def lora(
    recipe: str = typer.Argument(..., metavar="RECIPE|merge", help="A recipe YAML (see recipes/); or `merge`."),
    overrides: Optional[List[str]] = typer.Argument(None, metavar="[KEY=VALUE...]|ADAPTER",
                                                    help="key.path=value overrides; after `merge`: the ADAPTER "
                                                    "(an adapter folder or a lora run directory)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved recipe and exit."),
    show_mask: bool = typer.Option(False, "--show-mask", help="Show the supervised tokens of the first examples "
                                   "and exit."),
    out: Optional[Path] = typer.Option(None, "--out", help="merge: the model directory to write."),
    base: Optional[str] = typer.Option(None, "--base", help="merge: the base MODEL (default: the adapter's "
                                       "base_model_name_or_path)."),
    force: bool = typer.Option(False, "--force", help="merge: replace a non-empty --out directory (even the base "
                               "model's own)."),
):
    """LoRA / QLoRA fine-tuning through peft (adapters only train), or `llmctl lora merge ADAPTER --out DIR`:
    merge an adapter into a standalone model directory."""
    if recipe == "merge":
        if not overrides or len(overrides) != 1 or out is None:
            _fail("usage: llmctl lora merge ADAPTER --out DIR [--base MODEL] [--force]")
        from llmctl import lora as lora_lib

        print(lora_lib.merge(overrides[0], out, base, force=force))
        return
    return _train("lora", Path(recipe), overrides, dry_run, show_mask)


@app.command("tasks")
@_guard
def tasks(
    out: Path = typer.Option(..., "--out", help="The directory to write."),
    n_train: Optional[int] = typer.Option(None, "--n-train", help="Training items (default 5000)."),
    n_test: Optional[int] = typer.Option(None, "--n-test", help="Held-out items (default 500)."),
    seed: int = typer.Option(0, "--seed", help="The same seed writes the same files."),
    families: Optional[str] = typer.Option(None, "--families", help="Comma-separated task families (default: "
                                           "the built-in mix; see llmctl/tasks.py)."),
    phrasing: str = typer.Option("standard", "--phrasing", help="alt: the same items (numbers, words, answers, "
                                 "splits), each question worded differently: new prompts for a model "
                                 "fine-tuned on the standard ones."),
):
    """Write the built-in verifiable tasks (short questions with exact answers) as SFT, RL-prompt and
    preference-pair JSONL, train and held-out test: sft_*.jsonl, rl_*.jsonl, pref_*.jsonl."""
    from llmctl import tasks as tasks_lib

    kw = {k: v for k, v in (("n_train", n_train), ("n_test", n_test)) if v is not None}
    print(*tasks_lib.write_tasks(out, seed=seed, families=families, phrasing=phrasing, **kw).values(), sep="\n")


@app.command("rlhf")
@_guard
def rlhf(
    recipe: Path = typer.Argument(..., help="A recipe YAML (see recipes/); its `method:` is reward, dpo, ppo or grpo."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key.path=value overrides (values parsed as YAML)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved recipe and exit."),
):
    """Preference and RL training: a reward model, DPO, PPO or GRPO (with or without LoRA)."""
    return _train("rlhf", recipe, overrides, dry_run, False)


def _train(kind: str, recipe: Path, overrides, dry_run: bool, show_mask: bool) -> None:
    from llmctl.config import LoraRecipe, RlhfRecipe, SftRecipe, dump_recipe, load_recipe

    cfg = load_recipe(recipe, overrides or [], {"sft": SftRecipe, "lora": LoraRecipe, "rlhf": RlhfRecipe}[kind])
    if dry_run:
        sys.stdout.write(dump_recipe(cfg))
        return
    if kind == "rlhf":  # the stage of the method
        from llmctl.stages import dpo, reward, rl

        return {"reward": reward, "dpo": dpo, "ppo": rl, "grpo": rl}[cfg.method].run(cfg)
    from llmctl.stages import sft as stage

    return stage.show_mask(cfg) if show_mask else stage.run(cfg, lora=kind == "lora")


# --------------------------------------------------------------------------------------------- generate


@app.command("generate")
@_guard
def generate(
    prompt: Optional[str] = typer.Argument(None, help="The prompt. Without it: one prompt per stdin line, one "
                                           "completion per stdout line (backslash, newline and CR escaped as "
                                           "\\\\, \\n, \\r); an empty line is an empty prompt (the model "
                                           "starts from BOS alone)."),
    model: str = typer.Option(..., "--model", help="A model directory, a checkpoint, a run directory (its newest "
                              "checkpoint), a local Hugging Face folder, or a hub id org/name[@revision] in the "
                              "local Hugging Face cache (see `llmctl download`)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="At most this many new tokens "
                                                 "(default 128, or half the context if less). A longer prompt "
                                                 "than the context leaves room for keeps its BOS and its last "
                                                 "tokens, with a warning on stderr."),
    temperature: float = typer.Option(1.0, "--temperature", help="0 = greedy."),
    top_k: int = typer.Option(0, "--top-k", help="Sample from the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling, in (0, 1] (1 = off)."),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens less likely than min_p x the top one (0 = off)."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="> 1 penalises tokens already in "
                                             "the prompt or completion (transformers' rule)."),
    frequency_penalty: float = typer.Option(0.0, "--frequency-penalty", help="Subtracted per occurrence in the "
                                            "completion."),
    presence_penalty: float = typer.Option(0.0, "--presence-penalty", help="Subtracted once a token occurs in the "
                                           "completion."),
    num_beams: int = typer.Option(1, "--num-beams", help="Beam search with this many beams (temperature, "
                                  "top-k/p and min-p are ignored)."),
    length_penalty: float = typer.Option(1.0, "--length-penalty", help="Beam search: score = logprob / "
                                         "length ** length_penalty."),
    stop: Optional[List[str]] = typer.Option(None, "--stop", help="Stop string, repeatable (\\n, \\t "
                                             "understood); the completion ends before it."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Reproducible sampling: prompt N (from 0) uses "
                                       "seed + N."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Generate exactly --max-new-tokens tokens (EOS "
                                    "and --chat's end of turn as plain tokens; a --stop string still stops)."),
    json_mode: bool = typer.Option(False, "--json", help="JSONL out ({id, completion, finish_reason, "
                                   "prompt_tokens, completion_tokens}); an input line starting with { is an "
                                   "object ({prompt | messages, id, sampling overrides}), another line a plain "
                                   "prompt; blank lines are skipped."),
    chat: bool = typer.Option(False, "--chat", help="Apply the tokenizer's chat template (a prompt is a user "
                              "message)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Stdin prompts generated together."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if "
                                         "available)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the decode step (CUDA graphs on a GPU); "
                                 "compiling takes a while, so it pays off on long runs."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="A LoRA adapter folder or `llmctl lora` run "
                                          "directory, merged into MODEL (its base) for generation."),
    prompt_lookup: int = typer.Option(8, "--prompt-lookup", help="Speculative decoding with up to N draft tokens "
                                      "looked up in the prompt and text so far, verified in one pass (one prompt at a "
                                      "time, or a greedy batch with up to 3 per row); the same tokens (0 = off)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32 | bf16 | fp16 weights (default fp32 on CPU)."),
):
    """Generate text: a PROMPT, or one prompt per stdin line (or JSONL with --json)."""
    if batch_size < 1:
        _fail(f"--batch-size must be at least 1, got {batch_size}")
    from llmctl.stages import generate as stage

    flags = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                 repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
                 presence_penalty=presence_penalty, num_beams=num_beams, length_penalty=length_penalty,
                 stop=tuple(stage.unescape(s) for s in stop or ()), seed=seed, ignore_eos=ignore_eos)
    stage.run(model, prompt, flags, json_mode=json_mode, chat=chat, batch_size=batch_size, device=device,
              compile=compile, adapter=adapter, prompt_lookup=prompt_lookup, dtype=dtype)


# --------------------------------------------------------------------------------------------- chat


@app.command("chat", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@_guard
def chat(
    ctx: typer.Context,
    model: Path = typer.Option(..., "--model", help="A MODEL whose tokenizer has a chat template (see generate)."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="A LoRA adapter, merged into MODEL."),
    system: Optional[str] = typer.Option(None, "--system", help="The system message."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
):
    """A multi-turn conversation: a REPL on a terminal (streamed replies; /system /reset /retry /set /save /help
    /exit; Ctrl-C stops a reply, which stays on the screen but leaves the conversation; Ctrl-D ends), else one
    user turn per stdin line, one reply per stdout line. Also takes generate's sampling flags (--temperature 0,
    --top-p 0.9, --max-new-tokens N, --seed S, --stop S ...), which /set changes later."""
    from llmctl.stages import chat as stage

    stage.run(model, ctx.args, system=system, adapter=adapter, device=device)


# --------------------------------------------------------------------------------------------- eval


@app.command("eval")
@_guard
def eval_cmd(
    model: str = typer.Option(..., "--model", help="A model directory, a run directory (its newest checkpoint) "
                              "or a hub id org/name[@revision] in the local Hugging Face cache."),
    task: Optional[str] = typer.Option(None, "--task", help="ppl | bpb | mc | exact-match | preference."),
    data: Optional[List[str]] = typer.Option(None, "--data", help="ppl / bpb: a CORPUS (repeatable); mc, "
                                             "exact-match, preference: a JSONL file."),
    harness: Optional[List[str]] = typer.Option(None, "--harness", help="lm-eval task(s), repeatable or "
                                                "comma-separated (needs llmctl[harness])."),
    harness_include: Optional[Path] = typer.Option(None, "--harness-include", help="A directory of lm-eval task "
                                                   "YAML files (tasks over local data)."),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", help="--harness: few-shot examples."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N documents / records."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Windows (ppl/bpb, default 8) or "
                                             "sequences (default 16) per forward pass."),
    context: Optional[int] = typer.Option(None, "--context", help="ppl / bpb: window length (default: the "
                                          "model's block_size)."),
    stride: Optional[int] = typer.Option(None, "--stride", help="ppl / bpb: window stride (default: context // 2)."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="exact-match: tokens generated per prompt."),
    chat: bool = typer.Option(False, "--chat", help="exact-match, preference: each prompt as a user message in the "
                              "chat template (preference: each completion as the assistant's reply)."),
    ref_model: Optional[str] = typer.Option(None, "--ref-model", help="preference: score log p(model) - "
                                            "log p(ref), DPO's implicit reward."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
    samples: Optional[Path] = typer.Option(None, "--samples", help="Write per-item results (JSONL) to this file."),
    report: Optional[Path] = typer.Option(None, "--report", help="Record the result in DIR/evals.jsonl and write "
                                          "DIR/report.md + DIR/curves.png."),
    lineage: bool = typer.Option(False, "--lineage", help="Evaluate every stage of MODEL's run lineage."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="A LoRA adapter folder or `llmctl lora` run "
                                          "directory, merged into MODEL (its base)."),
):
    """Perplexity, bits per byte, multiple choice, exact match, preference, lm-eval tasks; a report card."""
    from llmctl.stages import eval as stage

    stage.run(model, task=task, data=data, harness=harness, harness_include=harness_include,
              num_fewshot=num_fewshot, limit=limit, batch_size=batch_size, context=context, stride=stride,
              max_new_tokens=max_new_tokens, chat=chat, ref_model=ref_model, device=device, dtype=dtype,
              as_json=as_json, samples=samples, report=report, lineage=lineage, adapter=adapter)


@export_app.command("gguf")
@_guard
def export_gguf(
    model: str = typer.Argument(..., help="A MODEL (see generate --model)."),
    out: Path = typer.Option(..., "--out", help="The .gguf file (and FILE.Modelfile for ollama beside it)."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="A LoRA adapter, merged into MODEL first."),
    dtype: str = typer.Option("f32", "--dtype", help="f32 | f16 | bf16 | q8_0 (norms and biases stay f32)."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check it in llama.cpp; a mismatch fails."),
    force: bool = typer.Option(False, "--force", help="Replace an existing FILE."),
):
    """A GGUF file for llama.cpp / ollama, verified in llama.cpp against llmctl (see README, Export)."""
    from llmctl.stages import export as stage

    stage.run(model, out, adapter=adapter, dtype=dtype, verify=verify, force=force)


# --------------------------------------------------------------------------------------------- download


@app.command("download")
@_guard
def download(
    model_id: str = typer.Argument(..., metavar="ID", help="A Hugging Face model id: org/name[@revision]."),
    revision: Optional[str] = typer.Option(None, "--revision", help="A branch, tag or commit (default: main)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Another cache directory than "
                                             "HF_HUB_CACHE / HF_HOME/hub (MODEL=ID finds it with HF_HUB_CACHE=D)."),
):
    """Fetch a Hugging Face model's safetensors, JSON configs and tokenizer files (never pickled weights) into the
    local Hugging Face cache, where MODEL=ID finds them offline; print the snapshot directory."""
    from llmctl import hub

    print(hub.download(model_id, revision=revision, cache_dir=cache_dir))


def main() -> None:
    from llmctl.streams import standard_streams

    standard_streams()
    app()


if __name__ == "__main__":
    main()
