"""Byte-level BPE tokenizer: training, loading, special tokens, chat template.

A trained tokenizer is the pair of files Hugging Face expects in a model directory:
- `tokenizer.json`: a `tokenizers` byte-level BPE (GPT-2 regex, no prefix space, no normaliser) whose
  post-processor (`TemplateProcessing`, as Llama's) puts `<|bos|>` before a text (and before each text of a
  pair); the 256 byte symbols are always in the vocabulary, so any text encodes, and decoding gives the text back
  exactly;
- `tokenizer_config.json` (+ `special_tokens_map.json`): bos / eos / pad tokens, `add_bos_token: true`,
  `add_eos_token: false`, `model_max_length` and a ChatML chat template, so
  `transformers.AutoTokenizer.from_pretrained(DIR)(text).input_ids` is `[<|bos|>] + ids`: the ids llmctl feeds
  its model (shards, prompts, SFT rows), and `apply_chat_template` gives the ids of `encode_chat`.

The special tokens sit at ids 0..4: `<|pad|>`, `<|bos|>`, `<|eos|>`, `<|im_start|>`, `<|im_end|>`.
`Tokenizer` also wraps foreign Hugging Face tokenizers (Llama, GPT-2, Qwen2 ...); there bos / eos / pad come from
`tokenizer_config.json` and the ids of missing special tokens are None.

`Tokenizer.encode` never adds special tokens. What goes before a text is one rule, `Tokenizer.prefix`: the
tokenizer's own, as transformers applies it -- `[bos]` when tokenizer_config.json says `add_bos_token: true` (an
explicit `add_bos_token` / `add_eos_token` there decides, as in transformers, and so does its absence when
tokenizer.json has no post-processor), else what tokenizer.json's post-processor puts before a text (Llama 3:
`<|begin_of_text|>`; Qwen2 / 3 and GPT-2: nothing). Prompts, shards, SFT / preference rows and evaluation
contexts all start with it (chat.prefix_ids). A text that must not be empty with nothing before it (an empty
prompt, an evaluation context) starts with eos instead (chat.start_ids, lm-eval's prefix token).
Tokenizer files llmctl wrote before it had a post-processor (`<|bos|>` at id 1, no post-processor) keep their
rule, BOS first, as their models were trained.

`Tokenizer.eos_ids`: every id that ends a generation -- the eos token and the `eos_token_id` (an id or a list,
Llama 3 instruct: [128001, 128008, 128009]) of the config.json and generation_config.json beside tokenizer.json.
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from llmctl.checkpoint import atomic_write
from llmctl.errors import UserError

PAD, BOS, EOS, IM_START, IM_END = "<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, IM_START, IM_END)
PAD_ID, BOS_ID, EOS_ID, IM_START_ID, IM_END_ID = range(5)
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + 1  # the byte alphabet, the specials, and at least one merge
DEFAULT_MODEL_MAX_LENGTH = 2048

# ChatML: `<|bos|>` then `<|im_start|>role\ncontent<|im_end|>\n` per message.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Parts of tokenizer.json that decide the text <-> ids mapping; `Tokenizer.hash` covers exactly these, so
# settings that transformers may rewrite on save (truncation, padding, post-processor) do not change it.
_HASHED_KEYS = ("added_tokens", "normalizer", "pre_tokenizer", "decoder", "model")


def _hf():
    import tokenizers

    return tokenizers


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by the ByteLevel pre-tokenizer."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class Tokenizer:
    """A loaded tokenizer: `encode` / `decode` without implicit special tokens, plus the special ids."""

    def __init__(self, hf_tokenizer, path: Path | None = None, config: dict | None = None,
                 model_eos: Iterable[int] = ()):  # fmt: skip
        self.hf = hf_tokenizer
        self.path = path  # the tokenizer.json it was loaded from (None when trained in memory)
        self.config = config or {}
        self.vocab_size: int = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        self.pad_id = self._special_id("pad_token", PAD)
        self.bos_id = self._special_id("bos_token", BOS)
        self.eos_id = self._special_id("eos_token", EOS)
        self.im_start_id = self.hf.token_to_id(IM_START)
        self.im_end_id = self.hf.token_to_id(IM_END)
        # every id that ends a generation: eos and the model folder's eos_token_id(s) (see the module doc)
        self.eos_ids: frozenset[int] = frozenset({*model_eos, *([] if self.eos_id is None else [self.eos_id])})

    def _special_id(self, key: str, default: str) -> int | None:
        tok = _special(self.config, key)
        return self.hf.token_to_id(tok if isinstance(tok, str) else default)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, path={str(self.path)!r})"

    # ------------------------------------------------------------------------------------------ encoding

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Ids of `text`, no special tokens added. Special-token strings inside `text` (e.g. a literal
        `<|eos|>`) are encoded as plain text unless `allow_special`, which maps them to their ids."""
        self.hf.encode_special_tokens = not allow_special
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], allow_special: bool = False) -> list[list[int]]:
        self.hf.encode_special_tokens = not allow_special
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    @cached_property
    def prefix(self) -> list[int]:
        """The ids the tokenizer's own rule puts before a text, as `AutoTokenizer(text)` does (see the module doc):
        [bos] for llmctl's and Llama's tokenizers, [] for Qwen's and GPT-2's."""
        cfg = self.config
        if "add_bos_token" in cfg or "add_eos_token" in cfg or self.hf.post_processor is None:
            return [self.bos_id] if cfg.get("add_bos_token") is True and self.bos_id is not None else []
        return self._processor_prefix()

    def _processor_prefix(self) -> list[int]:
        """What tokenizer.json's post-processor puts before a text ([] without one)."""
        if self.hf.post_processor is None:
            return []
        plain = self.hf.encode("a", add_special_tokens=False).ids
        full = self.hf.encode("a", add_special_tokens=True).ids
        n = len(plain)
        return next((full[:k] for k in range(len(full) - n + 1) if full[k : k + n] == plain), [])

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self.hf.id_to_token(int(i))

    # ------------------------------------------------------------------------------------------ chat

    @property
    def chat_template(self) -> str:
        """The Jinja chat template of tokenizer_config.json; ChatML for llmctl tokenizers that have none."""
        t = self.config.get("chat_template")
        if isinstance(t, list):  # older transformers: [{"name": "default", "template": ...}, ...]
            t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
        if isinstance(t, str) and t:
            return t
        if self.im_start_id is not None and self.im_end_id is not None:
            return CHAT_TEMPLATE
        raise UserError(f"tokenizer {self.path} has no chat template (no \"chat_template\" in tokenizer_config.json)")

    @property
    def special_tokens_map(self) -> dict:
        """`bos_token`, `eos_token`, ... as strings: what a chat template sees."""
        from llmctl.chat import special_tokens

        names = {k: self.id_to_token(i) for k, i in
                 (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id)) if i is not None}
        return {**names, **special_tokens(self.config)}

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The chat template as text (same string as transformers' `apply_chat_template(tokenize=False)`)."""
        from llmctl import chat

        return chat.render(self.chat_template, self.special_tokens_map, chat.check_messages(list(messages)), add_generation_prompt)

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """(ids, loss_mask) of a conversation under the chat template (ids as transformers' `apply_chat_template`
        gives them); the mask is 1 on assistant turns and their end-of-turn token (see llmctl/chat.py)."""
        from llmctl import chat

        return chat.encode(self, list(messages), add_generation_prompt)

    # ------------------------------------------------------------------------------------------ facts

    def hash(self) -> str:
        """sha256 of the canonical JSON of the parts of tokenizer.json that decide the text <-> ids mapping."""
        return self._hash

    @cached_property
    def _hash(self) -> str:
        return tokenizer_json_hash(json.loads(self.hf.to_str()))

    @cached_property
    def _token_bytes(self) -> np.ndarray:
        specials = {t.content for t in self.hf.get_added_tokens_decoder().values() if t.special}
        byte_level = "ByteLevel" in json.dumps(json.loads(self.hf.to_str()).get("decoder"))
        unbyte = {c: b for b, c in bytes_to_unicode().items()}
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for tok, i in self.hf.get_vocab(with_added_tokens=True).items():
            if i >= self.vocab_size or tok in specials:
                continue
            if byte_level and all(c in unbyte for c in tok):
                out[i] = len(tok)
            elif len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):  # sentencepiece byte fallback
                out[i] = 1
            else:
                out[i] = len(tok.replace("\u2581", " ").encode("utf-8"))
        return out

    def token_bytes(self) -> np.ndarray:
        """int64 [vocab_size]: how many UTF-8 bytes each token stands for (0 for special tokens)."""
        return self._token_bytes.copy()

    # ------------------------------------------------------------------------------------------ saving

    def save(self, out_dir: str | Path, model_max_length: int | None = None) -> Path:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out_dir`."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        prefix = self.prefix
        if self._processor_prefix() != prefix:  # the rule came from tokenizer_config.json: tokenizer.json says it too
            self.hf.post_processor = prefix_processor([self.id_to_token(i) for i in prefix], prefix)
        atomic_write(out_dir / "tokenizer.json", self.hf.to_str(pretty=True))
        names = {k: v for k, v in self.special_tokens_map.items() if k in ("bos_token", "eos_token", "pad_token")}
        max_len = model_max_length or self.config.get("model_max_length") or DEFAULT_MODEL_MAX_LENGTH
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **names,
            "model_max_length": int(max_len),
            "clean_up_tokenization_spaces": False,
        }
        if prefix in ([], [self.bos_id]):  # transformers rebuilds the post-processor from these: [bos] or nothing
            config.update(add_bos_token=bool(prefix), add_eos_token=False)
        if self.config.get("chat_template"):
            config["chat_template"] = self.config["chat_template"]
        elif self.im_start_id is not None and self.im_end_id is not None:
            config["chat_template"] = CHAT_TEMPLATE
        atomic_write(out_dir / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        atomic_write(out_dir / "special_tokens_map.json", json.dumps(names, indent=2, ensure_ascii=False) + "\n")
        self.path = out_dir / "tokenizer.json"
        self.config = config
        self.__dict__.pop("prefix", None)
        return out_dir


def prefix_processor(tokens: Sequence[str], ids: Sequence[int]):
    """A `TemplateProcessing` post-processor putting `tokens` before a text and before each text of a pair (as
    transformers builds Llama's: `<s>:0 $A:0 <s>:1 $B:1`)."""
    tp = _hf().processors.TemplateProcessing
    single = " ".join([f"{t}:0" for t in tokens] + ["$A:0"])
    pair = " ".join([single] + [f"{t}:1" for t in tokens] + ["$B:1"])
    return tp(single=single, pair=pair, special_tokens=sorted(set(zip(tokens, ids)), key=lambda x: x[1]))


def tokenizer_json_hash(obj: dict) -> str:
    """Canonical hash of a parsed tokenizer.json (see `Tokenizer.hash`)."""
    core = {k: obj.get(k) for k in _HASHED_KEYS}
    model = dict(core["model"] or {})
    merges = model.get("merges")
    if isinstance(merges, list):  # older `tokenizers` write merges as "a b" strings, newer as ["a", "b"]
        model["merges"] = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in merges]
    core["model"] = model
    core["added_tokens"] = sorted(({"id": t.get("id"), "content": t.get("content"), "special": t.get("special")}
                                   for t in core["added_tokens"] or []), key=lambda t: t["id"])
    canon = json.dumps(core, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def train_tokenizer(texts: Iterable[str] | Iterable[list[str]], vocab_size: int, length: int | None = None) -> Tokenizer:
    """Train a byte-level BPE on `texts` (strings or batches of strings); `vocab_size` counts the specials.

    Deterministic: the same texts and vocab_size give the same tokenizer.json. A corpus too small to fill the
    vocabulary gives a smaller one."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise UserError(f"vocab size must be at least {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special "
                        f"tokens + 1), got {vocab_size}")
    tk = _hf()
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[tk.AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, f"special token {t} is not at id {i}"
    tok.post_processor = prefix_processor([BOS], [BOS_ID])
    return Tokenizer(tok, config={"model_max_length": DEFAULT_MODEL_MAX_LENGTH, "chat_template": CHAT_TEMPLATE,
                                  "add_bos_token": True, "add_eos_token": False})  # fmt: skip


def find_tokenizer_file(path: str | Path) -> Path:
    """A tokenizer.json file, a directory holding one, or a MODEL (model / run directory) -> the tokenizer.json."""
    p = Path(path)
    if p.is_file():
        return p
    if (p / "tokenizer.json").is_file():
        return p / "tokenizer.json"
    from llmctl.checkpoint import resolve_model_dir

    return resolve_model_dir(p, need="tokenizer.json") / "tokenizer.json"


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer (see `find_tokenizer_file`); a missing or broken file is a UserError."""
    file = find_tokenizer_file(path)
    try:
        text = file.read_text(encoding="utf-8")
        hf = _hf().Tokenizer.from_str(text)
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read tokenizer {file}: {e}") from e
    except Exception as e:  # tokenizers raises plain Exception on malformed JSON
        raise UserError(f"{file}: not a valid tokenizer.json ({str(e).splitlines()[0] if str(e) else e})") from e
    config = {}
    cfg_file = file.parent / "tokenizer_config.json"
    if cfg_file.is_file():
        try:
            config = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"{cfg_file}: invalid JSON ({e})") from e
        if not isinstance(config, dict):
            raise UserError(f"{cfg_file}: expected a JSON object")
    if hf.post_processor is None and _special(config, "bos_token") == BOS and \
            all(hf.id_to_token(i) == t for i, t in enumerate(SPECIAL_TOKENS)):  # fmt: skip
        # written by llmctl before tokenizer.json had its post-processor: BOS first, as its models were trained
        hf.post_processor = prefix_processor([BOS], [BOS_ID])
        config = {**config, "add_bos_token": True, "add_eos_token": False}
    return Tokenizer(hf, path=file, config=config, model_eos=model_eos_ids(file.parent))


def _special(config: dict, key: str):
    tok = config.get(key)
    return tok.get("content") if isinstance(tok, dict) else tok


def model_eos_ids(folder: Path) -> set[int]:
    """The `eos_token_id`s (an id or a list) of `folder`'s config.json and generation_config.json, if any.
    Unreadable files add nothing here (loading the model reports them)."""
    out = set()
    for name in ("config.json", "generation_config.json"):
        try:
            v = json.loads((Path(folder) / name).read_text(encoding="utf-8")).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue
        for i in v if isinstance(v, list) else [v]:
            if isinstance(i, int) and not isinstance(i, bool) and i >= 0:
                out.add(i)
    return out

