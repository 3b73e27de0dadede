"""SFT data and the sft / lora stages: chat-template masks (ours and a foreign Jinja template, against
transformers), packing = padding, LoRA changes only adapters, peft on transformers = llmctl, merged = unmerged,
resume = uninterrupted, CLI errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llmctl import examples, hf, lora
from llmctl.losses import lm_loss
from llmctl.config import LoraSection
from llmctl.model import ModelConfig, Transformer
from llmctl.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]

CONVS = [
    [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "42"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"},
     {"role": "assistant", "content": "Green, or red."}],
    [{"role": "user", "content": "Reverse 'abc'."}, {"role": "assistant", "content": "cba"}],
]
ROWS = [{"messages": c} for c in CONVS] + [{"prompt": "Say hi:", "completion": " hi there"},
                                           {"prompt": "2+2=", "completion": "4"}]
# A Llama-3-like template (header tokens, double newline, content trimmed, an end-of-turn token)
FOREIGN = ("{{ bos_token }}{% for message in messages %}"
           "{{ '<|im_start|>' + message['role'] + '<|im_end|>\n\n' + message['content'] | trim + eos_token }}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_end|>\n\n' }}{% endif %}")


def llmctl(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "llmctl", *map(str, args)], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check:
        assert r.returncode == 0, r.stderr
    return r


def supervised_text(tok, ids, mask):
    runs, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs + ([tok.decode(cur)] if cur else [])


def test_chat_mask_only_assistant_turns(tok):
    ids, mask = tok.encode_chat(CONVS[1])
    assert ids == tok.encode(tok.render_chat(CONVS[1]), allow_special=True)
    assert supervised_text(tok, ids, mask) == ["Blue.<|im_end|>", "Green, or red.<|im_end|>"]
    ids, mask = examples.encode_sft(tok, {"prompt": "Say hi:", "completion": " hi there"})
    assert tok.decode(ids) == "<|bos|>Say hi: hi there<|eos|>"
    assert supervised_text(tok, ids, mask) == [" hi there<|eos|>"]


@pytest.mark.parametrize("template", ["chatml", "foreign", "generation-tag"])
def test_chat_template_equals_transformers(tok_dir, tmp_path, template):
    from transformers import AutoTokenizer

    d = tmp_path / "tok"
    d.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (d / f).write_bytes((Path(tok_dir) / f).read_bytes())
    if template != "chatml":
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        t = FOREIGN
        if template == "generation-tag":
            t = t.replace("{{ '<|im_start|>' +", "{% generation %}{{ '<|im_start|>' +").replace(
                "eos_token }}", "eos_token }}{% endgeneration %}")
        cfg["chat_template"] = t
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours, theirs = load_tokenizer(d), AutoTokenizer.from_pretrained(str(d))
    for conv in CONVS:
        for gen in (False, True):
            msgs = conv[:-1] if gen else conv
            text = theirs.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert ours.render_chat(msgs, add_generation_prompt=gen) == text
            out = theirs.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
            hf_ids = out["input_ids"] if hasattr(out, "keys") else out
            assert ours.encode_chat(msgs, add_generation_prompt=gen)[0] == list(hf_ids)
        ids, mask = ours.encode_chat(conv)
        end = "<|im_end|>" if template == "chatml" else "<|eos|>"
        want = [m["content"].strip() + end for m in conv if m["role"] == "assistant"]
        assert supervised_text(ours, ids, mask) == want


def test_packing_gives_the_same_supervised_tokens_and_loss(tok):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(arch="llama", vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2,
                                    n_embd=64, block_size=96)).eval()
    model.init_weights()
    ex = [examples.Example(np.asarray(i, dtype=np.int64), np.asarray(m, dtype=bool))
          for i, m in (examples.encode_sft(tok, r) for r in ROWS * 3)]
    packed_rows = examples.pack(ex, np.arange(len(ex)), 96)
    assert len(packed_rows) < len(ex)  # really packed: several examples a row
    packed = examples.collate_packed(packed_rows, 96)
    padded = examples.collate(ex)

    def supervised(b):  # (example's own position, target) pairs, in order
        pos = b["position_ids"] if "position_ids" in b else torch.arange(b["idx"].size(1)).expand_as(b["idx"])
        keep = b["targets"] != examples.IGNORE
        return list(zip(pos[keep].tolist(), b["targets"][keep].tolist()))

    assert supervised(packed) == supervised(padded)
    assert examples.count(packed) == examples.count(padded) > 0
    with torch.no_grad():
        a, b = lm_loss(model, packed), lm_loss(model, padded)
    assert abs(a.item() - b.item()) / b.item() <= 1e-6
    # and no token of a packed row sees another example: its logits equal the example alone
    with torch.no_grad():
        lp = model(packed["idx"], position_ids=packed["position_ids"], attn_mask=packed["attn_mask"])
        first = packed_rows[0]
        at = 0
        for e in first:
            alone = model(torch.from_numpy(e.ids[:-1])[None])
            assert torch.allclose(lp[0, at:at + e.n_inputs], alone[0], atol=1e-5)
            at += e.n_inputs


def test_sft_batches_are_a_function_of_the_step(tok):
    ex = [examples.Example(np.asarray(i, dtype=np.int64), np.asarray(m, dtype=bool))
          for i, m in (examples.encode_sft(tok, r) for r in ROWS * 4)]
    one = examples.sft_batches(ex, 64, micro=2, accum=2, rank=0, world=1, seed=3)
    two = [examples.sft_batches(ex, 64, micro=2, accum=1, rank=r, world=2, seed=3) for r in range(2)]
    for step in (5, 0, 9):  # any order: no hidden iterator state
        a = one(step)
        again = examples.sft_batches(ex, 64, micro=2, accum=2, rank=0, world=1, seed=3)(step)
        assert all(torch.equal(x["idx"], y["idx"]) for x, y in zip(a, again))
        # 2 processes x 1 micro-step cover the same rows as 1 process x 2 micro-steps
        assert torch.equal(torch.cat([two[0](step)[0]["idx"], two[1](step)[0]["idx"]]),
                           torch.cat([a[0]["idx"], a[1]["idx"]]))


# ------------------------------------------------------------------------------------------------ LoRA


def tiny_base(tmp_path, tok_dir, arch="llama", **kw):
    torch.manual_seed(0)
    tok = load_tokenizer(tok_dir)
    cfg = dict(arch=arch, vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_embd=64, block_size=128,
               bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    if arch == "llama":
        cfg.update(n_kv_head=2, qkv_bias=kw.get("qkv_bias", False))
    model = Transformer(ModelConfig(**cfg))
    model.init_weights()
    d = tmp_path / f"base-{arch}"
    hf.save_model(model, d, tokenizer_dir=tok_dir)
    return d


def perturb_adapters(pm, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_lora_trains_only_adapters(tmp_path, tok_dir, tok):
    base = hf.load_model(tiny_base(tmp_path, tok_dir))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    pm = lora.apply(base, LoraSection(r=4, dropout=0.0))
    trainable = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    ex = [examples.Example(np.asarray(i, dtype=np.int64), np.asarray(m, dtype=bool))
          for i, m in (examples.encode_sft(tok, r) for r in ROWS)]
    batch = examples.collate(ex)
    model = pm.get_base_model().train()
    for _ in range(3):
        lm_loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert any(n.endswith("lora_B.default.weight") and p.abs().sum() > 0 for n, p in model.named_parameters())


def test_lora_trainable_fraction_on_the_6m_config():
    """The ~6M llama of the benchmarks (6 layers, 256 wide, 8 heads, vocab 8192), r=8. LoRA r adds
    r * (in + out) per matrix: 6.25% of a 256 x 256 one, so the fraction depends on which matrices."""
    cfg = ModelConfig(arch="llama", vocab_size=8192, n_layer=6, n_head=8, n_embd=256, block_size=256)
    fractions = {}
    for preset in ("attention", "mlp", "all-linear"):
        with torch.device("meta"):
            pm = lora.apply(Transformer(cfg), LoraSection(r=8, targets=preset))
        n_train = sum(p.numel() for p in pm.parameters() if p.requires_grad)
        fractions[preset] = n_train / sum(p.numel() for p in pm.parameters())
        assert n_train == 6 * 8 * {"attention": 4 * 512, "mlp": 3 * (256 + 704), "all-linear": 4 * 512 + 3 * 960}[preset]
    assert fractions["attention"] < 0.02 and fractions["mlp"] < 0.02
    assert fractions["all-linear"] < 0.03


@pytest.mark.parametrize("arch, variant", [("llama", "lora"), ("gpt2", "rslora"), ("llama", "dora")])
def test_adapter_loads_in_peft_on_transformers(tmp_path, tok_dir, arch, variant):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = tiny_base(tmp_path, tok_dir, arch)
    pm = lora.apply(hf.load_model(base_dir), LoraSection(r=4, dropout=0.0, rslora=variant == "rslora",
                                                         dora=variant == "dora"))
    perturb_adapters(pm)
    ad = lora.save_adapter(pm, tmp_path / "adapter", base=str(base_dir), tokenizer_dir=tok_dir)
    x = torch.randint(5, 400, (2, 17))
    with torch.no_grad():
        ours = pm.get_base_model().eval()(x)
        theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(ad)).eval()
        ref = theirs(x).logits
        assert (ours - ref).abs().max() <= 1e-4
        # loaded back by llmctl, unmerged and merged
        unmerged = lora.load(hf.load_model(base_dir), ad).get_base_model()(x)
        merged = lora.merged(hf.load_model(base_dir), ad)
        assert type(merged) is Transformer and not any("lora" in n for n, _ in merged.named_parameters())
        assert (unmerged - ours).abs().max() <= 1e-5
        assert (merged(x) - ours).abs().max() <= 1e-4
    # `llmctl lora merge` writes a model directory transformers loads with the same logits
    out = tmp_path / "merged"
    llmctl("lora", "merge", ad, "--out", out)
    with torch.no_grad():
        hf_merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()(x).logits
    assert (hf_merged - ref).abs().max() <= 1e-4


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def sft_setup(tmp_path_factory, tok_dir):
    d = tmp_path_factory.mktemp("sft")
    base = tiny_base(d, tok_dir)
    data = write_rows(d / "train.jsonl", ROWS * 6)
    recipe = d / "r.yaml"
    recipe.write_text(f"init_from: {base}\ndata:\n  train: {data}\n  val: {data}\n"
                      "train:\n  micro_batch_size: 2\n  grad_accum: 2\n  log_every: 1\n  eval_every: 3\n"
                      "  eval_batches: 1\n  save_every: 3\noptim:\n  lr: 1.0e-3\n  warmup_steps: 2\n"
                      "  schedule: constant\n")
    return d, recipe


def losses(run):
    ev = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(e["step"], e["loss"]) for e in ev if "loss" in e], [(e["step"], e["val_loss"]) for e in ev
                                                                 if "val_loss" in e]


@pytest.mark.parametrize("kind", ["sft", "lora"])
def test_resume_equals_uninterrupted(sft_setup, kind):
    d, recipe = sft_setup
    straight, split = d / f"{kind}-straight", d / f"{kind}-split"
    llmctl(kind, recipe, f"out_dir={straight}", "train.max_steps=6")
    llmctl(kind, recipe, f"out_dir={split}", "train.max_steps=3")
    r = llmctl(kind, recipe, f"out_dir={split}", "train.max_steps=6")
    assert "resuming from" in r.stderr
    assert losses(straight) == losses(split)
    ck = split / "checkpoints" / "step-0000006"
    assert (ck / ("adapter_config.json" if kind == "lora" else "config.json")).is_file()


def test_generate_and_eval_take_an_adapter(sft_setup, tmp_path):
    d, recipe = sft_setup
    run = d / "lora-straight"
    if not run.exists():
        llmctl("lora", recipe, f"out_dir={run}", "train.max_steps=6")
    base = json.loads((run / "checkpoints/step-0000006/adapter_config.json").read_text())["base_model_name_or_path"]
    llmctl("lora", "merge", run, "--out", tmp_path / "merged")
    a = llmctl("generate", "--model", base, "--adapter", run, "--temperature", "0", "--max-new-tokens", "6", "Hi")
    b = llmctl("generate", "--model", tmp_path / "merged", "--temperature", "0", "--max-new-tokens", "6", "Hi")
    assert a.stdout == b.stdout and a.stdout.strip()
    em = write_rows(tmp_path / "em.jsonl", [{"prompt": "What is 12 + 30?", "answer": "42"}])
    r = llmctl("eval", "--model", base, "--adapter", run, "--task", "exact-match", "--data", em, "--chat", "--json")
    assert json.loads(r.stdout)["metrics"]["n"] == 1


def test_show_mask(sft_setup):
    _, recipe = sft_setup
    r = llmctl("sft", recipe, "out_dir=unused", "--show-mask")
    assert "[[42<|im_end|>]]" in r.stdout and "--- example 1" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["lora.quantize=4bit"], "needs a CUDA GPU"),
    (["lora.targets=qproj"], "no linear layer named 'qproj'"),
    (["data.train=BAD"], "BAD"),
    (["lora.rank=4"], "did you mean 'lora.r'"),
])
def test_lora_errors(sft_setup, tmp_path, args, message):
    d, recipe = sft_setup
    if args == ["data.train=BAD"]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps(ROWS[0]) + "\n" + '{"messages": "nope"}\n')
        args, message = [f"data.train={bad}"], f"{bad}:2:"
    r = llmctl("lora", recipe, f"out_dir={tmp_path / 'run'}", *args, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error:") and message in r.stderr, r.stderr


@pytest.mark.parametrize("kind", ["sft", "lora"])
def test_fine_tune_a_local_transformers_checkpoint(tmp_path, tok_dir, kind):
    """init_from = a folder transformers wrote (Qwen2: qkv bias, tied embeddings), with a tokenizer; the result
    loads back in transformers (sft: the model; lora: base + adapter through peft) with llmctl's logits."""
    import transformers
    from peft import PeftModel

    tok = load_tokenizer(tok_dir)
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128, tie_word_embeddings=True,
                                   bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    base = tmp_path / "qwen2"
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(base)
    tok.save(base)
    data = write_rows(tmp_path / "train.jsonl", ROWS * 2)
    run = tmp_path / "run"
    llmctl(kind, ROOT / f"recipes/tiny/{kind}.yaml", f"out_dir={run}", f"init_from={base}", f"data.train={data}",
           "eval.exact_match=null", "train.max_steps=2", "train.micro_batch_size=2")
    ck = run / "checkpoints/step-0000002"
    x = torch.randint(5, tok.vocab_size, (1, 12))
    with torch.no_grad():
        if kind == "sft":
            ours, theirs = hf.load_model(ck)(x), transformers.AutoModelForCausalLM.from_pretrained(str(ck))(x).logits
        else:
            ours = lora.load(hf.load_model(base), ck).get_base_model()(x)
            theirs = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(str(base)),
                                               str(ck)).eval()(x).logits
            assert (ours - hf.load_model(base)(x)).abs().max() > 0  # the adapter trained
    assert (ours - theirs).abs().max() <= 1e-4


def test_shipped_lora_recipe_runs_with_only_a_model_and_data(sft_setup, tmp_path):
    """recipes/tiny/lora.yaml names an exact-match file (runs/tasks/rl_test.jsonl) the user may never have made:
    with only init_from, data.train and out_dir it trains, skipping that evaluation with one warning."""
    import yaml

    _, recipe = sft_setup
    mine = yaml.safe_load(recipe.read_text())
    r = subprocess.run([sys.executable, "-m", "llmctl", "lora", str(ROOT / "recipes/tiny/lora.yaml"),
                        f"init_from={mine['init_from']}", f"data.train={mine['data']['train']}", "out_dir=run",
                        "train.max_steps=2", "train.micro_batch_size=2"], capture_output=True, text=True,
                       cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning: eval.exact_match")]
    assert len(warnings) == 1 and "no such file runs/tasks/rl_test.jsonl" in warnings[0], r.stderr
    assert yaml.safe_load((tmp_path / "run/config.yaml").read_text())["eval"]["exact_match"] is None
    assert (tmp_path / "run/checkpoints/step-0000002/adapter_config.json").is_file()
