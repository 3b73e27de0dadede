"""Corpus reading, the builtin corpus, token shards."""

from __future__ import annotations

import gzip
import io
import json

import numpy as np
import pytest

from llmctl import builtin, data
from llmctl.data import read_corpus
from llmctl.shards import NoSplit, TokenShards, encode_corpus
from llmctl.errors import UserError

DOCS = ["first document\nwith two lines", "second ü 🙂", "third <|eos|> literal", "fourth", "fifth doc"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------- builtin


def test_builtin_corpus_is_big_deterministic_and_quiet(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("LLMCTL_CACHE", str(tmp_path))
    monkeypatch.setattr(builtin, "_memory", None)
    docs = builtin.builtin_corpus()
    assert capfd.readouterr().out == ""
    assert all(isinstance(d, str) and d for d in docs)
    assert sum(len(d.encode("utf-8")) for d in docs) > 2_000_000
    assert len(list(tmp_path.glob("builtin-*.json.gz"))) == 1  # cached on disk
    monkeypatch.setattr(builtin, "_memory", None)
    assert builtin.builtin_corpus() == docs  # from the disk cache
    monkeypatch.setattr("sys.excepthook", lambda *a: None)  # process state (CLI hooks) must not matter
    assert builtin._build(builtin._stdlib_files()) == docs  # a fresh assembly is identical
    assert any("heap" in d for d in docs) and any("Assignment statements" in d for d in docs)


# ----------------------------------------------------------------------------------------------- reading


def test_read_txt_paragraphs(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("para one\nline two\n\n\n  \npara two\n\nlast", encoding="utf-8")
    assert read_corpus([str(f)])["text"][:] == ["para one\nline two", "para two", "last"]


def test_read_jsonl_gz_parquet_dir_glob(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    write_jsonl(d / "a.jsonl", [{"text": "j1", "id": 1}, {"text": "j2"}])
    with gzip.open(d / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "g1"}) + "\n\n")
    pq.write_table(pa.table({"text": ["p1", "p2"], "n": [1, 2]}), d / "sub" / "c.parquet")
    (d / "sub" / "d.txt").write_text("t1\n\nt2\n", encoding="utf-8")
    (d / "notes.md").write_text("ignored")
    assert list(read_corpus([str(d)])["text"]) == ["j1", "j2", "g1", "p1", "p2", "t1", "t2"]
    assert list(read_corpus([str(d / "*.jsonl*")])["text"]) == ["j1", "j2", "g1"]
    assert list(read_corpus([str(d / "**" / "*.txt"), str(d / "a.jsonl")])["text"]) == ["t1", "t2", "j1", "j2"]
    assert list(read_corpus([str(d / "sub" / "c.parquet")])["text"]) == ["p1", "p2"]


def test_read_stdin_and_builtin(monkeypatch):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO("from\nstdin\n\nsecond".encode())))
    ds = read_corpus(["-", "builtin"])
    assert ds["text"][:2] == ["from\nstdin", "second"]
    assert len(ds) == 2 + len(builtin.builtin_corpus())


def test_read_with_several_processes(tmp_path):
    files = [write_jsonl(tmp_path / f"{i}.jsonl", [{"text": f"doc {i}.{j}"} for j in range(3)]) for i in range(3)]
    assert list(read_corpus([str(f) for f in files], num_proc=2)["text"]) == \
        [f"doc {i}.{j}" for i in range(3) for j in range(3)]


def test_malformed_jsonl_names_file_and_line(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_text('{"text": "ok"}\n\n{"text": "bad",\n')
    with pytest.raises(UserError, match=r"data\.jsonl:3: invalid JSON"):
        read_corpus([str(f)])
    write_jsonl(f, [{"text": "ok"}, {"txt": "no text field"}])
    with pytest.raises(UserError, match=r"data\.jsonl:2: .*\"text\""):
        read_corpus([str(f)])
    write_jsonl(f, [{"text": "ok"}, {"text": 5}])
    with pytest.raises(UserError, match=r"data\.jsonl:2:"):
        read_corpus([str(f)])
    write_jsonl(f, [{"text": "ok"}, {"text": "x"}, ["not", "an", "object"]])
    with pytest.raises(UserError, match=r"data\.jsonl:3:"):
        read_corpus([str(f), str(f)], num_proc=2)  # also from worker processes


def test_read_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_corpus([str(tmp_path / "missing.txt")])
    with pytest.raises(UserError, match="no files match"):
        read_corpus([str(tmp_path / "*.jsonl")])
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="unsupported"):
        read_corpus([str(tmp_path / "data.csv")])
    with pytest.raises(UserError, match="no .* files in directory"):
        read_corpus([str(tmp_path)])
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(UserError, match="no text"):
        read_corpus([str(tmp_path / "empty.txt")])
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        read_corpus([str(tmp_path / "latin1.txt")])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(UserError, match='no column "text"'):
        read_corpus([str(tmp_path / "p.parquet")])


# ----------------------------------------------------------------------------------------------- shards


def split_docs(ids: np.ndarray, bos: int, eos: int) -> list[list[int]]:
    docs, cur = [], None
    for i in ids.tolist():
        if i == bos and cur is None:
            cur = []
        elif i == eos and cur is not None:
            docs.append(cur)
            cur = None
        else:
            cur.append(i)
    assert cur is None
    return docs


def test_shards_round_trip(tok, tmp_path):
    docs = [f"document number {i}: {DOCS[i % len(DOCS)]}" for i in range(60)]
    write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in docs])
    meta = encode_corpus([str(tmp_path / "c.jsonl")], tok, tmp_path / "out", val_fraction=0.1)
    saved = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert saved == meta
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 512 and meta["tokenizer_hash"] == tok.hash()
    assert meta["bos_id"] == tok.bos_id and meta["eos_id"] == tok.eos_id and meta["documents"] == 60
    assert meta["token_bytes"] == tok.token_bytes().tolist()
    train, val = TokenShards(tmp_path / "out"), TokenShards(tmp_path / "out", split="val")
    assert train.dtype == np.dtype("<u2") and train.shards[0].dtype == np.uint16
    assert len(train) == meta["splits"]["train"]["tokens"] and len(val) == meta["splits"]["val"]["tokens"] > 0
    assert (tmp_path / "out" / "train_00000.bin").stat().st_size == 2 * len(train)
    decoded = {s: [tok.decode(d) for d in split_docs(ds.read(0, len(ds)), tok.bos_id, tok.eos_id)]
               for s, ds in (("train", train), ("val", val))}
    assert 1 <= len(decoded["val"]) < 20
    assert sorted(decoded["train"] + decoded["val"]) == sorted(docs)
    assert [d for d in docs if d in decoded["val"]] == decoded["val"]  # order kept within a split
    for s in ("train", "val"):
        assert meta["splits"][s]["documents"] == len(decoded[s])
        assert meta["splits"][s]["text_bytes"] == sum(len(d.encode()) for d in decoded[s])
    # Token bytes of the shards = the text bytes (bos / eos count 0).
    assert train.token_bytes[train.read(0, len(train))].sum() == meta["splits"]["train"]["text_bytes"]


def test_literal_special_strings_stay_text(tok, tmp_path):
    write_jsonl(tmp_path / "c.jsonl", [{"text": "a <|eos|> b"}, {"text": "c"}])
    encode_corpus([str(tmp_path / "c.jsonl")], tok, tmp_path / "out", val_fraction=0.0)
    shards = TokenShards(tmp_path / "out")
    ids = shards.read(0, len(shards))
    assert (ids == tok.eos_id).sum() == 2


def test_val_split_at_least_one_document_and_deterministic(tok, tmp_path):
    write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in DOCS])
    m1 = encode_corpus([str(tmp_path / "c.jsonl")], tok, tmp_path / "a", val_fraction=0.001)
    m2 = encode_corpus([str(tmp_path / "c.jsonl")], tok, tmp_path / "b", val_fraction=0.001, num_proc=2)
    assert m1["splits"]["val"]["documents"] == 1
    assert m1 == m2
    for name in m1["splits"]["train"]["shards"] + m1["splits"]["val"]["shards"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    m0 = encode_corpus([str(tmp_path / "c.jsonl")], tok, tmp_path / "c", val_fraction=0.0)
    assert m0["splits"]["val"] == {"shards": [], "shard_tokens": [], "tokens": 0, "documents": 0, "text_bytes": 0}
    with pytest.raises(UserError, match="no val split"):
        TokenShards(tmp_path / "c", split="val")


def test_get_across_shard_boundaries(tok, tmp_path):
    write_jsonl(tmp_path / "c.jsonl", [{"text": f"{d} {i}"} for i, d in enumerate(DOCS * 4)])
    meta = encode_corpus([str(tmp_path / "c.jsonl")], tok, tmp_path / "out", val_fraction=0.0, max_shard_tokens=7)
    names = meta["splits"]["train"]["shards"]
    assert len(names) > 3 and names[:2] == ["train_00000.bin", "train_00001.bin"]
    assert all(n == 7 for n in meta["splits"]["train"]["shard_tokens"][:-1])
    ds = TokenShards(tmp_path / "out")
    full = np.concatenate([np.fromfile(tmp_path / "out" / n, dtype="<u2") for n in names]).astype(np.int64)
    assert len(ds) == full.size
    offsets = np.array([0, 5, 6, 13, full.size - 10], dtype=np.int64)
    batch = ds.get(offsets, 10)
    assert str(batch.dtype) == "torch.int64" and tuple(batch.shape) == (5, 10)
    for row, o in zip(batch.numpy(), offsets):
        assert (row == full[o:o + 10]).all()
    assert ds.num_windows(10) == full.size - 9
    with pytest.raises(IndexError):
        ds.get(np.array([full.size - 9]), 10)
    # A .bin path selects its split (the whole split).
    assert len(TokenShards(tmp_path / "out" / "train_00002.bin", split="val")) == full.size


def test_token_shards_errors(tok, tmp_path):
    with pytest.raises(UserError, match="no such token-shard directory"):
        TokenShards(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no meta.json"):
        TokenShards(tmp_path / "empty")
    write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in DOCS])
    encode_corpus([str(tmp_path / "c.jsonl")], tok, tmp_path / "out")
    with pytest.raises(UserError, match="no test split"):
        TokenShards(tmp_path / "out", split="test")
    with open(tmp_path / "out" / "train_00000.bin", "r+b") as f:
        f.truncate(4)
    with pytest.raises(UserError, match="truncated"):
        TokenShards(tmp_path / "out")


def test_out_dir_is_never_clobbered(tok, tmp_path):
    write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in DOCS])
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        encode_corpus([str(tmp_path / "c.jsonl")], tok, precious)
    assert (precious / "notes.txt").read_text() == "keep me" and len(list(precious.iterdir())) == 1
    # An earlier shard directory is replaced; an empty one is filled; no temp directories are left behind.
    encode_corpus([str(tmp_path / "c.jsonl")], tok, tmp_path / "out", val_fraction=0.0)
    encode_corpus([str(tmp_path / "c.jsonl")], tok, tmp_path / "out", val_fraction=0.5)
    assert TokenShards(tmp_path / "out").meta["val_fraction"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "mine", "out"]
    # A failing encode leaves the previous shards untouched.
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    with pytest.raises(UserError):
        encode_corpus([str(tmp_path / "bad.jsonl")], tok, tmp_path / "out")
    assert TokenShards(tmp_path / "out").meta["val_fraction"] == 0.5


def test_large_vocab_uses_uint32(tok, tmp_path):
    class BigVocab:  # the same tokenizer, claiming a vocabulary that does not fit uint16
        def __getattr__(self, name):
            return getattr(tok, name)

        vocab_size = 70_000

    write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in DOCS])
    meta = encode_corpus([str(tmp_path / "c.jsonl")], BigVocab(), tmp_path / "out", val_fraction=0.0)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_000
    ds = TokenShards(tmp_path / "out" / "train_00000.bin")
    assert (tmp_path / "out" / "train_00000.bin").stat().st_size == 4 * len(ds)
    ids = ds.read(0, len(ds))
    assert ids.tolist() == [i for d in DOCS for i in [tok.bos_id, *tok.encode(d), tok.eos_id]]


# ----------------------------------------------------------------------------------------------- bad bytes, bad shards


def test_text_that_is_not_utf8_names_file_and_line(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"one\n\ntwo\nthr\xe9e\n")
    with pytest.raises(UserError, match=r"a\.txt:4: not UTF-8 \(byte 0xe9"):
        read_corpus([str(tmp_path / "a.txt")])
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"b\.jsonl:2: not UTF-8"):
        list(data.iter_jsonl(tmp_path / "b.jsonl"))
    with gzip.open(tmp_path / "c.jsonl.gz", "wb") as f:
        f.write(b'\n{"text": "ok"}\n\xff\n')
    with pytest.raises(UserError, match=r"c\.jsonl\.gz:3: not UTF-8"):
        list(data.iter_jsonl(tmp_path / "c.jsonl.gz"))
    # an unpaired surrogate escape is not text either; a pair is
    (tmp_path / "d.jsonl").write_text('{"text": "\\ud83d\\ude00"}\n{"text": "\\udcff"}\n')
    rows = data.iter_jsonl(tmp_path / "d.jsonl")
    assert next(rows) == (1, {"text": "\U0001f600"})
    with pytest.raises(UserError, match=r"d\.jsonl:2: not UTF-8 \(an unpaired surrogate escape \\udcff\)"):
        next(rows)


def test_text_lines_decode_strictly():
    stream = io.TextIOWrapper(io.BytesIO(b"a\r\nb\n\xff\n"))
    lines = data.text_lines(stream)
    assert next(lines) == (1, "a\r\n") and next(lines) == (2, "b\n")
    with pytest.raises(UserError, match=r"^stdin:3: not UTF-8 \(byte 0xff"):
        next(lines)
    with pytest.raises(UserError, match=r"^stdin:2: not UTF-8 \(byte 0xe9\)"):
        list(data.text_lines(io.StringIO("ok\ncaf\udce9\n")))  # a text stream holding surrogate escapes


@pytest.fixture
def shards(tok, tmp_path):
    write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in DOCS * 3])
    encode_corpus([str(tmp_path / "c.jsonl")], tok, tmp_path / "out", val_fraction=0.3)
    return tmp_path / "out"


def _edit_meta(d, fn):
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text(json.dumps(fn(meta)))


def test_token_shards_know_their_largest_id_and_fall_back_to_another_split(tok, shards, tmp_path):
    train = TokenShards(shards)
    assert train.max_id == int(train.read(0, len(train)).max()) < tok.vocab_size
    assert TokenShards(shards, "val", fallback="train").split == "val"  # has its own
    write_jsonl(tmp_path / "held_out.jsonl", [{"text": d} for d in DOCS])
    encode_corpus([str(tmp_path / "held_out.jsonl")], tok, tmp_path / "alone", val_fraction=0.0)
    alone = TokenShards(tmp_path / "alone", "val", fallback="train")
    assert alone.split == "train" and len(alone) == len(TokenShards(tmp_path / "alone"))
    with pytest.raises(NoSplit, match="no val split"):
        TokenShards(tmp_path / "alone", "val")


@pytest.mark.parametrize("damage,match", [
    (lambda m: {**m, "dtype": 16}, "'dtype' must be \"uint16\" or \"uint32\", got 16"),
    (lambda m: {**m, "dtype": "uint16", "vocab_size": 70_000}, "'dtype' must be uint32 for a vocabulary of 70000"),
    (lambda m: {**m, "vocab_size": True}, "'vocab_size' must be a positive integer"),
    (lambda m: {**m, "token_bytes": "abc"}, "'token_bytes' must be a list"),
    (lambda m: {**m, "bos_id": "1"}, "'bos_id' must be a token id"),
    (lambda m: {**m, "tokenizer_hash": 5}, "'tokenizer_hash' must be a string"),
    (lambda m: {k: v for k, v in m.items() if k != "splits"}, "'splits' must be an object"),
    (lambda m: {**m, "splits": {"train": []}}, "'splits.train' must be an object"),
    (lambda m: {**m, "splits": {"train": {**m["splits"]["train"], "shards": ["val_00000.bin"]}}},
     "'splits.train.shards' must be a list of shard file names"),
    (lambda m: {**m, "splits": {"train": {**m["splits"]["train"], "shard_tokens": []}}},
     "'splits.train.shard_tokens' must be a token count for each shard"),
    (lambda m: {**m, "splits": {"train": {**m["splits"]["train"], "tokens": None}}},
     "'splits.train.tokens' must be the sum of its shard_tokens"),
    (lambda m: {**m, "vocab_size": 3}, "outside the vocabulary of 3 tokens"),
    (lambda m: "just a string", "unsupported token-shard format (not a JSON object)"),
])  # fmt: skip
def test_damaged_meta_is_one_clear_error(shards, damage, match):
    _edit_meta(shards, damage)
    with pytest.raises(UserError) as e:
        TokenShards(shards)
    assert match in str(e.value) and "meta.json" in str(e.value), str(e.value)


def test_token_ids_outside_the_vocabulary_are_refused(tok, shards):
    ids = np.fromfile(shards / "val_00000.bin", dtype="<u2")
    ids[-1] = tok.vocab_size
    ids.tofile(shards / "val_00000.bin")
    TokenShards(shards)  # the train split is fine
    with pytest.raises(UserError, match=f"val_00000.bin: token id {tok.vocab_size} is outside the vocabulary"):
        TokenShards(shards, "val")
