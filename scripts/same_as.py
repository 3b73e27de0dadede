"""Behaviour check against an earlier commit: the same commands through the old tree and this one must give
byte-identical results.

    python scripts/same_as.py [REV]            # default REV: 4957268 (before the re-layering)

For a fixed tiny model and fixed seeds, both trees (the old one checked out with `git worktree`, put first on
PYTHONPATH) run:
- 20 pretrain steps of the tiny llama (recipes/tiny/pretrain.yaml, smaller): every logged loss and the final
  model.safetensors must be identical;
- `llmctl generate` on one model: greedy, top-p with a seed, beams, a stdin batch, with prompt lookup on and off,
  a JSONL batch with per-line settings: stdout must be identical.
Each tree gets its own native-library cache, the same thread count (1, so no thread-count or scheduling
differences), and the same inputs. Prints one JSON document; exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.n_layer=2", "model.n_head=4", "model.n_kv_head=2", "model.n_embd=64", "model.block_size=64",
         "train.micro_batch_size=4", "train.log_every=1", "train.eval_every=10", "train.eval_batches=2",
         "train.save_every=0", "optim.warmup_steps=5", "train.max_steps=20"]
PROMPTS = ["The Python interpreter", "def f(x):", "", "A list is", "import os\nimport sys", "naïve café ½"]


def llmctl(tree: Path, cache: Path, *args, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree), "LLMCTL_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    env.pop("LLMCTL_DEBUG", None)
    r = subprocess.run([sys.executable, "-m", "llmctl", *map(str, args)], input=stdin, capture_output=True,
                       text=True, env=env, cwd=tree)
    if r.returncode != 0:
        raise SystemExit(f"{tree}: llmctl {' '.join(map(str, args))} failed:\n{r.stderr[-3000:]}")
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev", nargs="?", default="4957268")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="llmctl-same-as-"))
    old = work / "old"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), a.rev], check=True,
                   capture_output=True)
    try:
        trees = {"old": old, "new": ROOT}
        caches = {k: work / f"cache-{k}" for k in trees}
        from llmctl.builtin import builtin_corpus

        corpus = work / "corpus.txt"
        corpus.write_text("\n\n".join(builtin_corpus()[:300]))
        llmctl(ROOT, caches["new"], "tokenize", "train", corpus, "--vocab-size", 512, "--out", work / "tok")
        llmctl(ROOT, caches["new"], "tokenize", "encode", corpus, "--tokenizer", work / "tok", "--out", work / "data")
        report, same = {}, True

        runs = {}
        for k, tree in trees.items():
            out = work / f"pretrain-{k}"
            llmctl(tree, caches[k], "pretrain", ROOT / "recipes/tiny/pretrain.yaml", f"out_dir={out}",
                   f"tokenizer={work / 'tok'}", f"data.train={work / 'data'}", *SMALL)
            events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            runs[k] = ([(e["step"], e.get("loss"), e.get("val_loss")) for e in events],
                       (out / "checkpoints/step-0000020/model.safetensors").read_bytes())
        ok = runs["old"] == runs["new"]
        report["pretrain_20_steps"] = {"same_losses": runs["old"][0] == runs["new"][0],
                                       "same_weights": runs["old"][1] == runs["new"][1]}
        same &= ok

        model = work / "pretrain-old"
        cases = {
            "greedy": (["--temperature", 0, "--max-new-tokens", 24, PROMPTS[0]], None),
            "greedy-no-lookup": (["--temperature", 0, "--max-new-tokens", 24, "--prompt-lookup", 0, PROMPTS[0]], None),
            "top-p-seed": (["--top-p", 0.9, "--seed", 3, "--max-new-tokens", 24, PROMPTS[1]], None),
            "top-k-min-p-penalties": (["--top-k", 20, "--min-p", 0.05, "--repetition-penalty", 1.3,
                                       "--frequency-penalty", 0.2, "--seed", 5, "--max-new-tokens", 24, PROMPTS[3]],
                                      None),
            "beams": (["--num-beams", 3, "--max-new-tokens", 16, PROMPTS[0]], None),
            "stdin-batch-greedy": (["--temperature", 0, "--max-new-tokens", 20], "\n".join(PROMPTS) + "\n"),
            "stdin-batch-greedy-no-lookup": (["--temperature", 0, "--max-new-tokens", 20, "--prompt-lookup", 0],
                                             "\n".join(PROMPTS) + "\n"),
            "stdin-batch-sampled": (["--temperature", 0.8, "--seed", 11, "--max-new-tokens", 20, "--batch-size", 3],
                                    "\n".join(PROMPTS) + "\n"),
            "stop-string": (["--temperature", 0, "--max-new-tokens", 40, "--stop", "\\n", PROMPTS[4]], None),
            "json-batch": (["--json", "--max-new-tokens", 16],
                           "\n".join(json.dumps({"id": i, "prompt": p, "temperature": 0 if i % 2 else 0.7,
                                                 "seed": i}) for i, p in enumerate(PROMPTS)) + "\n"),
        }
        gen = {}
        for name, (args, stdin) in cases.items():
            outs = {k: llmctl(tree, caches[k], "generate", "--model", model, *args, stdin=stdin).stdout
                    for k, tree in trees.items()}
            gen[name] = outs["old"] == outs["new"]
            same &= gen[name]
        report["generate"] = gen
        report["same"] = same
        print(json.dumps({"rev": a.rev, **report}, indent=1))
        return 0 if same else 1
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], capture_output=True)


if __name__ == "__main__":
    sys.exit(main())
