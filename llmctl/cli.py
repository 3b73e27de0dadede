"""The `llmctl` command line.

Heavy packages (torch, datasets, tokenizers, peft, accelerate) are imported inside the command bodies, so that
`llmctl --help` answers at once. Every command runs inside `_guard`, which turns a UserError (and the usual
user-caused OS / parse errors) into one `error: ...` line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from llmctl.cliapp import _fail, _guard, app, tokenize_app  # noqa: F401  (tests add commands to `app`)


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


from llmctl import cli_run  # noqa: E402, F401  (generate, chat, serve: listed here in --help)


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
