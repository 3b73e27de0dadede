"""Rewards. A reward model: the llmctl Transformer as a backbone (no lm_head) plus a scalar `score` head, read at
the last real token of each row; saved as a Hugging Face sequence-classification folder. And `Rewards`, what RL's
rl.reward names: exact match, such a reward model, or a Python function.

A folder written by `save_reward_model` loads with `transformers.AutoModelForSequenceClassification` as
`LlamaForSequenceClassification` / `Qwen2ForSequenceClassification` / `GPT2ForSequenceClassification`
(num_labels=1; weights `model.*` or `transformer.*` plus `score.weight`) and gives the same scores when
transformers pools the same token as we do. We pool the rightmost position whose attention_mask is 1; transformers
(>= 4.48, 5.x) pools the rightmost token whose id is not config.json's `pad_token_id` (4.4x: the token before the
first pad id). Both are the last real token when rows are RIGHT-padded with pad_token_id and the pad id does not
occur among the real tokens (with transformers 5.x: is not a row's last real token), so use a dedicated pad token,
never eos when sequences end with eos.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from llmctl.checkpoint import resolve_model_dir
from llmctl.errors import UserError
from llmctl.config import ModelConfig, reward_kind
from llmctl.hf import (IGNORED_KEYS, _as_dtype, _read_json, _weight_files, check_keys, config_from_hf, config_to_hf,
                       load_state, write_folder)  # fmt: skip
from llmctl.model import Transformer, unwrap


class RewardModel(nn.Module):
    """`backbone` (a Transformer whose lm_head is removed) + `score` = nn.Linear(n_embd, 1, bias=False).

    forward(idx, attention_mask) -> one fp32 score per row, from the final hidden state at the last position where
    attention_mask is 1 (the last token when no mask is given); per_token=True gives every position's score [B, T]
    (a value head for PPO). The mask is also the attention mask, so left padding attends correctly too (pooling
    still picks each row's rightmost real token).
    """

    def __init__(self, backbone: Transformer, score_std: float | None = None):
        """Takes `backbone` over: its lm_head is deleted (for tied embeddings the token embedding stays).
        score_std: std of the score head's normal init, default 1 / sqrt(n_embd + 1) (as OpenAI's lm-human-preferences);
        0 gives a zero head (every score 0 until trained)."""
        super().__init__()
        if hasattr(backbone, "lm_head"):
            del backbone.lm_head  # unused, and a parameter without gradient would upset DDP
        self.backbone = backbone
        self.config = backbone.config
        w = backbone.get_input_embeddings().weight
        self.score = nn.Linear(self.config.n_embd, 1, bias=False, device=w.device, dtype=w.dtype)
        std = 1 / math.sqrt(self.config.n_embd + 1) if score_std is None else score_std
        nn.init.normal_(self.score.weight, 0.0, std)

    @classmethod
    def from_causal_lm(cls, model: nn.Module, score_std: float | None = None) -> RewardModel:
        """A reward model from a causal LM (e.g. `hf.load_model(init_from)`), unwrapping torch.compile / DDP.
        It takes the model's weights over and removes its lm_head: pass a copy to keep the causal LM."""
        return cls(unwrap(model, Transformer), score_std)

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                per_token: bool = False) -> torch.Tensor:  # fmt: skip
        """idx [B, T]; attention_mask [B, T] (1 = real token) or None. Returns scores [B] (or [B, T]), fp32."""
        h = self.backbone(idx, attn_mask=attention_mask, return_hidden=True)  # [B, T, C]
        if per_token:
            return self.score(h).squeeze(-1).float()  # [B, T]
        B, T = idx.shape
        if attention_mask is None:
            last = torch.full((B,), T - 1, device=idx.device)
        else:  # rightmost real position, as transformers finds the rightmost non-pad id
            last = (torch.arange(T, device=idx.device) * attention_mask.to(torch.long)).argmax(-1)  # [B]
        return self.score(h[torch.arange(B, device=idx.device), last]).squeeze(-1).float()  # [B]


# ------------------------------------------------------------------------------------------------------ save / load


def reward_config_to_hf(cfg: ModelConfig, pad_token_id: int, dtype: torch.dtype = torch.float32) -> dict:
    """hf.config_to_hf's dict for the sequence-classification head: architectures, one label, pad_token_id."""
    d = config_to_hf(cfg, dtype)
    arch = d["architectures"][0].removesuffix("ForCausalLM").removesuffix("LMHeadModel") + "ForSequenceClassification"
    d.update(architectures=[arch], pad_token_id=pad_token_id, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
             use_cache=False)  # fmt: skip
    return dict(sorted(d.items()))


def save_reward_model(model: nn.Module, out_dir, *, pad_token_id: int | None = None, tokenizer_dir=None,
                      dtype=None) -> Path:  # fmt: skip
    """Write a Hugging Face sequence-classification folder: config.json, model.safetensors and the tokenizer files
    found in `tokenizer_dir`. pad_token_id (default: the model config's) is required: transformers finds the
    pooled token by it (see the module doc). dtype: weights dtype (default: the model's)."""
    model = unwrap(model, RewardModel)
    cfg = model.config
    pad = cfg.pad_token_id if pad_token_id is None else pad_token_id
    if pad is None:
        raise UserError("a reward model needs a pad token id (transformers pools the last non-pad token): "
                        "give the tokenizer a pad token")  # fmt: skip
    dtype = _as_dtype(dtype) if dtype is not None else model.score.weight.dtype
    state = {k.removeprefix("backbone."): t for k, t in model.state_dict().items()}
    return write_folder(out_dir, state, cfg.arch, dtype, {"config.json": reward_config_to_hf(cfg, pad, dtype)},
                        tokenizer_dir)


def load_reward_model(path, *, device="cpu", dtype=torch.float32) -> RewardModel:
    """A RewardModel (in eval mode) from a sequence-classification folder (written by save_reward_model or by
    transformers, num_labels=1) or a run directory's newest complete checkpoint. Safetensors only."""
    d = resolve_model_dir(path)
    cfg = config_from_hf(_read_json(d / "config.json"))
    files = _weight_files(d)
    with torch.device("meta"):
        backbone = Transformer(cfg)
    model = RewardModel(backbone.to_empty(device=device), score_std=0.0).to(_as_dtype(dtype))
    params = dict(model.state_dict(keep_vars=True))

    def rename(key):
        name = key if key == "score.weight" else "backbone." + key
        return None if IGNORED_KEYS.search(name) else name

    loaded, unexpected = load_state(params, files, rename, cfg.arch, "reward model")
    missing = sorted(k.removeprefix("backbone.") for k in set(params) - loaded)  # as the file names them
    check_keys(d, missing, unexpected, "reward model",
               " (a causal LM, not a reward model?)" if "score.weight" in missing else "")
    return model.eval()


# ------------------------------------------------------------------------------------------------------ RL rewards


def load_reward_function(spec: str) -> Callable:
    """path/to/file.py:function -> the function (imported from the file, not from sys.path)."""
    path, _, name = spec.rpartition(":")
    p = Path(path)
    mod_spec = importlib.util.spec_from_file_location(f"llmctl_reward_{abs(hash(str(p.resolve())))}", p)
    if mod_spec is None or mod_spec.loader is None:
        raise UserError(f"rl.reward: cannot import {path} (expected a .py file)")
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's code
        raise UserError(f"rl.reward: importing {path} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        have = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise UserError(f"rl.reward: {path} has no function {name!r} (functions there: {', '.join(have) or 'none'})")
    return fn


class Rewards:
    """One reward per completion, from rl.reward (its form checked by config.reward_kind):
    exact-match                 1.0 when the completion matches the row's "answer" (evaluate.matches), else 0.0;
    a reward MODEL directory    its score on prompt + response tokens, as the policy saw them (it must share the
                                policy's tokenizer);
    path/to/file.py:function    function(completion: str, answer, prompt: str) -> float, called once per
                                completion (answer: the row's "answer", None when the row has none)."""

    def __init__(self, spec: str, tok, vocab_size: int):
        self.spec, self.kind, self.fn, self.model = spec, reward_kind(spec), None, None
        if self.kind == "function":
            self.fn = load_reward_function(spec)
        elif self.kind == "model":
            from llmctl.hf import load_config

            self.dir = resolve_model_dir(spec)
            n = load_config(self.dir).vocab_size
            if n != vocab_size:
                raise UserError(f"rl.reward: the reward model {self.dir} has a vocabulary of {n} tokens, the "
                                f"policy {vocab_size}: it must share the policy's tokenizer")
            self.pad = tok.pad_id if tok.pad_id is not None else 0

    def __call__(self, rows, completions, seqs, device) -> list[float]:
        if self.kind == "exact-match":
            from llmctl.evaluate import matches

            return [float(matches(c, r["answer"])) for r, c in zip(rows, completions)]
        if self.kind == "function":
            out = []
            for r, c in zip(rows, completions):
                try:
                    v = float(self.fn(c, r["answer"], r["prompt"]))
                except Exception as e:  # noqa: BLE001 - the user's code
                    raise UserError(f"rl.reward: {self.spec} raised {type(e).__name__}: {e}") from None
                if not math.isfinite(v):
                    raise UserError(f"rl.reward: {self.spec} returned {v} for completion {c!r}")
                out.append(v)
            return out
        if self.model is None:
            self.model = load_reward_model(self.dir, device=device).requires_grad_(False)
        from llmctl.examples import pad_right

        b = pad_right(seqs, self.pad)
        with torch.no_grad():
            return self.model(b["idx"].to(device), b["attention_mask"].to(device)).cpu().tolist()

