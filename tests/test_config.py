"""Recipes: every shipped YAML validates; overrides; strict errors through the CLI (exit 2, one error line)."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmctl.config import LoraRecipe, PretrainRecipe, RlhfRecipe, SftRecipe, dump_recipe, get_path, load_recipe
from llmctl.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


def test_recipes_exist():
    assert any(p.name == "pretrain.yaml" for p in RECIPES)
    assert len(RECIPES) >= 3


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_recipe_validates(path):
    # the command a recipe is for, by its name: sft.yaml, lora.yaml, reward / dpo / ppo / grpo.yaml, else pretrain
    cls = {"sft": SftRecipe, "lora": LoraRecipe, **dict.fromkeys(("reward", "dpo", "ppo", "grpo"), RlhfRecipe)}.get(
        path.stem, PretrainRecipe)
    cfg = load_recipe(path, [], cls)
    assert all(get_path(cfg, key) for key in cls.REQUIRED)
    # the dump is itself a valid recipe that resolves to the same thing
    again = Path(path.parent) / f".roundtrip-{path.name}"
    try:
        again.write_text(dump_recipe(cfg))
        assert load_recipe(again, [], cls) == cfg
    finally:
        again.unlink()


def test_overrides_parse_yaml_values(tmp_path):
    p = ROOT / "recipes/tiny/pretrain.yaml"
    cfg = load_recipe(p, ["train.max_steps=7", "optim.lr=1e-3", "model.n_kv_head=null", "model.arch=gpt2",
                          "train.compile=true"], PretrainRecipe)
    assert cfg.train.max_steps == 7 and cfg.optim.lr == 1e-3 and cfg.model.n_kv_head is None
    assert cfg.model.arch == "gpt2" and cfg.train.compile is True


@pytest.mark.parametrize("override,needle", [
    ("train.max_step=5", "did you mean 'train.max_steps'"),
    ("train.max_steps=abc", "train.max_steps: expected an integer"),
    ("train.precision=fp8", "train.precision: must be one of"),
    ("optim.lr=[1]", "optim.lr: expected a number"),
    ("nokey", "not of the form key.path=value"),
    ("model=3", "model: expected a mapping"),
])
def test_bad_overrides(override, needle):
    with pytest.raises(UserError, match=None) as e:
        load_recipe(ROOT / "recipes/tiny/pretrain.yaml", [override], PretrainRecipe)
    assert needle in str(e.value)


def test_unknown_key_in_file_and_missing_required(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"out_dir": "x", "tokenizer": "t", "data": {"train": "d"}, "trian": {}}))
    with pytest.raises(UserError, match=r"unknown key 'trian' in .*did you mean 'train"):
        load_recipe(p, [], PretrainRecipe)
    p.write_text(yaml.safe_dump({"out_dir": "x", "data": {"train": "d"}}))
    with pytest.raises(UserError, match="missing required key 'tokenizer'"):
        load_recipe(p, [], PretrainRecipe)


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "llmctl", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("content,args,needle", [
    (None, ["train.max_step=5"], "did you mean 'train.max_steps'"),
    (None, ["train.micro_batch_size=big"], "train.micro_batch_size: expected an integer"),
    ("a: [1\n", [], ":2: malformed YAML"),
    ("- 1\n- 2\n", [], "must be a YAML mapping"),
    ("MISSING", [], "no such recipe file"),
])
def test_cli_recipe_errors_exit_2_with_one_line(tmp_path, content, args, needle):
    if content is None:
        recipe = ROOT / "recipes/tiny/pretrain.yaml"
    elif content == "MISSING":
        recipe = tmp_path / "nope.yaml"
    else:
        recipe = tmp_path / "bad.yaml"
        recipe.write_text(content)
    r = _cli("pretrain", str(recipe), *args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_cli_dry_run_prints_resolved_recipe():
    r = _cli("pretrain", str(ROOT / "recipes/tiny/pretrain.yaml"), "--dry-run", "train.max_steps=3")
    assert r.returncode == 0, r.stderr
    data = yaml.safe_load(r.stdout)
    assert data["train"]["max_steps"] == 3 and data["model"]["arch"] == "llama"


def test_help_is_fast_and_lazy():
    code = ("import sys, time; t=time.perf_counter(); from llmctl.cli import app; "
            "heavy=[m for m in ('torch','datasets','peft','accelerate','transformers','tokenizers') if m in sys.modules]; "
            "print(heavy)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip() == "[]", r.stdout
    r = _cli("--help")
    assert r.returncode == 0 and "pretrain" in r.stdout and "tokenize" in r.stdout


# ------------------------------------------------------------------------------------- ranges, optional files

RECIPE_CLASSES = (PretrainRecipe, SftRecipe, LoraRecipe, RlhfRecipe)


def _sections(cls, prefix=""):
    import dataclasses
    import typing

    yield prefix, cls
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _sections(tp, f"{prefix}{f.name}.")


@pytest.mark.parametrize("cls", RECIPE_CLASSES, ids=lambda c: c.__name__)
def test_every_number_has_a_domain_and_the_defaults_lie_in_it(cls):
    import dataclasses
    import typing

    from llmctl.schema import check_value, field_meta

    for prefix, section in _sections(cls):
        hints = typing.get_type_hints(section)
        instance = section()
        for f in dataclasses.fields(section):
            base = [a for a in typing.get_args(hints[f.name]) if a is not type(None)] or [hints[f.name]]
            if base[0] in (int, float):
                meta = field_meta(section, f.name)
                assert meta.get("range"), f"{prefix}{f.name} declares no range"
                check_value(prefix + f.name, hints[f.name], getattr(instance, f.name), meta)


@pytest.mark.parametrize("cls,recipe,override,needle", [
    (PretrainRecipe, "pretrain", "optim.lr=-0.1", "optim.lr: must be > 0, got -0.1"),
    (PretrainRecipe, "pretrain", "optim.lr=.nan", "optim.lr: must be a finite number, got nan"),
    (PretrainRecipe, "pretrain", "optim.decay_fraction=-0.5", "optim.decay_fraction: must be in [0, 1], got -0.5"),
    (PretrainRecipe, "pretrain", "model.block_size=0", "model.block_size: must be >= 1, got 0"),
    (PretrainRecipe, "pretrain", "train.peak_tflops=-1", "train.peak_tflops: must be > 0"),
    (PretrainRecipe, "pretrain", "seed=-3", "seed: must be in [0, 2**63 - 1], got -3"),
    # a subclass that only changes a default (SftTrainSection.max_steps, LoraOptimSection.lr) keeps the range
    (SftRecipe, "sft", "train.max_steps=0", "train.max_steps: must be >= 1, got 0"),
    (LoraRecipe, "lora", "optim.lr=0", "optim.lr: must be > 0, got 0"),
    (LoraRecipe, "lora", "lora.dropout=-0.1", "lora.dropout: must be in [0, 1)"),
    (SftRecipe, "sft", "eval.max_new_tokens=0", "eval.max_new_tokens: must be >= 1"),
    (RlhfRecipe, "ppo", "rl.gamma=1.01", "rl.gamma: must be in [0, 1]"),
    (RlhfRecipe, "ppo", "rl.value_clip=0", "rl.value_clip: must be > 0"),
    (RlhfRecipe, "ppo", "rl.minibatches=257", "rl.minibatches: must be at most the sequences of a rollout batch "
                                              "(rl.prompts_per_step = 256), got 257"),
    (RlhfRecipe, "grpo", "rl.kl_coef=-1", "rl.kl_coef: must be >= 0"),
    (PretrainRecipe, "pretrain", "model.n_head=3", "model.n_embd: must be a multiple of model.n_head (3), got 128"),
])  # fmt: skip
def test_out_of_range_values_name_the_key_and_the_domain(cls, recipe, override, needle):
    with pytest.raises(UserError) as e:
        load_recipe(ROOT / f"recipes/tiny/{recipe}.yaml", [override], cls)
    assert str(e.value) == needle or needle in str(e.value), str(e.value)


def test_edges_of_the_domains_are_allowed():
    cfg = load_recipe(ROOT / "recipes/tiny/pretrain.yaml", ["train.eval_every=0", "train.save_every=0",
                      "train.keep_last=0", "train.grad_clip=0", "optim.warmup_steps=0", "optim.weight_decay=0",
                      "optim.min_lr_ratio=1", "optim.beta1=0", "model.dropout=0", "train.max_bad_steps=0",
                      "train.threads=null", "seed=0", "model.arch=gpt2", "model.n_kv_head=4"], PretrainRecipe)
    assert cfg.train.keep_last == 0 and cfg.model.n_kv_head == 4
    cfg = load_recipe(ROOT / "recipes/tiny/ppo.yaml", ["rl.group_size=1", "rl.top_p=1", "rl.gamma=0"], RlhfRecipe)
    assert cfg.rl.group_size == 1  # ppo samples one answer per prompt


def _cli_in(cwd, *args):
    import os

    return subprocess.run([sys.executable, "-m", "llmctl", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_shipped_lora_recipe_with_only_its_data_does_not_need_the_recipes_eval_file(tmp_path):
    # in a fresh directory, runs/tasks/rl_test.jsonl (the recipe's eval.exact_match) does not exist
    (tmp_path / "mine.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    r = _cli_in(tmp_path, "lora", ROOT / "recipes/tiny/lora.yaml", "data.train=mine.jsonl", "init_from=m",
                "out_dir=o", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["eval"]["exact_match"] is None
    assert r.stderr.splitlines() == [
        "warning: eval.exact_match: no such file runs/tasks/rl_test.jsonl (named in "
        f"{ROOT / 'recipes/tiny/lora.yaml'}); skipping it (set eval.exact_match=FILE to use another)"]
    # where the file exists, the recipe's default is used, without a word
    (tmp_path / "runs/tasks").mkdir(parents=True)
    (tmp_path / "runs/tasks/rl_test.jsonl").write_text('{"prompt": "a", "answer": "b"}\n')
    r = _cli_in(tmp_path, "lora", ROOT / "recipes/tiny/lora.yaml", "data.train=mine.jsonl", "--dry-run")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert yaml.safe_load(r.stdout)["eval"]["exact_match"] == "runs/tasks/rl_test.jsonl"


def test_a_missing_optional_file_named_on_the_command_line_is_an_error(tmp_path):
    for override in ("eval.exact_match=nope.jsonl", "eval={exact_match: nope.jsonl}"):
        with pytest.raises(UserError, match=r"^eval.exact_match: no such file nope.jsonl \(set eval.exact_match=null"):
            load_recipe(ROOT / "recipes/tiny/sft.yaml", [override], SftRecipe)
