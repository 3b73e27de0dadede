"""The model config and the recipes: YAML -> typed dataclasses, with `key.path=value` overrides, strict checking
and a YAML dump. This module imports no torch: `--dry-run` checks a whole recipe, model included, at once.

Every key a recipe may hold is a dataclass field below; an unknown key, a value of the wrong type, a value
outside a field's `choices` or its range (`bounded`: every number has its domain; no float may be NaN or
infinite) and a combination of values that cannot work (`validate()` of a recipe class, e.g. model.n_embd not
divisible by model.n_head) raise UserError naming the dotted key, so `--dry-run` catches them.

A field declared with `optional_file` names a file the run can do without (an evaluation set): when the recipe
file names one that does not exist, it is skipped with a warning (the resolved recipe shows null); when an
override names one that does not exist, that is an error.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from llmctl.errors import UserError
from llmctl.schema import (bounded, choice, field_meta, from_dict, get_path, is_section, keys_of,
                           load_yaml, optional_file, parse_override, set_path, unknown_key)  # fmt: skip

from llmctl.arch import ARCHS, ModelConfig, llama_intermediate_size  # noqa: F401  (the model section's type)


# ------------------------------------------------------------------------------------------- sections

SEED_MAX = 2**63 - 1  # torch.manual_seed and numpy's SeedSequence take it; negative seeds they do not


# The recipe's model section is a subset of ModelConfig's fields, declared from it (same types and domains) with
# the defaults of a small model; ModelConfig itself checks the combination (model_config), so --dry-run does too.
MODEL_KEYS = ("arch", "n_layer", "n_head", "n_kv_head", "n_embd", "block_size", "intermediate_size", "rope_theta",
              "qkv_bias", "tie_embeddings", "dropout")  # fmt: skip
_MODEL_DEFAULTS = {"n_layer": 6, "n_head": 8, "n_embd": 256, "block_size": 256, "tie_embeddings": False}
ModelSection = dataclasses.make_dataclass("ModelSection", [
    (f.name, typing.get_type_hints(ModelConfig)[f.name],
     field(default=_MODEL_DEFAULTS.get(f.name, f.default), metadata=f.metadata))
    for f in sorted((f for f in dataclasses.fields(ModelConfig) if f.name in MODEL_KEYS),
                    key=lambda f: MODEL_KEYS.index(f.name))])  # fmt: skip


def model_config(section, **more) -> ModelConfig:
    """The ModelConfig a recipe's model section describes (`more`: vocab_size, special token ids); a combination
    ModelConfig refuses is a UserError naming the key. gpt2 always ties its embeddings."""
    d = dataclasses.asdict(section)
    d["tie_embeddings"] = section.tie_embeddings or section.arch == "gpt2"
    try:
        return ModelConfig(**d, **more)
    except ValueError as e:
        raise UserError(str(e)) from None


@dataclass
class DataSection:
    train: str = ""  # a shard directory written by `llmctl tokenize encode` (or one of its .bin files)
    # None: the val split of data.train's directory; a directory without one (encoded with --val-fraction 0):
    # its train split
    val: Optional[str] = optional_file()


@dataclass
class TrainSection:
    max_steps: int = bounded(1000, ge=1)
    micro_batch_size: int = bounded(8, ge=1)
    grad_accum: int = bounded(1, ge=1)
    precision: str = choice("fp32", "fp32", "bf16", "fp16")
    eval_every: int = bounded(100, ge=0)  # 0: never (but still at the start and the end)
    eval_batches: int = bounded(8, ge=1)  # micro-batches of val windows per evaluation
    save_every: int = bounded(500, ge=0)  # 0: only at the end
    keep_last: int = bounded(2, ge=0)  # complete checkpoints kept; 0 keeps all
    log_every: int = bounded(10, ge=1)
    grad_clip: float = bounded(1.0, ge=0)  # 0: no clipping
    compile: bool = False
    gradient_checkpointing: bool = False
    peak_tflops: Optional[float] = bounded(None, gt=0)  # the device's peak for the MFU estimate; None: known GPUs only
    # this many non-finite (skipped) steps in a row stop the run with an error; 0: never
    max_bad_steps: int = bounded(10, ge=0)
    # CPU threads (PyTorch and native kernels); None: llmctl's policy (see threads.py)
    threads: Optional[int] = bounded(None, ge=1)


@dataclass
class OptimSection:
    lr: float = bounded(3e-4, gt=0)
    min_lr_ratio: float = bounded(0.1, ge=0, le=1)  # the schedule's floor, as a fraction of lr
    weight_decay: float = bounded(0.1, ge=0)
    beta1: float = bounded(0.9, ge=0, lt=1)
    beta2: float = bounded(0.95, ge=0, lt=1)
    eps: float = bounded(1e-8, gt=0)
    warmup_steps: int = bounded(100, ge=0)
    schedule: str = choice("cosine", "cosine", "wsd", "constant")
    decay_fraction: float = bounded(0.2, ge=0, le=1)  # wsd: the final fraction of steps that decays to the floor
    fused: Optional[bool] = None  # None: fused AdamW where the device supports it


@dataclass
class PretrainRecipe:
    out_dir: str = ""
    seed: int = bounded(1337, ge=0, le=SEED_MAX)
    tokenizer: str = ""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)

    REQUIRED = ("out_dir", "tokenizer", "data.train")

    def validate(self) -> None:
        model_config(self.model)


@dataclass
class SftDataSection:
    train: str = ""  # SFT JSONL: {"messages": [...]} or {"prompt": ..., "completion": ...}
    val: Optional[str] = optional_file()  # SFT JSONL for val_loss / val_bpb; None: no validation loss
    packing: bool = True  # several examples per row (no attention across them); false: one per row, padded
    block_size: Optional[int] = bounded(None, ge=1)  # row length; None: the model's block_size
    limit: Optional[int] = bounded(None, ge=1)  # only the first N training examples


@dataclass
class SftEvalSection:
    exact_match: Optional[str] = optional_file()  # {"prompt", "answer"} JSONL scored by greedy generation at each eval
    chat: bool = True  # the exact-match prompts go through the chat template as user messages
    max_new_tokens: int = bounded(32, ge=1)
    limit: Optional[int] = bounded(200, ge=1)  # at most this many exact-match records


@dataclass
class SftTrainSection(TrainSection):
    max_steps: int = 300
    eval_every: int = 100
    save_every: int = 100


@dataclass
class SftOptimSection(OptimSection):
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10


@dataclass
class SftRecipe:
    out_dir: str = ""
    seed: int = bounded(1337, ge=0, le=SEED_MAX)
    init_from: str = ""  # a MODEL: a model directory, a run directory, or a local Hugging Face checkpoint
    data: SftDataSection = field(default_factory=SftDataSection)
    train: SftTrainSection = field(default_factory=SftTrainSection)
    optim: SftOptimSection = field(default_factory=SftOptimSection)
    eval: SftEvalSection = field(default_factory=SftEvalSection)

    REQUIRED = ("out_dir", "init_from", "data.train")


@dataclass
class LoraSection:
    r: int = bounded(8, ge=1)
    alpha: float = bounded(16.0, gt=0)
    dropout: float = bounded(0.05, ge=0, lt=1)
    # a preset -- attention (q/k/v/o), mlp, all-linear (both) -- or module names, comma-separated
    targets: str = "all-linear"
    rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r
    dora: bool = False  # weight-decomposed LoRA (peft's use_dora)
    quantize: str = choice("none", "none", "4bit")  # 4bit: QLoRA (NF4 base through bitsandbytes, CUDA only)


@dataclass
class LoraOptimSection(SftOptimSection):
    lr: float = 1e-3


@dataclass
class LoraRecipe(SftRecipe):
    optim: LoraOptimSection = field(default_factory=LoraOptimSection)
    lora: LoraSection = field(default_factory=LoraSection)


@dataclass
class RlhfDataSection:
    train: str = ""  # reward / dpo: {"prompt", "chosen", "rejected"}; ppo / grpo: {"prompt", "answer"} JSONL
    # held-out file of the same kind (pairwise accuracy, or exact-match for ppo / grpo)
    val: Optional[str] = optional_file()
    chat: bool = True  # prompts go through the chat template as user messages, responses as assistant turns
    block_size: Optional[int] = bounded(None, ge=1)  # None: the model's block_size
    limit: Optional[int] = bounded(None, ge=1)


@dataclass
class RlhfLoraSection(LoraSection):
    enabled: bool = False  # train LoRA adapters instead of every weight (the reference = adapters disabled)


@dataclass
class DpoSection:
    beta: float = bounded(0.1, gt=0)
    label_smoothing: float = bounded(0.0, ge=0, lt=0.5)  # conservative DPO
    loss_type: str = choice("sigmoid", "sigmoid", "ipo")


@dataclass
class RlSection:
    reward: str = "exact-match"  # exact-match (answers of data.train), a reward MODEL dir, or path/to/file.py:function
    prompts_per_step: int = bounded(8, ge=1)  # prompts rolled out per rollout batch (each process)
    group_size: int = bounded(4, ge=1)  # grpo: samples per prompt, >= 2 (ppo: 1)
    max_new_tokens: int = bounded(16, ge=1)
    temperature: float = bounded(1.0, gt=0)  # rollouts are sampled
    top_p: float = bounded(1.0, gt=0, le=1)
    epochs: int = bounded(1, ge=1)  # optimizer passes over each rollout batch
    # optimizer steps per pass: each pass cuts the rollout batch into this many parts (at most its sequences)
    minibatches: int = bounded(1, ge=1)
    clip: float = bounded(0.2, gt=0)  # the clipped objective's epsilon
    kl_coef: float = bounded(0.0, ge=0)  # grpo: KL-to-reference loss weight; ppo: per-token KL penalty in the reward
    kl_estimator: str = choice("k3", "k1", "k2", "k3")
    gamma: float = bounded(1.0, ge=0, le=1)  # ppo: GAE discount
    lam: float = bounded(0.95, ge=0, le=1)  # ppo: GAE lambda
    vf_coef: float = bounded(0.5, ge=0)  # ppo: value loss weight
    value_clip: float = bounded(0.2, gt=0)  # ppo: value clipping


@dataclass
class RlhfOptimSection(SftOptimSection):
    lr: float = 1e-5
    warmup_steps: int = 0
    schedule: str = choice("constant", "cosine", "wsd", "constant")


@dataclass
class RlhfRecipe:
    out_dir: str = ""
    seed: int = bounded(1337, ge=0, le=SEED_MAX)
    method: str = choice("dpo", "reward", "dpo", "ppo", "grpo")
    init_from: str = ""  # the policy (dpo / ppo / grpo) or the backbone of the reward model (reward)
    ref_from: Optional[str] = None  # the frozen reference; None: init_from (with LoRA: the base, adapters off)
    data: RlhfDataSection = field(default_factory=RlhfDataSection)
    train: SftTrainSection = field(default_factory=SftTrainSection)
    optim: RlhfOptimSection = field(default_factory=RlhfOptimSection)
    lora: RlhfLoraSection = field(default_factory=RlhfLoraSection)
    dpo: DpoSection = field(default_factory=DpoSection)
    rl: RlSection = field(default_factory=RlSection)
    eval: SftEvalSection = field(default_factory=SftEvalSection)

    REQUIRED = ("out_dir", "method", "init_from", "data.train")

    def validate(self) -> None:
        if self.method == "reward" and self.lora.enabled:
            raise UserError("lora.enabled: method reward trains every weight of the reward model; lora.enabled is "
                            "for dpo, ppo, grpo")
        if self.method in ("ppo", "grpo"):
            rl = self.rl
            if self.method == "grpo" and rl.group_size < 2:
                raise UserError(f"rl.group_size: must be >= 2 for grpo (advantages are relative to the group), "
                                f"got {rl.group_size}")
            n = rl.prompts_per_step * (1 if self.method == "ppo" else rl.group_size)
            if rl.minibatches > n:
                what = "rl.prompts_per_step" if self.method == "ppo" else "rl.prompts_per_step x rl.group_size"
                raise UserError(f"rl.minibatches: must be at most the sequences of a rollout batch ({what} = {n}), "
                                f"got {rl.minibatches}")
            reward_kind(rl.reward)


def reward_kind(spec: str) -> str:
    """What rl.reward names: "exact-match", "function" (path/to/file.py:function, the file exists) or "model" (a
    directory, or a hub id in the local Hugging Face cache); anything else is a UserError (the function and the model are loaded by the stage)."""
    if spec == "exact-match":
        return spec
    if ".py:" in spec or spec.endswith(".py"):
        path, _, name = spec.rpartition(":")
        if ".py:" not in spec or not name:
            raise UserError(f"rl.reward: {spec!r} names no function (expected path/to/file.py:function)")
        if not Path(path).is_file():
            raise UserError(f"rl.reward: no such file: {path} (expected path/to/file.py:function)")
        return "function"
    if Path(spec).is_dir():
        return "model"
    from llmctl import hub

    if hub.hub_id(spec) is not None and ("/" in spec or "@" in spec):  # a hub id: in the cache, or the hint
        try:
            hub.resolve(spec)
        except UserError as e:
            raise UserError(f"rl.reward: {e}") from None
        return "model"
    raise UserError(f"rl.reward: expected exact-match, a reward model directory or path/to/file.py:function; "
                    f"got {spec!r} (no such directory)")


def load_recipe(path: Path, overrides: list[str], cls):
    """Read a recipe YAML, apply `key.path=value` overrides, and validate into `cls`."""
    data = load_yaml(path)
    for text in overrides:
        key, value = parse_override(text)
        if key not in keys_of(cls) and not is_section(cls, key):
            raise unknown_key(key, cls, " in overrides")
        set_path(data, key.split("."), value, cls, key)
    cfg = from_dict(cls, data, where=f" in {path}")
    for key in getattr(cls, "REQUIRED", ()):
        if get_path(cfg, key) in ("", None):
            raise UserError(f"{path}: missing required key '{key}'")
    if hasattr(cfg, "validate"):
        cfg.validate()
    _check_optional_files(cfg, path, [parse_override(t)[0] for t in overrides])
    return cfg


def _check_optional_files(cfg, path: Path, overridden: list[str]) -> None:
    """`optional_file` keys naming a missing file: an error when an override named it, else (the recipe file's
    value: a default the user may never have looked at) a warning, and the key becomes null."""
    for key in keys_of(type(cfg)):
        head, _, name = key.rpartition(".")
        section = get_path(cfg, head) if head else cfg
        value = getattr(section, name)
        if not value or not field_meta(type(section), name).get("optional_file") or Path(value).exists():
            continue
        if any(key == k or key.startswith(k + ".") for k in overridden):
            raise UserError(f"{key}: no such file {value} (set {key}=null to skip)")
        print(f"warning: {key}: no such file {value} (named in {path}); skipping it (set {key}=FILE to use "
              "another)", file=sys.stderr, flush=True)
        setattr(section, name, None)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_recipe(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
