"""The CPU thread policy (llmctl/threads.py): the count from affinity / cgroup quota / local world size, the
precedence of --threads, train.threads and the environment, the controller's decisions on scripted step times
(no timing measured), the CPU meter on a fake /proc, and the overrides reaching torch in `llmctl` subprocesses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmctl import threads

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_state():
    saved = dict(threads._state)
    yield
    threads._state.clear()
    threads._state.update(saved)


# ------------------------------------------------------------------------------------------- the count


def test_policy_threads_from_affinity_quota_and_local_world():
    assert threads.policy_threads({}, cpus=8, quota=None) == 8
    assert threads.policy_threads({}, cpus=8, quota=2.5) == 3  # a quota of 2.5 CPUs: 3 threads
    assert threads.policy_threads({}, cpus=8, quota=16.0) == 8
    assert threads.policy_threads({}, cpus=2, quota=0.5) == 1
    assert threads.policy_threads({"LOCAL_WORLD_SIZE": "4"}, cpus=8, quota=None) == 2
    assert threads.policy_threads({"LOCAL_WORLD_SIZE": "4"}, cpus=2, quota=None) == 1
    assert threads.policy_threads({"LOCAL_WORLD_SIZE": "x"}, cpus=4, quota=None) == 4


def test_cgroup_quota_v2_and_v1(tmp_path):
    assert threads.cgroup_cpu_limit(str(tmp_path)) is None  # no files: no quota
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_cpu_limit(str(tmp_path)) is None
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert threads.cgroup_cpu_limit(str(tmp_path)) == 1.5
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.cgroup_cpu_limit(str(v1)) is None
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    assert threads.cgroup_cpu_limit(str(v1)) == 3.0


# ------------------------------------------------------------------------------------------- setup precedence


@pytest.fixture
def four_cpus_quota_two(monkeypatch):
    monkeypatch.setattr(threads, "affinity_cpus", lambda: 4)
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda root="": 2.0)


def test_setup_policy_sets_the_count_only_when_it_differs_from_openmps(monkeypatch, four_cpus_quota_two):
    env = {}
    assert threads.setup(None, env) == 2 and env == {"OMP_NUM_THREADS": "2"}
    assert not threads._user_omp_threads(env)  # ours, not the user's: the controller may still run
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda root="": None)
    env = {}
    assert threads.setup(None, env) is None and env == {}  # 4 = the affinity mask: OpenMP's default


def test_setup_precedence(four_cpus_quota_two):
    env = {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "7"}
    assert threads.setup(None, env) is None  # the user's own settings stay
    assert env == {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "7"}
    assert threads._user_omp_threads(env)
    assert threads.setup(1, env) == 1 and env["OMP_NUM_THREADS"] == "1"  # --threads beats the environment
    env = {"LLMCTL_THREAD_POLICY": "off"}
    assert threads.setup(None, env) is None and env == {"LLMCTL_THREAD_POLICY": "off"}  # exactly as before
    assert threads.setup(3, env) == 3 and env["OMP_NUM_THREADS"] == "3"  # an explicit count still applies
    with pytest.raises(ValueError):
        threads.setup(0, {})


def test_training_controller_only_when_the_count_is_free(monkeypatch):
    import torch

    n = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LLMCTL_THREAD_POLICY", raising=False)
    try:
        torch.set_num_threads(2)
        threads._state.update(cli_threads=None, set_env={})
        assert isinstance(threads.training_controller(None, "cpu"), threads.Controller)
        assert threads.training_controller(None, "cpu", world=2) is None
        assert threads.training_controller(None, "cuda") is None
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert threads.training_controller(None, "cpu") is None  # the user's count
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setenv("LLMCTL_THREAD_POLICY", "off")
        assert threads.training_controller(None, "cpu") is None
        assert threads.training_controller(1, "cpu") is None and torch.get_num_threads() == 1  # train.threads
        torch.set_num_threads(2)
        threads._state["cli_threads"] = 2
        assert threads.training_controller(1, "cpu") is None and torch.get_num_threads() == 2  # --threads wins
    finally:
        torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------- the controller


class Script:
    """A fake clock whose steps take `cost[n]` seconds at n threads, and a fake CPU meter."""

    def __init__(self, cost, others=0.0):
        self.cost, self.others_value, self.t, self.n, self.calls = dict(cost), others, 0.0, 2, []

    def clock(self):
        return self.t

    def set_threads(self, n):
        self.n = n
        self.calls.append(n)

    def others(self, restart=False):
        return None if restart else self.others_value

    def steps(self, ctl, k, units=100):
        msgs = []
        for _ in range(k):
            ctl.begin()
            self.t += self.cost[self.n]
            msgs.append(ctl.end(units))
        return [m for m in msgs if m]


def test_controller_quiet_never_probes():
    s = Script({2: 1.0, 1: 1.8})
    ctl = threads.Controller(2, s.set_threads, s.others, clock=s.clock)
    assert s.steps(ctl, 300) == [] and s.calls == [] and ctl.n == 2


def test_controller_backs_off_under_a_neighbour_and_returns():
    s = Script({2: 4.0, 1: 1.8}, others=1.0)  # a neighbour: 2 threads crawl, 1 thread is faster
    ctl = threads.Controller(2, s.set_threads, s.others, clock=s.clock)
    s.others_value = 0.0
    s.steps(ctl, 10)
    s.others_value = 1.0  # it arrives
    msgs = s.steps(ctl, 20)
    assert ctl.n == 1 and s.n == 1 and len(msgs) == 1 and "2 -> 1" in msgs[0] and "faster" in msgs[0]
    assert ctl.switches[0][1:] == (2, 1)
    assert s.steps(ctl, 100) == []  # the neighbour stays (others 1.0): no probe back up
    s.cost, s.others_value = {2: 1.0, 1: 1.8}, 0.0  # it leaves
    msgs = s.steps(ctl, 20)
    assert ctl.n == 2 and s.n == 2 and "1 -> 2" in msgs[0]
    ctl.close()
    assert s.n == 2


def test_controller_starts_low_when_a_neighbour_is_there_and_checks_it():
    s = Script({2: 4.0, 1: 1.8}, others=1.0)
    ctl = threads.Controller(2, s.set_threads, s.others, clock=s.clock)
    msgs = s.steps(ctl, 1)
    assert s.n == 1 and "2 -> 1" in msgs[0] and "other processes" in msgs[0]  # before the first step
    s.steps(ctl, 30)
    assert s.calls[:3] == [1, 2, 1] and ctl.n == 1  # the check of 2 threads lost
    s2 = Script({2: 1.0, 1: 1.8}, others=1.0)  # a niced neighbour, say: 2 threads still win
    ctl = threads.Controller(2, s2.set_threads, s2.others, clock=s2.clock)
    msgs = s2.steps(ctl, 40)
    assert ctl.n == 2 and [sw[1:] for sw in ctl.switches] == [(2, 1), (1, 2)] and "1 -> 2" in msgs[-1]


def test_controller_keeps_the_count_when_the_probe_loses_and_backs_off_probing():
    s = Script({2: 1.0, 1: 1.8}, others=1.0)  # a light neighbour: 2 threads still win
    ctl = threads.Controller(2, s.set_threads, s.others, clock=s.clock, gap=5, max_gap=40)
    s.steps(ctl, 400)
    assert ctl.n == 2 and s.n == 2 and [sw[1:] for sw in ctl.switches] == [(2, 1), (1, 2)]  # started low
    probes = s.calls.count(1)
    assert 3 <= probes <= 400 // 40 + 4  # the cool-down doubles up to max_gap
    assert ctl.gap == 40


def test_controller_slowdown_triggers_a_probe_without_a_meter():
    s = Script({2: 1.0, 1: 1.8})
    ctl = threads.Controller(2, s.set_threads, None, clock=s.clock)
    s.steps(ctl, 30)  # no meter: one probe after the first baseline, which loses
    assert s.calls == [1, 2] and ctl.n == 2
    s.cost = {2: 3.0, 1: 1.8}  # steps slow down 3x at 2 threads
    s.steps(ctl, 30)
    assert ctl.n == 1
    ctl.close()
    assert s.n == 2


def test_others_meter_on_a_fake_proc(tmp_path):
    def write(cpu0, cpu1, own):
        (tmp_path / "stat").write_text(
            "cpu  0 0 0 0 0 0 0 0 0 0\n"
            f"cpu0 {cpu0[0]} 0 0 {cpu0[1]} 0 0 0 0 0 0\n"
            f"cpu1 {cpu1[0]} 0 0 {cpu1[1]} 0 0 0 {cpu1[2]} 0 0\nintr 1 2\n")
        (tmp_path / "self").mkdir(exist_ok=True)
        (tmp_path / "self" / "stat").write_text(f"1 (py thon) R {' '.join(['0'] * 10)} {own} 0 0 0\n")

    now = [0.0]
    write((0, 0), (0, 0, 0), 0)
    m = threads.OthersMeter(cpus={0, 1}, proc=str(tmp_path), min_ticks=50, clock=lambda: now[0])
    write((10, 10), (10, 10, 0), 10)
    assert m() is None  # too early: not even read
    now[0] = 10.0
    assert m() is None  # 20 ticks a CPU: the window stays open
    # 100 ticks a CPU: cpu0 busy 100 (ours 100), cpu1 busy 60 + steal 40 -> others 1.0 CPU
    write((100, 0), (60, 0, 40), 100)
    assert m() == pytest.approx(1.0)
    m(restart=True)
    now[0] = 20.0
    write((200, 0), (60, 100, 40), 200)  # cpu1 idle now
    assert m() == pytest.approx(0.0)


# ------------------------------------------------------------------------------------------- end to end

PROBE = """
import sys
from llmctl import cli

@cli.app.command("probe-threads")
def probe():
    import torch
    print(torch.get_num_threads())

cli.app(sys.argv[1:], standalone_mode=True)
"""


def _env(**kw):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LLMCTL_THREAD_POLICY")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(kw)
    return env


@pytest.mark.parametrize("args,env,want", [
    (["--threads", "1"], {}, 1),
    (["--threads", "1"], {"OMP_NUM_THREADS": "2"}, 1),
    ([], {"OMP_NUM_THREADS": "1"}, 1),
    ([], {"LLMCTL_THREAD_POLICY": "off"}, None),  # torch's default
])
def test_cli_threads_reach_torch(args, env, want):
    r = subprocess.run([sys.executable, "-c", PROBE, *args, "probe-threads"], capture_output=True, text=True,
                       env=_env(**env), cwd=ROOT, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    n = int(r.stdout.split()[-1])
    assert n == (want if want is not None else len(os.sched_getaffinity(0)))


def test_recipe_and_flag_reach_the_training_loop(tmp_path, tok_dir, corpus_file):
    """train.threads sets the count of a real run (its metrics log it); --threads beats train.threads."""
    shards = tmp_path / "shards"
    subprocess.run([sys.executable, "-m", "llmctl", "tokenize", "encode", str(corpus_file), "--tokenizer",
                    str(tok_dir), "--out", str(shards)], env=_env(), cwd=ROOT, check=True, capture_output=True)
    base = ["pretrain", str(ROOT / "recipes/tiny/pretrain.yaml"), f"tokenizer={tok_dir}", f"data.train={shards}",
            "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.n_kv_head=1", "model.block_size=16",
            "train.micro_batch_size=2", "train.max_steps=2", "train.log_every=1", "train.eval_every=0",
            "train.eval_batches=1", "train.save_every=0", "optim.warmup_steps=0"]
    for flags, extra, want in [([], ["train.threads=1"], 1), (["--threads", "2"], ["train.threads=1"], 2)]:
        out = tmp_path / f"run{want}"
        r = subprocess.run([sys.executable, "-m", "llmctl", *flags, *base, f"out_dir={out}", *extra],
                           env=_env(OMP_NUM_THREADS="3"), cwd=ROOT, capture_output=True, text=True)  # fmt: skip
        assert r.returncode == 0, r.stderr
        events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert [e["threads"] for e in events if "loss" in e] == [want, want]
