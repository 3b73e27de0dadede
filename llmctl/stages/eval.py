"""`llmctl eval`: a task (or lm-eval tasks) on a MODEL -> text or one JSON document on stdout; --report DIR."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

if not sys.stderr.isatty():  # before anything imports tqdm: lm-eval's progress bars only on a terminal
    os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402,F401  (loaded before lm-eval)

from llmctl import evaluate, hf  # noqa: E402
from llmctl.examples import load  # noqa: E402
from llmctl.checkpoint import resolve_model_dir  # noqa: E402
from llmctl.errors import UserError  # noqa: E402

TASKS = ("ppl", "bpb", "mc", "exact-match", "preference")
HEADLINE = {"ppl": "ppl", "bpb": "bpb", "mc": "acc", "exact-match": "exact_match", "preference": "acc"}


def _check_args(task, data, harness, report) -> None:
    if task is not None and harness:
        raise UserError("give either --task or --harness, not both")
    if task is None and not harness and report is None:
        raise UserError(f"nothing to do: give --task ({' | '.join(TASKS)}), --harness TASK or --report DIR")
    if task is not None and task not in TASKS:
        raise UserError(f"unknown --task {task!r}: expected one of {', '.join(TASKS)}")
    if task is not None and not data:
        what = "a CORPUS (a file, a directory, a glob or builtin)" if task in ("ppl", "bpb") else "a JSONL file"
        raise UserError(f"--task {task} needs --data: {what}")
    if task not in (None, "ppl", "bpb") and len(data) != 1:
        raise UserError(f"--task {task} reads one JSONL file (--data given {len(data)} times)")


def _load_data(task, data, limit):
    if task in ("ppl", "bpb"):
        from llmctl.data import read_corpus

        ds = read_corpus(list(data))
        return list(ds.select(range(min(limit, len(ds))))["text"] if limit is not None else ds["text"])
    return load(data[0], task, limit)


def _evaluate(model, tok, task, records, opts, ref=None) -> dict:
    bs, show = opts["batch_size"], True
    if task in ("ppl", "bpb"):
        return evaluate.corpus_loss(model, tok, records, context=opts["context"], stride=opts["stride"],
                                    batch_size=bs or 8, show_progress=show)  # fmt: skip
    if task == "mc":
        return evaluate.multiple_choice(model, tok, records, batch_size=bs or 16, show_progress=show)
    if task == "preference":
        return evaluate.preference(model, tok, records, ref_model=ref, batch_size=bs or 16, show_progress=show,
                                   chat=opts["chat"])
    completions = evaluate.generate_completions(model, tok, [r["prompt"] for r in records], opts["max_new_tokens"],
                                                batch_size=bs or 16, chat=opts["chat"])  # fmt: skip
    return evaluate.exact_match(completions, records)


def _print_text(results: list[dict], task, out) -> None:
    for r in results:
        head = f"{r['model']}: " if len(results) > 1 else ""
        for name, metrics in (r.get("tasks") or {task: r["metrics"]}).items():
            pairs = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
            pairs.sort(key=lambda kv: kv[0] != HEADLINE.get(name))  # the task's main figure first
            out.write(head + (f"{name} " if task is None else "") +
                      "  ".join(f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}" for k, v in pairs) + "\n")


def run(model, task=None, data=(), harness=(), harness_include=None, num_fewshot=None, limit=None,
        batch_size=None, context=None, stride=None, max_new_tokens=32, chat=False, ref_model=None, device=None,
        dtype="float32", as_json=False, samples=None, report=None, lineage=False, out=None, adapter=None) -> dict:
    """Evaluate MODEL (or every stage of its lineage) and print the result; returns the JSON document."""
    out = out or sys.stdout
    data = list(data or [])
    harness = [t for h in harness or [] for t in h.split(",") if t.strip()]
    _check_args(task, data, harness, report)
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be a positive integer, got {limit}")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
    if ref_model is not None and task != "preference":
        raise UserError("--ref-model only applies to --task preference")
    if chat and task not in ("exact-match", "preference"):
        raise UserError("--chat only applies to --task exact-match and --task preference")
    from llmctl.dist import resolve_device

    device = resolve_device(device)
    from llmctl.report import lineage as find_lineage, record_eval, write_report

    targets = [str(model)]
    if lineage:
        targets = [str(s.model_dir) for s in find_lineage(model) if (s.model_dir / "config.json").is_file()]
    records = _load_data(task, data, limit) if task else None
    ref = hf.load_model(ref_model, device=device, dtype=dtype) if ref_model is not None else None
    opts = {"batch_size": batch_size, "context": context, "stride": stride, "max_new_tokens": max_new_tokens,
            "chat": chat}
    results, items = [], []
    for target in targets if (task or harness) else []:
        m, tok = hf.load(target, device=device, dtype=dtype)
        where = str(resolve_model_dir(target))  # the checkpoint a run directory means, for the report
        if adapter is not None:
            from llmctl import lora

            m, where = lora.merged(m, adapter), str(lora.resolve_adapter(adapter))
        if harness:
            from llmctl.harness import run_harness

            res = run_harness(m, tok, harness, include=harness_include, limit=limit, num_fewshot=num_fewshot,
                              batch_size=batch_size or 16)  # fmt: skip
            results.append({"model": target, "tasks": res["results"]})
            for name, metrics in res["results"].items():
                if report is not None:
                    record_eval(report, {"model": where, "task": f"harness:{name}", "data": harness_include,
                                         "metrics": metrics})  # fmt: skip
            continue
        metrics = _evaluate(m, tok, task, records, opts, ref)
        items += [{"model": target, **it} if isinstance(it, dict) else {"model": target, "margin": it}
                  for it in metrics.pop("items", [])]  # fmt: skip
        results.append({"model": target, "metrics": metrics})
        if report is not None:
            record_eval(report, {"model": where, "task": task, "data": " ".join(data), "limit": limit,
                                 "metrics": metrics})  # fmt: skip
        del m
    if samples is not None:
        Path(samples).write_text("".join(json.dumps(it) + "\n" for it in items), encoding="utf-8")
    doc = {"model": str(model), "task": task, "harness": harness or None, "data": data or None, "limit": limit}
    if results:
        doc.update({k: v for k, v in results[-1].items() if k != "model"})
    if lineage:
        doc["stages"] = results
    if report is not None:
        written = write_report(model, report)
        doc["report"] = written["report"]
        print(f"report: {written['report']}" + (f" (+ {written['png']})" if written["png"] else ""), file=sys.stderr)
    if as_json:
        out.write(json.dumps(doc, indent=None) + "\n")
    elif results:
        _print_text(results, task, out)
    return doc
