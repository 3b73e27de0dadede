"""A tokenizer as GGUF metadata (`tokenizer.ggml.*`), for llama.cpp's byte-level BPE ("gpt2" model): the tokens
in id order, their types (special added tokens CONTROL, other added tokens USER_DEFINED, ids no token holds
UNUSED padding up to the model's vocabulary), the merges, the pre-tokenizer by llama.cpp's name, BOS / EOS / EOT /
PAD, `add_bos_token` (the tokenizer's own rule, `Tokenizer.prefix`) and the chat template.

The pre-tokenizer decides how text splits before the merges, so it must be one llama.cpp implements: llmctl's
tokenizers (and GPT-2's) use the GPT-2 split (`ByteLevel(use_regex=True)`, no prefix space), llama.cpp's `gpt-2`;
a `Split` regex followed by a plain ByteLevel is recognised for Llama 3's and Qwen 2's patterns. Anything else
(SentencePiece-style tokenizers, other splits) is refused here; whatever is written is verified afterwards."""

from __future__ import annotations

import json

from llmctl.errors import UserError

# Hugging Face Split regexes -> llama.cpp pre-tokenizer names (llama-vocab.cpp)
SPLITS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama3",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}  # fmt: skip
EOT_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def pre_name(tj: dict) -> str:
    """llama.cpp's name for the pre-tokenizer of a parsed tokenizer.json; UserError if it has none."""
    pre = tj.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"
    parts = pre.get("pretokenizers") or [] if pre.get("type") == "Sequence" else []
    if [p.get("type") for p in parts] == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True) \
            and not parts[1].get("add_prefix_space") and parts[0].get("behavior") == "Isolated":  # fmt: skip
        name = SPLITS.get((parts[0].get("pattern") or {}).get("Regex"))
        if name:
            return name
    raise UserError("cannot export this tokenizer to GGUF: its pre-tokenizer is not one llama.cpp implements "
                    "(llmctl exports byte-level BPE tokenizers with GPT-2's, Llama 3's or Qwen 2's split)")


def add_vocab(w, tok, vocab_size: int) -> dict:
    """Write the tokenizer keys; returns the special ids written ({"bos": id, ...})."""
    import gguf

    tj = json.loads(tok.hf.to_str())
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(tj.get("decoder")):
        raise UserError("cannot export this tokenizer to GGUF: llmctl exports byte-level BPE tokenizers only "
                        f"(this one is {model.get('type')} with decoder {(tj.get('decoder') or {}).get('type')})")
    pre = pre_name(tj)
    T = gguf.TokenType
    tokens, types = [f"[PAD{i}]" for i in range(vocab_size)], [T.UNUSED] * vocab_size
    for text, i in tok.hf.get_vocab(with_added_tokens=True).items():
        if i < vocab_size:
            tokens[i], types[i] = text, T.NORMAL
    for i, added in tok.hf.get_added_tokens_decoder().items():
        if i < vocab_size:
            types[i] = T.CONTROL if added.special else T.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    eot = next((i for i in (tok.hf.token_to_id(t) for t in EOT_TOKENS) if i is not None), None)
    ids = {"bos": tok.bos_id, "eos": tok.eos_id, "eot": eot, "pad": tok.pad_id}
    for key, i in ids.items():
        if i is not None:
            getattr(w, f"add_{key}_token_id")(i)
    w.add_add_bos_token(tok.bos_id is not None and list(tok.prefix) == [tok.bos_id])
    w.add_add_eos_token(False)
    template = chat_template(tok)
    if template:
        w.add_chat_template(template)
    return ids


def chat_template(tok) -> str | None:
    try:
        return tok.chat_template
    except UserError:
        return None
