"""Training throughput with a busy neighbour: llmctl's thread policy against PyTorch's defaults, in one run.

Tiny `llmctl pretrain` (recipes/tiny/pretrain.yaml) and tiny DPO (recipes/tiny/dpo.yaml on the pretrain run's
model) each run, as `python -m llmctl` subprocesses of this checkout, as:
  default_quiet  LLMCTL_THREAD_POLICY=off (PyTorch's and libgomp's defaults, as before the policy), machine as is;
  policy_quiet   llmctl's thread policy (llmctl/threads.py), machine as is;
  policy_busy    the policy, with `yes > /dev/null` running (one core taken);
  default_busy   the defaults, with `yes` running (cut at --run-timeout; the figure is what it reached, 0 if it
                 logged no step by then).
Throughput is tokens (DPO: pairs) per second from metrics.jsonl over the steps after --warmup-steps: their tokens
over their time, so a probe's slower steps count. `others_cpus` is the CPU time that other processes (`yes`
included) took during a run, in CPUs, from /proc/stat less the run's own; check it before trusting a "quiet".
Ratios: policy_busy / policy_quiet, policy_busy / default_quiet, policy_quiet / default_quiet, and
default_busy / default_quiet. --repeat R runs the two quiet configurations R times alternately (medians reported).

    python benchmarks/contention.py [--pretrain-steps 60] [--dpo-steps 40] [--repeat 1] [--no-default-busy]

Prints one JSON document on stdout (progress on stderr); about 5-6 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def env_for(policy: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["LLMCTL_THREAD_POLICY"] = "on" if policy else "off"
    return env


def llmctl(*args, env=None, timeout=None) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "llmctl", *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                       env=env or env_for(True), timeout=timeout)  # fmt: skip
    if r.returncode != 0:
        raise SystemExit(f"llmctl {' '.join(map(str, args[:2]))} failed:\n{r.stderr[-2000:]}")
    return r


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs from /proc/stat (steal counts as busy)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = v
    return user + nice + system + irq + softirq + steal, sum(v)


def children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def throughput(metrics: Path, warmup_steps: int) -> dict:
    events = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    train = [e for e in events if "tok_per_s" in e]
    kept, prev_tokens, warm_included = [], 0, False
    for e in train:
        if e["step"] > warmup_steps:
            kept.append((e["tokens"] - prev_tokens, e["tok_per_s"]))
        prev_tokens = e["tokens"]
    if not kept:  # a run cut short before the warm-up ended: what it did
        warm_included = True
        prev_tokens = 0
        for e in train:
            kept.append((e["tokens"] - prev_tokens, e["tok_per_s"]))
            prev_tokens = e["tokens"]
    if not kept:
        return {"tok_per_s": 0.0, "steps": 0}
    tokens = sum(n for n, _ in kept)
    seconds = sum(n / t for n, t in kept if t > 0)
    out = {"tok_per_s": tokens / seconds if seconds else 0.0,
           "median_interval_tok_per_s": statistics.median(t for _, t in kept),
           "steps": train[-1]["step"], "threads_logged": sorted({e["threads"] for e in train if "threads" in e})}
    if warm_included:
        out["warmup_included"] = True
    return out


def run(kind: str, args, data: dict, out: Path, policy: bool, busy: bool) -> dict:
    if kind == "pretrain":
        cmd = ["pretrain", ROOT / "recipes/tiny/pretrain.yaml", f"out_dir={out}", f"tokenizer={data['tok']}",
               f"data.train={data['shards']}", f"train.max_steps={args.pretrain_steps}"]
    else:
        cmd = ["rlhf", ROOT / "recipes/tiny/dpo.yaml", f"out_dir={out}", f"init_from={data['base']}",
               f"data.train={data['pref_train']}", f"data.val={data['pref_test']}",
               f"train.max_steps={args.dpo_steps}", "eval.limit=32"]
    cmd += ["train.eval_every=0", "train.save_every=0", f"train.log_every={args.log_every}"]
    yes = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) if busy else None
    try:
        load = os.getloadavg()[0]
        b0, t0, c0, w0 = *cpu_ticks(), children_cpu_s(), time.perf_counter()
        p = subprocess.Popen([sys.executable, "-m", "llmctl", *map(str, cmd)], cwd=ROOT, env=env_for(policy),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
        timed_out = False
        try:
            _, err = p.communicate(timeout=args.run_timeout if busy and not policy else 900)
        except subprocess.TimeoutExpired:
            timed_out = True
            p.kill()
            _, err = p.communicate()
        wall = time.perf_counter() - w0
        b1, t1 = cpu_ticks()
        c1 = children_cpu_s()
    finally:
        if yes is not None:
            yes.kill()
            yes.wait()
    if p.returncode != 0 and not timed_out:
        raise SystemExit(f"{kind} failed:\n{err[-2000:]}")
    tck = os.sysconf("SC_CLK_TCK")
    elapsed = (t1 - t0) / (os.cpu_count() or 1) / tck  # seconds, per CPU
    busy_cpus = (b1 - b0) / tck / elapsed if elapsed else 0.0
    own_cpus = (c1 - c0) / elapsed if elapsed else 0.0
    res = throughput(out / "metrics.jsonl", args.warmup_steps)
    res.update({"wall_s": round(wall, 1), "load_avg_before": load, "others_cpus": round(busy_cpus - own_cpus, 2),
                "switches": [list(map(int, m)) for m in re.findall(r"step (\d+): threads: (\d+) -> (\d+)", err)]})
    if timed_out:
        res["timed_out"] = True
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pretrain-steps", type=int, default=60)
    ap.add_argument("--dpo-steps", type=int, default=40)
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--warmup-steps", type=int, default=5, help="steps left out of the figures")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each quiet configuration (medians)")
    ap.add_argument("--run-timeout", type=float, default=90.0, help="seconds; a slower default_busy run is cut")
    ap.add_argument("--no-default-busy", action="store_true", help="skip the defaults-with-a-busy-core runs")
    ap.add_argument("--only", choices=["pretrain", "dpo"], default=None)
    args = ap.parse_args()
    t_start = time.perf_counter()
    res: dict = {"benchmark": "contention", "cpus": len(os.sched_getaffinity(0)), "machine": platform.machine(),
                 "processor": platform.processor(), "load_avg_before": os.getloadavg(), "args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        say("setup: tokenizer, shards, preference pairs")
        llmctl("tokenize", "train", "builtin", "--vocab-size", 4096, "--out", tmp / "tok")
        llmctl("tokenize", "encode", "builtin", "--tokenizer", tmp / "tok", "--out", tmp / "shards")
        llmctl("tasks", "--out", tmp / "tasks", "--n-train", 640, "--n-test", 64)
        data = {"tok": tmp / "tok", "shards": tmp / "shards", "pref_train": tmp / "tasks/pref_train.jsonl",
                "pref_test": tmp / "tasks/pref_test.jsonl"}
        kinds = [args.only] if args.only else ["pretrain", "dpo"]
        if "dpo" in kinds:  # DPO starts from a briefly pretrained model
            say("setup: the DPO base model")
            llmctl("pretrain", ROOT / "recipes/tiny/pretrain.yaml", f"out_dir={tmp / 'base'}",
                   f"tokenizer={tmp / 'tok'}", f"data.train={tmp / 'shards'}", "train.max_steps=20",
                   "train.eval_every=0", "train.save_every=0")
            data["base"] = tmp / "base"
        res["setup_s"] = round(time.perf_counter() - t_start, 1)
        for kind in kinds:
            runs: dict = {"default_quiet": [], "policy_quiet": []}
            plan = [("default_quiet", False, False), ("policy_quiet", True, False)] * args.repeat
            plan += [("policy_busy", True, True)]
            if not args.no_default_busy:
                plan += [("default_busy", False, True)]
            for i, (name, policy, busy) in enumerate(plan):
                r = run(kind, args, data, tmp / f"{kind}-{name}-{i}", policy, busy)
                say(f"{kind} {name}: {r['tok_per_s']:.0f}/s, others {r['others_cpus']} CPUs, "
                    f"switches {r['switches']}")
                runs.setdefault(name, []).append(r)
            figs = {}
            for name, rs in runs.items():
                figs[name] = {"tok_per_s": statistics.median(r["tok_per_s"] for r in rs), "runs": rs}
            tps = {k: v["tok_per_s"] for k, v in figs.items()}

            def ratio(a, b):
                return tps[a] / tps[b] if a in tps and tps.get(b) else None

            ratios = {"policy_busy_over_policy_quiet": ratio("policy_busy", "policy_quiet"),
                      "policy_busy_over_default_quiet": ratio("policy_busy", "default_quiet"),
                      "policy_quiet_over_default_quiet": ratio("policy_quiet", "default_quiet"),
                      "default_busy_over_default_quiet": ratio("default_busy", "default_quiet")}
            pb, pq = ratios["policy_busy_over_default_quiet"], ratios["policy_quiet_over_default_quiet"]
            res[kind] = {"unit": "pairs" if kind == "dpo" else "tokens", **figs, "ratios": ratios,
                         "acceptance": {"busy_at_least_half_of_quiet": pb is not None and pb >= 0.5,
                                        "quiet_within_5pct": pq is not None and pq >= 0.95}}
    res["total_s"] = round(time.perf_counter() - t_start, 1)
    json.dump(res, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
