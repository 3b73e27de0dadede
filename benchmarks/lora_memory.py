"""Peak memory and training tokens/s of `llmctl lora` against full `llmctl sft`, on the same model and batch.

A randomly initialised llama of --layers x --width (default 12 x 768, vocab 32000: ~134M parameters) is saved
once as a Hugging Face folder, with SFT data of random conversations. Each side then runs the real stage
(`llmctl.stages.sft.run`, the one training loop) for --steps steps in a fresh child process, so the peaks do not
mix: on CPU the peak is the child's maximum resident set size (ru_maxrss), reported whole and above the
child's own baseline after imports; on CUDA it is torch.cuda.max_memory_allocated. Both sides use the same
micro-batch, rows (packing on, full rows) and precision; LoRA uses r=8 on every linear layer (all-linear).

    python benchmarks/lora_memory.py [--layers 12 --width 768 --steps 4 --batch 1 --block 256]

Prints one JSON document on stdout; `ratio` is lora / full for each figure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def make_base(d: Path, layers: int, width: int, vocab: int, block: int) -> Path:
    import torch

    from llmctl import hf
    from llmctl.model import ModelConfig, Transformer
    from llmctl.tokenizer import train_tokenizer

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta", "zeta", "lambda"]
    texts = [" ".join(rng.choice(words) + str(rng.randint(0, 999)) for _ in range(40)) for _ in range(400)]
    tok = train_tokenizer(texts, vocab_size=2048)
    tok_dir = tok.save(d / "tok")
    torch.manual_seed(0)
    cfg = ModelConfig(arch="llama", vocab_size=vocab, n_layer=layers, n_head=width // 64, n_embd=width,
                      block_size=block, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    model = Transformer(cfg)
    model.init_weights()
    hf.save_model(model, d / "base", tokenizer_dir=tok_dir)
    with open(d / "train.jsonl", "w") as f:
        for t in texts:
            q, a = t[: len(t) // 2], t[len(t) // 2:]
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                    + "\n")
    return d / "base"


def worker(kind: str, d: Path, steps: int, batch: int, block: int) -> dict:
    """Runs in a child process: one stage run, then its peak memory and tokens/s."""
    import torch

    from llmctl.config import LoraRecipe, SftRecipe, from_dict
    from llmctl.stages import sft

    base_rss = rss_mb()
    cls = LoraRecipe if kind == "lora" else SftRecipe
    recipe = from_dict(cls, {
        "out_dir": str(d / f"run-{kind}"), "init_from": str(d / "base"),
        "data": {"train": str(d / "train.jsonl"), "block_size": block},
        "train": {"max_steps": steps, "micro_batch_size": batch, "eval_every": 0, "save_every": 0,
                  "log_every": 1, "keep_last": 1},
        "optim": {"warmup_steps": 0, "schedule": "constant"},
        **({"lora": {"r": 8, "targets": "all-linear", "dropout": 0.0}} if kind == "lora" else {}),
    })
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    sft.run(recipe, lora=kind == "lora")
    wall = time.perf_counter() - t0
    events = [json.loads(x) for x in (d / f"run-{kind}" / "metrics.jsonl").read_text().splitlines()]
    tps = [e["tok_per_s"] for e in events if "tok_per_s" in e][1:]  # the first step includes warm-up
    out = {"peak_rss_mb": peak_rss_mb(), "baseline_rss_mb": base_rss, "wall_s": wall,
           "tok_per_s": sorted(tps)[len(tps) // 2] if tps else float("nan")}
    out["peak_above_baseline_mb"] = out["peak_rss_mb"] - base_rss
    if cuda:
        out["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--worker", choices=["full", "lora"], help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, Path(a.dir), a.steps, a.batch, a.block)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        make_base(d, a.layers, a.width, a.vocab, a.block)
        from llmctl import hf

        n_params = hf.load_model(d / "base").num_params()
        res = {}
        for kind in ("full", "lora"):
            r = subprocess.run([sys.executable, __file__, "--worker", kind, "--dir", tmp, "--steps", str(a.steps),
                                "--batch", str(a.batch), "--block", str(a.block)],
                               capture_output=True, text=True, env={**os.environ})
            if r.returncode != 0:
                sys.exit(f"{kind} worker failed:\n{r.stderr[-3000:]}")
            res[kind] = json.loads(r.stdout.strip().splitlines()[-1])
    keys = [k for k in res["full"] if k != "baseline_rss_mb"]
    doc = {"benchmark": "lora_memory", "baseline": "full SFT (llmctl sft) on the same model and batch",
           "params_m": round(n_params / 1e6, 2), "layers": a.layers, "width": a.width, "vocab": a.vocab,
           "batch": a.batch, "block": a.block, "steps": a.steps, "lora": "r=8, all-linear",
           "full": res["full"], "lora_run": res["lora"],
           "ratio": {k: res["lora"][k] / res["full"][k] for k in keys if res["full"][k]},
           "load_avg": os.getloadavg()}
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
