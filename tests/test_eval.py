"""`llmctl eval`: bpb / perplexity and multiple-choice predictions equal an independent transformers computation,
sliding windows cover every token once, exact-match normalisation, preference, the lm-eval adapter on a local
task, and the command line (--json, --limit, errors)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from llmctl import evaluate  # noqa: E402
from llmctl.errors import UserError  # noqa: E402
from llmctl.examples import load  # noqa: E402
from llmctl.hf import load_model, save_model  # noqa: E402
from llmctl.model import ModelConfig, Transformer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REL = 1e-4  # the acceptance tolerance (relative); observed ~1e-9

MC_ITEMS = [
    {"question": "Python is a", "choices": ["programming language", "snake", "kind of tea"], "answer": 0},
    {"question": "2 + 2 =", "choices": ["4", "5", "22"], "answer": 0},
    {"question": "The opposite of true is", "choices": ["false", "None", "maybe"], "answer": 0},
    {"question": "A list in Python is written with", "choices": ["square brackets", "braces"], "answer": 0},
    {"question": "Question: which module handles paths?\nAnswer:", "choices": ["pathlib", "math", "json"],
     "answer": 0},
    {"question": "def f(x):\n    return ", "choices": ["x * 2", "  spaced", "naïve café"], "answer": 1},
    {"question": "Ends with a space ", "choices": ["one", "two words", "three whole words"], "answer": 2},
]  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory, tok_dir, tok):
    """Tiny llama and gpt2 checkpoints (random, init_std 0.2 so predictions are far from ties)."""
    out = {}
    for arch in ("llama", "gpt2"):
        torch.manual_seed(0)
        cfg = ModelConfig(arch=arch, vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_embd=64, block_size=48,
                          n_kv_head=2 if arch == "llama" else None, init_std=0.2, bos_token_id=tok.bos_id,
                          eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)  # fmt: skip
        d = tmp_path_factory.mktemp(arch)
        save_model(Transformer(cfg), d, tokenizer_dir=tok_dir)
        out[arch] = d
    return out


@pytest.fixture(scope="module")
def docs():
    from llmctl.builtin import builtin_corpus

    d = builtin_corpus()
    return [d[i] for i in (0, 3, 10, 25)] + ["x", "Short one.", "naïve café — “quotes” 🙂 日本語"]


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def hf_tokenizer(path):
    return transformers.AutoTokenizer.from_pretrained(str(path))


# ------------------------------------------------------------------------------------------ windows


@pytest.mark.parametrize("n, L, S", [(2, 8, 4), (9, 8, 8), (10, 8, 4), (100, 8, 3), (100, 8, 8), (101, 16, 1),
                                     (37, 32, 16)])  # fmt: skip
def test_sliding_windows_count_every_token_once_with_enough_context(n, L, S):
    w = evaluate.sliding_windows(n, L, S)
    counted = [p for b, e, k in w for p in range(e - k, e)]
    assert counted == list(range(1, n))  # every token after the first, once, in order
    for i, (b, e, k) in enumerate(w):
        assert e - b <= L + 1 and (e - b == L + 1 or n < L + 1)
        if i > 0:  # outside the first window: at least L - S + 1 tokens of context
            assert (e - k) - b >= L - S + 1


# ------------------------------------------------------------------------------------------ ppl / bpb


def reference_ppl_bpb(path, texts, L, S):
    """An independent computation with transformers: HF tokenizer, HF model, the windows of the module doc
    written as HF's perplexity guide loop, UTF-8 bytes counted from the texts."""
    tk, model = hf_tokenizer(path), hf_model(path)
    bos, eos = tk.convert_tokens_to_ids("<|bos|>"), tk.convert_tokens_to_ids("<|eos|>")
    ids = []
    for t in texts:
        ids += [bos] + tk(t, add_special_tokens=False)["input_ids"] + [eos]
    ids = torch.tensor(ids)
    n, nats, targets = len(ids), [], []
    prev_end, begin = 1, 0
    with torch.no_grad():
        while prev_end < n:
            begin = min(begin, max(0, n - L - 1))
            end = min(begin + L + 1, n)
            logits = model(ids[None, begin : end - 1]).logits[0].double()
            nll = F.cross_entropy(logits, ids[begin + 1 : end], reduction="none")
            trg = end - prev_end
            nats.append(nll[-trg:])
            targets.append(ids[end - trg : end])
            prev_end, begin = end, begin + S
    nats, targets = torch.cat(nats), torch.cat(targets)
    text = (targets != bos) & (targets != eos)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    return math.exp(nats.mean().item()), nats[text].sum().item() / (math.log(2) * nbytes), len(nats)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("context, stride", [(None, None), (32, 12), (48, 48)])
def test_ppl_and_bpb_equal_transformers(models, tok, docs, arch, context, stride):
    model = load_model(models[arch])
    r = evaluate.corpus_loss(model, tok, docs, context=context, stride=stride, batch_size=3, show_progress=False)
    L, S = context or 48, stride or 24
    assert (r["context"], r["stride"]) == (L, S)
    ppl, bpb, n = reference_ppl_bpb(models[arch], docs, L, S)
    assert r["tokens"] == n and r["bytes"] == sum(len(t.encode()) for t in docs)
    assert abs(r["ppl"] / ppl - 1) < REL and abs(r["bpb"] / bpb - 1) < REL
    assert r["ppl"] == pytest.approx(math.exp(r["loss"]))


def test_bpb_compares_across_tokenizers_of_the_same_text(models, tok, docs):
    """bpb counts text bytes, not tokens: the byte total is the UTF-8 size whatever the tokenization."""
    ids = evaluate.corpus_stream(docs, tok)
    tb = tok.token_bytes()
    assert int(tb[ids].sum()) == sum(len(t.encode("utf-8")) for t in docs)


def test_corpus_stream_separators():
    class Tok:
        bos_id, eos_id = 1, 2

        def encode_batch(self, batch):
            return [[7, 8] for _ in batch]

    assert evaluate.corpus_stream(["a", "b"], Tok()).tolist() == [1, 7, 8, 2, 1, 7, 8, 2]
    Tok.bos_id = Tok.eos_id = 9  # GPT-2's <|endoftext|>: once between documents
    assert evaluate.corpus_stream(["a", "b"], Tok()).tolist() == [9, 7, 8, 9, 7, 8, 9]


def test_corpus_errors(models, tok):
    model = load_model(models["llama"])
    with pytest.raises(UserError, match="--context"):
        evaluate.corpus_loss(model, tok, ["some text"], context=49)
    with pytest.raises(UserError, match="--stride"):
        evaluate.corpus_loss(model, tok, ["some text"], context=16, stride=17)


# ------------------------------------------------------------------------------------------ multiple choice


def reference_mc(path, items):
    """Per item: log-likelihoods of " " + choice after [bos] + question, with transformers (lm-eval's split)."""
    tk, model = hf_tokenizer(path), hf_model(path)
    bos = tk.convert_tokens_to_ids("<|bos|>")
    out = []
    with torch.no_grad():
        for it in items:
            lls = []
            for c in it["choices"]:
                ctx, cont = it["question"], " " + c
                n = len(ctx) - len(ctx.rstrip())
                if n:
                    ctx, cont = ctx[:-n], ctx[-n:] + cont
                ctx_ids = tk(ctx, add_special_tokens=False)["input_ids"]
                cont_ids = tk(ctx + cont, add_special_tokens=False)["input_ids"][len(ctx_ids) :]
                seq = torch.tensor([bos] + ctx_ids + cont_ids)
                logp = model(seq[None, :-1]).logits[0].double().log_softmax(-1)
                k = len(cont_ids)
                lls.append(logp[-k:].gather(1, seq[-k:, None]).sum().item())
            lls = np.array(lls)
            out.append((lls, int(np.argmax(lls)), int(np.argmax(lls / np.array([len(c) for c in it["choices"]])))))
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mc_predictions_equal_transformers_item_by_item(models, tok, arch):
    r = evaluate.multiple_choice(load_model(models[arch]), tok, MC_ITEMS, batch_size=4, show_progress=False)
    ref = reference_mc(models[arch], MC_ITEMS)
    for got, (lls, pred, pred_norm) in zip(r["items"], ref):
        np.testing.assert_allclose(got["lls"], lls, rtol=1e-5, atol=1e-4)
        assert (got["pred"], got["pred_norm"]) == (pred, pred_norm)
    assert r["acc"] == np.mean([p == it["answer"] for (_, p, _), it in zip(ref, MC_ITEMS)])
    assert r["acc_norm"] == np.mean([p == it["answer"] for (_, _, p), it in zip(ref, MC_ITEMS)])
    assert len({it["pred"] for it in r["items"]}) > 1  # a model that always answers 0 would prove little


def test_score_tokens_truncates_long_contexts_and_batches_like_one_by_one(models, tok):
    model = load_model(models["llama"])
    reqs = [([tok.bos_id] + list(range(10, 10 + n)), [7, 8, 9]) for n in (3, 30, 60)]  # 60 + 4 > block_size
    batched = evaluate.score_tokens(model, reqs, batch_size=3, show_progress=False)
    single = [evaluate.score_tokens(model, [r], batch_size=1, show_progress=False)[0] for r in reqs]
    for (a, _), (b, _) in zip(batched, single):
        assert a == pytest.approx(b, abs=1e-4)
    with torch.no_grad():  # the long one: its last block_size + 1 tokens
        seq = torch.tensor((reqs[2][0] + reqs[2][1])[-49:])
        ref = model(seq[None, :-1])[0].log_softmax(-1)[-3:].gather(1, seq[-3:, None]).sum().item()
    assert batched[2][0] == pytest.approx(ref, abs=1e-4)


# ------------------------------------------------------------------------------------------ exact match


@pytest.mark.parametrize("a, b", [
    ("Paris", "  paris  "), ("PARIS.", "Paris"), ("New   York", "new york"), ("new\tyork\n", "New York"),
    ('"Yes!"', "yes"), ("“Yes”.", "yes"), ("'ok'", "OK"), ("42", "42."), ("1,000", "1000"),
    ("1,234,567", "1234567"),
    ("3.0", "3"), ("3.50", "3.5"), ("-0.50", "-.5"), ("+7", "7"), ("-0", "0"), ("1e3", "1000"), ("0.5", ".5"),
    ("2.0 kg", "2 kg"), ("ｆｕｌｌｗｉｄｔｈ", "fullwidth"), ("Straße", "STRASSE"), ("x\u00a0y", "x y"),
    (42, "42.0"),
    ("3.14.", "3.14"), ("done?!", "done"),
])  # fmt: skip
def test_normalize_answer_equal(a, b):
    assert evaluate.normalize_answer(a) == evaluate.normalize_answer(b)


@pytest.mark.parametrize("a, b", [
    ("1,2", "12"), ("1,0000", "10000"), ("Paris, France", "Paris"), ("the cat", "cat"), ("$5", "5"), ("50%", "50"),
    ("3", "-3"), ("don't", "dont"), ("1.5", "15"), ("a.b", "ab"), ("", "0"),
])  # fmt: skip
def test_normalize_answer_different(a, b):
    assert evaluate.normalize_answer(a) != evaluate.normalize_answer(b)


def test_exact_match_scoring():
    items = [{"prompt": "q", "answer": "Paris"}, {"prompt": "q", "answer": 1000},
             {"prompt": "q", "answer": ["4", "four"]}, {"prompt": "q", "answer": "yes"}]
    r = evaluate.exact_match([" paris.", "1,000", "Four", "no"], items)
    assert [it["correct"] for it in r["items"]] == [True, True, True, False] and r["exact_match"] == 0.75


def test_exact_match_generates_through_the_engine(models, tok, tmp_path, monkeypatch):
    from llmctl import engine

    model = load_model(models["llama"])
    prompts = ["The module", "Python is", "def f(x):", "1 + 1 =", ""]
    calls = []
    real = engine.Engine.generate
    monkeypatch.setattr(engine.Engine, "generate", lambda self, *a, **k: calls.append(a) or real(self, *a, **k))
    got = evaluate.generate_completions(model, tok, prompts, max_new_tokens=8)
    assert len(calls) == 1 and len(calls[0][0]) == len(prompts)
    with torch.no_grad():  # greedy decoding by hand, full forward passes, cut at the first newline
        for p, g in zip(prompts, got):
            ids, out = [tok.bos_id] + tok.encode(p), []
            for _ in range(8):
                nxt = int(model(torch.tensor([ids + out]))[0, -1].argmax())
                if nxt == tok.eos_id:
                    break
                out.append(nxt)
            assert g == tok.decode(out, skip_special_tokens=True).split("\n")[0]

    # end to end: answers written differently from the completions still match after normalisation
    monkeypatch.setattr(engine.Engine, "generate", real)
    items = [{"prompt": p, "answer": "  " + g.upper() + " ."} for p, g in zip(prompts, got)]
    items += [{"prompt": p, "answer": [g + " and more", "certainly not this"]} for p, g in zip(prompts, got)]
    data = tmp_path / "em.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in items))
    code, out, err = llmctl("eval", "--model", models["llama"], "--task", "exact-match", "--data", data,
                            "--max-new-tokens", 8, "--json")  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    assert doc["metrics"]["exact_match"] == 0.5 and doc["metrics"]["n"] == 10


# ------------------------------------------------------------------------------------------ preference


def test_preference_counts_chosen_above_rejected(models, tok):
    model = load_model(models["llama"])
    items = [{"prompt": "The answer is", "chosen": " yes", "rejected": " no way at all"},
             {"prompt": "Hello", "chosen": ", world", "rejected": "!"}]  # fmt: skip
    r = evaluate.preference(model, tok, items, show_progress=False)
    ll = [s for s, _ in evaluate.score_pairs(model, tok, [(i["prompt"], i[k]) for i in items
                                                           for k in ("chosen", "rejected")], show_progress=False)]
    margins = [ll[0] - ll[1], ll[2] - ll[3]]
    assert r["items"] == pytest.approx(margins) and r["acc"] == np.mean([m > 0 for m in margins])
    same = evaluate.preference(model, tok, items, ref_model=model, show_progress=False)  # implicit reward: all 0
    assert same["acc"] == 0.5 and same["margin"] == 0.0
    # --chat: the completion is the assistant's reply (through <|im_end|>) after the user message
    chat = evaluate.preference(model, tok, items, show_progress=False, chat=True)
    want = []
    for it in items:
        user = [{"role": "user", "content": it["prompt"]}]
        n = len(tok.encode_chat(user, add_generation_prompt=True)[0])
        lp = []
        for k in ("chosen", "rejected"):
            ids = tok.encode_chat(user + [{"role": "assistant", "content": it[k]}])[0]
            assert tok.decode(ids[n:]).startswith(it[k] + "<|im_end|>")
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0], -1)
            lp.append(sum(logp[t - 1, ids[t]].item() for t in range(n, len(ids))))
        want.append(lp[0] - lp[1])
    assert chat["items"] == pytest.approx(want, abs=1e-4)


# ------------------------------------------------------------------------------------------ lm-eval adapter


def test_lm_eval_adapter_runs_a_local_task(models, tok, tmp_path, docs):
    pytest.importorskip("lm_eval")
    from llmctl.harness import run_harness

    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in MC_ITEMS))
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[-3:]))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "local_mc.yaml").write_text(f"""task: local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: question
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    (tasks / "local_text.yaml").write_text(f"""task: local_text
dataset_path: json
dataset_kwargs:
  data_files:
    test: {text}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: bits_per_byte
""")
    model = load_model(models["llama"])
    r = run_harness(model, tok, ["local_mc", "local_text"], include=tasks, log_samples=True)
    ours = evaluate.multiple_choice(model, tok, MC_ITEMS, show_progress=False)
    assert r["results"]["local_mc"]["acc"] == pytest.approx(ours["acc"])
    assert r["results"]["local_mc"]["acc_norm"] == pytest.approx(ours["acc_norm"])
    for s in r["samples"]["local_mc"]:  # item by item, the same log-likelihoods
        lls = [x[0] for x in s["filtered_resps"]]
        np.testing.assert_allclose(lls, ours["items"][s["doc_id"]]["lls"], atol=1e-6)
    # loglikelihood_rolling: these documents fit one window, so it is the plain log-likelihood after bos
    lls = [s for s, _ in evaluate.score_tokens(model, [([tok.bos_id], tok.encode(t)) for t in docs[-3:]],
                                               show_progress=False)]  # fmt: skip
    nbytes = sum(len(t.encode()) for t in docs[-3:])
    assert r["results"]["local_text"]["bits_per_byte"] == pytest.approx(-sum(lls) / nbytes / math.log(2), rel=1e-6)


def test_shipped_example_task_runs(models, tok, monkeypatch):
    """examples/eval/tasks/python_mc.yaml (the README's and the demo's local lm-eval task) equals --task mc."""
    pytest.importorskip("lm_eval")
    from llmctl.harness import run_harness

    monkeypatch.chdir(ROOT)  # its data_files path is relative to the repository root
    model = load_model(models["gpt2"])
    r = run_harness(model, tok, ["python_mc"], include=ROOT / "examples/eval/tasks")["results"]["python_mc"]
    items = load(ROOT / "examples/eval/python_mc.jsonl", "mc")
    ours = evaluate.multiple_choice(model, tok, items, show_progress=False)
    assert (r["acc"], r["acc_norm"]) == pytest.approx((ours["acc"], ours["acc_norm"]))


# ------------------------------------------------------------------------------------------ command line


def llmctl_proc(*args):
    r = subprocess.run([sys.executable, "-m", "llmctl", *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "LLMCTL_DEBUG": ""})  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r


def llmctl(*args):
    """The CLI in this process: (exit code, stdout, stderr)."""
    from typer.testing import CliRunner

    from llmctl.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def test_cli_json_limit_and_errors(models, tok, docs, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    r = llmctl_proc("eval", "--model", models["gpt2"], "--task", "bpb", "--data", corpus, "--limit", 2, "--json")
    doc = json.loads(r.stdout)  # one JSON document, nothing else on stdout
    assert doc["task"] == "bpb" and doc["limit"] == 2 and doc["metrics"]["documents"] == 2
    ref = evaluate.corpus_loss(load_model(models["gpt2"]), tok, docs[:2], show_progress=False)
    assert doc["metrics"]["bpb"] == pytest.approx(ref["bpb"], rel=1e-6)

    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps(it) + "\n" for it in MC_ITEMS))
    code, out, err = llmctl("eval", "--model", models["llama"], "--task", "mc", "--data", mc, "--samples",
                            tmp_path / "s.jsonl")  # fmt: skip
    assert code == 0, err
    assert out.startswith("acc ") and len(out.splitlines()) == 1
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == len(MC_ITEMS)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(MC_ITEMS[0]) + "\n" + json.dumps({"question": "q", "choices": ["a", "b"], "answer": 2})
                   + "\n")  # fmt: skip
    for args, msg in [
        (("--task", "mc", "--data", bad), f"{bad}:2: field \"answer\""),
        (("--task", "mc", "--data", tmp_path / "missing.jsonl"), "no such file"),
        (("--task", "nope", "--data", bad), "unknown --task"),
        (("--task", "bpb",), "needs --data"),
        (("--task", "bpb", "--data", corpus, "--stride", 0), "--stride"),
        (("--harness", "x", "--task", "mc", "--data", bad), "either --task or --harness"),
    ]:  # fmt: skip
        code, out, err = llmctl("eval", "--model", models["llama"], *args)
        assert code == 2 and err.startswith("error: ") and msg in err, (args, err)
        assert "Traceback" not in err and out == "" and len(err.splitlines()) == 1
