"""Hugging Face hub ids as MODEL, offline (issue 16, part 3): a cache built in a temporary HF_HOME with
huggingface_hub's own layout (`hub/models--org--name/{blobs, snapshots/<commit>, refs/<ref>}`, files as relative
symlinks to content-addressed blobs, checked by huggingface_hub's `scan_cache_dir`) holds tiny llmctl models;
MODEL=org/name[@revision] resolves there, an absent id names `llmctl download`, a local path wins. `download`
runs offline (HF_HUB_OFFLINE=1, an endpoint nothing listens on) and against a stand-in Hub on 127.0.0.1 (the few
endpoints snapshot_download calls, with the Hub's error codes): no test touches the network."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import torch
from typer.testing import CliRunner

from llmctl import hf, hub
from llmctl.cli import app
from llmctl.errors import UserError
from llmctl.model import ModelConfig, Transformer

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
COMMIT_A, COMMIT_B = "a" * 40, "0123456789abcdef0123456789abcdef01234567"

pytestmark = pytest.mark.usefixtures("one_thread")


def put_in_cache(hub_cache: Path, repo_id: str, src: Path, commit: str, refs=()) -> Path:
    """Add the files of `src` as snapshot `commit` of model `repo_id`, the way huggingface_hub stores a download:
    blobs named by their hash, snapshot entries as relative symlinks, refs/<ref> holding the commit hash."""
    repo = hub_cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return snap


def tiny(tmp: Path, tok_dir: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(arch="llama", vocab_size=512, n_layer=1, n_head=2, n_kv_head=1, n_embd=32,
                                block_size=64, init_std=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0))  # fmt: skip
    return hf.save_model(m, tmp / f"model-{seed}", tokenizer_dir=tok_dir)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tok_dir):
    """HF_HOME with org/tiny: commit A (model 1) at refs/main, commit B (model 2) at refs/v2; and the sources."""
    root = tmp_path_factory.mktemp("hf")
    m1, m2 = tiny(root, tok_dir, 1), tiny(root, tok_dir, 2)
    hub_cache = root / "home" / "hub"
    put_in_cache(hub_cache, "org/tiny", m1, COMMIT_A, refs=["main"])
    put_in_cache(hub_cache, "org/tiny", m2, COMMIT_B, refs=["v2"])
    return {"home": root / "home", "hub": hub_cache, "m1": m1, "m2": m2}


@pytest.fixture
def in_cache(cache, monkeypatch):
    """This process's huggingface_hub reads the test cache (it read HF_HOME once, on import)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache["hub"]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def llmctl(*args, input=None):
    r = runner.invoke(app, [*map(str, args)], input=input)
    return r.exit_code, r.stdout, r.stderr


def proc(*args, cwd, **env) -> subprocess.CompletedProcess:
    """`python -m llmctl ARGS` in `cwd`; HF_HUB_CACHE / HUGGINGFACE_HUB_CACHE unset so that HF_HOME decides."""
    base = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env = {**base, "PYTHONPATH": str(ROOT), "LLMCTL_DEBUG": "", "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-m", "llmctl", *map(str, args)], capture_output=True, text=True,
                          env={k: str(v) for k, v in env.items()}, cwd=cwd, timeout=300)


GREEDY = ("--temperature", 0, "--max-new-tokens", 6, "--device", "cpu")


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_the_cache_has_huggingface_hubs_own_layout(cache):
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(cache["hub"])
    assert not info.warnings, info.warnings
    (repo,) = info.repos
    assert repo.repo_id == "org/tiny" and repo.repo_type == "model"
    revs = {r.commit_hash: r for r in repo.revisions}
    assert set(revs) == {COMMIT_A, COMMIT_B} and revs[COMMIT_A].refs == {"main"} and revs[COMMIT_B].refs == {"v2"}
    assert {f.file_name for f in revs[COMMIT_A].files} == {p.name for p in cache["m1"].iterdir()}


def test_ids_and_paths_by_their_form():
    assert hub.parse("Qwen/Qwen3-0.6B") == ("Qwen/Qwen3-0.6B", None)
    assert hub.parse("gpt2") == ("gpt2", None)
    assert hub.parse("org/name@v1.0") == ("org/name", "v1.0")
    assert hub.parse(f"org/name@{COMMIT_A}") == ("org/name", COMMIT_A)
    for path in ("./org/name", "/org/name", "~/org/name", "../org/name", "runs/a/b", "org/name/", "a--b/c", "a/b..c",
                 "-org/name", "org/name-", "org/na me", "", "org/name@", "org/a@b@c"):
        assert hub.parse(path) is None, path


def test_generate_from_a_hub_id_in_a_subprocess_equals_the_snapshot(cache, tmp_path):
    """The acceptance command: HF_HOME set, nothing else; the id gives what the snapshot path gives."""
    r = proc("generate", "--model", "org/tiny", *GREEDY, "Hello", cwd=tmp_path, HF_HOME=cache["home"],
             HF_HUB_OFFLINE="1")
    assert r.returncode == 0, r.stderr
    code, out, err = llmctl("generate", "--model", cache["hub"] / "models--org--tiny" / "snapshots" / COMMIT_A,
                            *GREEDY, "Hello")
    assert code == 0, err
    assert r.stdout == out and out.strip()


def test_an_absent_id_names_the_download_command(cache, tmp_path):
    r = proc("generate", "--model", "org/absent", "hi", cwd=tmp_path, HF_HOME=cache["home"], HF_HUB_OFFLINE="1")
    line = one_error_line(r.stderr)
    assert r.returncode == 2 and r.stdout == ""
    assert "org/absent" in line and "llmctl download org/absent" in line and str(cache["hub"]) in line, line
    r = proc("generate", "--model", "org/tiny@nope", "hi", cwd=tmp_path, HF_HOME=cache["home"], HF_HUB_OFFLINE="1")
    assert r.returncode == 2 and "llmctl download org/tiny@nope" in one_error_line(r.stderr)


def test_revisions_by_commit_and_by_ref(in_cache):
    outs = {}
    for spec in ("org/tiny", f"org/tiny@{COMMIT_A}", "org/tiny@main", f"org/tiny@{COMMIT_B}", "org/tiny@v2",
                 in_cache["m1"], in_cache["m2"]):
        code, outs[str(spec)], err = llmctl("generate", "--model", spec, *GREEDY, "Hello")
        assert code == 0, err
    one, two = outs[str(in_cache["m1"])], outs[str(in_cache["m2"])]
    assert one != two  # two different models, so the comparisons below mean something
    assert outs["org/tiny"] == outs[f"org/tiny@{COMMIT_A}"] == outs["org/tiny@main"] == one
    assert outs[f"org/tiny@{COMMIT_B}"] == outs["org/tiny@v2"] == two


def test_a_local_directory_named_like_an_id_wins(in_cache, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(in_cache["m2"], tmp_path / "org" / "tiny")
    monkeypatch.chdir(tmp_path)
    code, local, err = llmctl("generate", "--model", "org/tiny", *GREEDY, "Hello")
    assert code == 0, err
    assert local == llmctl("generate", "--model", in_cache["m2"], *GREEDY, "Hello")[1]
    assert local != llmctl("generate", "--model", in_cache["m1"], *GREEDY, "Hello")[1]
    code, _, err = llmctl("generate", "--model", "./org/absent", "hi")  # ./: a path, never an id
    assert code == 2 and one_error_line(err).startswith("error: no such file or directory"), err


def test_a_cached_snapshot_without_the_needed_file(in_cache, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snap = put_in_cache(tmp_path / "hub", "org/partial", in_cache["m1"], COMMIT_A, refs=["main"])
    (snap / "config.json").unlink()
    code, _, err = llmctl("generate", "--model", "org/partial", "hi")
    line = one_error_line(err)
    assert code == 2 and "has no config.json" in line and "llmctl download org/partial" in line, line


def test_recipes_take_hub_ids(in_cache, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"prompt": "2+2=", "completion": "4"}) + "\n")
    recipe = ROOT / "recipes/tiny/sft.yaml"
    base = [recipe, f"out_dir={tmp_path / 'run'}", f"data.train={data}", "data.val=null", "eval.exact_match=null"]
    code, out, err = llmctl("sft", *base, "init_from=org/tiny@v2", "--dry-run")
    assert code == 0 and "init_from: org/tiny@v2" in out, err
    code, out, err = llmctl("sft", *base, "init_from=org/tiny@v2", "--show-mask")  # the tokenizer from the cache
    assert code == 0 and "[[" in out, err
    code, out, err = llmctl("sft", *base, "init_from=org/absent", "--show-mask")
    assert code == 2 and "llmctl download org/absent" in one_error_line(err)


def test_sft_and_lora_from_a_hub_id(in_cache, tmp_path):
    """One step of each from init_from=org/tiny@v2; the LoRA adapter names the hub id (and its revision) as its
    base, the way peft does, and `lora merge` finds the base in the cache from it."""
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) + "\n" for i in range(8)))
    common = [f"data.train={data}", "data.val=null", "eval.exact_match=null", "train.max_steps=1",
              "train.micro_batch_size=2", "train.save_every=1", "train.eval_every=0", "init_from=org/tiny@v2"]
    env = dict(HF_HOME=in_cache["home"], HF_HUB_OFFLINE="1")
    r = proc("sft", ROOT / "recipes/tiny/sft.yaml", *common, f"out_dir={tmp_path / 'sft'}", cwd=tmp_path, **env)
    assert r.returncode == 0, r.stderr
    from llmctl.report import lineage

    base, run = lineage(tmp_path / "sft")  # the report's lineage goes back to the cached snapshot
    assert base.kind == "model" and base.model_dir == in_cache["hub"] / "models--org--tiny" / "snapshots" / COMMIT_B
    assert run.run_dir == tmp_path / "sft"
    r = proc("lora", ROOT / "recipes/tiny/lora.yaml", *common, f"out_dir={tmp_path / 'lora'}", cwd=tmp_path, **env)
    assert r.returncode == 0, r.stderr
    (adapter,) = (tmp_path / "lora" / "checkpoints").glob("step-*")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "org/tiny" and cfg["revision"] == "v2", cfg
    code, out, err = llmctl("lora", "merge", tmp_path / "lora", "--out", tmp_path / "merged")
    assert code == 0 and (tmp_path / "merged" / "model.safetensors").is_file(), err


def test_reward_model_as_a_hub_id(in_cache):
    from llmctl.config import reward_kind

    assert reward_kind("org/tiny") == "model"
    with pytest.raises(UserError, match=r"^rl.reward: model org/absent .*llmctl download org/absent"):
        reward_kind("org/absent")


def test_download_offline(cache, tmp_path):
    """HF_HUB_OFFLINE=1: an absent id is one error line; a cached one prints its snapshot directory."""
    env = dict(HF_HOME=cache["home"], HF_HUB_OFFLINE="1")
    r = proc("download", "org/absent", cwd=tmp_path, **env)
    line = one_error_line(r.stderr)
    assert r.returncode == 2 and r.stdout == "" and "HF_HUB_OFFLINE" in line, line
    r = proc("download", "org/tiny", cwd=tmp_path, **env)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == cache["hub"] / "models--org--tiny" / "snapshots" / COMMIT_A
    r = proc("download", "org/tiny", "--revision", "v2", cwd=tmp_path, **env)
    assert r.returncode == 0 and r.stdout.strip().endswith(COMMIT_B), r.stderr
    r = proc("download", "org/tiny", cwd=tmp_path, HF_HOME=tmp_path / "other", HF_HUB_CACHE=cache["hub"],
             HF_HUB_OFFLINE="1")  # HF_HUB_CACHE before HF_HOME, as huggingface_hub has it
    assert r.returncode == 0 and r.stdout.strip().endswith(COMMIT_A), r.stderr
    r = proc("download", "./not-an-id", cwd=tmp_path, **env)
    assert r.returncode == 2 and "not a Hugging Face model id" in one_error_line(r.stderr)


def test_download_with_the_hub_unreachable(cache, tmp_path):
    """An endpoint nothing listens on (port 9 of this machine): one error line, exit 2, no network touched."""
    r = proc("download", "org/absent", cwd=tmp_path, HF_HOME=cache["home"], HF_HUB_OFFLINE="0",
             HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2")
    line = one_error_line(r.stderr)
    assert r.returncode == 2 and "cannot be reached" in line and "127.0.0.1:9" in line, line


def test_download_keeps_to_safetensors_json_and_tokenizer_files():
    from huggingface_hub.utils import filter_repo_objects

    files = ["model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json", "config.json",
             "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "merges.txt",
             "vocab.json", "chat_template.jinja", "pytorch_model.bin", "model.pt", "consolidated.pth", "tf_model.h5",
             "flax_model.msgpack", "model.onnx", "model.ckpt", "README.md", ".gitattributes"]
    kept = set(filter_repo_objects(files, allow_patterns=hub.ALLOW_PATTERNS))
    assert kept == set(files[:11]), kept


# ------------------------------------------------------------------------------ a stand-in Hub on this machine


def fake_hub(repos: dict, commit: str) -> ThreadingHTTPServer:
    """An HTTP server answering what snapshot_download asks the Hub (repo info, the file tree, /resolve/ HEAD and
    GET) for `repos` ({repo id: {path: bytes}}) at `commit` (also `main`); `org/gated` is gated (403 GatedRepo),
    another id is unknown (404 RepoNotFound), another revision too (404 RevisionNotFound). `served` lists the
    files it sent."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def send(self, code, body=b"", headers=()):
            self.send_response(code)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def error(self, code, kind):
            self.send(code, json.dumps({"error": kind}).encode(), [("X-Error-Code", kind)])

        def do_GET(self):
            parts = unquote(urlparse(self.path).path).strip("/").split("/")
            if len(parts) >= 6 and parts[:2] == ["api", "models"]:  # /api/models/ORG/NAME/{revision,tree}/REV
                repo, kind, rev, name = "/".join(parts[2:4]), parts[4], parts[5], None
            elif len(parts) >= 5 and parts[2] == "resolve":  # /ORG/NAME/resolve/REV/FILE
                repo, kind, rev, name = "/".join(parts[:2]), "resolve", parts[3], "/".join(parts[4:])
            else:
                return self.error(404, "EntryNotFound")
            if repo == "org/gated":
                return self.error(403, "GatedRepo")
            if repo not in repos:
                return self.error(404, "RepoNotFound")
            if rev not in ("main", commit):
                return self.error(404, "RevisionNotFound")
            files = repos[repo]
            if kind == "revision":
                info = {"id": repo, "sha": commit, "siblings": [{"rfilename": f} for f in files]}
                return self.send(200, json.dumps(info).encode())
            if kind == "tree":
                tree = [{"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                        for f, b in files.items()]  # fmt: skip
                return self.send(200, json.dumps(tree).encode())
            if name not in files:
                return self.error(404, "EntryNotFound")
            self.server.served.add(name)
            body = files[name]
            self.send(200, body, [("X-Repo-Commit", commit), ("ETag", f'"{hashlib.sha1(body).hexdigest()}"')])

        do_HEAD = do_GET

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.served = set()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


PICKLES = ("pytorch_model.bin", "model.pt", "consolidated.pth", "tf_model.h5", "flax_model.msgpack", "model.onnx",
           "model.ckpt", "README.md")


def test_download_from_a_hub_then_generate_offline(cache, tmp_path):
    """`llmctl download` through huggingface_hub fetches the safetensors, JSON and tokenizer files only (never a
    pickle), prints the snapshot, shows no progress bar off a terminal; the model then runs offline."""
    model = {p.name: p.read_bytes() for p in cache["m2"].iterdir()}
    repos = {"org/tiny": {**model, **{f: b"not for llmctl" for f in PICKLES}},
             "org/pickled": {"config.json": b"{}", "pytorch_model.bin": b"pickle"}}
    server = fake_hub(repos, COMMIT_B)
    home = tmp_path / "home"
    online = dict(HF_HOME=home, HF_HUB_OFFLINE="0", HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}",
                  HF_HUB_DISABLE_TELEMETRY="1")
    try:
        r = proc("download", "org/tiny", cwd=tmp_path, **online)
        assert r.returncode == 0 and r.stderr == "", r.stderr
        snap = Path(r.stdout.strip())
        assert snap == home / "hub" / "models--org--tiny" / "snapshots" / COMMIT_B
        assert sorted(p.name for p in snap.iterdir()) == sorted(model)
        assert server.served == set(model)  # no pickle, not even fetched
        for args, message in [(["org/absent"], "no model org/absent on the Hugging Face Hub"),
                              (["org/gated"], "org/gated is gated: accept its terms"),
                              (["org/tiny", "--revision", "nope"], "model org/tiny has no revision 'nope'"),
                              (["org/pickled"], "org/pickled has no safetensors weights")]:  # fmt: skip
            r = proc("download", *args, cwd=tmp_path, **online)
            assert r.returncode == 2 and message in one_error_line(r.stderr), (args, r.stderr)
    finally:
        server.shutdown()
    r = proc("generate", "--model", "org/tiny", *GREEDY, "Hello", cwd=tmp_path, HF_HOME=home, HF_HUB_OFFLINE="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout == llmctl("generate", "--model", cache["m2"], *GREEDY, "Hello")[1]
