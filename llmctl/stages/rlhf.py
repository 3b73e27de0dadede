"""`llmctl rlhf`: preference and RL training of a MODEL; the recipe's `method:` picks reward, dpo, ppo or grpo.

Each method builds a `loop.Task` (data, loss, trainable set, evaluation) and runs the one training loop:
reward models and DPO in llmctl/preference.py, PPO and GRPO (rollouts through the generate engine) in
llmctl/rl.py.
"""

from __future__ import annotations

import torch

from llmctl import loop
from llmctl.checkpoint import find_resume
from llmctl.dist import Dist


def run(recipe) -> dict:
    dist = Dist(recipe.train.precision, seed=recipe.seed)
    resume = find_resume(recipe.out_dir)
    torch.manual_seed(recipe.seed)
    if recipe.method in ("reward", "dpo"):
        from llmctl import preference as impl
    else:
        from llmctl import rl as impl
    task = impl.make_task(recipe, dist, resume)
    last = loop.train(recipe, task, dist, resume=resume)
    dist.end()
    return last
