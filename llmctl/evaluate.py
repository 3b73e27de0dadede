"""Evaluation: loss / perplexity / bits per byte over a corpus, multiple-choice log-likelihoods, exact-match
answers, preference accuracy. Library code: `llmctl eval` (llmctl/stages/eval.py) wires it to the command line.

Corpus scoring (`corpus_loss`, tasks `ppl` and `bpb`)
    Documents are tokenized and joined into one stream as token shards store them, `prefix doc1 [eos] prefix
    doc2 [eos] ...` (prefix: the tokenizer's own rule, chat.prefix_ids: [bos] for llmctl's and Llama's tokenizers;
    one that puts nothing before a text, Qwen's or GPT-2's, starts the stream with eos), and every token after
    the first is predicted exactly once, by sliding windows (`sliding_windows`): with context L (default the
    model's block_size) and stride S (default L // 2), window k reads tokens [kS, kS + L) and predicts tokens
    [kS + 1, kS + L]; only the predictions no earlier window made are counted, and the last window is moved
    back to end at the stream's end. So every token outside the first window is predicted from at least
    L - S + 1 tokens of context (as in Hugging Face's perplexity guide; S = L gives disjoint windows).
    loss = mean nats over all predicted tokens (bos / eos included, like pretrain's val_loss); ppl = exp(loss);
    bpb = the nats of the predicted tokens that stand for text (`Tokenizer.token_bytes()` > 0) / (ln 2 x their
    UTF-8 bytes): bits per byte of text, comparable across tokenizers (pretrain's val_bpb, over all windows).

Log-likelihoods (`score_pairs`, task `mc`, task `preference`, the lm-eval adapter)
    A (context, continuation) pair is tokenized as lm-eval-harness does: trailing whitespace of the context moves
    to the continuation, ctx = encode(context), cont = encode(context + continuation)[len(ctx):]; the context
    starts with what the tokenizer puts before a text (chat.prefix_ids, [bos] for llmctl's tokenizers, as the
    model saw documents in pretraining; an empty context with nothing before it: eos). ctx + cont is cut to its
    last block_size + 1 tokens; the score is the sum of log p over the continuation tokens.
    mc: each choice is the continuation " " + choice of the question; acc = argmax of the log-likelihoods is the
    answer, acc_norm = argmax of log-likelihood / len(choice) in characters (lm-eval-harness's acc_norm).

Exact match (`generate_completions`, `matches`, `exact_match`, `held_out_exact_match`)
    The completion (greedy, through the generate engine llmctl.engine, stopping at a newline) and the answer
    are compared after `normalize_answer` (see its docstring for the rules): the one rule of `llmctl eval`, of the
    training stages' held-out evaluation and of RL's exact-match reward.

Every log-prob above, and those of DPO and RL, comes from `token_logprobs` (hidden states -> log p of targets).
"""

from __future__ import annotations

import decimal
import math
import re
import unicodedata
from typing import Iterable, Sequence

import numpy as np
import torch

from llmctl.chat import encode_prompt, fit_prompt, prefix_ids, start_ids
from llmctl.errors import UserError
from llmctl.hf import check_vocab
from llmctl.progress import progress_bar

# --------------------------------------------------------------------------------------------------- helpers


def _device(model) -> torch.device:
    return next(model.parameters()).device


def token_logprobs(model, h: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0, greedy: bool = False):
    """log p(targets) [N] (fp32) from final hidden states h [N, C] through the model's lm_head (of logits /
    temperature), a chunk of rows at a time (the [N, vocab] logits never exist whole); with greedy, also whether
    each target is the argmax. The one per-token log-prob of llmctl: evaluation, DPO, reward and RL; with gradient
    when h (or the head) has one."""
    n, vocab = h.size(0), model.config.vocab_size
    chunk = max(32, 2**21 // vocab)  # ~8 MB of fp32 logits a chunk
    grad = torch.is_grad_enabled() and (h.requires_grad or model.lm_head.weight.requires_grad)
    out = [] if grad else torch.empty(n, dtype=torch.float32, device=h.device)
    hits = torch.empty(n, dtype=torch.bool, device=h.device) if greedy else None
    for s in range(0, n, chunk):
        logits = model.lm_head(h[s : s + chunk]).float()  # [n, V]
        if temperature != 1.0:
            logits = logits / temperature
        t = targets[s : s + chunk, None]  # [n, 1]
        target_logit = logits.gather(1, t)  # [n, 1]
        if greedy:
            hits[s : s + chunk] = logits.argmax(dim=-1) == t[:, 0]
        m = logits.detach().amax(dim=-1, keepdim=True)  # [n, 1]
        e = (logits - m).exp() if grad else logits.sub_(m).exp_()  # no grad: in place, no second [n, V] tensor
        lp = (target_logit - m - e.sum(dim=-1, keepdim=True).log())[:, 0]
        if grad:
            out.append(lp)
        else:
            out[s : s + chunk] = lp
    return (torch.cat(out) if out else h.new_zeros(0, dtype=torch.float32)) if grad else out, hits


# ---------------------------------------------------------------------------------------- corpus: ppl / bpb


def nats_bytes_sums(nats: torch.Tensor, nbytes: torch.Tensor) -> torch.Tensor:
    """[4] float64 sums for loss and bits per byte: nats (all tokens), tokens, nats of the tokens that stand for
    text (bytes > 0; special tokens stand for none), their UTF-8 bytes. Sums add across batches and processes."""
    nats, nbytes = nats.double().cpu(), nbytes.cpu()
    text = nbytes > 0
    return torch.stack([nats.sum(), torch.tensor(float(nats.numel()), dtype=torch.float64), nats[text].sum(),
                        nbytes.sum().double()])  # fmt: skip


def loss_and_bpb(sums: torch.Tensor) -> tuple[float, float]:
    """(mean nats per token, bits per byte) from nats_bytes_sums totals."""
    loss = (sums[0] / sums[1]).item()
    bpb = (sums[2] / (math.log(2) * sums[3])).item() if sums[3] > 0 else float("nan")
    return loss, bpb


def val_loss_bpb(model, batches, token_bytes: torch.Tensor, dist) -> dict:
    """A training stage's val_loss (mean nats per scored target) and val_bpb over micro-batches {idx, targets}
    (target -100: not scored), every process its own batches, summed across processes."""
    sums = torch.zeros(4, dtype=torch.float64)
    for b in batches:
        h = model(b["idx"].to(dist.device), return_hidden=True)  # [B, T, C]
        keep = b["targets"] != -100
        y = b["targets"][keep]
        sums += nats_bytes_sums(-token_logprobs(model, h[keep.to(h.device)], y.to(h.device))[0], token_bytes[y])
    loss, bpb = loss_and_bpb(dist.all_sum(sums).cpu())
    return {"val_loss": loss, "val_bpb": bpb}


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, new) per window over a stream of n_tokens (see the module doc): the model reads tokens
    [begin, end - 1) and predicts tokens [begin + 1, end), of which the last `new` are counted. Tokens
    1 .. n_tokens - 1 are counted exactly once; every window but a lone short one has context + 1 tokens."""
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be in [1, context={context}], got {stride}")
    out, done, begin = [], 1, 0
    while done < n_tokens:
        begin = min(begin, max(0, n_tokens - context - 1))
        end = min(begin + context + 1, n_tokens)
        out.append((begin, end, end - done))
        done, begin = end, begin + stride
    return out


def corpus_stream(texts: Iterable[str], tok) -> np.ndarray:
    """The token stream of documents as token shards hold it: prefix ids [eos] per document (int64; prefix:
    chat.prefix_ids). Without a prefix of its own, or when it is the eos token (GPT-2's <|endoftext|>), eos starts
    the stream and stands once between documents, so the first text token is predicted too."""
    head = prefix_ids(tok)
    tail = [] if tok.eos_id is None else [tok.eos_id]
    parts, batch = [], []
    if not head or head == tail:  # <eos> doc1 <eos> doc2 <eos>
        parts, head = [np.asarray(tail, dtype=np.int64)], []

    def flush():
        for ids in tok.encode_batch(batch):  # special-token strings in the text stay text
            parts.append(np.asarray(head + ids + tail, dtype=np.int64))
        batch.clear()

    for text in texts:
        batch.append(text)
        if len(batch) >= 1024:
            flush()
    flush()
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


@torch.inference_mode()
def score_stream(model, ids, token_bytes, *, context: int | None = None, stride: int | None = None,
                 batch_size: int = 8, show_progress: bool = True) -> dict:
    """Loss, perplexity and bits per byte of a token stream under the sliding windows of the module doc."""
    L = int(model.config.block_size if context is None else context)
    if not 1 <= L <= model.config.block_size:
        raise UserError(f"--context must be in [1, {model.config.block_size}] (the model's block_size), got {L}")
    S = int(max(1, L // 2) if stride is None else stride)
    if not 1 <= S <= L:
        raise UserError(f"--stride must be in [1, {L}] (the context), got {S}")
    ids = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    if ids.numel() < 2:
        raise UserError("the corpus holds fewer than 2 tokens: nothing to score")
    tb = torch.as_tensor(np.asarray(token_bytes), dtype=torch.long)
    if int(ids.max()) >= min(model.config.vocab_size, tb.numel()):
        raise UserError(f"token id {int(ids.max())} is outside the model's vocabulary ({model.config.vocab_size})")
    windows = sliding_windows(ids.numel(), L, S)
    dev = _device(model)
    sums = torch.zeros(4, dtype=torch.float64)  # nats (all), tokens, nats (text tokens), bytes
    with progress_bar(len(windows), "eval", show_progress) as advance:
        for i in range(0, len(windows), batch_size):
            group = windows[i : i + batch_size]
            T = max(e - b - 1 for b, e, _ in group)  # == L except for a stream shorter than L + 1
            begins = torch.tensor([b for b, _, _ in group])
            x = ids[(begins[:, None] + torch.arange(T)).clamp_max(ids.numel() - 1)]  # [B, T]
            new = [n for _, _, n in group]
            h = model(x.to(dev), return_hidden=True)  # [B, T, C]
            if len(set(new)) == 1:  # the usual case: the last `new` positions of every window
                rows = h[:, T - new[0] :].reshape(-1, h.size(-1))
                pos = (begins[:, None] + torch.arange(T - new[0], T)).reshape(-1)
            else:
                keep = torch.arange(T)[None, :] >= torch.tensor([T - n for n in new])[:, None]  # [B, T]
                rows = h[keep.to(dev)]
                pos = (begins[:, None] + torch.arange(T))[keep]
            targets = ids[pos + 1]  # input position p predicts token p + 1
            nats = -token_logprobs(model, rows, targets.to(dev))[0]
            sums += nats_bytes_sums(nats, tb[targets])
            advance(len(group))
    loss, bpb = loss_and_bpb(sums)
    return {"loss": loss, "ppl": math.exp(loss), "bpb": bpb, "tokens": int(sums[1]), "bytes": int(sums[3]),
            "windows": len(windows), "context": L, "stride": S}


def corpus_loss(model, tok, texts: Sequence[str], **kwargs) -> dict:
    """score_stream over documents `texts` (see the module doc); kwargs: context, stride, batch_size."""
    check_vocab(tok, model.config, "corpus scoring")
    out = score_stream(model, corpus_stream(texts, tok), tok.token_bytes(), **kwargs)
    return {**out, "documents": len(texts)}


# ---------------------------------------------------------------------------------------- log-likelihoods


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval-harness splits them (see the module doc), the context after the
    tokenizer's prefix (an empty one: after eos when there is no prefix)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    return (prefix_ids(tok) + ctx) or start_ids(tok), whole[len(ctx) :]


@torch.inference_mode()
def score_tokens(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 16,
                 show_progress: bool = True) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per
    (context ids, continuation ids) request; ctx + cont is cut to its last block_size + 1 tokens."""
    L, dev = model.config.block_size, _device(model)
    seqs = []
    for ctx, cont in requests:
        if not cont:
            raise UserError("empty continuation: nothing to score")
        if len(cont) > L:
            raise UserError(f"a continuation of {len(cont)} tokens does not fit the model's context ({L})")
        if not ctx:
            raise UserError("empty context (and the tokenizer has no bos / eos token to start from)")
        seqs.append((list(ctx) + list(cont))[-(L + 1) :])
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # similar lengths together: little padding
    results: list[tuple[float, bool]] = [(0.0, False)] * len(seqs)
    with progress_bar(len(seqs), "score", show_progress) as advance:
        for s in range(0, len(order), batch_size):
            chunk = order[s : s + batch_size]
            T = len(seqs[chunk[0]]) - 1
            x = torch.zeros(len(chunk), T, dtype=torch.long)
            keep = torch.zeros(len(chunk), T, dtype=torch.bool)
            targets = []
            for r, i in enumerate(chunk):
                seq, n = seqs[i], len(requests[i][1])
                x[r, : len(seq) - 1] = torch.tensor(seq[:-1])  # right padding: causal, so harmless
                keep[r, len(seq) - 1 - n : len(seq) - 1] = True
                targets += seq[-n:]
            h = model(x.to(dev), return_hidden=True)  # [B, T, C]
            lp, hits = token_logprobs(model, h[keep.to(dev)], torch.tensor(targets, device=dev), greedy=True)
            lp, hits = lp.double().cpu(), hits.cpu()
            start = 0
            for i in chunk:
                n = len(requests[i][1])
                results[i] = (lp[start : start + n].sum().item(), bool(hits[start : start + n].all()))
                start += n
            advance(len(chunk))
    return results


def score_pairs(model, tok, pairs: Sequence[tuple[str, str]], batch_size: int = 16,
                show_progress: bool = True) -> list[tuple[float, bool]]:
    """score_tokens over (context, continuation) strings, tokenized by `encode_pair`."""
    return score_tokens(model, [encode_pair(tok, c, x) for c, x in pairs], batch_size, show_progress)


def multiple_choice(model, tok, items: Sequence[dict], batch_size: int = 16, show_progress: bool = True) -> dict:
    """acc and acc_norm over {"question", "choices", "answer"} items; "items" holds each item's log-likelihoods
    and predictions (pred: argmax log-likelihood; pred_norm: argmax log-likelihood / len(choice))."""
    pairs = [(it["question"], " " + c) for it in items for c in it["choices"]]
    scores = score_pairs(model, tok, pairs, batch_size, show_progress)
    per_item, k = [], 0
    for it in items:
        lls = np.array([s for s, _ in scores[k : k + len(it["choices"])]])
        k += len(it["choices"])
        lengths = np.array([float(len(c)) for c in it["choices"]])
        pred, pred_norm = int(np.argmax(lls)), int(np.argmax(lls / lengths))
        per_item.append({"lls": lls.tolist(), "pred": pred, "pred_norm": pred_norm, "answer": it["answer"]})
    n = len(per_item)
    return {"acc": sum(p["pred"] == p["answer"] for p in per_item) / n,
            "acc_norm": sum(p["pred_norm"] == p["answer"] for p in per_item) / n, "n": n, "items": per_item}


def encode_chat_pair(tok, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of `response` as the assistant's reply to the user message `prompt` in
    the chat template; the continuation runs to the end of the conversation (the end-of-turn token included)."""
    ctx = tok.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)[0]
    whole = tok.encode_chat([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])[0]
    if whole[: len(ctx)] != ctx:
        raise UserError("the chat template does not render the reply after the generation prompt")
    return ctx, whole[len(ctx):]


def preference(model, tok, items: Sequence[dict], ref_model=None, batch_size: int = 16,
               show_progress: bool = True, chat: bool = False) -> dict:
    """How often `chosen` scores above `rejected` after `prompt`: the score is the completion's log-likelihood,
    or with ref_model the implicit reward log p_model - log p_ref (DPO's). A tie counts one half. With chat,
    the prompt is a user message and the completion the assistant's reply in the chat template."""
    pairs = [(it["prompt"], it[key]) for it in items for key in ("chosen", "rejected")]
    reqs = [encode_chat_pair(tok, c, x) if chat else encode_pair(tok, c, x) for c, x in pairs]
    s = np.array([x for x, _ in score_tokens(model, reqs, batch_size, show_progress)])
    if ref_model is not None:
        s = s - np.array([x for x, _ in score_tokens(ref_model, reqs, batch_size, show_progress)])
    margin = s[0::2] - s[1::2]
    acc = float(np.mean((margin > 0) + 0.5 * (margin == 0)))
    return {"acc": acc, "margin": float(np.mean(margin)), "n": len(items), "items": margin.tolist()}


# ---------------------------------------------------------------------------------------- exact match

_QUOTES = str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'", "\u00ab": '"', "\u00bb": '"'})
_EDGE_QUOTES = "\"'`"
_TRAILING = ".,;:!?"
_NUMBER = re.compile(r"^[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][+-]?\d+)?$")


def _canonical_number(word: str) -> str:
    if not _NUMBER.match(word) or not any(c.isdigit() for c in word.split("e")[0].split("E")[0]):
        return word
    try:
        d = decimal.Decimal(word.replace(",", ""))
    except decimal.InvalidOperation:
        return word
    if not d.is_finite() or abs(d.adjusted()) > 100:
        return word
    d = d.normalize()
    text = format(d, "f")
    return "0" if d.is_zero() else text


def normalize_answer(text) -> str:
    """The form in which exact-match compares a completion with an answer:
    1. Unicode NFKC, curly quotes to straight ones, case folded (`casefold`);
    2. every run of whitespace (newlines, tabs, non-breaking spaces) becomes one space; ends stripped;
    3. quotes (" ' `) at either end and trailing punctuation (. , ; : ! ?) are stripped, repeatedly;
    4. every space-separated word that is a number is written canonically: thousands separators dropped
       (only in groups of three: "1,000" -> "1000", "1,2" stays), no exponent, no trailing zeros, no "+",
       "-0" -> "0" ("3.50" -> "3.5", "1e3" -> "1000", ".5" -> "0.5").
    Articles, inner punctuation, currency signs and units are kept ("$5" != "5"). JSON numbers are str()-ed."""
    s = unicodedata.normalize("NFKC", str(text)).translate(_QUOTES).casefold()
    s = " ".join(s.split())
    prev = None
    while s != prev:
        prev = s
        s = s.strip(_EDGE_QUOTES).rstrip(_TRAILING).strip()
    return " ".join(_canonical_number(w) for w in s.split(" ")) if s else ""


def matches(completion: str, answer) -> bool:
    """Whether a completion is right: equal, after `normalize_answer`, to the answer (a string, a number, or a
    list of accepted ones). The one exact-match rule: eval, held-out evaluation during training, RL rewards."""
    answers = answer if isinstance(answer, (list, tuple)) else [answer]
    return normalize_answer(completion) in {normalize_answer(a) for a in answers}


def generate_completions(model, tok, prompts: Sequence[str], max_new_tokens: int = 32, until: Sequence[str] = ("\n",),
                         batch_size: int | None = 16, chat: bool = False) -> list[str]:
    """Greedy completions through the generate engine (llmctl.engine): each prompt as `llmctl generate` encodes
    it, after the tokenizer's prefix (or, with chat, as a user message in the chat template, stopping at
    <|im_end|>), cut before the first of `until`; stopping at every EOS id of the model (Tokenizer.eos_ids); a
    prompt too long for the context keeps its prefix and its last tokens (chat.encode_prompt, chat.fit_prompt)."""
    from llmctl.engine import Engine, SamplingParams

    stop_ids = (tok.im_end_id,) if chat and tok.im_end_id is not None else ()
    try:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop=tuple(until),
                                stop_token_ids=stop_ids)  # fmt: skip
        ids = [fit_prompt(tok, encode_prompt(tok, p, chat=chat), model.config.block_size,
                          max_new_tokens)[0] for p in prompts]  # fmt: skip
    except ValueError as e:
        raise UserError(f"--max-new-tokens: {e}") from None
    return [r.text for r in Engine(model, tok).generate(ids, params, batch_size=batch_size)]


def exact_match(completions: Sequence[str], items: Sequence[dict]) -> dict:
    """Accuracy of completions against each item's answer (see `matches`)."""
    per_item = [{"completion": c, "pred": normalize_answer(c), "correct": matches(c, it["answer"])}
                for c, it in zip(completions, items)]  # fmt: skip
    n = len(per_item)
    return {"exact_match": sum(p["correct"] for p in per_item) / n if n else float("nan"), "n": n, "items": per_item}


def held_out_exact_match(path, section, tok, dist):
    """The evaluation a training stage runs on a {"prompt", "answer"} file: exact_match of greedy completions
    (section: eval.limit rows, eval.max_new_tokens, eval.chat), each process a share, summed. None without a file;
    the returned function takes the bare model."""
    if not path:
        return None
    from llmctl.examples import load

    local = load(path, "exact-match", section.limit)[dist.rank :: dist.world]

    def run(model) -> dict:
        right = torch.zeros(2, dtype=torch.float64)
        if local:
            done = exact_match(generate_completions(model, tok, [r["prompt"] for r in local], section.max_new_tokens,
                                                    chat=section.chat), local)  # fmt: skip
            right += torch.tensor([sum(i["correct"] for i in done["items"]), len(local)], dtype=torch.float64)
        right = dist.all_sum(right).cpu()
        return {"exact_match": float(right[0] / right[1])}

    return run

