"""Built-in verifiable tasks: a deterministic generator of short instruction data with exact answers.

Each task family is a function of a `random.Random` giving (question, answer): a short user message ("Is 4821
even or odd?") and a short exact answer ("odd"). `FAMILIES` holds them all, `DEFAULT_FAMILIES` the default mix.
`generate(n_train, n_test, seed, families)` gives (train, test) lists of `Item(family, question, answer, rejected)`;
`write_tasks(out_dir, n_train, n_test, seed, families)` writes them, each file atomically:
- `sft_{train,test}.jsonl`: `{"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": A}]}`
  (`llmctl sft` / `lora`);
- `rl_{train,test}.jsonl`: `{"prompt": Q, "answer": A}` (`llmctl rlhf` ppo / grpo prompts, and exactly what
  `llmctl eval --task exact-match --data rl_test.jsonl --chat` reads);
- `pref_{train,test}.jsonl`: `{"prompt": Q, "chosen": A, "rejected": W}` (reward model, DPO), W a plausible wrong
  answer (`wrong_answer`: off by one or ten / one digit changed for a number, two neighbours swapped or one
  item / letter changed for a list or a word), never equal to A after `evaluate.normalize_answer`.
`llmctl tasks` writes them (see llmctl/cli.py).

Determinism and splits: n_train / n_test are split evenly over the families; each family draws from its own
`random.Random` seeded by (seed, family name), its test items first, and redraws any question it already drew.
So the same arguments give byte-identical files, no question repeats within or across the splits (test
questions never appear in train), and a family's items do not depend on which other families are chosen.
A family whose question space is too small for the request (succ has 1000 questions) is a UserError.

Why these defaults (DEFAULT_FAMILIES, 5000 / 500 items): README, Fine-tuning, "The built-in tasks".
Note that exact-match casefolds, so `upper` is scored like `repeat`.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from llmctl.checkpoint import atomic_write
from llmctl.errors import UserError

Pair = tuple[str, str]
Maker = Callable[[random.Random], Pair]

LETTERS = string.ascii_lowercase


def _word(rng: random.Random, lo: int, hi: int) -> str:
    """A made-up lowercase word of lo..hi random letters (held-out words are new words, not memorised ones)."""
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def _distinct(rng: random.Random, k: int, lo: int, hi: int) -> list[int]:
    return rng.sample(range(lo, hi + 1), k)


# ------------------------------------------------------------------------------------------------ families


def add(rng: random.Random) -> Pair:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {a} + {b}?", str(a + b)


def sub(rng: random.Random) -> Pair:
    a, b = sorted(_distinct(rng, 2, 10, 99), reverse=True)
    return f"What is {a} - {b}?", str(a - b)


def succ(rng: random.Random) -> Pair:
    n = rng.randint(0, 999)
    return f"What comes after {n}?", str(n + 1)


def pred(rng: random.Random) -> Pair:
    n = rng.randint(1, 999)
    return f"What comes before {n}?", str(n - 1)


def max_(rng: random.Random) -> Pair:
    xs = _distinct(rng, rng.randint(3, 5), 0, 9)
    return f"What is the largest of {', '.join(map(str, xs))}?", str(max(xs))


def min_(rng: random.Random) -> Pair:
    xs = _distinct(rng, rng.randint(3, 5), 0, 9)
    return f"What is the smallest of {', '.join(map(str, xs))}?", str(min(xs))


def compare(rng: random.Random) -> Pair:
    a, b = _distinct(rng, 2, 0, 999)
    return f"Which is larger, {a} or {b}?", str(max(a, b))


def parity(rng: random.Random) -> Pair:
    n = rng.randint(0, 9999)
    return f"Is {n} even or odd?", "even" if n % 2 == 0 else "odd"


def sort_digits(rng: random.Random) -> Pair:
    ds = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
    return f"Sort the digits {' '.join(map(str, ds))}.", " ".join(map(str, sorted(ds)))


def _on_word(lo: int, hi: int, question: str, answer: Callable[[str], str]) -> Maker:
    """A family over one made-up word of lo..hi letters: (question with the word, answer(word))."""
    def make(rng: random.Random) -> Pair:
        w = _word(rng, lo, hi)
        return question.format(w), answer(w)

    return make


@dataclass(frozen=True)
class Family:
    name: str
    make: Maker
    about: str


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("add", add, "sum of two 2-digit numbers"),
    Family("sub", sub, "difference of two distinct 2-digit numbers, larger first"),
    Family("succ", succ, "N + 1 for N in 0..999"),
    Family("pred", pred, "N - 1 for N in 1..999"),
    Family("max", max_, "largest of 3-5 distinct digits"),
    Family("min", min_, "smallest of 3-5 distinct digits"),
    Family("compare", compare, "larger of two numbers in 0..999"),
    Family("parity", parity, "even / odd of N in 0..9999"),
    Family("sort_digits", sort_digits, "3-5 digits in ascending order, space-separated"),
    Family("reverse", _on_word(3, 5, "Reverse the word {}.", lambda w: w[::-1]),
           "a made-up word of 3-5 letters backwards"),
    Family("sort_letters", _on_word(3, 5, "Sort the letters of {}.", lambda w: "".join(sorted(w))),
           "the letters of a made-up word of 3-5 letters in order"),
    Family("upper", _on_word(3, 6, "Uppercase the word {}.", str.upper),
           "a made-up word uppercased (exact-match ignores case: as easy as repeat there)"),
    Family("repeat", _on_word(3, 6, "Repeat the word {}.", str), "a made-up word of 3-6 letters repeated"),
    Family("count", _on_word(2, 8, "How many letters are in {}?", lambda w: str(len(w))),
           "the number of letters of a made-up word of 2-8 letters"),
    Family("first", _on_word(3, 7, "What is the first letter of {}?", lambda w: w[0]),
           "the first letter of a made-up word"),
    Family("last", _on_word(3, 7, "What is the last letter of {}?", lambda w: w[-1]),
           "the last letter of a made-up word"),
)}
DEFAULT_FAMILIES: tuple[str, ...] = ("parity", "max", "first", "sort_digits", "count", "last", "succ")

# The same questions phrased another way (`phrasing="alt"`, `llmctl tasks --phrasing alt`): the items (numbers,
# words, answers, splits) are those of the standard phrasing, only the wording differs. A model fine-tuned on the
# standard phrasing meets these as new prompts; RL on them (rewarded by the answers alone) adapts it.
ALT_PHRASINGS: dict[str, tuple[str, str]] = {  # family -> (regex over the standard question, replacement)
    "add": (r"What is (\d+) \+ (\d+)\?", r"Add \1 and \2."),
    "sub": (r"What is (\d+) - (\d+)\?", r"Subtract \2 from \1."),
    "succ": (r"What comes after (\d+)\?", r"What number follows \1?"),
    "pred": (r"What comes before (\d+)\?", r"What number precedes \1?"),
    "max": (r"What is the largest of (.+)\?", r"Which number is the biggest: \1?"),
    "min": (r"What is the smallest of (.+)\?", r"Which number is the lowest: \1?"),
    "compare": (r"Which is larger, (\d+) or (\d+)\?", r"Name the bigger number: \1 or \2."),
    "parity": (r"Is (\d+) even or odd\?", r"Is the number \1 odd or even?"),
    "sort_digits": (r"Sort the digits (.+)\.", r"Put the digits \1 in ascending order."),
    "reverse": (r"Reverse the word (\w+)\.", r"Write \1 backwards."),
    "sort_letters": (r"Sort the letters of (\w+)\.", r"Put the letters of \1 in alphabetical order."),
    "upper": (r"Uppercase the word (\w+)\.", r"Write \1 in capital letters."),
    "repeat": (r"Repeat the word (\w+)\.", r"Say \1 again."),
    "count": (r"How many letters are in (\w+)\?", r"Count the letters in \1."),
    "first": (r"What is the first letter of (\w+)\?", r"Give the first letter of \1."),
    "last": (r"What is the last letter of (\w+)\?", r"Give the last letter of \1."),
}
PHRASINGS = ("standard", "alt")


def _check_phrasing(phrasing: str) -> None:
    if phrasing not in PHRASINGS:
        raise UserError(f"phrasing must be one of {', '.join(PHRASINGS)}, got {phrasing!r}")


def rephrase(family: str, question: str, phrasing: str = "alt") -> str:
    """A family's standard question in `phrasing` ("standard": unchanged; "alt": ALT_PHRASINGS)."""
    _check_phrasing(phrasing)
    if phrasing == "standard":
        return question
    pattern, repl = ALT_PHRASINGS[family]
    out, n = re.subn(f"^{pattern}$", repl, question)
    if n != 1:  # a family whose questions the pattern does not cover: a bug here, not the user's
        raise ValueError(f"no alternative phrasing of {question!r} ({family})")
    return out


DEFAULT_N_TRAIN = 5000
DEFAULT_N_TEST = 500


# ------------------------------------------------------------------------------------------------ wrong answers

_SWAP_WORDS = {"even": "odd", "odd": "even", "yes": "no", "no": "yes"}


def _wrong_number(answer: str, rng: random.Random) -> str:
    n = int(answer)
    out = {n + 1, n - 1}
    if abs(n) >= 10:
        out |= {n + 10, n - 10}
    digits = str(abs(n))
    i = rng.randrange(len(digits))
    for d in "0123456789":
        if d != digits[i] and not (i == 0 and d == "0" and len(digits) > 1):
            out.add(int(("-" if n < 0 else "") + digits[:i] + d + digits[i + 1 :]))
    out.discard(n)
    if n >= 0:
        out = {x for x in out if x >= 0}
    return str(rng.choice(sorted(out)))


def _wrong_letters(answer: str, rng: random.Random) -> str:
    swaps = [i for i in range(len(answer) - 1) if answer[i].lower() != answer[i + 1].lower()]
    if swaps and rng.random() < 0.5:  # a wrong letter order
        i = rng.choice(swaps)
        return answer[:i] + answer[i + 1] + answer[i] + answer[i + 2 :]
    i = rng.randrange(len(answer))  # one wrong letter
    c = rng.choice([x for x in LETTERS if x != answer[i].lower()])
    return answer[:i] + (c.upper() if answer[i].isupper() else c) + answer[i + 1 :]


def _wrong_list(answer: str, rng: random.Random) -> str:
    items = answer.split(" ")
    swaps = [i for i in range(len(items) - 1) if items[i] != items[i + 1]]
    if swaps and rng.random() < 0.5:
        i = rng.choice(swaps)
        items[i], items[i + 1] = items[i + 1], items[i]
    else:
        i = rng.randrange(len(items))
        items[i] = _wrong_number(items[i], rng) if items[i].isdigit() else _wrong_letters(items[i], rng)
    return " ".join(items)


def wrong_answer(answer: str, rng: random.Random) -> str:
    """A plausible wrong answer: off by one (or ten) / one digit changed for a number, two neighbours swapped
    or one item / letter changed for a list or a word; never equal to `answer` after normalize_answer."""
    from llmctl.evaluate import normalize_answer

    gold = normalize_answer(answer)
    for _ in range(100):
        if answer in _SWAP_WORDS:
            w = _SWAP_WORDS[answer]
        elif answer.lstrip("-").isdigit():
            w = _wrong_number(answer, rng)
        elif " " in answer:
            w = _wrong_list(answer, rng)
        else:
            w = _wrong_letters(answer, rng)
        if normalize_answer(w) != gold:
            return w
    raise ValueError(f"no wrong answer found for {answer!r}")


# ------------------------------------------------------------------------------------------------ splits


@dataclass(frozen=True)
class Item:
    family: str
    question: str
    answer: str
    rejected: str


def _families(families) -> list[str]:
    if families is None:
        return list(DEFAULT_FAMILIES)
    if isinstance(families, str):
        families = [f.strip() for f in families.split(",") if f.strip()]
    names = list(dict.fromkeys(families))
    unknown = [f for f in names if f not in FAMILIES]
    if unknown:
        raise UserError(f"unknown task famil{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                        f"known: {', '.join(FAMILIES)}")  # fmt: skip
    if not names:
        raise UserError("no task families given")
    return names


def _shares(n: int, k: int) -> list[int]:
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def generate(n_train: int, n_test: int, seed: int = 0, families=None,
             phrasing: str = "standard") -> tuple[list[Item], list[Item]]:
    """(train, test) items: n_train / n_test split evenly over the families (the first ones get the remainder).
    Each family draws from its own random stream (seeded by seed and its name), test items first, and skips any
    question it already drew, so questions are unique across both splits and a family's items do not depend on
    which other families are chosen. Rows are shuffled (seeded). phrasing "alt": the same items, each question
    worded as ALT_PHRASINGS has it."""
    _check_phrasing(phrasing)
    if n_train < 0 or n_test < 0:
        raise UserError(f"--n-train and --n-test must be >= 0, got {n_train} and {n_test}")
    names = _families(families)
    train: list[Item] = []
    test: list[Item] = []
    for name, k_train, k_test in zip(names, _shares(n_train, len(names)), _shares(n_test, len(names))):
        rng = random.Random(f"llmctl.tasks:{seed}:{name}")
        bad = random.Random(f"llmctl.tasks:{seed}:{name}:rejected")
        seen: set[str] = set()
        for k, out in ((k_test, test), (k_train, train)):
            for _ in range(k):
                for _ in range(1000):
                    q, a = FAMILIES[name].make(rng)
                    if q not in seen:
                        break
                else:
                    raise UserError(f"task family {name} ran out of new questions after {len(seen)}; "
                                    f"ask for fewer items")  # fmt: skip
                seen.add(q)
                out.append(Item(name, rephrase(name, q, phrasing), a, wrong_answer(a, bad)))
    random.Random(f"llmctl.tasks:{seed}:shuffle-train").shuffle(train)
    random.Random(f"llmctl.tasks:{seed}:shuffle-test").shuffle(test)
    return train, test


# ------------------------------------------------------------------------------------------------ files


def _rows(items: Sequence[Item], kind: str) -> list[dict]:
    if kind == "sft":
        return [{"messages": [{"role": "user", "content": it.question}, {"role": "assistant", "content": it.answer}]}
                for it in items]
    if kind == "rl":
        return [{"prompt": it.question, "answer": it.answer} for it in items]
    return [{"prompt": it.question, "chosen": it.answer, "rejected": it.rejected} for it in items]


def write_tasks(out_dir, n_train: int = DEFAULT_N_TRAIN, n_test: int = DEFAULT_N_TEST, seed: int = 0,
                families=None, phrasing: str = "standard") -> dict[str, Path]:
    """Write sft_, rl_ and pref_ train / test JSONL files into out_dir (each atomically); returns name -> path."""
    train, test = generate(n_train, n_test, seed, families, phrasing)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for kind in ("sft", "rl", "pref"):
        for split, items in (("train", train), ("test", test)):
            p = out / f"{kind}_{split}.jsonl"
            atomic_write(p, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _rows(items, kind)))
            paths[f"{kind}_{split}"] = p
    return paths
