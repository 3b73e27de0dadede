"""Recipes: YAML -> typed dataclasses, with `key.path=value` overrides, strict checking and a YAML dump.

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
import difflib
import math
import sys
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


def bounded(default, *, ge=None, gt=None, le=None, lt=None):
    """A numeric field whose value (unless None) must lie in the range given by ge (>=), gt (>), le (<=), lt (<).
    A subclass that only changes the default may redeclare the field plainly: the range is inherited."""
    return field(default=default, metadata={"range": (ge, gt, le, lt)})


def optional_file(default=None):
    """A path to a file the run can do without (see the module doc)."""
    return field(default=default, metadata={"optional_file": True})


def _fmt(x) -> str:
    if isinstance(x, int) and x >= 2**20 and not (x + 1) & x:
        return f"2**{(x + 1).bit_length() - 1} - 1"
    return f"{x:g}" if isinstance(x, float) else str(x)


def _range_text(ge, gt, le, lt) -> str:
    lo = (ge, "[") if ge is not None else (gt, "(") if gt is not None else None
    hi = (le, "]") if le is not None else (lt, ")") if lt is not None else None
    if lo and hi:
        return f"in {lo[1]}{_fmt(lo[0])}, {_fmt(hi[0])}{hi[1]}"
    if lo:
        return f"{'>=' if lo[1] == '[' else '>'} {_fmt(lo[0])}"
    return f"{'<=' if hi[1] == ']' else '<'} {_fmt(hi[0])}"


def _check_range(key: str, value, rng) -> None:
    ge, gt, le, lt = rng
    ok = ((ge is None or value >= ge) and (gt is None or value > gt) and (le is None or value <= le)
          and (lt is None or value < lt))  # fmt: skip
    if not ok:
        raise UserError(f"{key}: must be {_range_text(ge, gt, le, lt)}, got {_fmt(value)}")


# ------------------------------------------------------------------------------------------- sections

SEED_MAX = 2**63 - 1  # torch.manual_seed and numpy's SeedSequence take it; negative seeds they do not


@dataclass
class ModelSection:
    arch: str = choice("llama", "llama", "gpt2")
    n_layer: int = bounded(6, ge=1)
    n_head: int = bounded(8, ge=1)
    n_kv_head: Optional[int] = bounded(None, ge=1)  # None: n_head (no grouped-query attention)
    n_embd: int = bounded(256, ge=1)  # a multiple of n_head (llama: of 2 n_head, for rotary embeddings)
    block_size: int = bounded(256, ge=1)
    intermediate_size: Optional[int] = bounded(None, ge=1)  # None: llama ~8/3 n_embd (multiple of 64), gpt2 4 n_embd
    rope_theta: float = bounded(10000.0, gt=0)
    qkv_bias: bool = False
    tie_embeddings: bool = False  # gpt2 always ties
    dropout: float = bounded(0.0, ge=0, lt=1)

    def validate(self, prefix: str = "model.") -> None:
        """The combinations llmctl.model.ModelConfig refuses, named by key (before any model is built)."""
        n_kv = self.n_kv_head if self.n_kv_head is not None else self.n_head
        if self.n_embd % self.n_head:
            raise UserError(f"{prefix}n_embd: must be a multiple of {prefix}n_head ({self.n_head}), got {self.n_embd}")
        if self.arch == "llama" and (self.n_embd // self.n_head) % 2:
            raise UserError(f"{prefix}n_embd: llama needs an even head size n_embd / n_head (rotary embeddings), "
                            f"got {self.n_embd} / {self.n_head} = {self.n_embd // self.n_head}")
        if self.n_head % n_kv:
            raise UserError(f"{prefix}n_kv_head: must divide {prefix}n_head ({self.n_head}), got {n_kv}")
        if self.arch == "gpt2" and n_kv != self.n_head:
            raise UserError(f"{prefix}n_kv_head: gpt2 has no grouped-query attention (n_kv_head must be null or "
                            f"{prefix}n_head = {self.n_head}), got {n_kv}")


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
        self.model.validate()


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
        if ok and not math.isfinite(value):
            raise UserError(f"{key}: must be a finite number, got {value}")
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
    if meta.get("range"):
        _check_range(key, value, meta["range"])
    return value


def _field_meta(cls, name: str) -> dict:
    """A field's metadata, merged over the class's dataclass bases: a subclass that redeclares a field to change
    its default keeps the base's range and flags (and may replace them)."""
    out: dict = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            for f in dataclasses.fields(klass):
                if f.name == name and f.metadata:
                    out.update(f.metadata)
    return out


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
            kwargs[k] = _check_value(key, tp, v, _field_meta(cls, k))
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
    if hasattr(cfg, "validate"):
        cfg.validate()
    _check_optional_files(cfg, path, [parse_override(t)[0] for t in overrides])
    return cfg


def _check_optional_files(cfg, path: Path, overridden: list[str]) -> None:
    """`optional_file` keys naming a missing file: an error when an override named it, else (the recipe file's
    value: a default the user may never have looked at) a warning, and the key becomes null."""
    for key in _keys(type(cfg)):
        head, _, name = key.rpartition(".")
        section = get_path(cfg, head) if head else cfg
        value = getattr(section, name)
        if not value or not _field_meta(type(section), name).get("optional_file") or Path(value).exists():
            continue
        if any(key == k or key.startswith(k + ".") for k in overridden):
            raise UserError(f"{key}: no such file {value} (set {key}=null to skip)")
        print(f"warning: {key}: no such file {value} (named in {path}); skipping it (set {key}=FILE to use "
              "another)", file=sys.stderr, flush=True)
        setattr(section, name, None)


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
