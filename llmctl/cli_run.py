"""The commands that run a model: `generate`, `chat`, `serve`, `export gguf` (registered on cliapp's `app`; the
bodies import their stages lazily, so `llmctl --help` stays fast)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from llmctl.cliapp import _fail, _guard, app, export_app

DTYPE_HELP = ("Weights: fp32 | bf16 | fp16 (default: fp32 on CPU, bf16 on a GPU that has it). On CPU 16-bit weights "
              "stay 16-bit and the step computes in fp32: half the memory, faster decoding.")


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
    prompt_lookup: int = typer.Option(8, "--prompt-lookup", help="Speculative decoding with up to N draft "
                                      "tokens looked up in the prompt and text so far, verified in one pass (one "
                                      "prompt at a time, or a greedy batch with up to 3 per row); the tokens are "
                                      "the same as without it (0 = off)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=DTYPE_HELP),
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
    dtype: Optional[str] = typer.Option(None, "--dtype", help=DTYPE_HELP),
):
    """A multi-turn conversation: a REPL on a terminal (streamed replies; /system /reset /retry /set /save /help
    /exit; Ctrl-C stops a reply, which stays on the screen but leaves the conversation; Ctrl-D ends), else one
    user turn per stdin line, one reply per stdout line. Also takes generate's sampling flags (--temperature 0,
    --top-p 0.9, --max-new-tokens N, --seed S, --stop S ...), which /set changes later."""
    from llmctl.stages import chat as stage

    stage.run(model, ctx.args, system=system, adapter=adapter, device=device, dtype=dtype)


@app.command("serve")
@_guard
def serve(
    model: str = typer.Option(..., "--model", help="A MODEL (see generate)."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="A LoRA adapter, merged into MODEL."),
    host: str = typer.Option("127.0.0.1", "--host", help="The address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", help="The port (0: a free one, printed on stderr)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Require it as a Bearer token on /v1 routes."),
    max_rows: int = typer.Option(16, "--max-rows", help="Requests decoding together (continuous batching)."),
    served_model_name: Optional[str] = typer.Option(None, "--served-model-name", help="The API's model id."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=DTYPE_HELP),
):
    """An OpenAI-compatible HTTP server, continuously batched; SIGTERM drains (needs llmctl[serve])."""
    from llmctl.stages import serve as stage

    stage.run(model, adapter, host, port, api_key, max_rows, served_model_name, device, dtype)


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
