"""Recipes: YAML -> typed dataclasses, with `key.path=value` overrides, strict checking and a YAML dump.

Every key a recipe may hold is a dataclass field below; an unknown key, a value of the wrong type or a value
outside a field's `choices` raises UserError naming the dotted key (with "did you mean" where one is close).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from llmctl.errors import UserError


def choice(default, *options):
    """A field whose value must be one of `options`."""
    return field(default=default, metadata={"choices": options})


# ------------------------------------------------------------------------------------------- sections


@dataclass
class ModelSection:
    arch: str = choice("llama", "llama", "gpt2")
    n_layer: int = 6
    n_head: int = 8
    n_kv_head: Optional[int] = None  # None: n_head (no grouped-query attention)
    n_embd: int = 256
    block_size: int = 256
    intermediate_size: Optional[int] = None  # None: llama ~8/3 n_embd (multiple of 64), gpt2 4 n_embd
    rope_theta: float = 10000.0
    qkv_bias: bool = False
    tie_embeddings: bool = False  # gpt2 always ties
    dropout: float = 0.0


@dataclass
class DataSection:
    train: str = ""  # a shard directory written by `llmctl tokenize encode` (or one of its .bin files)
    val: Optional[str] = None  # None: the val split of data.train's directory


@dataclass
class TrainSection:
    max_steps: int = 1000
    micro_batch_size: int = 8
    grad_accum: int = 1
    precision: str = choice("fp32", "fp32", "bf16", "fp16")
    eval_every: int = 100  # 0: never (but still at the start and the end)
    eval_batches: int = 8  # micro-batches of val windows per evaluation
    save_every: int = 500  # 0: only at the end
    keep_last: int = 2  # complete checkpoints kept; 0 keeps all
    log_every: int = 10
    grad_clip: float = 1.0  # 0: no clipping
    compile: bool = False
    gradient_checkpointing: bool = False
    peak_tflops: Optional[float] = None  # the device's peak for the MFU estimate; None: known GPUs only
    max_bad_steps: int = 10  # this many non-finite (skipped) steps in a row stop the run with an error; 0: never
    threads: Optional[int] = None  # CPU threads (PyTorch and native kernels); None: llmctl's policy (see threads.py)


@dataclass
class OptimSection:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # the schedule's floor, as a fraction of lr
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 100
    schedule: str = choice("cosine", "cosine", "wsd", "constant")
    decay_fraction: float = 0.2  # wsd: the final fraction of steps that decays to the floor
    fused: Optional[bool] = None  # None: fused AdamW where the device supports it


@dataclass
class PretrainRecipe:
    out_dir: str = ""
    seed: int = 1337
    tokenizer: str = ""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)

    REQUIRED = ("out_dir", "tokenizer", "data.train")


@dataclass
class SftDataSection:
    train: str = ""  # SFT JSONL: {"messages": [...]} or {"prompt": ..., "completion": ...}
    val: Optional[str] = None  # SFT JSONL for val_loss / val_bpb; None: no validation loss
    packing: bool = True  # several examples per row (no attention across them); false: one per row, padded
    block_size: Optional[int] = None  # row length; None: the model's block_size
    limit: Optional[int] = None  # only the first N training examples


@dataclass
class SftEvalSection:
    exact_match: Optional[str] = None  # {"prompt", "answer"} JSONL scored by greedy generation at each eval
    chat: bool = True  # the exact-match prompts go through the chat template as user messages
    max_new_tokens: int = 32
    limit: Optional[int] = 200  # at most this many exact-match records


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
    seed: int = 1337
    init_from: str = ""  # a MODEL: a model directory, a run directory, or a local Hugging Face checkpoint
    data: SftDataSection = field(default_factory=SftDataSection)
    train: SftTrainSection = field(default_factory=SftTrainSection)
    optim: SftOptimSection = field(default_factory=SftOptimSection)
    eval: SftEvalSection = field(default_factory=SftEvalSection)

    REQUIRED = ("out_dir", "init_from", "data.train")


@dataclass
class LoraSection:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
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
    val: Optional[str] = None  # held-out file of the same kind (pairwise accuracy, or exact-match for ppo / grpo)
    chat: bool = True  # prompts go through the chat template as user messages, responses as assistant turns
    block_size: Optional[int] = None  # None: the model's block_size
    limit: Optional[int] = None


@dataclass
class RlhfLoraSection(LoraSection):
    enabled: bool = False  # train LoRA adapters instead of every weight (the reference = adapters disabled)


@dataclass
class DpoSection:
    beta: float = 0.1
    label_smoothing: float = 0.0  # conservative DPO
    loss_type: str = choice("sigmoid", "sigmoid", "ipo")


@dataclass
class RlSection:
    reward: str = "exact-match"  # exact-match (answers of data.train), a reward MODEL dir, or path/to/file.py:function
    prompts_per_step: int = 8  # prompts rolled out per rollout batch (each process)
    group_size: int = 4  # grpo: samples per prompt (ppo: 1)
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    epochs: int = 1  # optimizer passes over each rollout batch
    minibatches: int = 1  # optimizer steps per pass: each pass cuts the rollout batch into this many parts
    clip: float = 0.2  # the clipped objective's epsilon
    kl_coef: float = 0.0  # grpo: KL-to-reference loss weight; ppo: per-token KL penalty in the reward
    kl_estimator: str = choice("k3", "k1", "k2", "k3")
    gamma: float = 1.0  # ppo: GAE discount
    lam: float = 0.95  # ppo: GAE lambda
    vf_coef: float = 0.5  # ppo: value loss weight
    value_clip: float = 0.2  # ppo: value clipping


@dataclass
class RlhfOptimSection(SftOptimSection):
    lr: float = 1e-5
    warmup_steps: int = 0
    schedule: str = choice("constant", "cosine", "wsd", "constant")


@dataclass
class RlhfRecipe:
    out_dir: str = ""
    seed: int = 1337
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


# ------------------------------------------------------------------------------------------- loading


def _type_name(tp) -> str:
    return {int: "an integer", float: "a number", bool: "a boolean (true/false)", str: "a string"}.get(tp, str(tp))


def _check_value(key: str, tp, value, meta) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_value(key, args[0], value, meta)
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "choices" not in meta:
            value, ok = str(value), True  # a path or name that YAML read as a number
    else:
        raise TypeError(f"unsupported recipe field type {tp} for {key}")
    if not ok:
        raise UserError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    choices = meta.get("choices")
    if choices and value not in choices:
        raise UserError(f"{key}: must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def _keys(cls, prefix="", sections=False) -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out += [prefix + f.name] if sections else []
            out += _keys(tp, f"{prefix}{f.name}.", sections)
        else:
            out.append(prefix + f.name)
    return out


def _unknown(key: str, root_cls, where: str) -> UserError:
    close = difflib.get_close_matches(key, _keys(root_cls, sections=True), n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return UserError(f"unknown key '{key}'{where}{hint}")


def from_dict(cls, data: dict, *, root_cls=None, prefix: str = "", where: str = ""):
    """Build dataclass `cls` from a nested dict, strictly."""
    root_cls = root_cls or cls
    if not isinstance(data, dict):
        raise UserError(f"{prefix.rstrip('.') or 'recipe'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise _unknown(key, root_cls, where)
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = from_dict(tp, v if v is not None else {}, root_cls=root_cls, prefix=key + ".", where=where)
        else:
            kwargs[k] = _check_value(key, tp, v, names[k].metadata)
    return cls(**kwargs)


def _set_path(d: dict, path: list[str], value, root_cls, raw_key: str):
    for i, part in enumerate(path[:-1]):
        nxt = d.get(part)
        if nxt is None:
            nxt = d[part] = {}
        if not isinstance(nxt, dict):
            raise _unknown(raw_key, root_cls, " in overrides")
        d = nxt
    d[path[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise UserError(f"override {text!r} is not of the form key.path=value")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key:
        raise UserError(f"override {text!r} has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def load_yaml(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise UserError(f"no such recipe file: {path}")
    if path.is_dir():
        raise UserError(f"recipe is a directory, not a YAML file: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{loc}: malformed YAML ({problem})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe must be a YAML mapping of keys to values")
    return data


def load_recipe(path: Path, overrides: list[str], cls):
    """Read a recipe YAML, apply `key.path=value` overrides, and validate into `cls`."""
    data = load_yaml(path)
    for text in overrides:
        key, value = parse_override(text)
        if key not in _keys(cls) and not _is_section(cls, key):
            raise _unknown(key, cls, " in overrides")
        _set_path(data, key.split("."), value, cls, key)
    cfg = from_dict(cls, data, where=f" in {path}")
    for key in getattr(cls, "REQUIRED", ()):
        if get_path(cfg, key) in ("", None):
            raise UserError(f"{path}: missing required key '{key}'")
    return cfg


def _is_section(cls, key: str) -> bool:
    hints = typing.get_type_hints(cls)
    head, _, rest = key.partition(".")
    if head not in hints or not dataclasses.is_dataclass(hints[head]):
        return False
    return not rest or _is_section(hints[head], rest)


def get_path(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_recipe(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
