"""Built-in verifiable tasks (llmctl.tasks): determinism, disjoint splits, right answers, wrong rejected answers,
file formats and the `llmctl tasks` command line."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llmctl import tasks
from llmctl.errors import UserError
from llmctl.evaluate import matches, normalize_answer
from llmctl.examples import load

FILES = [f"{k}_{s}.jsonl" for k in ("sft", "rl", "pref") for s in ("train", "test")]
REPO = Path(__file__).resolve().parents[1]


def _ints(q: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", q)]


def _word(q: str) -> str:
    return re.search(r"\b([a-z]+)[.?]$", q).group(1)


# Each family's answer recomputed from its question text alone, independently of the generator.
SOLVE = {
    "add": lambda q: str(sum(_ints(q))),
    "sub": lambda q: str(_ints(q)[0] - _ints(q)[1]),
    "succ": lambda q: str(_ints(q)[0] + 1),
    "pred": lambda q: str(_ints(q)[0] - 1),
    "max": lambda q: str(max(_ints(q))),
    "min": lambda q: str(min(_ints(q))),
    "compare": lambda q: str(max(_ints(q))),
    "parity": lambda q: ("odd", "even")[_ints(q)[0] % 2 == 0],
    "sort_digits": lambda q: " ".join(sorted(re.findall(r"\d", q))),
    "reverse": lambda q: _word(q)[::-1],
    "sort_letters": lambda q: "".join(sorted(_word(q))),
    "upper": lambda q: _word(q).upper(),
    "repeat": lambda q: _word(q),
    "count": lambda q: str(len(_word(q))),
    "first": lambda q: _word(q)[0],
    "last": lambda q: _word(q)[-1],
}


@pytest.fixture(scope="module")
def all_items():
    return tasks.generate(1600, 320, seed=3, families=list(tasks.FAMILIES))


def test_every_family_is_checked():
    assert set(SOLVE) == set(tasks.FAMILIES)
    assert set(tasks.DEFAULT_FAMILIES) <= set(tasks.FAMILIES)


def test_answers_are_right(all_items):
    train, test = all_items
    for it in train + test:
        assert it.answer == SOLVE[it.family](it.question), it
        assert 0 < len(it.question) <= 60 and 0 < len(it.answer) <= 12, it


def test_rejected_is_wrong_and_plausible(all_items):
    train, test = all_items
    for it in train + test:
        assert it.rejected and normalize_answer(it.rejected) != normalize_answer(it.answer), it
        assert abs(len(it.rejected) - len(it.answer)) <= 1, it  # a near miss, not noise
    for a in ["0", "9", "10", "100", "999", "1000", "-3", "even", "odd", "a", "zz", "ABC", "1 1 2", "0 0 0"]:
        rng = random.Random(a)
        for _ in range(50):
            assert normalize_answer(tasks.wrong_answer(a, rng)) != normalize_answer(a), a


def test_splits_are_disjoint_sized_and_even(all_items):
    train, test = all_items
    assert len(train) == 1600 and len(test) == 320
    qtrain, qtest = [it.question for it in train], [it.question for it in test]
    assert len(set(qtrain)) == len(qtrain) and len(set(qtest)) == len(qtest)
    assert not set(qtrain) & set(qtest)
    assert {it.family for it in test} == set(tasks.FAMILIES)
    counts = [sum(it.family == f for it in train) for f in tasks.FAMILIES]
    assert max(counts) - min(counts) <= 1


def test_family_items_do_not_depend_on_the_other_families():
    alone = tasks.generate(20, 10, seed=5, families=["add"])
    mixed = tasks.generate(40, 20, seed=5, families="max,add")
    for a, m in zip(alone, mixed):
        assert set(a) == {it for it in m if it.family == "add"}


def test_write_tasks_is_deterministic(tmp_path):
    a = tasks.write_tasks(tmp_path / "a", 300, 60, seed=7)
    b = tasks.write_tasks(tmp_path / "b", 300, 60, seed=7)
    c = tasks.write_tasks(tmp_path / "c", 300, 60, seed=8)
    assert sorted(p.name for p in a.values()) == sorted(FILES)
    for key in a:
        assert a[key].read_bytes() == b[key].read_bytes(), key
        assert a[key].read_bytes() != c[key].read_bytes(), key
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(FILES)  # no temporary files left


def test_formats(tmp_path):
    paths = tasks.write_tasks(tmp_path, 210, 35, seed=0)
    sft = {s: [json.loads(x) for x in paths[f"sft_{s}"].read_text().splitlines()] for s in ("train", "test")}
    assert len(sft["train"]) == 210 and len(sft["test"]) == 35
    for row in sft["train"] + sft["test"]:
        assert list(row) == ["messages"]
        (u, a) = row["messages"]
        assert u["role"] == "user" and a["role"] == "assistant" and u["content"] and a["content"]
    for split in ("train", "test"):
        rl = load(paths[f"rl_{split}"], "exact-match")
        pref = load(paths[f"pref_{split}"], "preference")
        assert all(list(r) == ["prompt", "answer"] for r in rl)
        assert [r["prompt"] for r in rl] == [r["messages"][0]["content"] for r in sft[split]]
        assert [r["answer"] for r in rl] == [r["messages"][1]["content"] for r in sft[split]]
        assert [(r["prompt"], r["chosen"]) for r in pref] == [(r["prompt"], r["answer"]) for r in rl]
        assert all(normalize_answer(r["chosen"]) != normalize_answer(r["rejected"]) for r in pref)
    q_train = {r["prompt"] for r in load(paths["rl_train"], "exact-match")}
    assert not q_train & {r["prompt"] for r in load(paths["rl_test"], "exact-match")}


def test_reward_is_the_exact_match_rule():
    assert matches("82", "82") == 1.0
    assert matches(" 82.\n", "82") == 1.0
    assert matches("Odd", "odd") == 1.0
    assert matches("1 2 3", "1 2 3") == 1.0
    assert matches("83", "82") == 0.0
    assert matches("", "82") == 0.0
    assert matches("b", ["a", "b"]) == 1.0


def test_bad_arguments():
    with pytest.raises(UserError, match="unknown task family nope"):
        tasks.generate(10, 10, families=["add", "nope"])
    with pytest.raises(UserError, match="ran out of new questions"):
        tasks.generate(2000, 0, families=["succ"])  # only 1000 questions exist


def test_cli(tmp_path):
    cmd = [sys.executable, "-m", "llmctl", "tasks", "--out", str(tmp_path / "t"), "--n-train", "40", "--n-test", "8",
           "--seed", "1", "--families", "add,reverse"]  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert sorted(Path(p).name for p in r.stdout.split()) == sorted(FILES)
    assert len(load(tmp_path / "t" / "rl_train.jsonl", "exact-match")) == 40
    assert len(load(tmp_path / "t" / "pref_test.jsonl", "preference")) == 8
    assert (tmp_path / "t" / "sft_test.jsonl").read_bytes() == \
        tasks.write_tasks(tmp_path / "u", 40, 8, seed=1, families=["add", "reverse"])["sft_test"].read_bytes()


def test_cli_errors(tmp_path):
    def llmctl_tasks(*args):
        return subprocess.run([sys.executable, "-m", "llmctl", "tasks", *args], cwd=REPO, capture_output=True,
                              text=True, check=False)  # fmt: skip

    r = llmctl_tasks("--out", str(tmp_path / "v"), "--families", "nope")
    assert r.returncode == 2
    assert r.stderr.startswith("error: unknown task family nope")
    assert not (tmp_path / "v").exists()
    assert llmctl_tasks("--out", str(tmp_path / "w"), "--n-train", "-1").returncode == 2


def test_alt_phrasing_is_the_same_items_worded_otherwise(all_items):
    alt = tasks.generate(1600, 320, seed=3, families=list(tasks.FAMILIES), phrasing="alt")
    assert set(tasks.ALT_PHRASINGS) == set(tasks.FAMILIES)
    templates = {}
    for std_split, alt_split in zip(all_items, alt):
        assert [(i.family, i.answer, i.rejected) for i in std_split] == [(i.family, i.answer, i.rejected)
                                                                          for i in alt_split]  # fmt: skip
        for s, a in zip(std_split, alt_split):
            assert a.question != s.question
            assert _ints(a.question) == _ints(s.question) or s.family == "sub"  # the same numbers
            if s.family == "sub":  # "Subtract b from a."
                assert _ints(a.question)[::-1] == _ints(s.question)
            words = set(re.findall(r"\b[a-z]+\b", s.question)) - set(re.findall(r"\b[a-z]+\b", a.question))
            assert not words - {"what", "is", "the", "of", "comes", "after", "before", "largest", "smallest", "which",
                                "larger", "or", "even", "odd", "digits", "word", "letters", "how", "many", "are",
                                "in", "letter"}, (s.question, a.question)  # the item's made-up word is kept
            templates.setdefault(a.family, set()).add(" ".join(a.question.split()[:2]))
    for family, starts in templates.items():  # the alternative wording is new: no standard question starts so
        assert not any(it.question.startswith(t) for t in starts for it in all_items[1] if it.family == family)
    assert not {it.question for it in alt[0]} & {it.question for it in alt[1]}
    assert len({it.question for it in alt[0]}) == len(alt[0])


def test_alt_phrasing_cli(tmp_path):
    r = subprocess.run([sys.executable, "-m", "llmctl", "tasks", "--out", str(tmp_path / "a"), "--n-train", "14",
                        "--n-test", "7", "--phrasing", "alt"], cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    std = tasks.write_tasks(tmp_path / "s", 14, 7)
    alt = load(tmp_path / "a" / "rl_test.jsonl", "exact-match")
    ref = load(std["rl_test"], "exact-match")
    assert [r["answer"] for r in alt] == [r["answer"] for r in ref]
    assert all(a["prompt"] != b["prompt"] for a, b in zip(alt, ref))
    r = subprocess.run([sys.executable, "-m", "llmctl", "tasks", "--out", str(tmp_path / "b"), "--phrasing", "odd"],
                       cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["error: phrasing must be one of standard, alt, "
                                                                   "got 'odd'"]  # fmt: skip
    assert not (tmp_path / "b").exists()
