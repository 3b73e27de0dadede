"""LoRA through peft: adapters on our HF-named linear layers, saved as peft adapter folders, loaded, merged.

The adapter's module names are transformers' (`model.layers.0.self_attn.q_proj`, `transformer.h.0.attn.c_attn`),
so `peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), ADAPTER)` loads what llmctl
writes, and llmctl loads adapters trained on transformers models. GPT-2's projections are `Conv1D` in
transformers ([in, out] weights) but `nn.Linear` here: the adapter matrices are the same either way, only
`fan_in_fan_out` (used when merging) differs, so it is written as transformers needs it and flipped on loading.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llmctl.checkpoint import atomic_write
from llmctl.errors import UserError

PRESETS = {
    "llama": {"attention": ["q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj"],  # fused ones: Phi-3
              "mlp": ["gate_proj", "up_proj", "gate_up_proj", "down_proj"]},
    "gpt2": {"attention": ["attn.c_attn", "attn.c_proj"], "mlp": ["mlp.c_fc", "mlp.c_proj"]},
    "neox": {"attention": ["query_key_value", "attention.dense"], "mlp": ["dense_h_to_4h", "dense_4h_to_h"]},
}
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def target_modules(model, spec: str) -> list[str]:
    """A preset (attention, mlp, all-linear) or comma-separated module names -> peft target_modules."""
    presets = PRESETS[model.config.arch]
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if spec in ("all-linear", *presets):
        names = presets["attention"] + presets["mlp"] if spec == "all-linear" else presets[spec]
        names = [t for t in names if any(n.endswith("." + t) for n in linear)]  # the family's own names
    else:
        names = [s.strip() for s in spec.split(",") if s.strip()]
    for t in names:
        if not any(n == t or n.endswith("." + t) for n in linear):
            known = sorted({n.rsplit(".", 1)[-1] for n in linear})
            raise UserError(f"lora.targets: no linear layer named {t!r} (presets: attention, mlp, all-linear; "
                            f"layer names: {', '.join(known)})")
    return names


def _check_quantize(section) -> None:
    if section.quantize == "none":
        return
    if not torch.cuda.is_available():
        raise UserError("lora.quantize: 4bit (QLoRA) needs a CUDA GPU and bitsandbytes; this machine has no CUDA "
                        "device (use lora.quantize: none)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("lora.quantize: 4bit needs bitsandbytes: pip install bitsandbytes") from None


def quantize_4bit(model, targets: list[str], compute_dtype=torch.bfloat16):
    """QLoRA: replace the targeted linear layers' frozen base weights by NF4 bitsandbytes layers (on CUDA)."""
    import bitsandbytes as bnb

    for name, mod in list(model.named_modules()):
        if type(mod) is not torch.nn.Linear or not any(name == t or name.endswith("." + t) for t in targets):
            continue
        q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                              compute_dtype=compute_dtype, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(mod.weight.data.cpu(), requires_grad=False, quant_type="nf4")
        if mod.bias is not None:
            q.bias = torch.nn.Parameter(mod.bias.data, requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, q.cuda())
    return model


def lora_config(model, section):
    from peft import LoraConfig

    return LoraConfig(r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout,
                      target_modules=target_modules(model, section.targets), use_rslora=section.rslora,
                      use_dora=section.dora, bias="none")


def apply(model, section):
    """Wrap `model` (frozen) with fresh LoRA adapters; returns the PeftModel."""
    import peft

    _check_quantize(section)
    cfg = lora_config(model, section)
    if section.quantize == "4bit":
        model = quantize_4bit(model, list(cfg.target_modules))
    return peft.get_peft_model(model, cfg)


def _fix_config(adapter_dir: Path, arch: str, base: str | None, revision: str | None = None) -> None:
    """Make adapter_config.json what transformers-side peft expects for this base (a path, or a hub id with its
    revision in peft's `revision` field)."""
    p = adapter_dir / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg["task_type"] = "CAUSAL_LM"
    cfg["auto_mapping"] = None  # peft records our Transformer class; transformers-side loading needs none
    cfg["fan_in_fan_out"] = arch == "gpt2"  # Conv1D there
    if base is not None:
        cfg["base_model_name_or_path"] = base
        cfg["revision"] = revision
    atomic_write(p, json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def save_adapter(peft_model, out_dir, base: str | None, tokenizer_dir=None, revision: str | None = None) -> Path:
    """Write a peft adapter folder (adapter_config.json, adapter_model.safetensors) plus the tokenizer files."""
    from llmctl.hf import copy_tokenizer
    from llmctl.model import unwrap

    out = Path(out_dir)
    peft_model.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False)
    _fix_config(out, unwrap(peft_model).config.arch, base, revision)
    copy_tokenizer(tokenizer_dir, out)
    return out


def resolve_adapter(path) -> Path:
    """ADAPTER: an adapter folder, or a `llmctl lora` run directory (its newest complete checkpoint). Refuses a
    full-model directory or run, and pickled adapter weights (adapter_model.bin), with the reason."""
    from llmctl.checkpoint import latest_checkpoint, resolve_model_dir

    p = Path(path)
    if p.is_dir() and not (p / "adapter_config.json").is_file():
        latest = latest_checkpoint(p)
        full = p if (p / "config.json").is_file() else latest if latest and (latest / "config.json").is_file() else None
        if full is not None:
            kind = "a model directory" if full == p else "a run directory of full-model checkpoints"
            raise UserError(f"{p} is {kind}, not a LoRA adapter (no adapter_config.json in {full}); pass it as "
                            "--model, or give a `llmctl lora` run directory or adapter folder")
    d = resolve_model_dir(path, need="adapter_config.json")
    if not (d / "adapter_model.safetensors").is_file():
        if any(d.glob("adapter_model*.bin")) or any(d.glob("*.pt")):
            raise UserError(f"{d} holds pickled adapter weights (adapter_model.bin); llmctl reads safetensors only "
                            "— re-save the adapter with peft's save_pretrained(..., safe_serialization=True)")
        raise UserError(f"{d}: no adapter_model.safetensors next to adapter_config.json")
    return d


def base_of(adapter) -> str:
    """The base MODEL an adapter was trained on: its adapter_config.json's base_model_name_or_path, a local folder
    or a hub id (at peft's `revision`, when recorded) that the local Hugging Face cache holds."""
    from llmctl import hub

    d = resolve_adapter(adapter)
    cfg = json.loads((d / "adapter_config.json").read_text())
    base, rev = cfg.get("base_model_name_or_path"), cfg.get("revision")
    if base and not Path(base).exists() and hub.hub_id(base) is not None:
        return f"{base}@{rev}" if rev and "@" not in base else base  # resolve_model_dir names the download
    if not base or not Path(base).exists():
        raise UserError(f"{d}: its base model {base!r} is not a local folder; name the base explicitly")
    return base


def load(model, adapter, trainable: bool = False):
    """`model` with the adapter of `adapter` (folder or run directory) attached: a PeftModel."""
    from peft import LoraConfig, PeftModel

    d = resolve_adapter(adapter)
    try:
        cfg = LoraConfig.from_pretrained(str(d))
    except Exception as e:  # peft raises ValueError / TypeError / JSON errors on a bad config
        raise UserError(f"{d}: not a LoRA adapter folder ({e})") from None
    cfg.fan_in_fan_out = False  # nn.Linear here, whatever the adapter was saved for
    cfg.task_type = None  # a plain PeftModel: our Transformer is not a transformers generation model
    cfg.inference_mode = not trainable
    try:
        return PeftModel.from_pretrained(model, str(d), config=cfg, is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"incompatible adapter {d} for this model: {str(e).splitlines()[0]}") from None


def merged(model, adapter):
    """`model` with the adapter merged into its weights: a plain Transformer (the fast generation path)."""
    return load(model, adapter).merge_and_unload()


def merge(adapter, out, base=None, force: bool = False) -> Path:
    """Merge an adapter into its base and write a standalone model directory. `out` must be missing or empty
    (with `force`: anything, even the base itself); it is written under a temporary name and renamed into place,
    so a failure leaves whatever was at `out` as it was."""
    import tempfile

    from llmctl import hf
    from llmctl.checkpoint import publish_dir, resolve_model_dir, writing

    d = resolve_adapter(adapter)
    base = base or base_of(adapter)
    base_dir = resolve_model_dir(base)
    out = Path(out)
    if out.exists() and not force:
        if not out.is_dir():
            raise UserError(f"--out {out} is an existing file; choose a directory path (or --force)")
        if out.resolve() in (base_dir.resolve(), d.resolve()):
            what = "the base model" if out.resolve() == base_dir.resolve() else "the adapter"
            raise UserError(f"--out {out} is {what} itself; choose another directory (or --force to replace it)")
        if any(out.iterdir()):
            raise UserError(f"--out {out} is not empty; choose a new directory (or --force to replace it)")
    model = merged(hf.load_model(base_dir), d)
    tok = d if (d / "tokenizer.json").is_file() else base_dir
    with writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    with writing(out, cleanup=tmp):
        tmp.chmod(0o755)
        hf.save_model(model, tmp, tokenizer_dir=tok)
    publish_dir(tmp, out)
    return out
