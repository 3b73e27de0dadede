"""lm-evaluation-harness adapter: an llmctl model as an `lm_eval` LM (`llmctl eval --harness TASK`).

lm-eval is an optional extra (`pip install 'llmctl[harness]'`; the `test` extra installs it). Requests go
through llmctl.evaluate: `loglikelihood` -> score_pairs (lm-eval's context / continuation split, after the
tokenizer's prefix), `loglikelihood_rolling` -> lm-eval's own rolling windows (context_len 1, after the
tokenizer's prefix, else eos) scored by score_tokens,
`generate_until` -> evaluate.generate_completions (greedy, through the generate engine llmctl.engine).

Tasks: names of lm-eval tasks, or of tasks defined by YAML files under `include` (lm-eval's include_path),
e.g. a multiple-choice task over a local JSONL file (`dataset_path: json`, `dataset_kwargs.data_files`).
With `include`, only those local tasks are indexed (not lm-eval's ~15k built-in ones);
built-in tasks need their datasets already in the Hugging Face cache: nothing is downloaded (offline mode).
"""

from __future__ import annotations

import logging
import os
import sys

from llmctl import evaluate
from llmctl.chat import start_ids
from llmctl.errors import UserError


def _lm_eval():
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars only on a terminal
    try:
        import lm_eval
        from lm_eval.api.model import LM
    except ImportError:
        raise UserError("--harness needs lm-eval: pip install 'llmctl[harness]'") from None
    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return lm_eval, LM


def make_lm(model, tok, batch_size: int = 16):
    """An lm_eval LM around an llmctl model."""
    _, LM = _lm_eval()

    class LlmctlLM(LM):
        def __init__(self):
            super().__init__()
            self.model, self.tok, self.batch_size = model, tok, batch_size

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return evaluate.score_pairs(self.model, self.tok, [r.args for r in requests], self.batch_size)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

            prefix = start_ids(self.tok)
            if not prefix:
                raise UserError("loglikelihood_rolling needs a bos or eos token to start from")
            out = []
            for r in requests:
                windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                    self.tok.encode(r.args[0]), prefix[0], self.model.config.block_size, 1)]  # fmt: skip
                scores = evaluate.score_tokens(self.model, windows, self.batch_size) if windows else []
                out.append(sum(s for s, _ in scores))
            return out

        def generate_until(self, requests, disable_tqdm: bool = False):
            out = []
            for r in requests:  # one at a time: each request has its own stop strings and length
                context, kw = r.args
                kw = dict(kw or {})
                until = kw.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                n = min(int(kw.get("max_gen_toks", 256)), self.model.config.block_size // 2)
                out += evaluate.generate_completions(self.model, self.tok, [context], n, until=until, batch_size=1)
            return out

    return LlmctlLM()


def run_harness(model, tok, tasks: list[str], include=None, limit=None, num_fewshot=None, batch_size: int = 16,
                log_samples: bool = False) -> dict:
    """simple_evaluate over `tasks`; returns {"results": {task: {metric: value}}, "samples": ... (if asked)}."""
    lm_eval, _ = _lm_eval()
    from lm_eval.tasks import TaskManager

    if include is not None and not os.path.isdir(include):
        raise UserError(f"--harness-include: no such directory: {include}")
    tm = TaskManager(include_path=str(include) if include else None, include_defaults=include is None)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        where = f" in {include}" if include else " (lm-eval's built-in tasks)"
        raise UserError(f"unknown lm-eval task(s) {', '.join(unknown)}{where}")
    try:
        res = lm_eval.simple_evaluate(model=make_lm(model, tok, batch_size), tasks=tasks,
                                      task_manager=tm, limit=limit, num_fewshot=num_fewshot, bootstrap_iters=0,
                                      log_samples=log_samples, random_seed=0, numpy_random_seed=0,
                                      torch_random_seed=0, fewshot_random_seed=0)  # fmt: skip
    except (FileNotFoundError, ConnectionError) as e:
        raise UserError(f"lm-eval could not load a task's data offline: {e}") from None
    results = {}
    for task, metrics in res["results"].items():
        results[task] = {k.split(",")[0]: v for k, v in metrics.items()
                         if isinstance(v, (int, float)) and not k.startswith("sample") and "_stderr" not in k}
    out = {"results": results}
    if log_samples:
        out["samples"] = res.get("samples", {})
    return out
