"""CPU threads: how many, how they wait, and backing off when a neighbour takes a core.

PyTorch's CPU kernels, MKL, oneDNN and llmctl's native kernels share one OpenMP runtime (libgomp), so one thread
count governs them all. Left alone, libgomp runs one thread per CPU of the affinity mask, whose threads spin
between parallel regions; when another process holds one of the cores, every region waits for a descheduled
thread and a training step slows 3-60x. llmctl's policy, applied before torch is imported (`setup`, from the CLI's
root callback) and during training (`training_controller`, one call per step from loop.train):

- the thread count: the CPUs this process may use (its affinity mask, capped by a cgroup CPU quota), divided by
  the local world size under a multi-process launcher that did not choose one;
- in training on CPU, a controller that watches step times and the CPU time other processes take on those CPUs:
  when a neighbour shows up (or steps slow down), it tries fewer threads for a few steps and keeps them if steps
  are faster, and tries all of them again when the neighbour goes (or steps speed up).

`llmctl --threads N` (or a recipe's `train.threads`, or OMP_NUM_THREADS in the environment, in that order) fixes
the count: no controller. The user's own OMP_WAIT_POLICY / GOMP_SPINCOUNT are never touched.
LLMCTL_THREAD_POLICY=off restores PyTorch's defaults exactly (an explicit count still applies).
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from collections import deque
from typing import Callable, Mapping, MutableMapping, Optional

POLICY_ENV = "LLMCTL_THREAD_POLICY"  # off / 0 / false / no: PyTorch's defaults
_OFF = ("off", "0", "false", "no")

# What setup() decided, for training_controller() later in the same process.
_state: dict = {"cli_threads": None, "set_env": {}}


def policy_enabled(environ: Mapping[str, str] = os.environ) -> bool:
    return environ.get(POLICY_ENV, "on").strip().lower() not in _OFF


def cgroup_cpu_limit(root: str = "/sys/fs/cgroup") -> Optional[float]:
    """The CPU quota of this process's cgroup in CPUs (cgroup v2 cpu.max, else v1 cfs quota), None if none."""
    try:
        quota, period = open(os.path.join(root, "cpu.max")).read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(open(os.path.join(root, "cpu", "cpu.cfs_quota_us")).read())
        period = int(open(os.path.join(root, "cpu", "cpu.cfs_period_us")).read())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def affinity_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def policy_threads(environ: Mapping[str, str] = os.environ, cpus: Optional[int] = None,
                   quota: Optional[float] = -1.0) -> int:
    """The thread count of the policy: usable CPUs (affinity, capped by the cgroup quota rounded up), divided by
    LOCAL_WORLD_SIZE when a launcher runs several processes here; at least 1."""
    n = affinity_cpus() if cpus is None else cpus
    q = cgroup_cpu_limit() if quota == -1.0 else quota
    if q is not None and q > 0:
        n = min(n, max(1, math.ceil(q - 1e-9)))
    try:
        local = int(environ.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError:
        local = 1
    return max(1, n // max(1, local))


def setup(threads: Optional[int] = None, environ: MutableMapping[str, str] = os.environ) -> Optional[int]:
    """Choose the thread count before OpenMP starts (call before torch is imported; if it already is, the count is
    still applied through torch.set_num_threads). threads: `--threads` (None: not given). Sets OMP_NUM_THREADS
    only when it differs from OpenMP's own default (the affinity mask) or was asked for; returns the count set,
    None when left to OpenMP/PyTorch."""
    _state["cli_threads"] = threads
    _state["set_env"] = {}
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be at least 1, got {threads}")
        n = threads
    elif not policy_enabled(environ) or environ.get("OMP_NUM_THREADS"):
        return None
    else:
        n = policy_threads(environ)
        if n == affinity_cpus():
            return None  # OpenMP's default already; leave the variable unset (children stay on the policy)
    environ["OMP_NUM_THREADS"] = str(n)
    _state["set_env"]["OMP_NUM_THREADS"] = str(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    return n


def _user_omp_threads(environ: Mapping[str, str]) -> bool:
    v = environ.get("OMP_NUM_THREADS")
    return bool(v) and v != _state["set_env"].get("OMP_NUM_THREADS")


# ------------------------------------------------------------------------------------------- the controller


def _median(xs) -> float:
    return statistics.median(xs)


class OthersMeter:
    """The CPUs other tasks used on this process's CPUs since the last call (in CPUs, e.g. 1.0 for one busy
    neighbour): their busy + steal time in /proc/stat, less this process's own CPU time (/proc/self/stat)."""

    def __init__(self, cpus=None, proc: str = "/proc", min_ticks: int = 50, clock=time.monotonic):
        self.proc, self.min_ticks = proc, min_ticks  # a window of at least min_ticks clock ticks (0.5 s at 100 Hz)
        self.cpus = set(os.sched_getaffinity(0)) if cpus is None else set(cpus)
        self.min_s, self.clock = min_ticks / (os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100), clock
        self._last, self._opened = self._read(), clock()
        self._value: Optional[float] = None

    def _read(self) -> tuple[int, int, int]:
        busy = total = 0
        with open(os.path.join(self.proc, "stat")) as f:
            for line in f:
                if not line.startswith("cpu") or line[3] == " ":
                    continue
                name, *vals = line.split()
                if int(name[3:]) not in self.cpus:
                    continue
                v = [int(x) for x in vals[:8]] + [0] * (8 - len(vals[:8]))
                user, nice, system, idle, iowait, irq, softirq, steal = v
                busy += user + nice + system + irq + softirq + steal
                total += user + nice + system + idle + iowait + irq + softirq + steal
        with open(os.path.join(self.proc, "self", "stat")) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        own = int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of proc(5))
        return busy, total, own

    def __call__(self, restart: bool = False) -> Optional[float]:
        """Others' CPUs over the window since the last reading that closed one (a window closes once it spans
        min_ticks; until then the last value is returned). restart: open a new window now, return None."""
        if not restart and self.clock() - self._opened < self.min_s:
            return self._value  # too early to close the window: spare the reads (~0.1 ms)
        now = self._read()
        if restart:
            self._last, self._value, self._opened = now, None, self.clock()
            return None
        (b0, t0, o0), (b1, t1, o1) = self._last, now
        per_cpu = (t1 - t0) / max(1, len(self.cpus))  # elapsed ticks
        if per_cpu >= self.min_ticks:
            self._last, self._opened = now, self.clock()
            self._value = max(0.0, ((b1 - b0) - (o1 - o0)) / per_cpu)
        return self._value


class Controller:
    """Chooses the thread count of a CPU training run step by step (see the module docstring).

    The loop calls begin() before a step and end(units) after it (units: the step's tokens). After `warmup`
    steps, the median time per unit over the last `window` steps is the baseline at the current count. A probe
    runs `probe_steps` steps at another count and keeps it when their median is `margin` faster; it starts when
    the cool-down has passed and (at full count) other processes used at least `busy` CPUs or steps slowed by
    `drift`, or (at fewer threads) other processes left room for more threads or steps sped up by `drift`. A
    probe that changes nothing doubles the cool-down (up to `max_gap` steps); one that switches resets it.
    When other processes already use `busy` CPUs before the first step (the meter's window opens when the
    controller is made, so it spans the run's set-up), the run starts at fewer threads at once -- a contended
    step can take 6x longer -- and a probe of the full count after the first baseline checks that choice.
    Without a CPU meter, one probe runs after the first baseline.
    """

    def __init__(self, n_full: int, set_threads: Callable[[int], None], others: Optional[Callable] = None,
                 clock: Callable[[], float] = time.perf_counter, warmup: int = 1, window: int = 3,
                 probe_steps: int = 2, margin: float = 0.1, drift: float = 0.3, busy: float = 0.5,
                 gap: int = 3, max_gap: int = 400):
        self.n_full = self.n = n_full
        self.set_threads, self.others, self.clock = set_threads, others, clock
        self.warmup, self.window, self.probe_steps = warmup, window, probe_steps
        self.margin, self.drift, self.busy, self.min_gap, self.max_gap = margin, drift, busy, gap, max_gap
        self.gap = gap
        self.recent: deque = deque(maxlen=window)
        self.base: Optional[float] = None
        self.probe: Optional[list] = None
        self.alt = n_full
        self.steps = self.since = 0
        self.probed = self.verify = False
        self.pending: Optional[str] = None
        self.switches: list[tuple[int, int, int]] = []  # (step, from, to)
        self._t0: Optional[float] = None

    def begin(self) -> None:
        if self.steps == 0 and self._t0 is None and self.others is not None and not self.switches:
            used = self.others()  # the window since the controller was made
            if used is not None and used >= self.busy:
                self.n, self.verify = self._fewer(used), True
                self.set_threads(self.n)
                self.switches.append((0, self.n_full, self.n))
                self.pending = f"threads: {self.n_full} -> {self.n} (other processes use {used:.1f} CPUs)"
        self._t0 = self.clock()

    def _fewer(self, used: float) -> int:
        return max(1, self.n_full - max(1, round(used)))

    def end(self, units: float) -> Optional[str]:
        """Record a step; returns a message when the thread count changed."""
        if self._t0 is None:
            return None
        dt, self._t0 = self.clock() - self._t0, None
        self.steps += 1
        msg, self.pending = self.pending, None
        if self.steps <= self.warmup:
            if self.steps == self.warmup and self.others is not None:
                self.others(restart=True)  # the meter's window starts after the warm-up
            return msg
        return self.observe(dt / max(float(units), 1.0)) or msg

    def observe(self, x: float) -> Optional[str]:
        if self.probe is not None:
            return self._probe_step(x)
        self.recent.append(x)
        self.since += 1
        if len(self.recent) < self.window:
            return None
        m = _median(self.recent)
        if self.base is None:
            self.base = m
        if self.since < self.gap:
            return None
        alt = self._wanted(m)
        if alt is not None and alt != self.n:
            self.alt, self.probe, self.probed = alt, [], True
            self.set_threads(alt)
        return None

    def _wanted(self, m: float) -> Optional[int]:
        """The count to probe now, or None."""
        used = self.others() if self.others is not None else None
        if self.n == self.n_full:
            if used is not None and used >= self.busy:
                return self._fewer(used)
            if m > self.base * (1 + self.drift) or (self.others is None and not self.probed):
                return max(1, self.n_full // 2)
            return None
        if self.verify or (used is not None and self.n_full - self.n > used + self.busy) \
                or m < self.base * (1 - self.drift):
            self.verify = False
            return self.n_full
        return None

    def _probe_step(self, x: float) -> Optional[str]:
        self.probe.append(x)
        if len(self.probe) < self.probe_steps:
            return None
        p, b = _median(self.probe), _median(self.recent)
        old, msg = self.n, None
        if p < b * (1 - self.margin):
            self.n, self.gap = self.alt, self.min_gap
            self.recent = deque(self.probe, maxlen=self.window)
            self.switches.append((self.steps, old, self.n))
            msg = f"threads: {old} -> {self.n} (steps {b / p:.2f}x faster)"
        else:
            self.set_threads(self.n)
            self.gap = min(self.gap * 2, self.max_gap)
        self.base = _median(self.recent)
        self.probe, self.since = None, 0
        if self.others is not None:
            self.others(restart=True)  # a fresh window for the next decision
        return msg

    def close(self) -> None:
        """Back to the count the run started with."""
        if self.n != self.n_full or self.probe is not None:
            self.set_threads(self.n_full)
            self.n, self.probe = self.n_full, None


def training_controller(recipe_threads: Optional[int], device=None, world: int = 1) -> Optional[Controller]:
    """For loop.train: apply a recipe's train.threads (unless `--threads` was given), and return the controller
    for this run, or None when the count is fixed (--threads, train.threads, OMP_NUM_THREADS, the policy off),
    the run is not on CPU, several processes train, or there is a single thread to begin with."""
    import torch

    if _state["cli_threads"] is not None:
        return None
    if recipe_threads is not None:
        if recipe_threads < 1:
            from llmctl.errors import UserError

            raise UserError(f"train.threads must be at least 1, got {recipe_threads}")
        torch.set_num_threads(recipe_threads)
        return None
    if not policy_enabled() or _user_omp_threads(os.environ) or world > 1:
        return None
    if device is not None and torch.device(device).type != "cpu":
        return None
    n = torch.get_num_threads()
    if n <= 1:
        return None
    try:
        meter: Optional[Callable] = OthersMeter()
    except (OSError, ValueError, IndexError, AttributeError):
        meter = None
    return Controller(n, torch.set_num_threads, meter)
