"""Reward models: transformers' AutoModelForSequenceClassification loads what llmctl saves and gives the same scores
(fp32, 1e-4) on right-padded batches, and the other way round; save / load round trips; pooling reads the last real
token whatever the padding; from_causal_lm keeps the backbone; errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from llmctl.errors import UserError
from llmctl.hf import save_model
from llmctl.losses import bradley_terry_loss
from llmctl.model import ModelConfig, Transformer
from llmctl.reward import RewardModel, load_reward_model, save_reward_model

pytestmark = pytest.mark.usefixtures("one_thread")

V, PAD = 96, 0
TOL = dict(atol=1e-4, rtol=0)
LENGTHS = (12, 7, 3)


def causal_lm(**kw) -> Transformer:
    torch.manual_seed(0)
    base = dict(vocab_size=V, n_layer=2, n_head=4, n_embd=32, block_size=32, bos_token_id=1, eos_token_id=2,
                pad_token_id=PAD)  # fmt: skip
    model = Transformer(ModelConfig(**{**base, **kw}))
    with torch.no_grad():  # perturb norms and biases so that a wrong mapping shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def reward_model(**kw) -> RewardModel:
    return RewardModel.from_causal_lm(causal_lm(**kw), score_std=0.5).eval()


def padded_batch(lengths=LENGTHS, T=12, seed=1):
    """Right-padded rows of real tokens (ids 3.., never the pad id) and their attention mask."""
    idx = torch.randint(3, V, (len(lengths), T), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
    return idx.masked_fill(mask == 0, PAD), mask


FAMILIES = [
    (dict(arch="llama", n_kv_head=2), "LlamaForSequenceClassification"),
    (dict(arch="llama", qkv_bias=True), "Qwen2ForSequenceClassification"),
    (dict(arch="gpt2"), "GPT2ForSequenceClassification"),
]


@pytest.mark.parametrize("kw, hf_class", FAMILIES)
def test_llmctl_to_transformers_and_back(tmp_path, kw, hf_class):
    transformers = pytest.importorskip("transformers")
    rm = reward_model(**kw)
    save_reward_model(rm, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == [hf_class] and cfg["pad_token_id"] == PAD
    keys = set(load_file(tmp_path / "model.safetensors"))
    prefix = "model." if kw["arch"] == "llama" else "transformer."
    assert "score.weight" in keys and all(k.startswith(prefix) for k in keys - {"score.weight"})
    assert not any(k.startswith(("lm_head", "backbone")) for k in keys)

    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert type(hf).__name__ == hf_class and hf.config.num_labels == 1
    idx, mask = padded_batch()
    with torch.no_grad():
        ours = rm(idx, mask)
        torch.testing.assert_close(hf(idx, attention_mask=mask).logits[:, 0], ours, **TOL)
        torch.testing.assert_close(load_reward_model(tmp_path)(idx, mask), ours, atol=0, rtol=0)  # round trip
        # transformers -> llmctl: a folder transformers saved loads and scores the same
        hf.save_pretrained(tmp_path / "hf")
        torch.testing.assert_close(load_reward_model(tmp_path / "hf")(idx, mask), ours, **TOL)


def test_pooling_reads_the_last_real_token():
    rm = reward_model(arch="llama")
    idx, mask = padded_batch()
    with torch.no_grad():
        scores = rm(idx, mask)
        alone = torch.stack([rm(idx[i : i + 1, :n])[0] for i, n in enumerate(LENGTHS)])  # each row unpadded
        torch.testing.assert_close(scores, alone, **TOL)
        junk = idx.masked_fill(mask == 0, 5)  # what fills the padding does not matter, only the mask
        torch.testing.assert_close(rm(junk, mask), scores, **TOL)
        wider = torch.cat([idx, torch.full((3, 4), PAD)], dim=1)  # more padding changes nothing
        torch.testing.assert_close(rm(wider, torch.cat([mask, torch.zeros(3, 4, dtype=torch.long)], 1)), scores, **TOL)
        per_token = rm(idx, mask, per_token=True)  # [B, T]: the pooled score is the last real token's
        assert per_token.shape == idx.shape
        torch.testing.assert_close(per_token[torch.arange(3), torch.tensor(LENGTHS) - 1], scores, **TOL)
        torch.testing.assert_close(rm(idx), rm(idx, per_token=True)[:, -1], **TOL)  # no mask: the last position


def test_from_causal_lm():
    lm = causal_lm(arch="llama")
    idx, mask = padded_batch()
    with torch.no_grad():
        hidden = lm(idx, return_hidden=True)
        rm = RewardModel.from_causal_lm(lm, score_std=0.0)  # takes the weights over
        assert not hasattr(rm.backbone, "lm_head") and rm.backbone is lm
        assert not any(n.startswith("backbone.lm_head") for n, _ in rm.named_parameters())
        assert (rm(idx, mask) == 0).all()  # a zero score head
        rm.score.weight.normal_()
        torch.testing.assert_close(rm(idx, per_token=True), (hidden @ rm.score.weight.t())[..., 0], **TOL)


def test_training_step_moves_the_margin():
    rm = reward_model(arch="gpt2").train()
    chosen, rejected = padded_batch(seed=2), padded_batch(seed=3)
    opt = torch.optim.SGD(rm.parameters(), lr=0.1)
    margins = []
    for _ in range(2):
        margin = rm(*chosen) - rm(*rejected)
        bradley_terry_loss(margin, torch.zeros_like(margin)).mean().backward()
        assert rm.backbone.transformer.h[0].attn.c_attn.weight.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad()
        margins.append(margin.detach())
    assert (margins[1] > margins[0]).all()


def test_pad_id_tokenizer_files_and_errors(tmp_path):
    rm = reward_model(arch="llama", pad_token_id=None)
    with pytest.raises(UserError, match="pad token"):
        save_reward_model(rm, tmp_path / "rm")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    save_reward_model(rm, tmp_path / "rm", pad_token_id=3, tokenizer_dir=tmp_path / "tok")  # an explicit pad id
    assert json.loads((tmp_path / "rm" / "config.json").read_text())["pad_token_id"] == 3
    assert (tmp_path / "rm" / "tokenizer.json").is_file()
    save_model(causal_lm(arch="llama"), tmp_path / "lm")
    with pytest.raises(UserError, match="not a reward model"):
        load_reward_model(tmp_path / "lm")
