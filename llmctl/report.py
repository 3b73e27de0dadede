"""The report card: `llmctl eval --model MODEL --report DIR` writes DIR/report.md and DIR/curves.png.

Lineage: MODEL's run directory, then the run its recipe's `init_from` names, and so on back to a run without
`init_from` (pretraining) or to a plain model directory; MODEL may also be one checkpoint directory
(`RUN/checkpoints/step-N`), which then stands for its run up to that step. A stage's kind comes from its
recipe's keys (`method` -> rlhf, `lora` -> lora, `init_from` -> sft, `model` -> pretrain).

DIR/evals.jsonl collects every evaluation recorded into DIR (one JSON object a line: model, task, data,
metrics), so several `llmctl eval ... --report DIR` runs build one report. report.md lists the model's facts
(architecture, parameters, tokens seen over the lineage, recipes), a table with one row per stage (steps,
tokens, last training loss, last val_loss / val_bpb from metrics.jsonl, and the recorded evaluations of that
stage's checkpoint), every recorded evaluation, and curves.png: training loss and validation bits per byte
against the tokens seen over the whole lineage, one line per stage.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from llmctl import hub
from llmctl.checkpoint import STEP_RE, atomic_write, resolve_model_dir
from llmctl.errors import UserError

HEADLINE = {"ppl": ("ppl",), "bpb": ("bpb",), "mc": ("acc", "acc_norm"), "exact-match": ("exact_match",),
            "preference": ("acc",)}  # fmt: skip
AXES = (("tokens seen (whole lineage)", "training loss (nats / token)"),
        ("tokens seen (whole lineage)", "validation bits per byte"))  # fmt: skip


@dataclass
class Stage:
    name: str
    kind: str
    model_dir: Path  # the checkpoint this stage contributes to the lineage
    run_dir: Path | None = None
    config: dict = field(default_factory=dict)
    step: int | None = None
    tokens: int | None = None  # tokens trained on in this stage, up to `step`
    events: list[dict] = field(default_factory=list)  # metrics.jsonl events up to `step`

    def last(self, key: str):
        for e in reversed(self.events):
            if isinstance(e.get(key), (int, float)):
                return e[key]
        return None


def stage_kind(cfg: dict) -> str:
    if "method" in cfg:
        return f"rlhf ({cfg['method']})"
    if "lora" in cfg:
        return "lora"
    if "init_from" in cfg:
        return "sft"
    return "pretrain" if "model" in cfg else "model"


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        d = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    return d if isinstance(d, dict) else {}


def _json_lines(path: Path, keep) -> list[dict]:
    """The JSON objects of a JSONL file that `keep` accepts (none when it is missing); a line cut short by a crash
    is skipped."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if isinstance(e, dict) and keep(e):
            out.append(e)
    return out


def locate(model) -> tuple[Path | None, Path]:
    """MODEL -> (its run directory or None, the model directory it means)."""
    p = Path(model)
    if (p / "config.yaml").is_file() and (p / "checkpoints").is_dir():
        return p, resolve_model_dir(p)
    if STEP_RE.match(p.name) and p.parent.name == "checkpoints" and (p.parent.parent / "config.yaml").is_file():
        return p.parent.parent, resolve_model_dir(p)
    return None, resolve_model_dir(p)


def _stage(model) -> Stage:
    run, ck = locate(model)
    if run is None:
        return Stage(name=ck.name, kind="model", model_dir=ck)
    cfg = _read_yaml(run / "config.yaml")
    m = STEP_RE.match(ck.name)
    step = int(m.group(1)) if m else None
    state = {}
    if (ck / "trainer_state.json").is_file():
        try:
            state = json.loads((ck / "trainer_state.json").read_text(encoding="utf-8"))
        except ValueError:
            state = {}
    events = [e for e in _json_lines(run / "metrics.jsonl", lambda e: isinstance(e.get("step"), int))
              if step is None or e["step"] <= step]  # fmt: skip
    tokens = state.get("tokens")
    if tokens is None:
        tokens = next((e["tokens"] for e in reversed(events) if "tokens" in e), None)
    return Stage(name=run.name, kind=stage_kind(cfg), model_dir=ck, run_dir=run, config=cfg, step=step,
                 tokens=tokens, events=events)  # fmt: skip


def lineage(model) -> list[Stage]:
    """The stages behind MODEL, oldest first (see the module doc)."""
    stages, seen, cur = [], set(), model
    while cur is not None:
        st = _stage(cur)
        key = (st.run_dir or st.model_dir).resolve()
        if key in seen:
            break
        seen.add(key)
        stages.append(st)
        init = st.config.get("init_from")
        cur = None
        if init:
            p = Path(init)
            if not p.exists() and not p.is_absolute() and st.run_dir is not None and (
                    hub.hub_id(init) is None or (st.run_dir.parent / init).exists()):
                p = st.run_dir.parent / init  # a path relative to where the run was started (else a hub id)
            try:
                _stage(p)
                cur = p
            except UserError:
                stages.append(Stage(name=str(init), kind="model (not found)", model_dir=Path(init)))
    return stages[::-1]


# ------------------------------------------------------------------------------------------------ records


def record_eval(report_dir, record: dict) -> None:
    """Append one evaluation ({model, task, data, metrics, ...}) to DIR/evals.jsonl."""
    d = Path(report_dir)
    d.mkdir(parents=True, exist_ok=True)
    record = {"time": datetime.datetime.now().isoformat(timespec="seconds"), **record}
    with open(d / "evals.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")


def read_evals(report_dir) -> list[dict]:
    return _json_lines(Path(report_dir) / "evals.jsonl", lambda r: isinstance(r.get("metrics"), dict))


def _data_labels(evals: list[dict]) -> dict[str, str]:
    """A short label per evaluation data path: its file name, or parent/name where two different paths share a
    file name (e.g. tasks/rl_test.jsonl and tasks-alt/rl_test.jsonl)."""
    paths = {(r.get("data") or "").split()[0] for r in evals if r.get("data")}
    names: dict[str, set] = {}
    for p in paths:
        names.setdefault(Path(p).name, set()).add(p)
    return {p: Path(p).name if len(names[Path(p).name]) == 1 else f"{Path(p).parent.name}/{Path(p).name}"
            for p in paths}


def _headline(rec: dict, labels: dict[str, str] | None = None) -> dict:
    """{column name: value} of an evaluation record's main metrics."""
    task, data, m = rec.get("task", "?"), rec.get("data") or "", rec["metrics"]
    names = HEADLINE.get(task) or [k for k, v in m.items() if isinstance(v, (int, float)) and k != "n"]
    path = data.split()[0] if data else ""
    where = f" ({(labels or {}).get(path) or Path(path).name})" if data else ""
    return {(task if k == task.replace("-", "_") else f"{task} {k}") + where: m[k]
            for k in names if isinstance(m.get(k), (int, float))}


# ------------------------------------------------------------------------------------------------ rendering


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool) or isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}" if abs(v) >= 1e4 else f"{v:.4f}"
    return str(v).replace("|", "\\|")


def _si(n) -> str:
    if n is None:
        return "–"
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]


def _facts(final: Stage, stages: list[Stage]) -> list[list]:
    import torch

    from llmctl.hf import load_config
    from llmctl.model import Transformer

    cfg = load_config(final.model_dir)
    hf_cfg = json.loads((final.model_dir / "config.json").read_text(encoding="utf-8"))
    with torch.device("meta"):
        model = Transformer(cfg)
    heads = f"{cfg.n_head} ({cfg.n_kv_head} key/value)" if cfg.n_kv_head != cfg.n_head else str(cfg.n_head)
    known = [s.tokens for s in stages if s.tokens is not None]
    per_stage = " + ".join(f"{s.kind} {_si(s.tokens)}" for s in stages if s.tokens is not None)
    return [
        ["checkpoint", f"`{final.model_dir}`"],
        ["architecture", f"{cfg.arch} ({', '.join(hf_cfg.get('architectures') or ['?'])})"],
        ["parameters", f"{_si(model.num_params())} ({_si(model.num_params(exclude_embeddings=True))} "
                       "without embeddings)"],
        ["layers / heads / width", f"{cfg.n_layer} / {heads} / {cfg.n_embd}"],
        ["context (block_size)", f"{cfg.block_size:,}"],
        ["vocabulary", f"{cfg.vocab_size:,}"],
        ["tokens seen", f"{_si(sum(known))}" + (f" ({per_stage})" if len(known) > 1 else "") if known else "–"],
    ]  # fmt: skip


def plot_curves(stages: list[Stage], path: Path) -> tuple | None:
    """Training loss and val bpb against tokens seen over the lineage -> PNG; returns the axes' (x, y) labels,
    or None when no stage has metrics. The labels are also stored in the PNG's text chunk "Axes"."""
    import numpy as np

    series, offset = [], 0
    for st in stages:
        train = [(e["step"], e["tokens"], e["loss"]) for e in st.events if {"loss", "tokens"} <= e.keys()]
        evals = [(e["step"], e.get("val_bpb")) for e in st.events if e.get("val_bpb") is not None]
        if train or evals:
            steps = np.array([0] + [s for s, _, _ in train], dtype=float)
            toks = np.array([0] + [t for _, t, _ in train], dtype=float)
            val = [(offset + float(np.interp(s, steps, toks)), v) for s, v in evals]
            series.append((st, [(offset + t, loss) for _, t, loss in train], val))
        offset += st.tokens or (train[-1][1] if train else 0)
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    for ax, which, (xl, yl) in zip(axes, (1, 2), AXES):
        for st, train, val in series:
            pts = train if which == 1 else val
            if pts:
                ax.plot(*zip(*pts), marker="" if which == 1 and len(pts) > 20 else "o", ms=3,
                        label=f"{st.name} ({st.kind})")  # fmt: skip
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("llmctl report: " + " -> ".join(s.name for s in stages))
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, format="png", metadata={"Software": "llmctl", "Axes": json.dumps(AXES)})
    plt.close(fig)
    os.replace(tmp, path)
    return AXES


def write_report(model, report_dir) -> dict:
    """Write DIR/report.md (and DIR/curves.png when there are metrics); returns {"report", "png", "stages"}."""
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    stages = lineage(model)
    final = stages[-1]
    evals = read_evals(out)
    png = out / "curves.png"
    try:
        axes = plot_curves(stages, png)
    except ImportError:
        axes = None
        import sys

        print("warning: matplotlib is not installed (pip install 'llmctl[report]'): no curves.png", file=sys.stderr)
    from llmctl import __version__

    md = [f"# llmctl report: {final.name}", "",
          f"Written by llmctl {__version__} on {datetime.date.today().isoformat()} for `{model}`.", "",
          "## Model", ""]  # fmt: skip
    md += _table(["", ""], _facts(final, stages)) + [""]

    by_model: dict[str, dict] = {}
    labels = _data_labels(evals)
    for r in evals:
        by_model.setdefault(str(Path(r.get("model", "")).resolve()), {}).update(_headline(r, labels))
    cols = sorted({k for s in stages for k in by_model.get(str(s.model_dir.resolve()), {})})
    md += ["## Stages", "", f"{len(stages)} stage(s), oldest first: " + " → ".join(s.name for s in stages), ""]
    rows = []
    for i, s in enumerate(stages, 1):
        ev = by_model.get(str(s.model_dir.resolve()), {})
        rows.append([i, s.name, s.kind, f"`{s.model_dir}`", s.step, s.tokens, s.last("loss"), s.last("val_loss"),
                     s.last("val_bpb")] + [ev.get(c) for c in cols])  # fmt: skip
    md += _table(["#", "stage", "kind", "checkpoint", "steps", "tokens", "train loss", "val loss", "val bpb"] + cols,
                 rows) + [""]  # fmt: skip
    if evals:
        md += ["## Evaluations", ""]
        rows = [[r.get("time", ""), f"`{r.get('model')}`", r.get("task"), r.get("data") or "–",
                 ", ".join(f"{k} {_fmt(v)}" for k, v in r["metrics"].items() if isinstance(v, (int, float)))]
                for r in evals]  # fmt: skip
        md += _table(["time", "model", "task", "data", "metrics"], rows) + [""]
    md += ["## Curves", ""]
    md += ([f"![training loss and validation bits per byte]({png.name})", ""] if axes else
           ["No curves: no stage has metrics.jsonl events (or matplotlib is missing).", ""])
    recipes = [s for s in stages if s.config]
    if recipes:
        import yaml

        md += ["## Recipes", ""]
        for s in recipes:
            md += [f"<details><summary>{s.name} ({s.kind}): <code>{s.run_dir / 'config.yaml'}</code></summary>", "",
                   "```yaml", yaml.safe_dump(s.config, sort_keys=False).rstrip(), "```", "", "</details>", ""]
    atomic_write(out / "report.md", "\n".join(md))
    return {"report": str(out / "report.md"), "png": str(png) if axes else None,
            "stages": [s.name for s in stages], "axes": axes}
