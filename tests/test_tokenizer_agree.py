"""Tokenizers agree everywhere: `AutoTokenizer.from_pretrained(DIR)(text).input_ids` is what llmctl feeds its model,
for tokenizers llmctl trains (BOS by the post-processor and add_bos_token, as Llama's) and for foreign ones, whose
own rule llmctl follows (Qwen-style: nothing before a text; Llama-3-style: `<|begin_of_text|>`) in generate, eval,
sft and the shards; transformers' greedy generate from those ids equals `llmctl generate`; generation stops on
every EOS id of the model (`eos_token_id` may be a list). Everything is built here: nothing is downloaded."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from conftest import TRICKY
from llmctl import evaluate, hf
from llmctl.chat import encode_prompt, fit_prompt
from llmctl.cli import app
from llmctl.errors import UserError
from llmctl.examples import encode_sft
from llmctl.model import ModelConfig, Transformer
from llmctl.shards import TokenShards, encode_corpus
from llmctl.tokenizer import BOS_ID, EOS_ID, load_tokenizer, tokenizer_json_hash

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()

PROMPTS = ["The Python", "naïve café 🙂 日本語 — ½", "def f(x):\n    return x"]
TEXTS = [t for t in TRICKY if "<|" not in t]  # transformers maps special-token strings in a text to their ids


def save_model(out, tok_dir, vocab_size: int, bos, eos, block_size: int = 96):
    torch.manual_seed(0)
    m = Transformer(ModelConfig(arch="llama", vocab_size=vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                                block_size=block_size, init_std=0.1, bos_token_id=bos, eos_token_id=eos))  # fmt: skip
    return hf.save_model(m, out, tokenizer_dir=tok_dir)


def llmctl_greedy(model_dir, prompts, n: int) -> list[dict]:
    stdin = "".join(json.dumps({"prompt": p}) + "\n" for p in prompts)
    r = runner.invoke(app, ["generate", "--model", str(model_dir), "--json", "--temperature", "0",
                            "--max-new-tokens", str(n)], input=stdin)  # fmt: skip
    assert r.exit_code == 0, r.stderr
    return [json.loads(x) for x in r.stdout.splitlines()]


def transformers_greedy(model_dir, prompts, n: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, new ids) of transformers' greedy generate from AutoTokenizer(prompt) ids."""
    at = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    out = []
    for p in prompts:
        ids = at(p, return_tensors="pt").input_ids
        with torch.no_grad():
            g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                               pad_token_id=at.eos_token_id)  # fmt: skip
        out.append((ids[0].tolist(), g[0, ids.shape[1] :].tolist()))
    return out


def assert_same_generations(model_dir, prompts, n: int = 16):
    at = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    for o, (ids, new) in zip(llmctl_greedy(model_dir, prompts, n), transformers_greedy(model_dir, prompts, n)):
        assert o["prompt_tokens"] == len(ids) and o["completion_tokens"] == len(new)
        assert o["completion"] == at.decode(new, skip_special_tokens=True)


# ------------------------------------------------------------------------------------------ llmctl's tokenizers


@pytest.fixture(scope="module")
def auto_tok(tok_dir):
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


@pytest.mark.parametrize("text", TEXTS + ["x"])
def test_autotokenizer_gives_llmctl_prompt_ids(tok, auto_tok, text):
    assert tok.prefix == [BOS_ID]
    ids = encode_prompt(tok, text)
    assert auto_tok(text).input_ids == ids == [BOS_ID] + tok.encode(text)  # "" too: BOS alone
    assert auto_tok(text, "y").input_ids == ids + [BOS_ID] + tok.encode("y")  # a pair, as Llama's
    assert encode_sft(tok, {"prompt": text, "completion": "y"})[0] == ids + tok.encode("y") + [EOS_ID]


def test_trained_files_say_so_and_the_hash_stays(tok, tok_dir, tmp_path):
    obj = json.loads((tok_dir / "tokenizer.json").read_text())
    assert obj["post_processor"]["type"] == "TemplateProcessing"
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert cfg["add_bos_token"] is True and cfg["add_eos_token"] is False
    # the post-processor is not hashed: shards encoded before it existed stay valid
    assert tokenizer_json_hash({**obj, "post_processor": None}) == tok.hash()
    # a folder written before the post-processor (none, add_bos_token false) keeps BOS first, as its models were
    # trained, and is saved in the new form
    old = tmp_path / "old"
    old.mkdir()
    (old / "tokenizer.json").write_text(json.dumps({**obj, "post_processor": None}))
    (old / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": False}))
    legacy = load_tokenizer(old)
    assert legacy.prefix == [BOS_ID] and legacy.hash() == tok.hash()
    assert encode_prompt(legacy, "a") == encode_prompt(tok, "a")
    legacy.save(tmp_path / "new")
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "new"))("a").input_ids == encode_prompt(tok, "a")


def test_transformers_generate_equals_llmctl_generate(tok_dir, tmp_path):
    d = save_model(tmp_path / "model", tok_dir, 512, BOS_ID, EOS_ID)
    assert_same_generations(d, PROMPTS)


# ------------------------------------------------------------------------------------------ foreign tokenizers

STYLES = {  # special tokens, tokenizer_config.json, the token the post-processor puts first (None: nothing)
    "qwen": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
             {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}, None),
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
               {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}, "<|begin_of_text|>"),
}  # fmt: skip


def foreign_tokenizer(out, style: str, texts):
    """A byte-level BPE built with `tokenizers` as Qwen2's (ByteLevel post-processor, no bos_token) or Llama 3's
    (ByteLevel + TemplateProcessing putting <|begin_of_text|> first) are; no add_bos_token in its config."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials, config, first = STYLES[style]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[AddedToken(t, special=True, normalized=False) for t in specials])
    tk.train_from_iterator(texts, trainer=trainer)
    byte_level = processors.ByteLevel(trim_offsets=False)
    if first is None:
        tk.post_processor = byte_level
    else:
        template = processors.TemplateProcessing(single=f"{first}:0 $A:0", pair=f"{first}:0 $A:0 {first}:1 $B:1",
                                                 special_tokens=[(first, tk.token_to_id(first))])
        tk.post_processor = processors.Sequence([byte_level, template])
    out.mkdir(parents=True)
    tk.save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 2048,
           "clean_up_tokenization_spaces": False, **config}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module", params=sorted(STYLES))
def foreign(request, tmp_path_factory, corpus_file):
    """(style, tokenizer, model dir): a foreign tokenizer and a tiny llama saved with it."""
    texts = corpus_file.read_text(encoding="utf-8").split("\n\n")[:400]
    d = foreign_tokenizer(tmp_path_factory.mktemp("tok") / request.param, request.param, texts)
    tok = load_tokenizer(d)
    model = save_model(tmp_path_factory.mktemp("model"), d, tok.vocab_size, tok.bos_id, tok.eos_id)
    return request.param, load_tokenizer(model), model


def test_foreign_rule_is_followed(foreign, tmp_path, monkeypatch):
    style, tok, model_dir = foreign
    first = STYLES[style][2]
    prefix = [] if first is None else [tok.hf.token_to_id(first)]
    assert tok.prefix == prefix and (tok.bos_id is None) == (style == "qwen")
    at = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    for text in TEXTS + ["x"]:
        ids = encode_prompt(tok, text)
        if text:
            assert at(text).input_ids == ids == prefix + tok.encode(text)  # one BOS for Llama 3, none for Qwen
        else:
            assert ids == (prefix or [tok.eos_id])  # an empty prompt starts from EOS when nothing goes first
    assert fit_prompt(tok, encode_prompt(tok, "a b c d e f g"), 8, 4)[0][: len(prefix)] == prefix
    # sft rows, evaluation contexts, corpus streams
    eos = [tok.eos_id]
    p, c = prefix + tok.encode("Q:"), tok.encode(" A") + eos
    assert encode_sft(tok, {"prompt": "Q:", "completion": " A"}) == (p + c, [0] * len(p) + [1] * len(c))
    assert evaluate.encode_pair(tok, "Question: ", "yes")[0] == prefix + tok.encode("Question:")
    assert evaluate.encode_pair(tok, "", "yes")[0] == (prefix or eos)
    docs = ["first doc", "second ü"]
    want = [i for d in docs for i in prefix + tok.encode(d) + eos]
    assert evaluate.corpus_stream(docs, tok).tolist() == (want if prefix else eos + want)
    # exact match: the engine gets the same prompt ids
    from llmctl import engine

    seen, real = [], engine.Engine.generate
    monkeypatch.setattr(engine.Engine, "generate",
                        lambda self, ids, *a, **k: seen.extend(ids) or real(self, ids, *a, **k))  # fmt: skip
    evaluate.generate_completions(hf.load_model(model_dir), tok, ["The Python", ""], max_new_tokens=3)
    assert seen == [prefix + tok.encode("The Python"), prefix or eos]
    # shards: prefix + ids + eos per document (Qwen: separated by eos alone)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    meta = encode_corpus([str(tmp_path / "c.jsonl")], tok, tmp_path / "shards", val_fraction=0.0)
    shards = TokenShards(tmp_path / "shards")
    assert len(shards) == len(want) and shards.read(0, len(want)).tolist() == want
    assert meta["prefix"] == prefix and meta["bos_id"] == (prefix[0] if prefix else None) and meta["eos_id"] == eos[0]


def test_shards_need_an_eos_only(tok, tmp_path):
    class NoEos:  # the same tokenizer without an eos token: documents could not be told apart
        def __getattr__(self, name):
            return getattr(tok, name)

        eos_id = None

    (tmp_path / "c.txt").write_text("a document\n")
    with pytest.raises(UserError, match="has no eos token"):
        encode_corpus([str(tmp_path / "c.txt")], NoEos(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_foreign_generate_equals_transformers(foreign):
    style, tok, model_dir = foreign
    assert_same_generations(model_dir, PROMPTS)
    (o,) = llmctl_greedy(model_dir, [""], 4)
    assert o["prompt_tokens"] == 1  # BOS (Llama 3) or EOS (Qwen) alone


# ------------------------------------------------------------------------------------------ EOS lists


def test_generation_stops_on_every_eos_id(tok, tok_dir, tmp_path):
    """Llama 3 instruct's `eos_token_id` is a list: config.json's or generation_config.json's, any of them stops."""
    from llmctl.engine import Engine, SamplingParams

    d = save_model(tmp_path / "model", tok_dir, 512, BOS_ID, EOS_ID)
    ids = encode_prompt(tok, PROMPTS[0])
    greedy = SamplingParams(max_new_tokens=16, temperature=0)
    free = Engine(hf.load_model(d), eos_ids=[]).generate([ids], greedy)[0].tokens
    k = next(i for i in range(3, 16) if free[i] not in free[:i] and EOS_ID not in free[: i + 1])
    stop = free[k]
    for name in ("generation_config.json", "config.json"):
        m = tmp_path / name.removesuffix(".json")
        shutil.copytree(d, m)
        obj = json.loads((m / name).read_text())
        (m / name).write_text(json.dumps({**obj, "eos_token_id": [EOS_ID, stop, 511]}))
        assert load_tokenizer(m).eos_ids == {EOS_ID, stop, 511}
        (o,) = llmctl_greedy(m, [PROMPTS[0]], 16)
        assert o["finish_reason"] == "eos" and o["completion_tokens"] == k + 1
        engine = Engine(hf.load_model(m), load_tokenizer(m))  # eval and RL build theirs so
        assert engine.generate([ids], greedy)[0].tokens == free[: k + 1]
    # transformers reads the list from generation_config.json and stops there too
    assert transformers_greedy(tmp_path / "generation_config", [PROMPTS[0]], 16)[0][1] == free[: k + 1]
