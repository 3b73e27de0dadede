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
