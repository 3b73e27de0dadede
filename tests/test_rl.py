"""GRPO and PPO (llmctl/stages/rl.py): resume = uninterrupted (half and half, and a SIGTERM anywhere in a rollout buffer),
a positive kl_coef keeps the policy closer to the reference than kl_coef 0, Python reward functions, group
advantages, the PPO value head in checkpoints, LoRA's reference, errors for bad reward specs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_llama, sigterm_after_losses

from llmctl import hf
from llmctl.config import RlhfRecipe, load_recipe
from llmctl.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in
           [(1, 2), (3, 4), (10, 5), (7, 7), (2, 9), (12, 30), (8, 1), (6, 6), (4, 4), (5, 0), (9, 9), (3, 3)]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tok_dir):
    d = tmp_path_factory.mktemp("rl")
    save_tiny_llama(d / "base", tok_dir, block_size=96)
    data = d / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    (d / "reward_fn.py").write_text(
        "import json, os\n"
        "def has_e(completion, answer, prompt):\n"
        "    return 1.0 if 'e' in completion else 0.0\n"
        "def constant(completion, answer, prompt):\n"
        "    with open(os.environ['RL_TEST_LOG'], 'a') as f:\n"
        "        f.write(json.dumps([completion, answer, prompt]) + '\\n')\n"
        "    return 0.25\n")
    recipe = d / "r.yaml"
    recipe.write_text(f"method: grpo\ninit_from: {d / 'base'}\ndata:\n  train: {data}\n"
                      "train:\n  micro_batch_size: 4\n  log_every: 1\n  eval_every: 0\n  save_every: 0\n"
                      "optim:\n  lr: 3.0e-3\nrl:\n  prompts_per_step: 4\n  group_size: 4\n  max_new_tokens: 6\n"
                      "  epochs: 2\n  minibatches: 2\n  reward: exact-match\n")
    return d, recipe


def run(recipe, *overrides):
    from llmctl.stages import rl

    return rl.run(load_recipe(recipe, list(overrides), RlhfRecipe))


def events(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def trace(out):
    keys = ("loss", "reward", "kl", "response_len", "clipfrac", "value_loss")
    return {e["step"]: tuple(e.get(k) for k in keys) for e in events(out) if "loss" in e}


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_resume_equals_uninterrupted(setup, method):
    """4 optimizer steps per rollout buffer (2 epochs x 2 minibatches): stopping after step 5 stops inside one."""
    d, recipe = setup
    straight, split = d / f"{method}-straight", d / f"{method}-split"
    args = [f"method={method}", "rl.kl_coef=0.1", "rl.reward=" + f"{d / 'reward_fn.py'}:has_e"]
    run(recipe, f"out_dir={straight}", "train.max_steps=10", *args)
    run(recipe, f"out_dir={split}", "train.max_steps=5", *args)
    run(recipe, f"out_dir={split}", "train.max_steps=10", *args)
    a, b = trace(straight), trace(split)
    assert sorted(a) == list(range(1, 11)) and a == b
    assert len({v[0] for v in a.values()}) > 3  # the losses move: not trivially equal
    ck = split / "checkpoints" / "step-0000010"
    assert (ck / "config.json").is_file() and (ck / "task_state-0.pt").is_file()
    if method == "ppo":  # the value head travels next to a plain model directory
        assert (ck / "value_head.safetensors").is_file()
        from transformers import AutoModelForCausalLM

        x = torch.tensor([[1, 5, 9, 3]])
        ours = hf.load_model(ck)(x)
        with torch.no_grad():
            theirs = AutoModelForCausalLM.from_pretrained(str(ck)).eval()(x).logits
        assert (ours - theirs).abs().max() <= 1e-4


def test_sigterm_anywhere_resumes_exactly(setup):
    d, recipe = setup
    steps = ["train.max_steps=60", "rl.epochs=3", "rl.minibatches=1"]
    straight, out = d / "sig-straight", d / "sig-run"
    run(recipe, f"out_dir={straight}", *steps)
    cmd = [sys.executable, "-m", "llmctl", "rlhf", recipe, f"out_dir={out}", *steps]
    code, err = sigterm_after_losses(cmd, out, 4, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert code == 143 and "SIGTERM" in err, err  # saved, then exit 128 + 15
    first = max(trace(out))
    assert first < 60, "the run ended before the signal arrived"
    run(recipe, f"out_dir={out}", *steps)
    assert trace(out) == trace(straight)


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_kl_coef_keeps_the_policy_near_the_reference(setup, method):
    d, recipe = setup
    reward = f"rl.reward={d / 'reward_fn.py'}:has_e"
    kls = {}
    for coef in (0.0, 1.0):
        out = d / f"kl-{method}-{coef}"
        run(recipe, f"out_dir={out}", f"method={method}", reward, f"rl.kl_coef={coef}", "train.max_steps=24",
            "rl.epochs=1", "rl.minibatches=1", "optim.lr=1.0e-2")  # fmt: skip
        kl = [e["kl"] for e in events(out) if "kl" in e]
        kls[coef] = sum(kl[-8:]) / 8
    assert kls[0.0] > 0.05, kls  # the reward does move the policy away
    assert kls[1.0] < 0.5 * kls[0.0], kls


def test_python_reward_function_and_group_advantages(setup, tmp_path, monkeypatch):
    from llmctl.stages import rl
    from llmctl.dist import Dist

    d, recipe = setup
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("RL_TEST_LOG", str(log))
    cfg = load_recipe(recipe, [f"out_dir={tmp_path / 'run'}", f"rl.reward={d / 'reward_fn.py'}:constant"], RlhfRecipe)
    task = rl.build(cfg, Dist("fp32", seed=cfg.seed), None)
    rt = task.batches.__self__
    micro = task.batches(0)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) == 16 and all(isinstance(c, str) for c, _, _ in calls)
    assert {(a, p) for _, a, p in calls} <= {(r["answer"], r["prompt"]) for r in PROMPTS}
    assert task.stats()["reward"] == pytest.approx(0.25)
    assert all(float(b["adv"].abs().max()) == 0 for b in micro)  # equal rewards: no signal
    # exact match: advantages are constant along a completion and zero-mean within each group
    cfg = load_recipe(recipe, [f"out_dir={tmp_path / 'run2'}", "rl.temperature=3.0"], RlhfRecipe)
    rt = rl.build(cfg, Dist("fp32", seed=cfg.seed), None).batches.__self__
    b = rt.rollout(0)
    keep = b["keep"]
    seq_adv = torch.stack([b["adv"][i][keep[i]][0] for i in range(len(keep))])
    assert all(torch.allclose(b["adv"][i][keep[i]], seq_adv[i].expand(int(keep[i].sum()))) for i in range(len(keep)))
    assert torch.allclose(seq_adv.view(-1, 4).mean(1), torch.zeros(4), atol=1e-6)
    r = b["reward"].view(-1, 4)
    want = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True, unbiased=False) + 1e-6)
    assert torch.allclose(seq_adv.view(-1, 4), torch.where(r.std(1, keepdim=True) > 0, want, 0.0), atol=1e-5)
    # the rollout-time log-probs are the policy's: the first step's ratio is exactly 1
    mb = rt.batches(0)[0]
    with torch.no_grad():
        logp, _ = rt.ac(mb["idx"], mb["keep"], mb["targets"])
    assert torch.allclose(logp, mb["old_logp"], atol=1e-5)


def test_reward_model_scores_prompt_and_response(setup, tmp_path, tok_dir):
    from llmctl.stages import rl
    from llmctl.dist import Dist
    from llmctl.reward import RewardModel, load_reward_model, save_reward_model

    d, recipe = setup
    torch.manual_seed(1)
    rm = RewardModel.from_causal_lm(hf.load_model(d / "base"), score_std=1.0)
    save_reward_model(rm, tmp_path / "rm", tokenizer_dir=tok_dir)
    cfg = load_recipe(recipe, [f"out_dir={tmp_path / 'run'}", "method=ppo", f"rl.reward={tmp_path / 'rm'}",
                               "rl.prompts_per_step=6"], RlhfRecipe)  # fmt: skip
    rt = rl.build(cfg, Dist("fp32", seed=cfg.seed), None).batches.__self__
    b = rt.rollout(0)
    rm = load_reward_model(tmp_path / "rm")
    for i in range(6):  # each sequence alone: prompt + sampled response
        n = int(b["keep"][i].nonzero().max()) + 1
        seq = torch.cat([b["idx"][i, :n], b["targets"][i, n - 1 : n]])[None]
        with torch.no_grad():
            assert rm(seq).item() == pytest.approx(b["reward"][i].item(), abs=1e-5)
    assert b["reward"].std() > 0
    # PPO: the reward sits on the last response token, the KL penalty on every one; advantages are whitened
    keep = b["keep"]
    assert abs(float(b["adv"][keep].mean())) < 1e-5 and float(b["adv"][~keep].abs().max()) == 0


def test_lora_reference_is_the_base_with_adapters_off(setup):
    d, recipe = setup
    out = d / "lora"
    run(recipe, f"out_dir={out}", "lora.enabled=true", "train.max_steps=2", "rl.epochs=1", "rl.minibatches=1")
    ev = [e for e in events(out) if "kl" in e]
    assert ev[0]["kl"] == 0.0  # LoRA's B starts at zero: the policy is the base
    assert (out / "checkpoints" / "step-0000002" / "adapter_config.json").is_file()


@pytest.mark.parametrize("spec, message", [
    ("nope.py:fn", "rl.reward: no such file: nope.py"),
    ("{d}/reward_fn.py:missing", "has no function 'missing' (functions there: constant, has_e)"),
    ("{d}/reward_fn.py", "names no function"),
    ("no/such/model", "expected exact-match, a reward model directory or path/to/file.py:function"),
])
def test_bad_reward_specs(setup, tmp_path, spec, message):
    from llmctl.stages import rl
    from llmctl.dist import Dist

    d, recipe = setup
    with pytest.raises(UserError) as e:  # the form of rl.reward (and a missing file) already in the recipe check
        cfg = load_recipe(recipe, [f"out_dir={tmp_path}", f"rl.reward={spec.format(d=d)}"], RlhfRecipe)
        rl.build(cfg, Dist("fp32"), None)
    assert message in str(e.value)


def test_cli_errors_exit_2_with_one_line(setup, tmp_path):
    _, recipe = setup
    no_answer = tmp_path / "p.jsonl"
    no_answer.write_text('{"prompt": "hi"}\n')
    r = subprocess.run([sys.executable, "-m", "llmctl", "rlhf", str(recipe), f"out_dir={tmp_path / 'x'}",
                        f"data.train={no_answer}"], capture_output=True, text=True, cwd=ROOT, check=False)  # fmt: skip
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert 'p.jsonl:1: rl.reward exact-match needs an "answer"' in lines[0]
