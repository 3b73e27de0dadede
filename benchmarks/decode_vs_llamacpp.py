"""CPU decode speed: llmctl's engine against llama.cpp on the same exported model, in one run.

A randomly initialised llama (default ~91M parameters: 12 layers, n_embd 768, 12 heads, MLP 2048, vocab 8192, tied
embeddings, block 1024) is saved with llmctl (hf.save_model, with a tokenizer of the same vocabulary trained on the
builtin corpus) and exported to GGUF f32, f16, bf16 and q8_0 with `llmctl export gguf` (where this checkout has it;
else with llama.cpp's own convert_hf_to_gguf.py, --converter; "gguf_converter" says which). llmctl loads the saved
folder through `generation.load_engine` (what `llmctl generate --dtype` runs) with prompt lookup off, in fp32 and
in bf16; llama.cpp loads each GGUF through llama-cpp-python's low-level API (llama_decode on one-token batches and
its C sampler chain: no Python sampling, the tightest loop it offers). Same thread count both sides
(torch.set_num_threads; n_threads = n_threads_batch).

Per side, medians over --rounds rounds, the sides alternating within each round:
- decode tokens/s, greedy and sampled (temperature 0.8, top-p 0.9): a --prompt-len-token prompt, then
  --new-tokens tokens (no EOS stop); decode tokens/s = (new - 1) / (t(new tokens) - t(1 token)), i.e. the
  decode steps alone, prefill taken out the same way on both sides;
- prefill tokens/s: a --prefill-len-token prompt, one new token: prefill-len / t.
The ratios are llmctl / llama.cpp. Greedy runs also report how many of llmctl fp32's tokens llama.cpp f32
reproduces (random weights give near-flat logits: an early difference in the last bits can change the rest).
The machine's load average is recorded before and after.

    python benchmarks/decode_vs_llamacpp.py [--threads 2] [--rounds 5] [--out DIR]

Prints one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE = dict(arch="llama", vocab_size=8192, n_layer=12, n_head=12, n_kv_head=12, n_embd=768, block_size=1024,
             tie_embeddings=True)  # fmt: skip
LLMCTL = {"fp32": "fp32", "bf16": "bf16"}  # llmctl side: --dtype
GGUF = ("f32", "f16", "bf16", "q8_0")  # llama.cpp side: GGUF types
SAMPLED = dict(temperature=0.8, top_p=0.9)


def build(out: Path) -> Path:
    """The model folder (built once, kept in --out)."""
    import torch

    from llmctl import hf
    from llmctl.model import ModelConfig, Transformer

    d = out / "model"
    if (d / "model.safetensors").exists():
        return d
    tok = out / "tok"
    if not (tok / "tokenizer.json").exists():
        subprocess.run([sys.executable, "-m", "llmctl", "tokenize", "train", "builtin", "--vocab-size",
                        str(SHAPE["vocab_size"]), "--out", str(tok)], check=True, cwd=ROOT)  # fmt: skip
    from llmctl.tokenizer import load_tokenizer

    t = load_tokenizer(tok)
    torch.manual_seed(0)
    m = Transformer(ModelConfig(**SHAPE, bos_token_id=t.bos_id, eos_token_id=t.eos_id, pad_token_id=t.pad_id))
    m.init_weights()
    hf.save_model(m, d, tokenizer_dir=tok)
    return d


def export(model: Path, out: Path, converter: str) -> dict[str, Path]:
    files = {}
    for q in GGUF:
        f = out / f"model-{q}.gguf"
        if not f.exists():
            if converter == "llmctl":
                cmd = [sys.executable, "-m", "llmctl", "export", "gguf", str(model), "--out", str(f), "--dtype", q,
                       "--no-verify"]  # (tests/test_gguf.py checks the exporter against llama.cpp)
            else:
                cmd = [sys.executable, converter, str(model), "--outfile", str(f), "--outtype", q]
            subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        files[q] = f
    return files


def has_llmctl_export() -> bool:
    return (ROOT / "llmctl" / "stages" / "export.py").exists()


class LlamaCpp:
    """One GGUF in llama.cpp through llama-cpp-python's low-level API."""

    def __init__(self, path: Path, threads: int, n_ctx: int):
        import llama_cpp as lc

        self.lc = lc
        lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(str(path).encode(), mp)
        cp = lc.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, n_ctx, n_ctx
        cp.n_threads, cp.n_threads_batch = threads, threads
        self.ctx = lc.llama_init_from_model(self.model, cp)
        self.mem = lc.llama_get_memory(self.ctx)

    def _sampler(self, greedy: bool, seed: int):
        lc = self.lc
        s = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        if greedy:
            lc.llama_sampler_chain_add(s, lc.llama_sampler_init_greedy())
        else:
            lc.llama_sampler_chain_add(s, lc.llama_sampler_init_top_p(SAMPLED["top_p"], 1))
            lc.llama_sampler_chain_add(s, lc.llama_sampler_init_temp(SAMPLED["temperature"]))
            lc.llama_sampler_chain_add(s, lc.llama_sampler_init_dist(seed))
        return s

    def generate(self, prompt: list[int], n: int, greedy: bool = True, seed: int = 0) -> tuple[float, list[int]]:
        """(seconds, tokens): prefill the prompt, then n tokens, each one decoded once picked (n - 1 steps)."""
        lc = self.lc
        lc.llama_memory_clear(self.mem, True)
        smpl = self._sampler(greedy, seed)
        arr = (lc.llama_token * len(prompt))(*prompt)
        one = (lc.llama_token * 1)()
        out = []
        t0 = time.perf_counter()
        if lc.llama_decode(self.ctx, lc.llama_batch_get_one(arr, len(prompt))) != 0:
            raise RuntimeError("llama_decode failed")
        for i in range(n):
            tok = lc.llama_sampler_sample(smpl, self.ctx, -1)
            out.append(tok)
            if i + 1 < n:
                one[0] = tok
                if lc.llama_decode(self.ctx, lc.llama_batch_get_one(one, 1)) != 0:
                    raise RuntimeError("llama_decode failed")
        dt = time.perf_counter() - t0
        lc.llama_sampler_free(smpl)
        return dt, out

    def close(self):
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)


class Llmctl:
    def __init__(self, model: Path, dtype: str):
        from llmctl.generation import load_engine

        self.engine = load_engine(model, "cpu", prompt_lookup=0, dtype=dtype)

    def generate(self, prompt: list[int], n: int, greedy: bool = True, seed: int = 0) -> tuple[float, list[int]]:
        from llmctl.engine import SamplingParams

        kw = dict(temperature=0.0) if greedy else dict(seed=seed, **SAMPLED)
        sp = SamplingParams(max_new_tokens=n, ignore_eos=True, **kw)
        t0 = time.perf_counter()
        r = self.engine.generate([prompt], sp)[0]
        return time.perf_counter() - t0, r.tokens

    def close(self):
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prefill-len", type=int, default=256)
    ap.add_argument("--out", default="/tmp/llmctl-decode-vs-llamacpp", help="model, tokenizer and GGUFs (kept)")
    ap.add_argument("--converter", default=None, help="llama.cpp's convert_hf_to_gguf.py instead of llmctl's "
                    "exporter (the default where this checkout has it)")
    ap.add_argument("--sides", nargs="*", default=None, help="e.g. llmctl-fp32 llamacpp-f16 (default: all)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    model = build(out)
    converter = args.converter or ("llmctl" if has_llmctl_export() else None)
    if converter is None:
        sys.exit("error: no GGUF exporter: this checkout has no `llmctl export gguf`; pass --converter "
                 "path/to/convert_hf_to_gguf.py")
    ggufs = export(model, out, converter)
    sides = {f"llmctl-{k}": (lambda k=k: Llmctl(model, LLMCTL[k])) for k in LLMCTL}
    sides.update({f"llamacpp-{q}": (lambda q=q: LlamaCpp(ggufs[q], args.threads, SHAPE["block_size"])) for q in GGUF})
    names = args.sides or list(sides)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(5, SHAPE["vocab_size"], (args.prompt_len,), generator=g).tolist()
    long_prompt = torch.randint(5, SHAPE["vocab_size"], (args.prefill_len,), generator=g).tolist()
    loaded = {name: sides[name]() for name in names}
    for s in loaded.values():  # warm-up: native build, first-touch of the weights, llama.cpp's graph
        s.generate(prompt, 4)
        s.generate(long_prompt, 1)
    times = {name: {"greedy": [], "sampled": [], "one": [], "prefill": []} for name in names}
    tokens = {}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            s, t = loaded[name], times[name]
            dt, toks = s.generate(prompt, args.new_tokens, greedy=True)
            t["greedy"].append(dt)
            tokens[name] = toks
            t["sampled"].append(s.generate(prompt, args.new_tokens, greedy=False, seed=r)[0])
            t["one"].append(s.generate(prompt, 1)[0])
            t["prefill"].append(s.generate(long_prompt, 1)[0])
    results = {}
    for name in names:
        t = {k: statistics.median(v) for k, v in times[name].items()}
        steps = args.new_tokens - 1
        results[name] = {"greedy_decode_tok_s": round(steps / (t["greedy"] - t["one"]), 1),
                         "sampled_decode_tok_s": round(steps / (t["sampled"] - t["one"]), 1),
                         "prefill_tok_s": round(args.prefill_len / t["prefill"], 1),
                         "greedy_end_to_end_tok_s": round(args.new_tokens / t["greedy"], 1)}  # fmt: skip
    ratios = {}
    for a, b in (("llmctl-fp32", "llamacpp-f32"), ("llmctl-bf16", "llamacpp-f16"), ("llmctl-bf16", "llamacpp-bf16"),
                 ("llmctl-bf16", "llamacpp-q8_0"), ("llmctl-bf16", "llmctl-fp32")):  # fmt: skip
        if a in results and b in results:
            ratios[f"{a}/{b}"] = {k: round(results[a][k] / results[b][k], 3) for k in results[a]}
    same = None
    if "llmctl-fp32" in tokens and "llamacpp-f32" in tokens:
        a, b = tokens["llmctl-fp32"], tokens["llamacpp-f32"]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    for s in loaded.values():
        s.close()
    import llama_cpp

    from llmctl import hf

    m = hf.load_model(model)
    params, inter = sum(p.numel() for p in m.parameters()), m.config.intermediate_size

    print(json.dumps({
        "model": {**SHAPE, "parameters": params, "intermediate_size": inter},
        "threads": args.threads, "rounds": args.rounds, "statistic": "median",
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "prefill_len": args.prefill_len,
        "gguf_converter": "llmctl export gguf" if converter == "llmctl" else converter,
        "llama_cpp_python": llama_cpp.__version__, "llama_cpp_api": "low-level: llama_decode + C sampler chain",
        "llmctl_prompt_lookup": 0, "sampled": SAMPLED,
        "results": results, "ratios": ratios,
        "greedy_tokens_llmctl_fp32_equal_llamacpp_f32_before_first_difference": same,
        "load_avg_before": [round(x, 2) for x in load_before], "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "cpu": _cpu(),
    }, indent=1))  # fmt: skip


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


if __name__ == "__main__":
    main()
