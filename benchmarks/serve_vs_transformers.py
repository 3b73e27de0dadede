"""Serving throughput and latency: `llmctl serve` against `transformers serve` on the same model, in one run.

A randomly initialised llama (default the ~6M-parameter shape of benchmarks/generate_vs_hf.py: 6 layers, n_embd 256,
8 heads, block 256) with a byte-level BPE tokenizer trained on the built-in corpus is saved once as a Hugging Face
folder; both servers load that folder, fp32 on the CPU. The official `openai` client drives each server with 1, 4
and 16 concurrent streams (--concurrency); each stream sends --rounds streamed completions one after the other,
from fixed prompts (the built-in corpus' paragraphs, cut to 8-40 words), with max_tokens --max-tokens and the same
sampling (temperature 0.8, top_p 0.9, a seed per request). The servers take turns level by level, so both see the
same machine.

- aggregate completion tokens/s = the completion tokens every stream received (counted from `usage`) / the level's
  wall time, first request sent to last one answered;
- time to first token: from sending a request to its first chunk with text; p50 and p95 over the level's requests.

llmctl's requests add `ignore_eos` (vLLM's extra parameter) so they generate exactly max_tokens; transformers serve
refuses unknown fields, so its requests stop at EOS if the model samples it (a random model rarely does): the
tokens are counted, not assumed ("tokens" in each entry). transformers serve runs by default one request at a
time (`GenerateRunner`); `--continuous-batching` (paged attention, `CBGenerateRunner`) is the fair comparison for
concurrent streams and is what the ratios use; --transformers-default adds its default mode as a third entry.

    python benchmarks/serve_vs_transformers.py [--concurrency 1 4 16] [--max-tokens 64] [--rounds 2]

Prints one JSON document on stdout (progress on stderr); ratios are llmctl over transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE = dict(arch="llama", n_layer=6, n_head=8, n_embd=256, block_size=256)  # generate_vs_hf.py's llama-6m
SAMPLING = {"temperature": 0.8, "top_p": 0.9}


def make_model(d: Path, vocab: int, shape: dict) -> Path:
    import torch

    from llmctl import hf
    from llmctl.builtin import builtin_corpus
    from llmctl.model import ModelConfig, Transformer
    from llmctl.tokenizer import train_tokenizer

    tok = train_tokenizer(builtin_corpus()[:2000], vocab_size=vocab)
    tok.save(d / "tok")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                      pad_token_id=tok.pad_id, **shape)  # fmt: skip
    out = hf.save_model(Transformer(cfg), d / "model", tokenizer_dir=d / "tok")
    # transformers serve samples only when the model's generation config says so, and with its defaults (top_k 50)
    # otherwise: the benchmark's sampling goes there too (llmctl serve takes it from the requests alone)
    gen = json.loads((out / "generation_config.json").read_text())
    gen.update(SAMPLING, do_sample=True, top_k=0)
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out


def prompts(n: int = 16) -> list[str]:
    from llmctl.builtin import builtin_corpus

    out = []
    for i, p in enumerate(builtin_corpus()[:400:7]):
        words = p.split()
        if len(words) >= 8:
            out.append(" ".join(words[: 8 + (i * 5) % 33]))
        if len(out) == n:
            return out
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    def __init__(self, name: str, cmd: list[str], env: dict):
        self.name, self.lines, self.url = name, [], None
        self.p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stderr:
            self.lines.append(line.rstrip("\n"))
            m = re.search(r"serving on (http://\S+)", line)
            if m and self.url is None:
                self.url = m.group(1)

    def wait_ready(self, url: str | None, model: str, timeout: float = 300.0):
        import openai

        try:
            import httpx2 as httpx  # the HTTP client of openai >= 3
        except ImportError:
            import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.p.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n" + "\n".join(self.lines[-30:]))
            self.url = url or self.url
            if self.url:
                try:
                    if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
            time.sleep(0.5)
        else:
            raise RuntimeError(f"{self.name} did not start:\n" + "\n".join(self.lines[-30:]))
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=600)
        self.model = model

    def stop(self):
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(60)
            except subprocess.TimeoutExpired:
                self.p.kill()


def one_request(srv: Proc, prompt: str, max_tokens: int, seed: int, extra: dict) -> tuple[float, int, float]:
    """(time to first token, completion tokens, seconds) of one streamed completion."""
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    stream = srv.client.completions.create(model=srv.model, prompt=prompt, max_tokens=max_tokens, seed=seed,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body=extra or None, **SAMPLING)  # fmt: skip
    counted = 0
    for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].text:
            ttft = time.perf_counter() - t0
        if chunk.choices and chunk.choices[0].text:
            counted += 1
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return ttft if ttft is not None else time.perf_counter() - t0, tokens or counted, time.perf_counter() - t0


def level(srv: Proc, conc: int, texts: list[str], args, extra: dict) -> dict:
    def stream(k: int):
        return [one_request(srv, texts[(k + r * conc) % len(texts)], args.max_tokens, 1000 * k + r, extra)
                for r in range(args.rounds)]  # fmt: skip

    t0 = time.perf_counter()
    with ThreadPoolExecutor(conc) as pool:
        runs = [x for s in pool.map(stream, range(conc)) for x in s]
    wall = time.perf_counter() - t0
    ttft = sorted(r[0] for r in runs)
    tokens = sum(r[1] for r in runs)
    q = statistics.quantiles(ttft, n=20, method="inclusive") if len(ttft) > 1 else [ttft[0]] * 19
    return {"requests": len(runs), "tokens": tokens, "expected_tokens": len(runs) * args.max_tokens,
            "wall_s": round(wall, 2), "tok_s": round(tokens / wall, 1), "ttft_p50_s": round(statistics.median(ttft), 4),
            "ttft_p95_s": round(q[18], 4)}  # fmt: skip


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="requests each stream sends, one after the other")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--n-layer", type=int, default=SHAPE["n_layer"])
    ap.add_argument("--n-embd", type=int, default=SHAPE["n_embd"])
    ap.add_argument("--n-head", type=int, default=SHAPE["n_head"])
    ap.add_argument("--transformers-default", action="store_true", help="also transformers serve without "
                    "--continuous-batching (one request at a time)")  # fmt: skip
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    shape = {**SHAPE, "n_layer": args.n_layer, "n_embd": args.n_embd, "n_head": args.n_head}
    import torch
    import transformers

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    servers: list[Proc] = []
    try:
        model = make_model(tmp, args.vocab, shape)
        texts = prompts()
        llm = Proc("llmctl", [sys.executable, "-m", "llmctl", "serve", "--model", str(model), "--port", "0",
                              "--max-rows", str(max(args.concurrency)), "--served-model-name", "bench",
                              "--device", args.device], env)  # fmt: skip
        servers.append(llm)
        tf_bin = shutil.which("transformers") or "transformers"
        kinds = {"transformers": ["--continuous-batching"]}
        if args.transformers_default:
            kinds["transformers_default"] = []
        for name, flags in kinds.items():
            port = free_port()
            p = Proc(name, [tf_bin, "serve", str(model), "--host", "127.0.0.1", "--port", str(port), "--device",
                            args.device, "--dtype", "float32", "--log-level", "warning", *flags], env)  # fmt: skip
            p.tf_url = f"http://127.0.0.1:{port}"
            servers.append(p)
        llm.wait_ready(None, "bench")
        for p in servers[1:]:
            p.wait_ready(p.tf_url, str(model))
        extra = {s.name: ({"ignore_eos": True} if s.name == "llmctl" else {}) for s in servers}
        for s in servers:  # warm-up: a few requests each
            for k in range(3):
                one_request(s, texts[k], 8, k, extra[s.name])
        res = {"device": args.device, "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "torch": torch.__version__, "transformers": transformers.__version__,
               "load_avg_before": os.getloadavg()[0], "model": {**shape, "vocab_size": args.vocab},
               "max_tokens": args.max_tokens, "rounds": args.rounds, "sampling": SAMPLING,
               "transformers_flags": kinds, "results": {s.name: {} for s in servers}}  # fmt: skip
        for conc in args.concurrency:
            for s in servers:
                r = level(s, conc, texts, args, extra[s.name])
                res["results"][s.name][str(conc)] = r
                print(f"{s.name} {conc} streams: {r}", file=sys.stderr, flush=True)
        ours, theirs = res["results"]["llmctl"], res["results"]["transformers"]
        lo, hi = str(min(args.concurrency)), str(max(args.concurrency))
        res["ratios"] = {
            f"llmctl_{hi}_vs_{lo}_streams_tok_s": round(ours[hi]["tok_s"] / ours[lo]["tok_s"], 2),
            **{f"tok_s_at_{c}": round(ours[str(c)]["tok_s"] / theirs[str(c)]["tok_s"], 2) for c in args.concurrency},
            **{f"ttft_p50_at_{c}": round(ours[str(c)]["ttft_p50_s"] / theirs[str(c)]["ttft_p50_s"], 3)
               for c in args.concurrency},
        }  # fmt: skip
        res["load_avg_after"] = os.getloadavg()[0]
        print(json.dumps(res, indent=2))
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
